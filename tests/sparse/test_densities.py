import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_ggr import initial_densities
from lightning_ggr.sparse.densities import active_counts, erk_score

shape_strategy = st.one_of(
    st.tuples(st.integers(1, 64), st.integers(1, 64)),
    st.tuples(st.integers(1, 32), st.integers(1, 32), st.sampled_from([1, 3, 5]),
              st.sampled_from([1, 3, 5])),
)
shapes_strategy = st.lists(shape_strategy, min_size=1, max_size=8).map(
    lambda shapes: {f"layer{i}.weight": s for i, s in enumerate(shapes)}
)


def test_erk_score_formula():
    assert erk_score((64, 32, 3, 3)) == pytest.approx((64 + 32 + 3 + 3) / (64 * 32 * 9))
    assert erk_score((10, 100)) == pytest.approx(110 / 1000)


def test_uniform_gives_every_layer_the_same_density():
    shapes = {"a": (8, 3, 3, 3), "b": (10, 8)}
    assert initial_densities(shapes, 0.9, "uniform") == {"a": pytest.approx(0.1),
                                                         "b": pytest.approx(0.1)}


def test_erk_matches_hand_computed_values():
    # Two layers, no capping: d_l = eps * score_l with sum(d_l N_l) = 0.5 * (100 + 400).
    shapes = {"small": (10, 10), "big": (20, 20)}
    densities = initial_densities(shapes, 0.5, "erk")
    eps = 250 / (0.2 * 100 + 0.1 * 400)
    assert densities["small"] == pytest.approx(eps * 0.2)
    assert densities["big"] == pytest.approx(eps * 0.1)


def test_erk_caps_overfull_layer_and_resolves_the_rest():
    # A tiny first conv would get density > 1 at low sparsity: it must be made dense.
    shapes = {"conv1": (4, 3, 3, 3), "fc": (100, 1000)}
    densities = initial_densities(shapes, 0.5, "erk")
    assert densities["conv1"] == 1.0
    total = 108 + 100_000
    assert 108 + densities["fc"] * 100_000 == pytest.approx(0.5 * total)


@settings(max_examples=200, deadline=None)
@given(shapes=shapes_strategy, sparsity=st.floats(0.0, 0.999),
       distribution=st.sampled_from(["erk", "uniform"]))
def test_densities_never_exceed_one_and_hit_the_global_target(shapes, sparsity, distribution):
    densities = initial_densities(shapes, sparsity, distribution)
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    assert all(0.0 < d <= 1.0 + 1e-12 for d in densities.values())
    active = sum(densities[n] * sizes[n] for n in shapes)
    assert active == pytest.approx((1 - sparsity) * sum(sizes.values()), rel=1e-9, abs=1e-6)


@settings(max_examples=200, deadline=None)
@given(shapes=shapes_strategy, sparsity=st.floats(0.0, 0.99),
       distribution=st.sampled_from(["erk", "uniform"]))
def test_active_counts_are_exact_and_within_one_of_the_density(shapes, sparsity, distribution):
    densities = initial_densities(shapes, sparsity, distribution)
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    target = round((1 - sparsity) * sum(sizes.values()))
    if target < len(shapes):
        with pytest.raises(ValueError, match="at least 1"):
            active_counts(shapes, densities, total=target)
        return
    counts = active_counts(shapes, densities, total=target)
    assert sum(counts.values()) == target
    for name, count in counts.items():
        assert 1 <= count <= sizes[name]
        # Off by at most one from the exact value, except where the 1-weight floor lifts it.
        assert count <= max(1, math.ceil(densities[name] * sizes[name])) + 1
        assert count >= math.floor(densities[name] * sizes[name]) - 1


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_invalid_sparsity_is_refused(sparsity):
    with pytest.raises(ValueError, match=r"sparsity must be a real number in \[0, 1\)"):
        initial_densities({"a": (4, 4)}, sparsity)


def test_unknown_distribution_is_refused():
    with pytest.raises(ValueError, match="distribution must be one of"):
        initial_densities({"a": (4, 4)}, 0.5, "lognormal")


def test_empty_shapes_are_refused():
    with pytest.raises(ValueError, match="no sparse layer"):
        initial_densities({}, 0.5)
