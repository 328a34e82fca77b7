"""The engine on a GPU (skipped without one): masks drawn there, the per-step pass and every
rewiring without synchronisations beyond the documented ones, invariants kept."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_ggr.sparse import METHODS, SparseEngine, select_sparse_parameters

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 10),
    ).cuda()


def syncs(fn) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum(1 for w in caught if "synchroniz" in str(w.message))


def backward(model: nn.Module) -> None:
    x = torch.randn(4, 3, 8, 8, device="cuda")
    model(x).square().sum().backward()


def test_masks_are_drawn_on_the_gpu_and_reproducible():
    engines = [SparseEngine(select_sparse_parameters(cuda_net()), sparsity=0.9, seed=3)
               for _ in range(2)]
    for name, mask in engines[0].masks.items():
        assert mask.is_cuda and torch.equal(mask, engines[1].masks[name])
        assert int(mask.sum()) == engines[0].initial_counts[name]


@pytest.mark.xfail(strict=True, reason="measured on an H100 (2026-11-26): one synchronisation "
                   "per pass, source not found yet (benchmarks/sync_sites.py prints the line); "
                   "see docs/benchmarks.md")
def test_the_per_step_pass_never_synchronises_and_is_exact():
    model = cuda_net()
    engine = SparseEngine(select_sparse_parameters(model), sparsity=0.9, seed=0)
    backward(model)
    for param in engine.params.values():
        param.grad.fill_(float("nan"))
    assert syncs(engine.mask_gradients) == 0
    for name, param in engine.params.items():
        assert (param.grad[~engine.masks[name]] == 0).all()


@pytest.mark.xfail(strict=False, reason="measured on an H100 (2026-11-26) before the fix: 15-107 "
                   "CUDA synchronisations per rewiring (item assignment of Python numbers, one "
                   ".cpu() per layer in gradients_usable); the fix is not re-measured on a GPU "
                   "yet: run benchmarks/sync_sites.py and make this strict or drop it")
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_rewiring_on_the_gpu_keeps_the_invariants_with_few_syncs(method):
    model = cuda_net()
    engine = SparseEngine(select_sparse_parameters(model), sparsity=0.8, method=method, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    backward(model)
    optimizer.step()
    engine.rewire(0.3, [optimizer])  # DSR's first threshold
    backward(model)
    total = engine.total_active
    count = syncs(lambda: engine.rewire(0.3, [optimizer]))
    data_dependent = METHODS[method].allocation == "gradient" or METHODS[method].removal == (
        "threshold")
    assert count <= (1 if data_dependent else 0), count
    assert engine.total_active == total
    for name, param in engine.params.items():
        mask = engine.masks[name]
        assert int(mask.sum()) == engine.active_counts()[name]
        assert (param.detach()[~mask] == 0).all()
        momentum = optimizer.state[param]["momentum_buffer"]
        assert (momentum[~mask] == 0).all()
