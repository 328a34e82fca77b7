"""The engine on a GPU (skipped without one): masks drawn there, the per-step pass and every
rewiring without synchronisations beyond the documented ones, invariants kept."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_ggr.sparse import METHODS, SparseEngine, select_sparse_parameters
from lightning_ggr.sparse.syncs import count_cuda_syncs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def cuda_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(16 * 8 * 8, 10),
    ).cuda()


syncs = count_cuda_syncs


def backward(model: nn.Module) -> None:
    x = torch.randn(4, 3, 8, 8, device="cuda")
    model(x).square().sum().backward()


def test_masks_are_drawn_on_the_gpu_and_reproducible():
    engines = [SparseEngine(select_sparse_parameters(cuda_net()), sparsity=0.9, seed=3)
               for _ in range(2)]
    for name, mask in engines[0].masks.items():
        assert mask.is_cuda and torch.equal(mask, engines[1].masks[name])
        assert int(mask.sum()) == engines[0].initial_counts[name]


def test_the_per_step_pass_never_synchronises_and_is_exact():
    model = cuda_net()
    engine = SparseEngine(select_sparse_parameters(model), sparsity=0.9, seed=0)
    backward(model)
    for param in engine.params.values():
        param.grad.fill_(float("nan"))
    assert syncs(engine.mask_gradients) == 0
    for name, param in engine.params.items():
        assert (param.grad[~engine.masks[name]] == 0).all()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_rewiring_on_the_gpu_keeps_the_invariants_with_few_syncs(method):
    model = cuda_net()
    engine = SparseEngine(select_sparse_parameters(model), sparsity=0.8, method=method, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    backward(model)
    engine.mask_gradients()  # as a training step does before the optimizer's
    optimizer.step()
    engine.rewire(0.3, [optimizer])  # DSR's first threshold
    backward(model)
    total = engine.total_active
    assert syncs(engine.gradients_usable) == 1  # the due step's one check of the gradients
    count = syncs(lambda: engine.rewire(0.3, [optimizer]))
    data_dependent = METHODS[method].allocation == "gradient" or METHODS[method].removal == (
        "threshold")
    assert count == (1 if data_dependent else 0), count
    assert engine.total_active == total
    for name, param in engine.params.items():
        mask = engine.masks[name]
        assert int(mask.sum()) == engine.active_counts()[name]
        assert (param.detach()[~mask] == 0).all()
        momentum = optimizer.state[param]["momentum_buffer"]
        assert (momentum[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_to_inference_on_cuda_computes_the_masked_model(dtype):
    """The CSR path through cuSPARSE (torch.sparse on CUDA): whatever the timing picks, the
    converted model equals the masked one; forced sparse, SparseLinear/SparseConv2d do too."""
    from lightning_ggr import to_inference
    from lightning_ggr.sparse.inference import SparseConv2d, SparseLinear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 64, 512), nn.ReLU(), nn.Linear(512, 10)).cuda().to(dtype)
    masks = {name: torch.rand(p.shape, device="cuda") < 0.05
             for name, p in model.named_parameters() if p.dim() > 1}
    x = torch.randn(4, 3, 8, 8, device="cuda", dtype=dtype)
    converted = to_inference(model, masks, x)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    tolerance = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {}
    with torch.inference_mode():
        torch.testing.assert_close(converted(x), model.eval()(x), **tolerance)
        conv = SparseConv2d.from_dense(model[0], masks["0.weight"])
        torch.testing.assert_close(conv(x), model[0](x), **tolerance)
        linear = SparseLinear.from_dense(model[3], masks["3.weight"])
        hidden = torch.randn(4, 16 * 64, device="cuda", dtype=dtype)
        torch.testing.assert_close(linear(hidden), model[3](hidden), **tolerance)
    assert converted.inference_report.device.startswith("cuda")
