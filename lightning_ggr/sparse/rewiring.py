"""One rewiring: removal -> allocation -> insertion on boolean masks (paper sections 3.2-3.3).

All functions work in place on the given masks and weights and keep the total number of
active weights exactly: ``sum(grown) == sum(removed)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_ggr.sparse.methods import MethodSpec
from lightning_ggr.sparse.topk import global_topk_counts


@dataclass
class RewiringReport:
    """What one rewiring did, per layer (parameter name -> count)."""

    drop_fraction: float
    removed: dict[str, int]
    grown: dict[str, int]
    active: dict[str, int]
    threshold: float | None = None
    skipped: bool = False

    @property
    def total_removed(self) -> int:
        return sum(self.removed.values())

    @property
    def total_grown(self) -> int:
        return sum(self.grown.values())

    @property
    def moved(self) -> dict[str, int]:
        """Net change of each layer's active count (positive: the layer gained weights)."""
        return {name: self.grown[name] - self.removed[name] for name in self.removed}

    @property
    def total_moved(self) -> int:
        """Weights that changed layer: the sum of the positive net changes."""
        return sum(max(0, change) for change in self.moved.values())


def _round_half_up(value: float) -> int:
    return math.floor(value + 0.5)


def _select(scores: Tensor, count: int, largest: bool) -> Tensor:
    """A boolean tensor shaped like ``scores`` marking its ``count`` extreme entries."""
    chosen = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if count > 0:
        index = scores.reshape(-1).topk(count, largest=largest, sorted=False).indices
        chosen[index] = True
    return chosen.view(scores.shape)


# ----------------------------------------------------------------------------- removal


def remove_by_magnitude(
    weights: Mapping[str, Tensor], masks: Mapping[str, Tensor], drop_fraction: float
) -> dict[str, Tensor]:
    """Each layer drops its ``round(f * n_l)`` active weights of smallest magnitude.

    A layer always keeps at least one active weight. Returns the dropped positions.
    """
    dropped = {}
    for name, mask in masks.items():
        active = int(mask.sum())
        count = min(_round_half_up(drop_fraction * active), max(active - 1, 0))
        scores = torch.where(mask, weights[name].detach().abs(), torch.inf)
        dropped[name] = _select(scores, count, largest=False)
    return dropped


def remove_by_threshold(
    weights: Mapping[str, Tensor], masks: Mapping[str, Tensor], threshold: float
) -> dict[str, Tensor]:
    """DSR: drop every active weight with magnitude below ``threshold`` (global).

    A layer whose every weight is below the threshold keeps its largest one.
    """
    dropped = {}
    for name, mask in masks.items():
        magnitude = weights[name].detach().abs()
        drop = mask & (magnitude < threshold)
        if int(drop.sum()) == int(mask.sum()) and int(mask.sum()) > 0:
            keep = _select(torch.where(mask, magnitude, -1.0), 1, largest=True)
            drop &= ~keep
        dropped[name] = drop
    return dropped


def adapt_threshold(threshold: float, removed: int, target: int, tolerance: float) -> float:
    """DSR's threshold update: double it when too few were pruned, halve it when too many."""
    if removed < (1.0 - tolerance) * target:
        return threshold * 2.0
    if removed > (1.0 + tolerance) * target:
        return threshold / 2.0
    return threshold


def initial_threshold(weights: Mapping[str, Tensor], masks: Mapping[str, Tensor], k: int) -> float:
    """The k-th smallest active magnitude over all layers: a data-driven start for DSR's H."""
    if k <= 0:
        return 0.0
    negated = (torch.where(m, -weights[n].detach().abs(), -torch.inf) for n, m in masks.items())
    # The k largest negated magnitudes are the k smallest magnitudes; stream per layer.
    values: Tensor | None = None
    for score in negated:
        flat = score.reshape(-1).float()
        top = flat.topk(min(k, flat.numel()), sorted=False).values
        values = top if values is None else torch.cat([values, top.to(values.device)])
        if values.numel() > k:
            values = values.topk(k, sorted=False).values
    return float(-values.min())


# -------------------------------------------------------------------------- allocation


def allocate_proportional(
    survivors: Sequence[int], capacity: Sequence[int], total: int
) -> list[int]:
    """DSR: split ``total`` new weights in proportion to each layer's surviving count.

    A layer whose share exceeds its ``capacity`` (free positions) is filled and the rest is
    re-split among the others, in the same proportion; the final integer shares follow
    the largest remainders, so they add up to ``total`` exactly.
    """
    counts = [0] * len(survivors)
    remaining = total
    open_layers = [i for i, cap in enumerate(capacity) if cap > 0]
    while remaining > 0 and open_layers:
        weight = {i: max(survivors[i], 0) for i in open_layers}
        if sum(weight.values()) == 0:
            weight = dict.fromkeys(open_layers, 1)
        exact = {i: remaining * weight[i] / sum(weight.values()) for i in open_layers}
        overfull = [i for i in open_layers if exact[i] > capacity[i] - counts[i]]
        if overfull:
            for i in overfull:
                remaining -= capacity[i] - counts[i]
                counts[i] = capacity[i]
            open_layers = [i for i in open_layers if i not in overfull]
            continue
        share = {i: math.floor(exact[i]) for i in open_layers}
        leftover = remaining - sum(share.values())
        for i in sorted(open_layers, key=lambda i: exact[i] - share[i], reverse=True)[:leftover]:
            share[i] += 1
        for i in open_layers:
            counts[i] += share[i]
        remaining = 0
    if remaining:
        raise ValueError(f"{total} weights do not fit into {sum(capacity)} free positions")
    return counts


def allocate_by_gradient(
    gradients: Mapping[str, Tensor], masks: Mapping[str, Tensor], total: int
) -> list[int]:
    """GGR: layer ``l`` gets as many as it holds of the global top-``total`` inactive gradients."""
    scores = (torch.where(m, -1.0, gradients[n].detach().abs().float()) for n, m in masks.items())
    return global_topk_counts(scores, total)


# --------------------------------------------------------------------------- insertion


def _uniform_scores(like: Tensor, generator: torch.Generator) -> Tensor:
    """Uniform random numbers shaped like ``like``, drawn on its device from ``generator``."""
    if like.device == generator.device:
        return torch.rand(like.shape, generator=generator, device=like.device)
    # A per-call device generator seeded from the (checkpointed) host generator.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    device_generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.rand(like.shape, generator=device_generator, device=like.device)


def grow(
    mask: Tensor,
    gradient: Tensor | None,
    count: int,
    insertion: str,
    gradient_ratio: float,
    generator: torch.Generator,
) -> Tensor:
    """Positions (boolean, inactive in ``mask``) where ``count`` new weights go."""
    by_gradient = {"gradient": count, "random": 0, "mixed": _round_half_up(gradient_ratio * count)}
    gradient_count = by_gradient[insertion]
    grown = torch.zeros_like(mask)
    if gradient_count > 0:
        if gradient is None:
            raise ValueError(f"insertion {insertion!r} needs gradients")
        scores = torch.where(mask, -1.0, gradient.detach().abs().float())
        grown |= _select(scores, gradient_count, largest=True)
    random_count = count - gradient_count
    if random_count > 0:
        scores = torch.where(mask | grown, -1.0, _uniform_scores(mask, generator))
        grown |= _select(scores, random_count, largest=True)
    return grown


# ------------------------------------------------------------------------------ compose


@torch.no_grad()
def rewire_(
    weights: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    gradients: Mapping[str, Tensor] | None,
    method: MethodSpec,
    drop_fraction: float,
    *,
    generator: torch.Generator,
    gradient_ratio: float = 0.5,
    init_value: float = 1e-10,
    threshold: float | None = None,
    threshold_tolerance: float = 0.1,
    on_grow: Callable[[str, Tensor], None] | None = None,
) -> RewiringReport:
    """Run removal, allocation and insertion in place on ``masks`` and ``weights``.

    Dropped weights become 0 and grown ones ``init_value``. Positions dropped in this
    rewiring may be grown again (as in RigL). The total active count is conserved.

    Args:
        weights: name -> parameter; masked entries are expected to be 0.
        masks: name -> boolean mask, modified in place.
        gradients: name -> dense gradient of the rewiring step (required when
            ``method.needs_gradients``).
        method: the removal/allocation/insertion preset.
        drop_fraction: fraction ``f`` of each layer's active weights to drop.
        generator: source of randomness for random insertion.
        gradient_ratio: share of ``"mixed"`` insertion that goes by gradient.
        init_value: value of a newly grown weight.
        threshold: DSR's current threshold ``H`` (``None``: start from the data).
        threshold_tolerance: DSR's tolerance around the target removal count.
        on_grow: called with each layer's name and the positions grown in it (a bool tensor,
            including positions dropped and regrown in this rewiring), e.g. to reset their
            optimizer state.
    """
    if method.needs_gradients and gradients is None:
        raise ValueError("this method grows by gradient: pass the dense gradients")
    names = list(masks)
    before = {n: int(masks[n].sum()) for n in names}
    new_threshold = None
    if method.removal == "threshold":
        target = _round_half_up(drop_fraction * sum(before.values()))
        # Start (or restart, if halving drove it to 0) from the data: H = 0 prunes nothing.
        if threshold is None or threshold <= 0.0:
            threshold = initial_threshold(weights, masks, target)
        dropped = remove_by_threshold(weights, masks, threshold)
        removed_total = sum(int(d.sum()) for d in dropped.values())
        new_threshold = adapt_threshold(threshold, removed_total, target, threshold_tolerance)
    else:
        dropped = remove_by_magnitude(weights, masks, drop_fraction)
    removed = {n: int(dropped[n].sum()) for n in names}
    for name in names:
        masks[name] &= ~dropped[name]
        weights[name].masked_fill_(dropped[name], 0.0)
    total = sum(removed.values())

    if method.allocation == "keep":
        counts = [removed[n] for n in names]
    elif method.allocation == "gradient":
        counts = allocate_by_gradient(gradients, masks, total)
    else:
        survivors = [before[n] - removed[n] for n in names]
        capacity = [masks[n].numel() - survivors[i] for i, n in enumerate(names)]
        counts = allocate_proportional(survivors, capacity, total)

    grown = {}
    for name, count in zip(names, counts, strict=True):
        gradient = None if gradients is None else gradients.get(name)
        new = grow(masks[name], gradient, count, method.insertion, gradient_ratio, generator)
        masks[name] |= new
        weights[name].masked_fill_(new, init_value)
        if on_grow is not None:
            on_grow(name, new)
        grown[name] = count
    return RewiringReport(
        drop_fraction=drop_fraction,
        removed=removed,
        grown=grown,
        active={n: int(masks[n].sum()) for n in names},
        threshold=new_threshold,
    )
