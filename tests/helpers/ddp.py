"""A ``ddp_spawn`` strategy for tests whose ranks exit cleanly.

Lightning never destroys a gloo process group (it registers ``destroy_process_group`` at
exit for NCCL only), so each spawned rank used to finalize Python with the group alive. The
group's worker thread drops its last collective (the tests' ``all_gather`` in
``on_train_end``) *after* the main thread has returned from it; in torch 2.14 dropping a
tensor that Python also saw takes the GIL. When the main thread had already started
finalizing, the worker's ``take_gil`` ended the thread with ``pthread_exit`` inside the
``noexcept`` destructor ``~AsyncAllgatherWork`` -> ``std::terminate`` ("terminate called
without an active exception") -> SIGABRT, one run in five on a busy 2-core machine.
Destroying the group at the end of the fit joins its worker threads while the interpreter
is whole.
"""

from __future__ import annotations

from datetime import timedelta

import torch
from lightning.pytorch.strategies import DDPStrategy


class SpawnedDDPStrategy(DDPStrategy):
    """``DDPStrategy(start_method="spawn")`` whose ranks destroy their process group when
    the fit ends (after every collective of the run: the strategy's teardown runs after
    ``on_train_end``; nothing here uses collectives in ``on_fit_end`` or ``teardown``)."""

    def teardown(self) -> None:
        super().teardown()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def spawned_ddp(timeout: timedelta) -> SpawnedDDPStrategy:
    """The tests' multi-process strategy: spawned CPU ranks over gloo, with a short
    collective ``timeout`` so that a failing rank fails the test fast."""
    return SpawnedDDPStrategy(start_method="spawn", timeout=timeout)
