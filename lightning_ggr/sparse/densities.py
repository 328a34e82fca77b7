"""Initial layer densities (paper section 3.1) and their exact integer counts."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from lightning_ggr.sparse.checks import check_choice, check_sparsity

#: Initial density distributions (paper section 3.1).
DISTRIBUTIONS = ("erk", "uniform")


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(d) for d in shape)


def _check_shapes(shapes: Mapping[str, Sequence[int]]) -> None:
    if not shapes:
        raise ValueError("shapes is empty: there is no sparse layer to distribute density over")
    for name, shape in shapes.items():
        if len(shape) == 0 or any(int(d) <= 0 for d in shape):
            raise ValueError(f"shape of {name!r} must have positive dimensions, got {tuple(shape)}")


def erk_score(shape: Sequence[int]) -> float:
    """Erdos-Renyi-Kernel density score ``sum(shape) / prod(shape)``.

    For a convolution ``(n_out, n_in, k_h, k_w)`` this is
    ``(n_out + n_in + k_h + k_w) / (n_out * n_in * k_h * k_w)`` and for a linear
    layer ``(n_out + n_in) / (n_out * n_in)`` (Evci et al. 2020; paper section 3.1).
    """
    return sum(int(d) for d in shape) / _numel(shape)


def initial_densities(
    shapes: Mapping[str, Sequence[int]], sparsity: float, distribution: str = "erk"
) -> dict[str, float]:
    """Density of every sparse layer at initialization.

    ``uniform`` gives every layer ``1 - sparsity``. ``erk`` makes layer ``l``'s density
    proportional to :func:`erk_score`, scaled so that ``sum(d_l * N_l) == (1 - sparsity) *
    sum(N_l)``; a layer whose density would exceed 1 is made dense and the scale re-solved
    for the rest, until no density exceeds 1 (as RigL's reference implementation does).

    Args:
        shapes: parameter name -> tensor shape of every sparse layer.
        sparsity: fraction of zeros over all sparse layers together, in ``[0, 1)``.
        distribution: ``"erk"`` or ``"uniform"``.

    Returns:
        name -> density in ``(0, 1]``, in the order of ``shapes``.
    """
    sparsity = check_sparsity(sparsity)
    _check_shapes(shapes)
    check_choice("distribution", distribution, DISTRIBUTIONS)
    density = 1.0 - sparsity
    if distribution == "uniform":
        return {name: density for name in shapes}

    sizes = {name: _numel(shape) for name, shape in shapes.items()}
    scores = {name: erk_score(shape) for name, shape in shapes.items()}
    target = density * sum(sizes.values())
    dense: set[str] = set()
    while True:
        sparse_names = [n for n in shapes if n not in dense]
        if not sparse_names:
            return {name: 1.0 for name in shapes}
        remaining = target - sum(sizes[n] for n in dense)
        scale = remaining / sum(scores[n] * sizes[n] for n in sparse_names)
        overfull = [n for n in sparse_names if scale * scores[n] > 1.0]
        if not overfull:
            break
        # Cap the most over-full layer first: capping one layer lowers the scale of the rest.
        dense.add(max(overfull, key=lambda n: scores[n]))
    return {name: 1.0 if name in dense else scale * scores[name] for name in shapes}


def layer_budget(shapes: Mapping[str, Sequence[int]], sparsity: float) -> int:
    """Active weights over all sparse layers: ``round((1 - sparsity) * total)``.

    Every sparse layer keeps at least one active weight (an empty layer cuts the network in
    two), so the budget must be at least the number of layers.

    Raises:
        ValueError: the budget is below one weight per layer; the message names the largest
            sparsity these layers allow.
    """
    sparsity = check_sparsity(sparsity)
    _check_shapes(shapes)
    total = sum(_numel(shape) for shape in shapes.values())
    budget = round((1.0 - sparsity) * total)
    if budget < len(shapes):
        raise ValueError(
            f"sparsity={sparsity!r} leaves {budget} active weights for the {len(shapes)} sparse "
            f"layers ({total} weights); every layer keeps at least one active weight, so "
            f"sparsity must be at most {1 - len(shapes) / total:.6g} for these layers: lower "
            "the sparsity or exclude some layers"
        )
    return budget


def active_counts(
    shapes: Mapping[str, Sequence[int]],
    densities: Mapping[str, float],
    total: int | None = None,
    minimum: int = 1,
) -> dict[str, int]:
    """Integer number of active weights per layer for the given densities.

    Each layer gets ``floor(d_l * N_l)`` or one more (largest remainder first), so the
    counts add up exactly to ``total`` (default: ``round(sum(d_l * N_l))``). Every layer
    keeps at least ``minimum`` weights: an empty layer would cut the network in two.

    Raises:
        ValueError: if ``total`` cannot be met with ``minimum`` weights per layer.
    """
    sizes = {name: _numel(shapes[name]) for name in densities}
    exact = {name: float(densities[name]) * sizes[name] for name in densities}
    if total is None:
        total = round(sum(exact.values()))
    floor_min = {name: min(sizes[name], minimum) for name in densities}
    if total < sum(floor_min.values()):
        raise ValueError(
            f"{total} active weights cannot give each of the {len(sizes)} sparse layers at "
            f"least {minimum}: lower the sparsity or exclude some layers"
        )
    if total > sum(sizes.values()):
        raise ValueError(f"{total} active weights do not fit into {sum(sizes.values())}")
    counts = {n: min(sizes[n], max(floor_min[n], math.floor(exact[n]))) for n in densities}
    missing = total - sum(counts.values())
    # Hand out (or take back) single weights by largest (smallest) fractional remainder.
    order = sorted(densities, key=lambda n: exact[n] - counts[n], reverse=missing > 0)
    while missing != 0:
        changed = False
        for name in order:
            if missing > 0 and counts[name] < sizes[name]:
                counts[name] += 1
                missing -= 1
                changed = True
            elif missing < 0 and counts[name] > floor_min[name]:
                counts[name] -= 1
                missing += 1
                changed = True
            if missing == 0:
                break
        if not changed:  # pragma: no cover - excluded by the checks above
            raise RuntimeError("could not distribute active counts")
    return counts
