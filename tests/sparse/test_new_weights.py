"""What a grown weight starts from (issue 12): its first step, a weight dropped and regrown in
the same rewiring, DSR's first threshold; and non-finite weights (issue 10, item 9)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_ggr.sparse import METHODS, SparseEngine
from lightning_ggr.sparse.rewiring import ThresholdRemoval, initial_threshold
from tests.helpers.marks import REWIRES_WITHOUT_OPTIMIZER

INIT = 1e-10


def one_layer(seed: int = 0, shape=(8, 16)):
    generator = torch.Generator().manual_seed(seed)
    weight = nn.Parameter(torch.randn(shape, generator=generator))
    return {"w": weight}, generator


def train_step(engine, params, optimizer, generator, rewire_at=None):
    """One step: fresh gradients, maybe a rewiring first (as before_optimizer_step does),
    masked gradients, the optimizer step."""
    for param in params.values():
        param.grad = torch.randn(param.shape, generator=generator)
    report = None
    if rewire_at is not None:
        report = engine.rewire(rewire_at, [optimizer])
    engine.mask_gradients()
    optimizer.step()
    engine.after_optimizer_step([optimizer])
    return report


@pytest.mark.parametrize("method", ["rigl", "ggr", "set"])
@pytest.mark.parametrize("update_grown_weights", [False, True])
def test_a_grown_weight_starts_its_next_step_at_init_value(method, update_grown_weights):
    params, generator = one_layer()
    engine = SparseEngine(params, sparsity=0.75, method=method, init_value=INIT,
                          update_grown_weights=update_grown_weights, reinit_regrown=True)
    optimizer = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9)
    train_step(engine, params, optimizer, generator)  # momentum everywhere active
    before = engine.masks["w"].clone()
    train_step(engine, params, optimizer, generator, rewire_at=0.5)
    new = engine.masks["w"] & ~before
    assert new.any()
    weight = params["w"].detach()[new]
    if update_grown_weights:  # today's behaviour: the rewiring step moved them, -lr * g
        assert not torch.equal(weight, torch.full_like(weight, INIT))
    else:  # RigL's reference: no update on the mask-update step
        assert torch.equal(weight, torch.full_like(weight, INIT))
        momentum = optimizer.state[params["w"]]["momentum_buffer"][new]
        assert (momentum == 0).all()


def test_with_weight_decay_a_grown_weight_only_decays():
    """The gradient is zeroed, weight decay is not: SGD leaves init_value * (1 - lr * wd)."""
    params, generator = one_layer()
    engine = SparseEngine(params, sparsity=0.75, method="rigl", init_value=1e-3,
                          reinit_regrown=True)
    optimizer = torch.optim.SGD(params.values(), lr=0.1, momentum=0.9, weight_decay=0.01)
    train_step(engine, params, optimizer, generator)
    before = engine.masks["w"].clone()
    train_step(engine, params, optimizer, generator, rewire_at=0.5)
    new = engine.masks["w"] & ~before
    expected = torch.full((int(new.sum()),), 1e-3) * (1 - 0.1 * 0.01)
    torch.testing.assert_close(params["w"].detach()[new], expected, rtol=1e-6, atol=0)


def regrown_setup(reinit_regrown: bool):
    """RigL on one row: the weakest active weight holds the largest gradient, so a rewiring
    drops it and grows it back at once."""
    weight = nn.Parameter(torch.tensor([[0.01, 0.5, 0.6, 0.7, 0.0, 0.0, 0.0, 0.0]]))
    mask = weight.detach() != 0
    engine = SparseEngine({"w": weight}, sparsity=0.5, method="rigl", masks={"w": mask},
                          init_value=INIT, reinit_regrown=reinit_regrown)
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    weight.grad = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    optimizer.step()
    with torch.no_grad():
        weight.copy_(torch.tensor([[0.01, 0.5, 0.6, 0.7, 0.0, 0.0, 0.0, 0.0]]))
    weight.grad = torch.tensor([[9.0, 0.0, 0.0, 0.0, 0.1, 0.2, 0.3, 0.4]])
    report = engine.rewire(0.25, [optimizer])
    return weight, engine, optimizer, report


def test_a_weight_dropped_and_regrown_keeps_its_value_and_momentum_by_default():
    weight, engine, optimizer, report = regrown_setup(reinit_regrown=False)
    assert report.removed == {"w": 1} and report.grown == {"w": 1}
    assert engine.masks["w"][0, 0]  # dropped and regrown
    assert weight[0, 0].item() == pytest.approx(0.01)
    assert optimizer.state[weight]["momentum_buffer"][0, 0].item() == pytest.approx(1.0)
    assert weight.grad[0, 0].item() == 9.0  # updated as if it had never left


def test_a_weight_dropped_and_regrown_restarts_with_reinit_regrown():
    weight, engine, optimizer, _ = regrown_setup(reinit_regrown=True)
    assert engine.masks["w"][0, 0]
    assert weight[0, 0] == torch.tensor(INIT)
    assert optimizer.state[weight]["momentum_buffer"][0, 0].item() == 0.0
    assert weight.grad[0, 0].item() == 0.0


def dsr_engine(**kwargs):
    generator = torch.Generator().manual_seed(0)
    params = {f"l{i}": nn.Parameter(torch.randn(s, generator=generator) * 0.1)
              for i, s in enumerate([(16, 16), (32, 8)])}
    return SparseEngine(params, sparsity=0.5, method="dsr", seed=0, **kwargs), params


@REWIRES_WITHOUT_OPTIMIZER
def test_dsr_starts_its_threshold_at_its_reference_value_by_default():
    engine, _ = dsr_engine()
    assert engine.dsr_initial_threshold == 1e-3
    report = engine.rewire(0.2)
    # H = 1e-3 removed far fewer than K: doubled once, starting from 1e-3.
    assert report.total_removed < 0.9 * round(0.2 * engine.total_active)
    assert report.threshold == 2e-3


@REWIRES_WITHOUT_OPTIMIZER
def test_dsr_starts_from_the_data_when_asked():
    engine, params = dsr_engine(dsr_initial_threshold=None)
    masks = {n: m.clone() for n, m in engine.masks.items()}
    weights = {n: p.detach().clone() for n, p in params.items()}
    target = round(0.2 * engine.total_active)
    start = initial_threshold(weights, masks, target)
    report = engine.rewire(0.2)
    assert abs(report.total_removed - target) <= 1  # the K-th smallest: on target
    assert report.threshold == start


@REWIRES_WITHOUT_OPTIMIZER
def test_dsr_restarts_a_non_finite_threshold():
    engine, _ = dsr_engine()
    engine.load_state_dict({**engine.state_dict(), "threshold": float("nan")})
    report = engine.rewire(0.2)
    assert math.isfinite(report.threshold) and report.threshold > 0


# ------------------------------------------------------------ non-finite active weights
@REWIRES_WITHOUT_OPTIMIZER
@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_active_weights_are_dropped_first_and_counts_kept(method, bad):
    generator = torch.Generator().manual_seed(1)
    params = {"head": nn.Parameter(torch.randn(6, 10, generator=generator)),
              "body": nn.Parameter(torch.randn(10, 10, generator=generator))}
    engine = SparseEngine(params, sparsity=0.5, method=method, seed=0)
    counts = engine.active_counts()
    total = engine.total_active
    with torch.no_grad():  # the unused head blew up: every active weight non-finite but 2
        head = params["head"].detach()
        head[engine.masks["head"]] = bad
        active = engine.masks["head"].nonzero()
        head[tuple(active[:2].T)] = torch.tensor([0.5, -0.7])
    for param in params.values():
        param.grad = torch.randn(param.shape, generator=generator)
    before = engine.masks["head"].clone()
    report = engine.rewire(0.2)
    for name, mask in engine.masks.items():
        assert int(mask.sum()) == report.active[name] == engine.active_counts()[name]
    assert engine.total_active == total
    if not METHODS[method].moves_between_layers:
        assert engine.active_counts() == counts
    # Only formerly active positions were dropped, the non-finite ones first.
    finite_kept = before & torch.isfinite(params["head"].detach()) & (params["head"] != INIT)
    assert int((finite_kept & engine.masks["head"]).sum()) == 2
    assert report.threshold is None or math.isfinite(report.threshold)


def test_dsr_threshold_stays_finite_over_non_finite_weights():
    weights = {"a": torch.tensor([float("nan"), 0.5, float("inf"), 0.1, 0.2, 0.0])}
    masks = {"a": torch.tensor([True, True, True, True, True, False])}
    assert initial_threshold(weights, masks, 2) == pytest.approx(0.2)  # finite ones only
    removal = ThresholdRemoval(initial_threshold=None)
    dropped = removal(weights, masks, 0.4)["a"]
    assert math.isfinite(removal.threshold)
    # NaN and inf go first, then the smallest finite ones below H; never position 5
    assert {0, 2} <= set(dropped.tolist()) and 5 not in dropped.tolist()
