"""The synchronisation counters of the benchmarks and GPU tests (lightning_ggr.sparse.syncs)."""

from __future__ import annotations

import pytest
import torch

from lightning_ggr.sparse.syncs import (
    CUDA_SYNC_EVENTS,
    is_sync_warning,
    profile_sync_events,
    profiler_own_syncs,
)


def test_only_a_synchronising_call_counts_not_the_modes_prototype_notice():
    # Both texts as PyTorch 2.11 prints them; the notice was once counted as a sync.
    assert is_sync_warning("called a synchronizing CUDA operation (Triggered internally at "
                           "/pytorch/c10/cuda/CUDAFunctions.cpp:170.)")
    assert not is_sync_warning("Synchronization debug mode is a prototype feature and does "
                               "not yet detect all synchronizing operations")


def test_profile_sync_events_counts_the_blocking_runtime_calls():
    class Event:
        def __init__(self, name):
            self.name = name

    events = [Event(n) for n in (*CUDA_SYNC_EVENTS, "cudaLaunchKernel", "aten::mul_")]
    assert profile_sync_events(events) == len(CUDA_SYNC_EVENTS)


def test_a_cpu_profile_has_no_synchronisation_of_its_own():
    assert profiler_own_syncs(torch.device("cpu")) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_profilers_own_synchronisation_is_measured_on_cuda():
    # H100, torch 2.11: a profile of nothing records one cudaDeviceSynchronize at its stop.
    assert profiler_own_syncs(torch.device("cuda")) >= 1
