"""Property-based tests of the engine over random layer shapes, sparsities and methods.

Invariants, whatever the draw: masks are boolean and exact (the initial counts add up to the
global target, every layer keeps >= 1 active weight), every rewiring conserves the total
(and, for methods that keep layer densities, every layer's count), weights and optimizer
state are zero wherever masked, a grown weight starts with zero optimizer state, and a
budget too small for one weight per layer is refused with a ValueError rather than
producing an empty layer. All of it holds with non-finite weights or gradients (an unused
head that blew up), under every setting of the new-weight options.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_ggr.sparse import METHODS, SparseEngine, get_method
from lightning_ggr.sparse.densities import DISTRIBUTIONS
from tests.helpers.marks import REWIRES_WITHOUT_OPTIMIZER

shape = st.lists(st.integers(1, 7), min_size=1, max_size=4).map(tuple)
engine_settings = settings(max_examples=80, deadline=None,
                           suppress_health_check=[HealthCheck.too_slow])


def check_invariants(engine: SparseEngine, params: dict[str, nn.Parameter], target: int,
                     optimizer: torch.optim.Optimizer | None = None) -> None:
    assert sum(engine.active_counts().values()) == target
    for name, param in params.items():
        mask = engine.masks[name]
        assert mask.dtype == torch.bool and mask.shape == param.shape
        assert int(mask.sum()) >= 1, f"{name} has an empty mask"
        assert (param.detach()[~mask] == 0).all(), f"{name}: weight not zero where masked"
        if optimizer is not None:
            for value in optimizer.state.get(param, {}).values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    assert (value[~mask] == 0).all(), f"{name}: optimizer state where masked"


@engine_settings
@given(
    shapes=st.lists(shape, min_size=1, max_size=4),
    sparsity=st.one_of(st.floats(0.0, 0.999), st.sampled_from([0.0, 0.9, 0.99, 0.999])),
    method=st.sampled_from(sorted(METHODS)),
    distribution=st.sampled_from(DISTRIBUTIONS),
    drop_fractions=st.lists(st.floats(0.01, 1.0), min_size=1, max_size=3),
    gradient_ratio=st.floats(0.0, 1.0),
    init_value=st.sampled_from([1e-10, 0.0, 0.5]),
    optimizer_name=st.sampled_from(["sgd", "adam"]),
    seed=st.integers(0, 2**31 - 1),
    non_finite=st.sampled_from([None, "nan weights", "inf weights", "nan gradients",
                                "inf gradients"]),
    update_grown_weights=st.booleans(),
    reinit_regrown=st.booleans(),
    dsr_initial_threshold=st.sampled_from([1e-3, None, 10.0]),
)
def test_counts_are_conserved_and_masks_exact(shapes, sparsity, method, distribution,
                                               drop_fractions, gradient_ratio, init_value,
                                               optimizer_name, seed, non_finite,
                                               update_grown_weights, reinit_regrown,
                                               dsr_initial_threshold):
    generator = torch.Generator().manual_seed(seed)
    params = {f"layer{i}.weight": nn.Parameter(torch.randn(s, generator=generator))
              for i, s in enumerate(shapes)}
    total = sum(math.prod(s) for s in shapes)
    target = round((1 - sparsity) * total)
    kwargs = {"sparsity": sparsity, "distribution": distribution, "method": method,
              "gradient_ratio": gradient_ratio, "init_value": init_value, "seed": seed,
              "update_grown_weights": update_grown_weights, "reinit_regrown": reinit_regrown,
              "dsr_initial_threshold": dsr_initial_threshold}
    if target < len(shapes):  # fewer active weights than layers: refused, never an empty layer
        event("budget below one weight per layer: refused")
        with pytest.raises(ValueError, match=r"every layer keeps at least one active weight"):
            SparseEngine(params, **kwargs)
        return

    engine = SparseEngine(params, **kwargs)
    assert engine.active_counts() == engine.initial_counts
    check_invariants(engine, params, target)

    optimizer = (torch.optim.SGD(params.values(), lr=0.1, momentum=0.9, weight_decay=1e-2)
                 if optimizer_name == "sgd" else torch.optim.Adam(params.values(), lr=0.1))
    keeps_layers = get_method(method).allocation == "keep"
    for drop_fraction in drop_fractions:
        # A training step first, so weights move and the optimizer holds state everywhere.
        for param in params.values():
            param.grad = torch.randn(param.shape, generator=generator)
        if non_finite is not None:  # the first layer blew up, at some positions
            event(non_finite)
            first = next(iter(params))
            bad = float("nan") if non_finite.startswith("nan") else float("inf")
            chosen = torch.rand(params[first].shape, generator=generator) < 0.5
            with torch.no_grad():
                if non_finite.endswith("weights"):
                    params[first][chosen & engine.masks[first]] = bad
                else:
                    params[first].grad[chosen] = bad
        before = engine.active_counts()
        weights_before = {n: p.detach().clone() for n, p in params.items()}
        report = engine.rewire(drop_fraction, [optimizer])
        after = engine.active_counts()
        for name, param in params.items():
            # A weight the rewiring set (grown, or dropped and regrown) starts with no state.
            now, then = param.detach(), weights_before[name]
            changed = engine.masks[name] & (now != then) & ~(now.isnan() & then.isnan())
            for value in optimizer.state[param].values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    assert (value[changed] == 0).all(), f"{name}: state kept by a new weight"
        assert report.total_removed == report.total_grown
        assert report.active == after
        assert report.threshold is None or math.isfinite(report.threshold)
        for name in params:
            assert after[name] == before[name] - report.removed[name] + report.grown[name]
            if keeps_layers:
                assert after[name] == before[name]
        check_invariants(engine, params, target, optimizer)
        engine.mask_gradients()
        optimizer.step()
        engine.after_optimizer_step()
        check_invariants(engine, params, target, optimizer)
        with torch.no_grad():  # a fresh start for the next round: finite weights again
            for name, param in params.items():
                param.nan_to_num_(0.5, 0.5, -0.5).mul_(engine.masks[name])


@REWIRES_WITHOUT_OPTIMIZER
@engine_settings
@given(
    shapes=st.lists(shape, min_size=1, max_size=3),
    sparsity=st.floats(0.0, 0.95),
    method=st.sampled_from(sorted(METHODS)),
    seed=st.integers(0, 2**31 - 1),
)
def test_state_dict_round_trip_restores_masks_and_random_stream(shapes, sparsity, method, seed):
    """A resumed engine makes the same next rewiring as the one that kept running."""
    generator = torch.Generator().manual_seed(seed)
    weights = {f"layer{i}.weight": torch.randn(s, generator=generator)
               for i, s in enumerate(shapes)}
    gradients = {n: torch.randn(w.shape, generator=generator) for n, w in weights.items()}
    total = sum(math.prod(s) for s in shapes)
    if round((1 - sparsity) * total) < len(shapes):
        return

    def engine_with_grads(masks=None):
        params = {n: nn.Parameter(w.clone()) for n, w in weights.items()}
        for name, param in params.items():
            param.grad = gradients[name].clone()
        return SparseEngine(params, sparsity=sparsity, method=method, seed=seed, masks=masks)

    running = engine_with_grads()
    running.rewire(0.3)
    state = running.state_dict()
    resumed = engine_with_grads(masks=state["masks"])
    for name, param in resumed.params.items():  # the weights come from the model checkpoint
        param.data.copy_(running.params[name].data)
    resumed.load_state_dict(state)
    for engine in (running, resumed):  # the next step's gradients, the same for both
        for name, param in engine.params.items():
            param.grad = gradients[name].clone()
    running.rewire(0.3)
    resumed.rewire(0.3)
    for name, mask in running.masks.items():
        assert torch.equal(resumed.masks[name], mask)
        assert torch.equal(resumed.params[name].data, running.params[name].data)
    assert resumed.threshold == running.threshold
