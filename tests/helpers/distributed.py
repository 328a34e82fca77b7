"""Process groups for tests: one process in-process, or several spawned (gloo, CPU).

A spawned worker asserts what it checks (a failed assertion fails the spawn, hence the
test) and rank 0 writes a small JSON record that the test reads, to prove the checks ran.
Rendezvous through a file: no network port to race for with other test processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: A failing rank must fail the test fast, not leave the others waiting 30 minutes.
COLLECTIVE_TIMEOUT = timedelta(seconds=60)


@contextlib.contextmanager
def one_process_group() -> Iterator[None]:
    """A gloo group of this process alone (world size 1), destroyed on exit."""
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=0,
                                world_size=1, timeout=COLLECTIVE_TIMEOUT)
        try:
            yield
        finally:
            dist.destroy_process_group()


def exit_spawned_rank() -> None:
    """End a spawned rank that succeeded without finalizing the interpreter.

    After a run with FSDP2's DTensors, a gloo rank sometimes aborts in interpreter
    finalization (``terminate called without an active exception``, SIGABRT, the main
    thread with no Python frame left: about one run in three here, at the first FSDP2
    commits), after every check and after ``destroy_process_group``. Its cause was the
    tests' own: ``DTensor.full_tensor()`` returns an all-gather still pending, which a rank
    that never read it left to the process group's thread until interpreter shutdown
    (``tests.helpers.sharded.full`` now waits for it; the package's collectives are
    synchronous). Not reproduced since (2026-12-07, normal exit: 0 aborts in 27 engine
    spawns of ``tests/sparse/test_sharded.py``, 7 Lightning tests of
    ``test_sharded_training.py``, 6 fits of a script); kept as a guard. A rank whose work is
    done and recorded exits with status 0 at once; a failing rank still raises
    (``mp.spawn`` reports it)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run(rank: int, world: int, store: str, record: str, fn: Callable[..., Any],
         args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world, timeout=COLLECTIVE_TIMEOUT)
    try:
        result = fn(rank, world, *args)
        if rank == 0:
            Path(record).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()
    exit_spawned_rank()


def spawn(fn: Callable[..., Any], *args: Any, world: int = 2, folder: Path) -> Any:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes joined by a gloo group;
    return what rank 0 returned (JSON)."""
    record = folder / "record.json"
    mp.spawn(_run, args=(world, str(folder / "store"), str(record), fn, args), nprocs=world,
             join=True)
    return json.loads(record.read_text())
