"""Exact values, computed by hand, where sums and bounds let real bugs through (issue 17,
item 10): the order of GGR's winners, the largest-remainder step, half-up rounding, which
positions a rewiring touches in the optimizer state."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_ggr.sparse import METHODS, SparseEngine, active_counts, global_topk_counts
from lightning_ggr.sparse.densities import initial_densities, layer_budget
from lightning_ggr.sparse.masks import random_mask
from lightning_ggr.sparse.rewiring import (
    MixedInsertion,
    allocate_proportional,
    magnitude_counts,
    rank_by_gradient,
    threshold_counts,
)
from lightning_ggr.sparse.topk import global_topk, global_topk_packed

# ------------------------------------------------------------ GGR's winners, best first
SCORES = [torch.tensor([0.1, 0.9, 0.5, 0.7]), torch.tensor([0.8, 0.2, 0.95])]


def test_global_top_k_ranks_each_layers_winners_largest_first():
    """The top 5 of both: 0.95 (B2), 0.9 (A1), 0.8 (B0), 0.7 (A3), 0.5 (A2)."""
    for top in (global_topk(iter(SCORES), 5),
                global_topk_packed([4, 3], lambda i, out: out.copy_(SCORES[i]), 5,
                                   device=torch.device("cpu"))):
        counts = top.counts()
        assert counts == [3, 2]
        ranked = top.ranked(counts)
        assert ranked[0].tolist() == [1, 3, 2] and ranked[1].tolist() == [2, 0]


def test_ggr_grows_its_best_winners_by_gradient():
    """Layer ``a`` wins 3 free positions (gradients 9, 8, 7 beat ``b``'s 6): GGR grows
    round(0.5 * 3) = 2 by gradient, which must be its two best (positions 10 and 11), and
    one at random among the other 990-odd free positions."""
    weights = {"a": torch.zeros(1000), "b": torch.zeros(1000)}
    masks = {name: torch.zeros(1000, dtype=torch.bool) for name in weights}
    masks["a"][:6] = masks["b"][:6] = True
    weights["a"][:6] = weights["b"][:6] = torch.arange(1.0, 7.0)
    grads = {"a": torch.zeros(1000), "b": torch.zeros(1000)}
    grads["a"][10:13] = torch.tensor([9.0, 8.0, 7.0])
    grads["b"][20:23] = torch.tensor([6.0, 5.0, 4.0])
    for seed in range(5):
        m = {n: t.clone() for n, t in masks.items()}
        report = METHODS["ggr"].build()({n: t.clone() for n, t in weights.items()}, m,
                                        grads, 0.5, generator=torch.Generator().manual_seed(seed))
        assert report.removed == {"a": 3, "b": 3} and report.grown == {"a": 3, "b": 3}
        assert m["a"][10] and m["a"][11]  # a's two best, whatever the random draw
        assert m["b"][20] and m["b"][21]  # b wins 20, 21, 22: round(1.5) = 2 by gradient


def test_rank_by_gradient_gives_the_winners_of_each_layer_in_order():
    masks = {"a": torch.tensor([True, False, False, False]),
             "b": torch.tensor([False, False, True])}
    grads = {"a": torch.tensor([5.0, 0.1, 0.9, 0.7]), "b": torch.tensor([0.8, 0.2, 3.0])}
    # Free: a's 0.1, 0.9, 0.7 and b's 0.8, 0.2 (the active ones score -1): the top 4 are
    # 0.9 (a2), 0.8 (b0), 0.7 (a3), 0.2 (b1).
    allocated = rank_by_gradient(grads, masks, 4)
    assert allocated.counts == [2, 2]
    assert allocated.ranked["a"].tolist() == [2, 3] and allocated.ranked["b"].tolist() == [0, 1]


def test_ggr_gives_tied_gradients_to_the_first_layers_then_the_first_positions():
    """The rule of a sharded rewiring, on one device (issue 19): GGR's allocation takes the
    gradients tied at its ``K``-th in layer order, then position order, so that one device
    and shards give every layer the same count."""
    masks = {"a": torch.tensor([True, False, False, False, False]),
             "b": torch.tensor([False, False, True, False])}
    grads = {"a": torch.tensor([5.0, 1.0, 1.0, 1.0, 1.0]),
             "b": torch.tensor([1.0, 2.0, 9.0, 1.0])}
    # Free: a's four 1.0, b's 1.0, 2.0, 1.0. The top 4: b1 (2.0), then three of the five
    # tied 1.0: a1, a2, a3 (layer a first, its first positions).
    allocated = rank_by_gradient(grads, masks, 4)
    assert allocated.counts == [3, 1]
    assert allocated.ranked["a"].tolist() == [1, 2, 3] and allocated.ranked["b"].tolist() == [1]
    # Six of the seven: a's four, then b1 and b0.
    allocated = rank_by_gradient(grads, masks, 6)
    assert allocated.counts == [4, 2] and allocated.ranked["b"].tolist() == [1, 0]


def test_mixed_insertion_grows_half_up_by_gradient():
    """5 new weights at ratio 0.5: 3 by gradient (2.5 rounds up), 2 at random."""
    mask = torch.zeros(100, dtype=torch.bool)
    gradient = torch.zeros(100)
    gradient[40:44] = torch.tensor([4.0, 3.0, 2.0, 1.0])
    chosen = MixedInsertion(0.5)(mask, gradient, 5, torch.Generator().manual_seed(0))
    assert chosen[:3].tolist() == [40, 41, 42]
    assert len(set(chosen.tolist())) == 5


# --------------------------------------------------------------- counts by hand
def test_active_counts_hand_out_the_remainder_to_the_largest_fractions():
    """10 weights each at densities 0.34, 0.25, 0.38: 3.4 + 2.5 + 3.8 = 9.7 rounds to 10;
    the floors give 8, and the two extra go to the largest remainders, c (0.8) and b (0.5)."""
    shapes = {"a": (10,), "b": (10,), "c": (10,)}
    densities = {"a": 0.34, "b": 0.25, "c": 0.38}
    assert active_counts(shapes, densities) == {"a": 3, "b": 3, "c": 4}
    # One too many: the one taken back comes from the smallest remainder, a (0.4).
    assert active_counts(shapes, densities, total=7) == {"a": 2, "b": 2, "c": 3}
    # A budget of 9: one extra, to c.
    assert active_counts(shapes, densities, total=9) == {"a": 3, "b": 2, "c": 4}


def test_erk_counts_of_a_small_network_by_hand():
    """ERK at sparsity 0.5 over a 10x10 and a 10x40 layer: scores (10+10)/100 = 0.2 and
    (10+40)/400 = 0.125, so densities 0.2e and 0.125e with 100 * 0.2e + 400 * 0.125e = 250:
    e = 3.571..., densities 5/7 and 25/56, counts 71.4 and 178.6 -> 71 and 179 (total 250)."""
    shapes = {"small": (10, 10), "wide": (10, 40)}
    densities = initial_densities(shapes, 0.5, "erk")
    assert densities["small"] == pytest.approx(5 / 7) and densities["wide"] == pytest.approx(
        25 / 56)
    counts = active_counts(shapes, densities, total=layer_budget(shapes, 0.5))
    assert counts == {"small": 71, "wide": 179}


def test_global_topk_counts_by_hand():
    assert global_topk_counts(iter(SCORES), 3) == [1, 2]
    assert global_topk_counts(iter(SCORES), 4) == [2, 2]


def test_removal_counts_round_half_up():
    """round(f * n) half up: 0.25 x 10 = 2.5 -> 3, 0.25 x 6 = 1.5 -> 2, 0.25 x 7 = 1.75 ->
    2, 0.25 x 1: at most n - 1 = 0; a layer keeps one weight."""
    assert magnitude_counts({"a": 10, "b": 6, "c": 7, "d": 1, "e": 2}, 0.25) == {
        "a": 3, "b": 2, "c": 2, "d": 0, "e": 1}
    assert magnitude_counts({"a": 4}, 1.0) == {"a": 3}


@pytest.mark.parametrize(("method", "removed"), [("set", {"a": 3, "b": 2}),
                                                 ("rigl", {"a": 3, "b": 2}),
                                                 ("ggr", {"a": 3, "b": 2})])
def test_a_rewiring_removes_round_half_up_of_each_layer(method, removed):
    weights = {"a": torch.arange(1.0, 21.0), "b": torch.arange(1.0, 21.0)}
    masks = {"a": torch.arange(20) < 10, "b": torch.arange(20) < 6}
    grads = {n: torch.ones(20) for n in weights}
    report = METHODS[method].build()(weights, masks, grads, 0.25,
                                     generator=torch.Generator().manual_seed(0))
    assert report.removed == removed


def test_dsr_counts_below_its_threshold_exactly():
    weights = {"a": torch.tensor([0.1, 0.2, 0.3, 5.0, float("nan"), 0.0]),
               "b": torch.tensor([0.05, 0.06, 0.9, 1.0, 0.0, 0.0])}
    masks = {"a": torch.tensor([True, True, True, True, True, False]),
             "b": torch.tensor([True, True, False, False, False, False])}
    # a: 0.1, 0.2 and the NaN are below 0.25 (the inactive 0.0 does not count); b: both, but a
    # layer keeps one weight.
    assert threshold_counts(weights, masks, 0.25, {"a": 5, "b": 2}) == {"a": 3, "b": 1}


# ------------------------------------------------- which optimizer state a rewiring touches
def test_a_rewiring_touches_the_optimizer_state_only_at_changed_positions():
    generator = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(8, 8, generator=generator))
    engine = SparseEngine({"w": weight}, sparsity=0.5, method="rigl", seed=0)
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
    for _ in range(3):
        weight.grad = torch.randn(8, 8, generator=generator)
        engine.mask_gradients()
        optimizer.step()
    momentum = optimizer.state[weight]["momentum_buffer"]
    before, old = momentum.clone(), engine.masks["w"].clone()
    weight.grad = torch.randn(8, 8, generator=generator)
    gradient = weight.grad.clone()
    engine.rewire(0.5, [optimizer])
    new = engine.masks["w"]
    assert torch.equal(momentum[old & new], before[old & new])  # kept: untouched
    assert (momentum[~new] == 0).all() and (momentum[new & ~old] == 0).all()
    assert (before[old & new] != 0).all()  # the check above compares something
    # The gradient too: a kept weight takes its step; a new one does not (its gradient is
    # zeroed, update_grown_weights=False); masked ones are zeroed by the step's mask pass.
    assert torch.equal(weight.grad[old & new], gradient[old & new])
    assert (weight.grad[new & ~old] == 0).all()


def test_the_budget_rounds_to_the_nearest_count():
    """round((1 - s) * total): 0.67 x 10 = 6.7 -> 7 (not 6); 0.25 x 30 = 7.5 -> 8."""
    assert layer_budget({"a": (10,)}, 0.33) == 7
    assert layer_budget({"a": (10, 3)}, 0.75) == 8


def test_dsr_allocation_by_hand():
    """In proportion to the survivors 5, 3, 2, 4 new weights: 2.0, 1.2, 0.8 -> floors 2, 1,
    0 and the one left to the largest remainder (0.8): 2, 1, 1. A layer with room for one
    takes one; the rest is shared by the others."""
    assert allocate_proportional([5, 3, 2], [100, 100, 100], 4) == [2, 1, 1]
    assert allocate_proportional([6, 2], [1, 10], 5) == [1, 4]
    assert allocate_proportional([0, 0, 0], [5, 5, 5], 4) == [2, 1, 1]  # no survivors: even


@settings(max_examples=60, deadline=None)
@given(numel=st.integers(1, 3000), share=st.floats(0.0, 1.0), seed=st.integers(0, 2**32))
def test_a_random_mask_has_exactly_the_asked_count(numel, share, seed):
    active = round(share * numel)
    mask = random_mask((numel,), active, torch.Generator().manual_seed(seed))
    assert int(mask.sum()) == active


def test_the_engine_draws_exactly_its_initial_counts():
    """The engine keeps the counts on the host: the masks must hold exactly those."""
    weights = {"a": torch.zeros(37, 11), "b": torch.zeros(5, 3, 3, 3), "c": torch.zeros(1000)}
    engine = SparseEngine(weights, sparsity=0.8, method="set", seed=7)
    assert {n: int(m.sum()) for n, m in engine.masks.items()} == engine.initial_counts
