"""A grown weight's optimizer state starts where its optimizer starts a fresh parameter.

Every torch.optim optimizer that can run here, pinned per position right after a rewiring:
grown positions hold the optimizer's fresh value, dropped ones 0, kept ones what they held,
per-tensor state (``step``) what it held; then masked weights stay exactly 0 as training
goes on. The table in docs/guarantees.md is this test's ``FRESH``.
"""

from __future__ import annotations

import pytest
import torch

from lightning_ggr.sparse import SparseEngine
from lightning_ggr.sparse.masks import preserves_zeros
from lightning_ggr.sparse.optimizer_state import (
    FreshState,
    check_optimizer_state,
    reset_optimizer_state_,
)

LR = 0.01

#: optimizer -> (constructor, {per-weight state key: where a grown weight starts})
FRESH = {
    "SGD": (lambda p: torch.optim.SGD(p, lr=LR), {}),
    "SGD momentum": (lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9, dampening=0.5,
                                              weight_decay=1e-2), {"momentum_buffer": 0.0}),
    "SGD nesterov": (lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9, nesterov=True),
                     {"momentum_buffer": 0.0}),
    "Adam": (lambda p: torch.optim.Adam(p, lr=LR), {"exp_avg": 0.0, "exp_avg_sq": 0.0}),
    "AdamW": (lambda p: torch.optim.AdamW(p, lr=LR, weight_decay=0.1),
              {"exp_avg": 0.0, "exp_avg_sq": 0.0}),
    "Adam amsgrad": (lambda p: torch.optim.Adam(p, lr=LR, amsgrad=True),
                     {"exp_avg": 0.0, "exp_avg_sq": 0.0, "max_exp_avg_sq": 0.0}),
    "NAdam": (lambda p: torch.optim.NAdam(p, lr=LR), {"exp_avg": 0.0, "exp_avg_sq": 0.0}),
    "RAdam": (lambda p: torch.optim.RAdam(p, lr=LR), {"exp_avg": 0.0, "exp_avg_sq": 0.0}),
    "Adamax": (lambda p: torch.optim.Adamax(p, lr=LR), {"exp_avg": 0.0, "exp_inf": 0.0}),
    "Adadelta": (lambda p: torch.optim.Adadelta(p), {"square_avg": 0.0, "acc_delta": 0.0}),
    "Adagrad": (lambda p: torch.optim.Adagrad(p, lr=LR, initial_accumulator_value=0.5),
                {"sum": 0.5}),
    "Rprop": (lambda p: torch.optim.Rprop(p, lr=LR), {"prev": 0.0, "step_size": LR}),
    "RMSprop centered momentum": (
        lambda p: torch.optim.RMSprop(p, lr=LR, centered=True, momentum=0.9),
        {"square_avg": 0.0, "momentum_buffer": 0.0, "grad_avg": 0.0}),
    "ASGD": (lambda p: torch.optim.ASGD(p, lr=LR), {"ax": 0.0}),
    # Factored second moments (m x 1, 1 x n): shared by a row or a column, like `step`.
    "Adafactor": (lambda p: torch.optim.Adafactor(p, lr=LR), {}),
}


def trained(make, steps: int = 4, seed: int = 0):
    """A 6x8 weight at sparsity 0.5 (SET: random growth), trained ``steps`` steps so that
    every kept weight's state holds something."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.nn.Parameter(torch.randn(6, 8, generator=generator))
    engine = SparseEngine({"w": weight}, sparsity=0.5, method="set", seed=seed)
    optimizer = make([weight])
    for _ in range(steps):
        step(engine, weight, optimizer, generator)
    return weight, engine, optimizer, generator


def step(engine, weight, optimizer, generator, after_step: bool | None = None) -> None:
    weight.grad = torch.randn(weight.shape, generator=generator)
    engine.mask_gradients()
    optimizer.step()
    if preserves_zeros(optimizer) if after_step is None else after_step:
        return
    engine.after_optimizer_step([optimizer])  # as the callback's post-step hook


@pytest.mark.parametrize("name", sorted(FRESH))
def test_a_grown_weight_starts_its_state_where_the_optimizer_starts_a_fresh_parameter(name):
    make, fresh = FRESH[name]
    weight, engine, optimizer, generator = trained(make)
    state = optimizer.state[weight]
    per_weight = {k for k, v in state.items() if torch.is_tensor(v) and v.shape == weight.shape}
    assert per_weight == set(fresh)  # what the table covers is all there is
    before = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}
    old = engine.masks["w"].clone()
    weight.grad = torch.randn(weight.shape, generator=generator)
    report = engine.rewire(0.5, [optimizer])
    new = engine.masks["w"]
    grown, dropped, kept = new & ~old, old & ~new, old & new
    # Grown here: new positions (a weight dropped and regrown keeps its state, like a kept one).
    assert report.total_grown >= int(grown.sum()) > 0 and int(dropped.sum()) > 0
    for key, start in fresh.items():
        value = state[key]
        expected = torch.tensor(start, dtype=value.dtype)
        assert torch.equal(value[grown], expected.expand(int(grown.sum()))), key
        assert (value[dropped] == 0).all() and (value[~new] == 0).all(), key
        assert torch.equal(value[kept], before[key][kept]), key
    for key, value in state.items():  # per-tensor and per-row/column state stays shared
        if key not in fresh:
            assert torch.equal(value, before[key]) if torch.is_tensor(value) else (
                value == before[key]), key


@pytest.mark.parametrize("name", sorted(FRESH))
def test_masked_weights_stay_exactly_zero_with_their_state_at_zero(name):
    """Zero state at masked positions keeps each optimizer's masked weights at exactly 0:
    with its post-step re-zeroing where the callback installs one, and, for the optimizers
    listed as zero-preserving, with none."""
    make, _ = FRESH[name]
    weight, engine, optimizer, generator = trained(make)
    for rewiring in range(3):
        weight.grad = torch.randn(weight.shape, generator=generator)
        engine.rewire(0.5, [optimizer])
        for _ in range(3):
            step(engine, weight, optimizer, generator)
            mask = engine.masks["w"]
            assert (weight.detach()[~mask] == 0).all(), (name, rewiring)
            for value in optimizer.state[weight].values():
                if torch.is_tensor(value) and value.shape == weight.shape and preserves_zeros(
                        optimizer):
                    # No re-zeroing pass ran: the step itself kept the zeros.
                    assert (value[~mask] == 0).all(), name


def test_a_learning_rate_change_is_probed_again():
    """Rprop starts a fresh parameter's step sizes at the group's *current* lr."""
    weight, engine, optimizer, generator = trained(FRESH["Rprop"][0])
    for lr in (0.005, 0.02):
        optimizer.param_groups[0]["lr"] = lr  # as a scheduler does
        old = engine.masks["w"].clone()
        weight.grad = torch.randn(weight.shape, generator=generator)
        engine.rewire(0.5, [optimizer])
        grown = engine.masks["w"] & ~old
        sizes = optimizer.state[weight]["step_size"][grown]
        assert grown.any() and torch.equal(sizes, torch.full_like(sizes, lr))


def test_per_group_hyper_parameters_decide():
    first = torch.nn.Parameter(torch.randn(4, 4))
    second = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = torch.optim.Rprop([{"params": [first]}, {"params": [second], "lr": 0.5}],
                                  lr=0.1)
    fresh = FreshState()
    for param in (first, second):
        param.grad = torch.ones_like(param)
    optimizer.step()
    starts = {id(p): [float(s) for _, s in fresh.starts(optimizer, p)] for p in (first, second)}
    assert starts[id(first)] == [0.0, pytest.approx(0.1)]  # prev, step_size
    assert starts[id(second)] == [0.0, 0.5]


def test_reset_optimizer_state_gives_fresh_values_at_the_positions():
    weight, _, optimizer, _ = trained(FRESH["Adagrad"][0])
    positions = torch.zeros(6, 8, dtype=torch.bool)
    positions[0, :3] = True
    before = optimizer.state[weight]["sum"].clone()
    reset_optimizer_state_([optimizer], weight, positions, FreshState())
    after = optimizer.state[weight]["sum"]
    assert torch.equal(after[positions], torch.full((3,), 0.5))
    assert torch.equal(after[~positions], before[~positions])
    reset_optimizer_state_([optimizer], weight, positions)  # without probing: zeros
    assert (optimizer.state[weight]["sum"][positions] == 0).all()


class FlatMomentum(torch.optim.Optimizer):
    """One value per weight, kept flattened: neither maskable nor resettable per weight."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["flat"] = torch.zeros(p.numel())
                state["flat"].mul_(0.9).add_(p.grad.reshape(-1))
                p.add_(state["flat"].view_as(p), alpha=-group["lr"])


class Wrapper(torch.optim.Optimizer):
    """An optimizer over another one (Lookahead-like): its class cannot be built from its
    defaults."""

    def __init__(self, base: torch.optim.Optimizer) -> None:
        self.base = base
        super().__init__(base.param_groups, {"lr": 0.1})
        self.state = base.state

    def step(self, closure=None):
        return self.base.step(closure)


def test_state_in_another_layout_is_refused_before_training():
    weight = torch.nn.Parameter(torch.randn(4, 5))
    engine = SparseEngine({"layer.weight": weight}, sparsity=0.5, method="set")
    with pytest.raises(ValueError, match=r"FlatMomentum keeps 'flat' of shape \(6,\) for a "
                                         r"parameter of shape \(2, 3\).*'layer.weight'"):
        engine.check_optimizers([FlatMomentum([weight])])
    # A resumed state in that layout is refused too, whatever the probe says.
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    optimizer.state[weight]["momentum_buffer"] = torch.zeros(20)
    with pytest.raises(ValueError, match=r"'momentum_buffer' of shape \(20,\)"):
        engine.check_optimizers([optimizer])


class Unbuildable(torch.optim.Rprop):
    """An optimizer whose class cannot be built from its defaults (a required argument)."""

    def __init__(self, params, owner: object, lr: float = 0.3) -> None:
        super().__init__(params, lr=lr)
        self.owner = owner


def test_row_and_column_state_is_accepted_and_an_unprobeable_optimizer_warns():
    weight = torch.nn.Parameter(torch.randn(4, 5))
    engine = SparseEngine({"w": weight}, sparsity=0.5, method="set")
    assert engine.check_optimizers([torch.optim.Adafactor([weight])]) == []
    unbuildable = Unbuildable([weight], owner=object())
    (warning,) = engine.check_optimizers([unbuildable])
    assert "Unbuildable" in warning and "start their per-weight optimizer state at 0" in warning
    weight.grad = torch.ones_like(weight)
    unbuildable.step()
    assert [start for _, start in engine.fresh_state.starts(unbuildable, weight)] == [0.0, 0.0]


class SlowWeights(torch.optim.Optimizer):
    """timm's ``Lookahead``: wraps another optimizer without ``Optimizer.__init__``, shares
    its ``param_groups``, keeps an empty ``state`` of its own and puts its slow weights into
    the wrapped optimizer's state, next to that optimizer's moments."""

    def __init__(self, base: torch.optim.Optimizer, k: int = 2) -> None:
        self._base_optimizer = base
        self.param_groups = base.param_groups
        self.defaults = base.defaults
        self.state = {}
        self.k, self.steps = k, 0

    @torch.no_grad()
    def step(self, closure=None):
        loss = self._base_optimizer.step(closure)
        self.steps += 1
        if self.steps % self.k == 0:
            for group in self.param_groups:
                for p in group["params"]:
                    state = self._base_optimizer.state[p]
                    slow = state.setdefault("slow", p.detach().clone())
                    slow.add_(p - slow, alpha=0.5)
                    p.copy_(slow)
        return loss


@pytest.mark.parametrize("make", [
    lambda base: Wrapper(base),  # one state shared with the wrapped optimizer
    lambda base: SlowWeights(base),  # the wrapped optimizer's state, its own empty
], ids=["shared state", "wrapped state"])
def test_an_optimizer_wrapping_another_has_the_wrapped_state_masked_and_reset(make):
    """A wrapper (Lookahead) cannot be rebuilt from its defaults; its state lives in the
    optimizer it wraps. That state was never masked nor reset (timm's Lookahead over Adam:
    dropped weights kept their moments and slow weights, grown ones got them back) and the
    warning said grown weights start at 0. The wrapped optimizer is followed and probed."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(6, 8, generator=generator))
    engine = SparseEngine({"w": weight}, sparsity=0.5, method="set", seed=0)
    base = torch.optim.Rprop([weight], lr=0.3)
    optimizer = make(base)
    assert engine.check_optimizers([optimizer]) == []  # no warning: the wrapped one probes
    for _ in range(4):
        weight.grad = torch.randn(weight.shape, generator=generator)
        engine.mask_gradients()
        optimizer.step()
        engine.after_optimizer_step([optimizer])
    state = base.state[weight]
    before = engine.masks["w"].clone()
    kept_sizes = state["step_size"].clone()
    engine.rewire(0.5, [optimizer])
    mask = engine.masks["w"]
    grown, dropped = mask & ~before, before & ~mask
    assert grown.any() and dropped.any()
    assert (state["step_size"][grown] == 0.3).all()  # where a fresh Rprop weight starts
    assert (state["prev"][grown] == 0).all()
    for key in state:
        if isinstance(state[key], torch.Tensor) and state[key].shape == weight.shape:
            assert (state[key][~mask] == 0).all(), key
    assert torch.equal(state["step_size"][mask & before], kept_sizes[mask & before])


def test_timms_lookahead_has_its_wrapped_state_masked():
    timm_optim = pytest.importorskip("timm.optim")
    weight = torch.nn.Parameter(torch.randn(6, 8))
    engine = SparseEngine({"w": weight}, sparsity=0.5, method="set")
    optimizer = timm_optim.Lookahead(torch.optim.Adam([weight], lr=0.1), k=2)
    assert engine.check_optimizers([optimizer]) == []
    for _ in range(2):
        weight.grad = torch.randn_like(weight)
        engine.mask_gradients()
        optimizer.step()
        engine.after_optimizer_step([optimizer])
    engine.rewire(0.5, [optimizer])
    state = optimizer._base_optimizer.state[weight]
    assert {"exp_avg", "exp_avg_sq", "lookahead_slow_buff"} <= set(state)
    for key in ("exp_avg", "exp_avg_sq", "lookahead_slow_buff"):
        assert (state[key][~engine.masks["w"]] == 0).all(), key


class FactoredMoments(torch.optim.Optimizer):
    """Hugging Face's and timm's Adafactor layout: a weight's second moment factored into a
    row vector ``shape[:-1]`` and a column vector ``shape[:-2] + shape[-1:]`` (a dimension
    dropped, not kept at size 1 as in torch's Adafactor), next to a first moment shaped
    like the weight."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["row"] = torch.zeros(p.shape[:-1])
                    state["col"] = torch.zeros(p.shape[:-2] + p.shape[-1:])
                    state["exp_avg"] = torch.zeros_like(p)
                square = p.grad.square()
                state["row"].lerp_(square.mean(-1), 0.5)
                state["col"].lerp_(square.mean(-2), 0.5)
                state["exp_avg"].lerp_(p.grad, 0.1)
                p.add_(state["exp_avg"], alpha=-group["lr"])


def test_factored_moments_that_drop_a_dimension_are_shared_not_refused():
    """Hugging Face's Adafactor was refused before training ("one value per weight in
    another layout" for its ``(m,)`` row moments: they are one per row), and a run with
    timm's Adafactor, which factors only large weights, was refused when resumed."""
    weight = torch.nn.Parameter(torch.randn(16, 12))
    engine = SparseEngine({"w": weight}, sparsity=0.5, method="set")
    optimizer = FactoredMoments([weight])
    assert engine.check_optimizers([optimizer]) == []  # the probe's state
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    assert engine.check_optimizers([optimizer]) == []  # a restored state
    engine.mask_gradients()
    row, col = optimizer.state[weight]["row"].clone(), optimizer.state[weight]["col"].clone()
    engine.rewire(0.5, [optimizer])
    # Shared by a row or a column: left as they are; the first moment follows each weight.
    assert torch.equal(optimizer.state[weight]["row"], row)
    assert torch.equal(optimizer.state[weight]["col"], col)
    assert (optimizer.state[weight]["exp_avg"][~engine.masks["w"]] == 0).all()


def test_per_weight_state_without_a_dimension_of_size_1_follows_each_weight():
    """A ``1 x n`` weight (a one-output head): Hugging Face's Adafactor keeps its column
    moments as ``(n,)``, one per weight in the weight's order. They are masked and reset
    like state shaped as the weight (they were refused)."""
    weight = torch.nn.Parameter(torch.randn(1, 12))
    engine = SparseEngine({"head": weight}, sparsity=0.5, method="set", seed=1)
    optimizer = FactoredMoments([weight])
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    assert engine.check_optimizers([optimizer]) == []
    state = optimizer.state[weight]
    assert state["col"].shape == (12,) and state["row"].shape == (1,)
    before = engine.masks["head"].clone()
    engine.mask_gradients()
    report = engine.rewire(0.5, [optimizer])
    assert report.total_grown > 0
    mask = engine.masks["head"].reshape(-1)
    assert (state["col"][~mask] == 0).all()  # masked positions: 0
    grown = mask & ~before.reshape(-1)
    assert (state["col"][grown] == 0).all()  # grown: a fresh parameter's (the probe's 0)
    assert float(state["row"]) != 0  # one value for the whole row: left as it is
    kept = mask & before.reshape(-1)
    assert (state["col"][kept] != 0).all()
    # Flattened state of a weight with two real dimensions is still refused.
    square = torch.nn.Parameter(torch.randn(4, 5))
    other = SparseEngine({"w": square}, sparsity=0.5, method="set")
    sgd = torch.optim.SGD([square], lr=0.1, momentum=0.9)
    sgd.state[square]["momentum_buffer"] = torch.zeros(20)
    with pytest.raises(ValueError, match="one value per weight in another layout"):
        other.check_optimizers([sgd])
    sgd.state[square]["momentum_buffer"] = torch.zeros(2, 4, 5)
    with pytest.raises(ValueError, match="more values than the parameter has weights"):
        other.check_optimizers([sgd])


@pytest.mark.parametrize("library", ["transformers", "timm"])
def test_the_ecosystems_adafactors_are_accepted(library):
    """The real ones, where installed (the dev extra installs both)."""
    weight = torch.nn.Parameter(torch.randn(32, 24))
    if library == "transformers":
        optimization = pytest.importorskip("transformers.optimization")
        optimizer = optimization.Adafactor([weight], lr=1e-2, relative_step=False,
                                           scale_parameter=False)
    else:
        timm_optim = pytest.importorskip("timm.optim")
        optimizer = timm_optim.Adafactor([weight], lr=1e-2)  # factors from 16 rows
    engine = SparseEngine({"w": weight}, sparsity=0.5, method="set")
    assert engine.check_optimizers([optimizer]) == []
    weight.grad = torch.randn_like(weight)
    optimizer.step()
    assert engine.check_optimizers([optimizer]) == []  # resuming from this state


def test_the_probe_records_values_before_the_update():
    """Adamax's infinity norm becomes eps in the probe's step; its start is 0."""
    weight = torch.nn.Parameter(torch.randn(3, 3))
    optimizer = torch.optim.Adamax([weight], eps=0.25)
    first = FreshState().probe(optimizer, weight)
    assert float(first["exp_inf"].reshape(-1)[0]) == 0.0
    assert check_optimizer_state(optimizer, {"w": weight}, FreshState()) is None


@pytest.mark.parametrize("name", ["Adam", "AdamW", "NAdam", "RAdam", "RMSprop", "Adagrad"])
def test_an_eps_that_vanishes_in_float16_needs_the_re_zeroing_after_the_step(name):
    """Regression: in float16 (``precision="16-true"``) the default ``eps`` (1e-8, Adagrad's
    1e-10) is 0, so these optimizers divide 0 by 0 at every masked weight (gradient and
    state 0): NaN, which the zero-preserving shortcut left in the weights. They are not
    zero-preserving then, and the re-zeroing after the step keeps masked weights at 0."""
    from lightning_ggr.sparse.masks import vanishing_eps

    weight = torch.nn.Parameter(torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
                                .half())
    engine = SparseEngine({"w": weight}, sparsity=0.5, method="set")
    optimizer = getattr(torch.optim, name)([weight], lr=LR)
    assert vanishing_eps(optimizer) == (optimizer.defaults["eps"], torch.float16)
    assert not preserves_zeros(optimizer)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        weight.grad = torch.randn(weight.shape, generator=generator).half()
        engine.mask_gradients()
        optimizer.step()
        engine.after_optimizer_step([optimizer])  # the callback's post-step hook
    assert (weight.detach()[~engine.masks["w"]] == 0).all()
    assert weight.detach()[engine.masks["w"]].isfinite().all()
    safe = getattr(torch.optim, name)([weight], lr=LR, eps=1e-4)
    assert vanishing_eps(safe) is None and preserves_zeros(safe)
