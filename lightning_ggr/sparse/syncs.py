"""Counting host-device synchronisations and operations, for the benchmarks and the tests.

Under ``torch.cuda.set_sync_debug_mode("warn")`` every synchronising CUDA call made by
PyTorch raises a warning ``"called a synchronizing CUDA operation"``. The first time the mode
is switched on in a process, PyTorch also warns once that the mode is "a prototype feature and
does not yet detect all synchronizing operations": that notice is not a synchronisation (an
H100 run on 2026-11-26 counted it as one against the per-step pass), so only the first message
counts here.

``torch.profiler`` adds one ``cudaDeviceSynchronize`` of its own when a profile with CUDA
activity stops; :func:`profiler_own_syncs` measures it so that counts taken from a profile can
subtract it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

#: The text of PyTorch's warning for one synchronising CUDA call (c10/cuda/CUDAFunctions.cpp).
SYNC_WARNING = "called a synchronizing CUDA operation"
#: Profiler events that block the host until the device has finished.
CUDA_SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def is_sync_warning(message: object) -> bool:
    """Whether a warning raised under the sync debug mode reports a synchronisation (and not
    the mode's one-time "prototype feature" notice)."""
    return SYNC_WARNING in str(message)


def count_cuda_syncs(fn: Callable[[], object]) -> int:
    """Synchronising CUDA calls made by ``fn``, counted with
    ``torch.cuda.set_sync_debug_mode("warn")``. Needs CUDA."""
    if not torch.cuda.is_available():
        raise RuntimeError("count_cuda_syncs needs a CUDA device")
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(1 for w in caught if is_sync_warning(w.message))


def profile_sync_events(events) -> int:
    """Synchronising CUDA runtime calls among ``torch.profiler`` events."""
    return sum(1 for event in events if event.name in CUDA_SYNC_EVENTS)


def top_level_operations(events) -> list[str]:
    """Names of the aten operations among ``torch.profiler`` events that no other aten
    operation called: what the code asked for, not how aten carried it out."""
    names = []
    for event in events:
        if not event.name.startswith("aten::"):
            continue
        parent = event.cpu_parent
        while parent is not None and not parent.name.startswith("aten::"):
            parent = parent.cpu_parent
        if parent is None:
            names.append(event.name)
    return names


def profiler_own_syncs(device: torch.device) -> int:
    """Synchronisations a profile of nothing records on ``device`` (CUDA: the profiler's own
    ``cudaDeviceSynchronize`` at its stop); 0 elsewhere."""
    if torch.device(device).type != "cuda":
        return 0
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        pass
    return profile_sync_events(prof.events())
