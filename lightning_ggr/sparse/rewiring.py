"""One rewiring: removal -> allocation -> insertion on boolean masks (paper sections 3.2-3.3).

Every method is three independent choices (``docs/methods.md``), each a small object here:

- a *removal* picks the active weights to drop (:class:`MagnitudeRemoval`,
  :class:`ThresholdRemoval` for DSR, which owns its adaptive threshold);
- an *allocation* decides how many new weights each layer gets (:class:`KeepAllocation`,
  :class:`GradientAllocation` for GGR, :class:`ProportionalAllocation` for DSR);
- an *insertion* chooses where inside a layer they go (:class:`GradientInsertion` for RigL,
  :class:`RandomInsertion` for SET, :class:`MixedInsertion` for GGR).

:class:`Rewiring` composes one of each; ``lightning_ggr.sparse.methods`` holds the presets.
The pure functions below the classes do the work and are usable on their own. Every rewiring
works in place on the given masks and weights and keeps the total number of active weights
exactly: ``sum(grown) == sum(removed)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from lightning_ggr.sparse.checks import check_fraction
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


class Removal(Protocol):
    """Picks the active weights to drop; may keep state across rewirings (DSR's threshold)."""

    def __call__(self, weights: Mapping[str, Tensor], masks: Mapping[str, Tensor],
                 drop_fraction: float) -> dict[str, Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class MagnitudeRemoval:
    """Local magnitude removal (SET, RigL, GGR): see :func:`remove_by_magnitude`."""

    def __call__(self, weights: Mapping[str, Tensor], masks: Mapping[str, Tensor],
                 drop_fraction: float) -> dict[str, Tensor]:
        return remove_by_magnitude(weights, masks, drop_fraction)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class ThresholdRemoval:
    """DSR's removal: every active weight below a global threshold ``H`` goes.

    The target count is ``K = round(f * total active)``. After removing, ``H`` is doubled
    when fewer than ``(1 - tolerance) K`` weights fell below it and halved when more than
    ``(1 + tolerance) K`` did (:func:`adapt_threshold`). ``H`` starts (and restarts, should
    halving ever drive it to 0) at the ``K``-th smallest active magnitude
    (:func:`initial_threshold`).

    Args:
        tolerance: DSR's tolerance around ``K``, in ``(0, 1)`` (their code: 0.1).
        threshold: the current ``H``; ``None`` until the first rewiring sets it.
    """

    def __init__(self, tolerance: float = 0.1, threshold: float | None = None) -> None:
        self.tolerance = check_fraction("dsr_tolerance", tolerance, 0.0, 1.0,
                                        closed_low=False, closed_high=False)
        self.threshold = threshold

    def __call__(self, weights: Mapping[str, Tensor], masks: Mapping[str, Tensor],
                 drop_fraction: float) -> dict[str, Tensor]:
        target = _round_half_up(drop_fraction * sum(int(m.sum()) for m in masks.values()))
        if self.threshold is None or self.threshold <= 0.0:
            self.threshold = initial_threshold(weights, masks, target)
        dropped = remove_by_threshold(weights, masks, self.threshold)
        removed = sum(int(d.sum()) for d in dropped.values())
        self.threshold = adapt_threshold(self.threshold, removed, target, self.tolerance)
        return dropped

    def state_dict(self) -> dict[str, Any]:
        return {"threshold": None if self.threshold is None else float(self.threshold)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        threshold = state.get("threshold")
        self.threshold = None if threshold is None else float(threshold)


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


class Allocation(Protocol):
    """How many new weights each layer gets, given the masks after removal."""

    needs_gradients: bool
    moves_between_layers: bool

    def __call__(self, masks: Mapping[str, Tensor], gradients: Mapping[str, Tensor] | None,
                 removed: Mapping[str, int], survivors: Mapping[str, int]) -> list[int]: ...


class KeepAllocation:
    """Every layer regrows as many weights as it lost: layer densities stay fixed."""

    needs_gradients = False
    moves_between_layers = False

    def __call__(self, masks: Mapping[str, Tensor], gradients: Mapping[str, Tensor] | None,
                 removed: Mapping[str, int], survivors: Mapping[str, int]) -> list[int]:
        return [removed[name] for name in masks]


class GradientAllocation:
    """GGR's global gradient-based redistribution: see :func:`allocate_by_gradient`."""

    needs_gradients = True
    moves_between_layers = True

    def __call__(self, masks: Mapping[str, Tensor], gradients: Mapping[str, Tensor] | None,
                 removed: Mapping[str, int], survivors: Mapping[str, int]) -> list[int]:
        assert gradients is not None
        return allocate_by_gradient(gradients, masks, sum(removed.values()))


class ProportionalAllocation:
    """DSR's allocation in proportion to surviving counts: see :func:`allocate_proportional`."""

    needs_gradients = False
    moves_between_layers = True

    def __call__(self, masks: Mapping[str, Tensor], gradients: Mapping[str, Tensor] | None,
                 removed: Mapping[str, int], survivors: Mapping[str, int]) -> list[int]:
        alive = [survivors[name] for name in masks]
        capacity = [masks[name].numel() - survivors[name] for name in masks]
        return allocate_proportional(alive, capacity, sum(removed.values()))


# --------------------------------------------------------------------------- insertion


def _uniform_scores(like: Tensor, generator: torch.Generator) -> Tensor:
    """Uniform random numbers shaped like ``like``, drawn on its device from ``generator``."""
    if like.device == generator.device:
        return torch.rand(like.shape, generator=generator, device=like.device)
    # A per-call device generator seeded from the (checkpointed) host generator.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    device_generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.rand(like.shape, generator=device_generator, device=like.device)


def grow_by_gradient(mask: Tensor, gradient: Tensor, count: int) -> Tensor:
    """The ``count`` inactive positions of largest ``|gradient|`` (RigL)."""
    if count <= 0:
        return torch.zeros_like(mask)
    scores = torch.where(mask, -1.0, gradient.detach().abs().float())
    return _select(scores, count, largest=True)


def grow_at_random(mask: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` inactive positions drawn uniformly at random (SET).

    Draws nothing from ``generator`` when ``count`` is 0.
    """
    if count <= 0:
        return torch.zeros_like(mask)
    scores = torch.where(mask, -1.0, _uniform_scores(mask, generator))
    return _select(scores, count, largest=True)


class Insertion(Protocol):
    """Where inside a layer its new weights go."""

    needs_gradients: bool

    def __call__(self, mask: Tensor, gradient: Tensor | None, count: int,
                 generator: torch.Generator) -> Tensor: ...


class GradientInsertion:
    """RigL: at the inactive positions of largest gradient magnitude."""

    needs_gradients = True

    def __call__(self, mask: Tensor, gradient: Tensor | None, count: int,
                 generator: torch.Generator) -> Tensor:
        assert gradient is not None
        return grow_by_gradient(mask, gradient, count)


class RandomInsertion:
    """SET: at uniformly random inactive positions."""

    needs_gradients = False

    def __call__(self, mask: Tensor, gradient: Tensor | None, count: int,
                 generator: torch.Generator) -> Tensor:
        return grow_at_random(mask, count, generator)


class MixedInsertion:
    """GGR: ``floor(gradient_ratio * c + 0.5)`` of a layer's ``c`` new weights by gradient,
    the rest at random among the inactive positions that remain.

    Args:
        gradient_ratio: share grown by gradient, in ``[0, 1]`` (the paper: 0.5).
    """

    needs_gradients = True

    def __init__(self, gradient_ratio: float = 0.5) -> None:
        self.gradient_ratio = check_fraction("gradient_ratio", gradient_ratio)

    def __call__(self, mask: Tensor, gradient: Tensor | None, count: int,
                 generator: torch.Generator) -> Tensor:
        assert gradient is not None
        by_gradient = _round_half_up(self.gradient_ratio * count)
        grown = grow_by_gradient(mask, gradient, by_gradient)
        if count > by_gradient:
            grown |= grow_at_random(mask | grown, count - by_gradient, generator)
        return grown


# ------------------------------------------------------------------------------ compose


class Rewiring:
    """One dynamic-sparse-training method: removal, then allocation, then insertion.

    Dropped weights become 0 and grown ones ``init_value``. Positions dropped in a rewiring
    may be grown again in the same rewiring (as in RigL). The total active count is
    conserved. State (DSR's threshold) lives in the removal and is saved by
    :meth:`state_dict`.

    Args:
        removal: which active weights go.
        allocation: how many new weights each layer gets.
        insertion: where inside each layer they go.
        init_value: value of a newly grown weight (the paper: ``1e-10``).
    """

    def __init__(self, removal: Removal, allocation: Allocation, insertion: Insertion,
                 init_value: float = 1e-10) -> None:
        self.removal = removal
        self.allocation = allocation
        self.insertion = insertion
        self.init_value = float(init_value)

    @property
    def needs_gradients(self) -> bool:
        """Whether rewiring reads the dense gradient (RigL- and GGR-style growth)."""
        return self.allocation.needs_gradients or self.insertion.needs_gradients

    @torch.no_grad()
    def __call__(
        self,
        weights: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        gradients: Mapping[str, Tensor] | None,
        drop_fraction: float,
        *,
        generator: torch.Generator,
        on_grow: Callable[[str, Tensor], None] | None = None,
    ) -> RewiringReport:
        """Rewire ``masks`` and ``weights`` in place.

        Args:
            weights: name -> parameter; masked entries are expected to be 0.
            masks: name -> boolean mask, modified in place.
            gradients: name -> dense gradient of the rewiring step (required when
                :attr:`needs_gradients`).
            drop_fraction: fraction ``f`` of each layer's active weights to drop.
            generator: source of randomness for random insertion.
            on_grow: called with each layer's name and the positions grown in it (a bool
                tensor, including positions dropped and regrown in this rewiring), e.g. to
                reset their optimizer state.
        """
        if self.needs_gradients and gradients is None:
            raise ValueError("this method grows by gradient: pass the dense gradients")
        names = list(masks)
        before = {n: int(masks[n].sum()) for n in names}
        dropped = self.removal(weights, masks, drop_fraction)
        removed = {n: int(dropped[n].sum()) for n in names}
        for name in names:
            masks[name] &= ~dropped[name]
            weights[name].masked_fill_(dropped[name], 0.0)
        survivors = {n: before[n] - removed[n] for n in names}
        counts = self.allocation(masks, gradients, removed, survivors)

        grown = {}
        for name, count in zip(names, counts, strict=True):
            gradient = None if gradients is None else gradients.get(name)
            new = self.insertion(masks[name], gradient, count, generator)
            masks[name] |= new
            weights[name].masked_fill_(new, self.init_value)
            if on_grow is not None:
                on_grow(name, new)
            grown[name] = count
        return RewiringReport(
            drop_fraction=drop_fraction,
            removed=removed,
            grown=grown,
            active={n: survivors[n] + grown[n] for n in names},
            threshold=getattr(self.removal, "threshold", None),
        )

    def state_dict(self) -> dict[str, Any]:
        """The removal's state (DSR's threshold); plain Python values."""
        return self.removal.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.removal.load_state_dict(state)
