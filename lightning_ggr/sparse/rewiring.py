"""One rewiring: removal -> allocation -> insertion on boolean masks (paper sections 3.2-3.3).

Every method is three independent choices (``docs/methods.md``), each a small object here:

- a *removal* picks the active weights to drop (:class:`MagnitudeRemoval`,
  :class:`ThresholdRemoval` for DSR, which owns its adaptive threshold);
- an *allocation* decides how many new weights each layer gets (:class:`KeepAllocation`,
  :class:`GradientAllocation` for GGR, :class:`ProportionalAllocation` for DSR);
- an *insertion* chooses where inside a layer they go (:class:`GradientInsertion` for RigL,
  :class:`RandomInsertion` for SET, :class:`MixedInsertion` for GGR).

:class:`Rewiring` composes one of each; ``lightning_ggr.sparse.methods`` holds the presets.
Every rewiring works in place on the given masks and weights and keeps the total number of
active weights exactly: ``sum(grown) == sum(removed)``.

How it runs on an accelerator: positions are flat index tensors (row-major over the layer's
shape), counts are host integers known without reading the device wherever they can be
(every selection is a ``topk`` of exactly ``k``), and the data-dependent ones are read in
one transfer (GGR's per-layer allocation, DSR's per-layer removals). Selections are shared
between layers, because on a GPU a ``topk`` is dozens of kernel launches whatever its size:
layers of similar sizes are the rows of one padded buffer for removal and insertion
(:func:`~lightning_ggr.sparse.topk.topk_rows`), small layers are packed into one buffer for
GGR's global top-k (:func:`~lightning_ggr.sparse.topk.global_topk_packed`). No buffer is
larger than the largest layer's scores, so the peak extra memory stays that plus O(K) for
the ``K`` moved weights; random draws happen on the layer's device.

Non-finite weights: a NaN or inf *active* weight scores below every finite magnitude, so
removal drops it first (DSR's threshold counts it as below ``H``); inactive positions are
never picked, whatever the values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from lightning_ggr.sparse.checks import check_finite, check_fraction, check_positive_or_none
from lightning_ggr.sparse.draws import draw_key, key_dtype, layer_key, random_keys
from lightning_ggr.sparse.masks import count_active, device_scalar
from lightning_ggr.sparse.sharded import (
    ShardLayout,
    all_sum,
    current_layout,
    select_across_shards,
    sharded_context,
)
from lightning_ggr.sparse.topk import (
    TIE_MARGIN,
    global_topk,
    global_topk_in_order,
    global_topk_packed,
    topk,
    topk_rows,
)

#: DSR's reference implementation starts its threshold here.
DSR_REFERENCE_THRESHOLD = 1e-3


@dataclass
class RewiringReport:
    """What one rewiring did, per layer (parameter name -> count)."""

    drop_fraction: float
    removed: dict[str, int]
    grown: dict[str, int]
    active: dict[str, int]
    threshold: float | None = None
    skipped: bool = False
    #: Why a due rewiring was postponed (``skipped``): a short phrase such as
    #: ``"non-finite sparse gradients"`` (the engine's ``SKIP_*``); ``None`` when it ran.
    skip_reason: str | None = None
    #: Sparse parameters left out because frozen or held by no optimizer (they keep their
    #: masks and weights and take no part in removal or allocation).
    frozen: tuple[str, ...] = ()
    #: Masked weights found non-zero at this due step (written by something else), per
    #: layer that had any: the engine zeroed them again before rewiring.
    stray_weights: dict[str, int] = field(default_factory=dict)

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


# ----------------------------------------------------------------------------- positions


def _extent(name: str | None, mask: Tensor) -> tuple[int, int]:
    """Where ``mask``'s flat positions start in its whole layer, and the layer's size: ``(0,
    mask.numel())`` in one process, this process's rows under a sharded rewiring."""
    layout = current_layout()
    if layout is not None and name in layout.layers:
        shard = layout.layers[name]
        return shard.start, shard.numel
    return 0, mask.numel()


def _summed(counts: Mapping[str, int]) -> dict[str, int]:
    """Per-layer counts of this process's positions, summed over the shards of a sharded
    rewiring (one all-reduce); as they are in one process."""
    layout = current_layout()
    if layout is None:
        return dict(counts)
    return dict(zip(counts, all_sum(list(counts.values()), layout), strict=True))


def _single_process(what: str) -> None:
    """Refuse a per-layer selection under a sharded rewiring: it would rank one shard."""
    if current_layout() is not None:
        raise RuntimeError(
            f"{what} selects within one tensor and cannot run across shards: a sharded "
            "rewiring selects for all layers at once (an insertion's select(), the "
            "removals and allocations of lightning_ggr.sparse.rewiring)")


def _with_start(entry: Tensor | tuple[Tensor, Tensor | float]) -> tuple[Tensor, Tensor | float]:
    """A ``states`` entry as ``(tensor, start)``: a bare tensor starts new weights at 0."""
    return (entry, 0.0) if isinstance(entry, Tensor) else (entry[0], entry[1])


def _empty_index(like: Tensor) -> Tensor:
    return torch.zeros(0, dtype=torch.int64, device=like.device)


def _as_index(selection: Tensor) -> Tensor:
    """Flat indices of a selection: an index tensor as is, a bool tensor's True positions
    (a host synchronisation: for pieces written against boolean selections)."""
    if selection.dtype == torch.bool:
        return selection.reshape(-1).nonzero().squeeze(1)
    return selection.reshape(-1)


def _to_bool(index: Tensor, like: Tensor) -> Tensor:
    positions = torch.zeros(like.numel(), dtype=torch.bool, device=like.device)
    positions.index_fill_(0, index, True)
    return positions.view(like.shape)


def _flat(tensor: Tensor, index: Tensor) -> tuple[Tensor, Tensor] | None:
    """A 1-D view of ``tensor``'s memory and the positions there of flat row-major ``index``
    (``None`` for a tensor with gaps or overlaps).

    A contiguous tensor is its own flat view. A dense one in another layout (channels_last)
    is viewed in memory order and the row-major index mapped through its strides with
    device arithmetic on Python integers (``torch.unravel_index`` would copy the shape to
    the device from the host: a synchronisation on CUDA).
    """
    if tensor.is_contiguous():
        return tensor.view(-1), index
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(tensor.stride(), tensor.shape,
                                                          strict=True) if sz != 1):
        if stride != expected:
            return None
        expected *= size
    offsets = torch.zeros_like(index)
    rest = index
    for size, stride in reversed(list(zip(tensor.shape, tensor.stride(), strict=True))):
        offsets += rest.remainder(size) * stride
        rest = rest.div(size, rounding_mode="floor")
    return tensor.as_strided((tensor.numel(),), (1,), tensor.storage_offset()), offsets


def _gather(tensor: Tensor, index: Tensor) -> Tensor:
    """``tensor``'s entries at flat (row-major) ``index``, whatever its memory layout."""
    flat = _flat(tensor, index)
    if flat is None:
        return tensor[torch.unravel_index(index, tensor.shape)]
    return flat[0].index_select(0, flat[1])


def _write_(tensor: Tensor, index: Tensor, values: Tensor | float | bool) -> None:
    """Write ``values`` at flat (row-major) ``index`` of ``tensor``, in place, O(len(index)).

    Never ``tensor[index] = 0.0``: on CUDA, item assignment of a Python number builds the
    number on the CPU and copies it to the device, a synchronisation per call.
    ``index_fill_`` takes the number as a kernel argument.
    """
    if index.numel() == 0:
        return
    flat = _flat(tensor, index)
    if flat is None:  # gaps or overlaps: rare, and slower
        if not isinstance(values, Tensor):
            values = device_scalar(values, tensor.dtype, tensor.device)
        tensor.index_put_(torch.unravel_index(index, tensor.shape), values)
    elif isinstance(values, Tensor):
        flat[0].index_copy_(0, flat[1], values)
    else:
        flat[0].index_fill_(0, flat[1], values)


def _score_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _abs_into(out: Tensor, values: Tensor) -> None:
    """``out = abs(values)``: one kernel when the dtypes match, else a copy first."""
    if values.dtype == out.dtype:
        torch.abs(values, out=out)
    else:
        out.copy_(values).abs_()


def magnitude_scores(weight: Tensor, mask: Tensor, out: Tensor | None = None) -> Tensor:
    """Flat removal scores of one layer: ``abs(weight)`` at active positions, ``+inf`` at
    inactive ones, ``-1`` at a non-finite active weight (so it is dropped first); written into
    ``out`` (1-D, the mask's size) when given."""
    scores = out if out is not None else torch.empty(
        mask.numel(), dtype=_score_dtype(weight.dtype), device=mask.device)
    _abs_into(scores.view(mask.shape), weight.detach())
    scores.nan_to_num_(nan=-1.0, posinf=-1.0)
    inf = device_scalar(math.inf, scores.dtype, scores.device)
    return torch.where(mask.reshape(-1), scores, inf, out=scores)


def gradient_scores(gradient: Tensor | None, mask: Tensor, out: Tensor | None = None) -> Tensor:
    """Flat growth scores of one layer: ``abs(gradient)`` at inactive positions, ``-1`` at
    active ones (no gradient: 0 everywhere inactive); written into ``out`` (1-D, the mask's
    size) when given."""
    if out is None:
        dtype = _score_dtype(gradient.dtype) if gradient is not None else torch.float32
        out = torch.empty(mask.numel(), dtype=dtype, device=mask.device)
    scores = out
    if gradient is None:
        scores.zero_()
    else:
        _abs_into(scores.view(mask.shape), gradient.detach())
    return scores.masked_fill_(mask.reshape(-1), -1.0)


# ----------------------------------------------------------------------------- removal


def _topk_per_layer(
    masks: Mapping[str, Tensor], counts: Mapping[str, int],
    write: Callable[[str, Tensor], object], dtypes: Mapping[str, torch.dtype], *,
    largest: bool, pad: float | None = None,
) -> dict[str, Tensor]:
    """Each layer's ``counts[name]`` largest (smallest) scores, as flat indices; ``write(name,
    out)`` fills a layer's scores into ``out``. Layers of one device and score type share
    selections (:func:`lightning_ggr.sparse.topk.topk_rows`): a few ``topk`` for all.
    ``pad``: a score never selected (default ``-inf`` for the largest, ``+inf`` for the
    smallest)."""
    groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for name, mask in masks.items():
        groups.setdefault((mask.device, dtypes[name]), []).append(name)
    found: dict[str, Tensor] = {}
    layout = current_layout()
    for (device, dtype), names in groups.items():
        if layout is not None:  # across shards: one selection per layer, exact
            found.update(zip(names, select_across_shards(
                [masks[n].numel() for n in names], range(len(names)),
                [max(counts[n], 0) for n in names],
                lambda i, out, names=names: write(names[i], out), dtype=dtype,
                largest=largest, device=device, layout=layout).indices, strict=True))
            continue
        found.update(zip(names, topk_rows(
            [masks[n].numel() for n in names], [max(counts[n], 0) for n in names],
            lambda i, out, names=names: write(names[i], out), largest=largest,
            pad=(-math.inf if largest else math.inf) if pad is None else pad, device=device,
            dtype=dtype), strict=True))
    return {name: found[name] for name in masks}


def drop_smallest(
    weights: Mapping[str, Tensor], masks: Mapping[str, Tensor], counts: Mapping[str, int]
) -> dict[str, Tensor]:
    """Flat indices of each layer's ``counts[name]`` active weights of smallest magnitude
    (non-finite ones first); ``counts[name]`` must not exceed the layer's active count."""
    return _topk_per_layer(
        masks, counts, lambda name, out: magnitude_scores(weights[name], masks[name], out),
        {name: _score_dtype(weights[name].dtype) for name in masks}, largest=False)


def magnitude_counts(active: Mapping[str, int], drop_fraction: float) -> dict[str, int]:
    """Each layer drops ``round(f * n_l)`` weights, keeping at least one."""
    return {name: min(_round_half_up(drop_fraction * n), max(n - 1, 0))
            for name, n in active.items()}


def remove_by_magnitude(
    weights: Mapping[str, Tensor], masks: Mapping[str, Tensor], drop_fraction: float
) -> dict[str, Tensor]:
    """Each layer drops its ``round(f * n_l)`` active weights of smallest magnitude.

    A layer always keeps at least one active weight. Returns the dropped positions (bool).
    """
    active = _active_or_count(masks, None)
    dropped = drop_smallest(weights, masks, magnitude_counts(active, drop_fraction))
    return {name: _to_bool(index, masks[name]) for name, index in dropped.items()}


def threshold_counts(
    weights: Mapping[str, Tensor], masks: Mapping[str, Tensor], threshold: float,
    active: Mapping[str, int],
) -> dict[str, int]:
    """How many active weights of each layer are below ``threshold`` (non-finite ones count
    as below), read back in one transfer; a layer whose every weight is below keeps one."""
    below = [torch.count_nonzero(magnitude_scores(weights[n], m) < threshold)
             for n, m in masks.items()]
    summed = _summed(dict(zip(masks, _read_ints(below), strict=True)))
    counts = {}
    for name, value in summed.items():
        counts[name] = min(value, max(active[name] - 1, 0))
    return counts


def _read_ints(values: Sequence[Tensor]) -> list[int]:
    """0-dim integer tensors as host ints, one transfer per device."""
    out = [0] * len(values)
    by_device: dict[torch.device, list[int]] = {}
    for index, value in enumerate(values):
        by_device.setdefault(value.device, []).append(index)
    for indices in by_device.values():
        read = torch.stack([values[i] for i in indices]).tolist()
        for i, value in zip(indices, read, strict=True):
            out[i] = int(value)
    return out


def remove_by_threshold(
    weights: Mapping[str, Tensor], masks: Mapping[str, Tensor], threshold: float
) -> dict[str, Tensor]:
    """DSR: drop every active weight with magnitude below ``threshold`` (global).

    A layer whose every weight is below the threshold keeps its largest one. Returns the
    dropped positions (bool).
    """
    active = _active_or_count(masks, None)
    dropped = drop_smallest(weights, masks, threshold_counts(weights, masks, threshold, active))
    return {name: _to_bool(index, masks[name]) for name, index in dropped.items()}


def adapt_threshold(threshold: float, removed: int, target: int, tolerance: float) -> float:
    """DSR's threshold update: double it when too few were pruned, halve it when too many."""
    if removed < (1.0 - tolerance) * target:
        return threshold * 2.0
    if removed > (1.0 + tolerance) * target:
        return threshold / 2.0
    return threshold


def initial_threshold(weights: Mapping[str, Tensor], masks: Mapping[str, Tensor], k: int) -> float:
    """The k-th smallest finite active magnitude over all layers: a data-driven start for
    DSR's H (``inf`` when fewer than ``k`` are finite, 0 when ``k <= 0``)."""
    if k <= 0:
        return 0.0

    def negated(name: str) -> Tensor:
        scores = magnitude_scores(weights[name], masks[name])
        # Non-finite weights (scored -1) and inactive positions take no part.
        return scores.masked_fill_(scores < 0, math.inf).neg_()

    layout = current_layout()
    if layout is not None:  # the k-th over all layers and shards
        names = list(masks)
        k = min(k, sum(_extent(name, masks[name])[1] for name in names))
        value = select_across_shards(
            [masks[n].numel() for n in names], [0] * len(names), [k],
            lambda i, out: out.copy_(negated(names[i])), dtype=_score_dtype(
                next(iter(weights.values())).dtype), largest=True,
            device=next(iter(masks.values())).device, layout=layout, indices=False).values[0]
        return -float(value)
    k = min(k, sum(m.numel() for m in masks.values()))
    top = global_topk((negated(name) for name in masks), k)
    return float(-top.values.min())


def _active_or_count(masks: Mapping[str, Tensor],
                     active: Mapping[str, int] | None) -> Mapping[str, int]:
    if active is not None:
        return active
    return _summed(dict(zip(masks, count_active(masks.values()), strict=True)))


class Removal(Protocol):
    """Picks the active weights to drop (flat index tensor per layer); ``active`` holds each
    layer's active count when the caller knows it. May keep state across rewirings (DSR's
    threshold)."""

    def __call__(self, weights: Mapping[str, Tensor], masks: Mapping[str, Tensor],
                 drop_fraction: float, *,
                 active: Mapping[str, int] | None = None) -> dict[str, Tensor]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class MagnitudeRemoval:
    """Local magnitude removal (SET, RigL, GGR): each layer drops its ``round(f * n_l)``
    active weights of smallest magnitude, at most ``n_l - 1``, with no host read."""

    def __call__(self, weights: Mapping[str, Tensor], masks: Mapping[str, Tensor],
                 drop_fraction: float, *,
                 active: Mapping[str, int] | None = None) -> dict[str, Tensor]:
        active = _active_or_count(masks, active)
        return drop_smallest(weights, masks, magnitude_counts(active, drop_fraction))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class ThresholdRemoval:
    """DSR's removal: every active weight below a global threshold ``H`` goes.

    The target count is ``K = round(f * total active)``. After removing, ``H`` is doubled
    when fewer than ``(1 - tolerance) K`` weights fell below it and halved when more than
    ``(1 + tolerance) K`` did (:func:`adapt_threshold`). ``H`` starts at
    ``initial_threshold`` (DSR's reference: 1e-3), or, when that is ``None``, at the ``K``-th
    smallest finite active magnitude of the first rewiring (:func:`initial_threshold`); it
    starts again the same way should it ever stop being a positive finite number (halved to
    0, or a saved NaN). The per-layer counts below ``H`` are read back in one transfer.

    Args:
        tolerance: DSR's tolerance around ``K``, in ``(0, 1)`` (their code: 0.1).
        threshold: the current ``H``; ``None`` until the first rewiring sets it.
        initial_threshold: the first ``H``, finite and > 0, or ``None`` for the data-driven
            start.
    """

    def __init__(self, tolerance: float = 0.1, threshold: float | None = None, *,
                 initial_threshold: float | None = DSR_REFERENCE_THRESHOLD) -> None:
        self.tolerance = check_fraction("dsr_tolerance", tolerance, 0.0, 1.0,
                                        closed_low=False, closed_high=False)
        self.initial_threshold = check_positive_or_none("dsr_initial_threshold",
                                                        initial_threshold)
        self.threshold = threshold

    def _start(self, weights: Mapping[str, Tensor], masks: Mapping[str, Tensor],
               target: int) -> float:
        if self.initial_threshold is not None:
            return self.initial_threshold
        start = initial_threshold(weights, masks, target)
        # No usable magnitude (every active weight 0 or non-finite): DSR's reference start.
        return start if math.isfinite(start) and start > 0 else DSR_REFERENCE_THRESHOLD

    def __call__(self, weights: Mapping[str, Tensor], masks: Mapping[str, Tensor],
                 drop_fraction: float, *,
                 active: Mapping[str, int] | None = None) -> dict[str, Tensor]:
        active = _active_or_count(masks, active)
        target = _round_half_up(drop_fraction * sum(active.values()))
        threshold = self.threshold
        if threshold is None or not math.isfinite(threshold) or threshold <= 0.0:
            threshold = self._start(weights, masks, target)
        counts = threshold_counts(weights, masks, threshold, active)
        self.threshold = adapt_threshold(threshold, sum(counts.values()), target, self.tolerance)
        return drop_smallest(weights, masks, counts)

    def state_dict(self) -> dict[str, Any]:
        return {"threshold": None if self.threshold is None else float(self.threshold)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        threshold = state.get("threshold")
        self.threshold = None if threshold is None else float(threshold)


# -------------------------------------------------------------------------- allocation


class Allocated(NamedTuple):
    """An allocation's result: per-layer counts (host ints, in the masks' order), and, for
    allocations that ranked the free positions by gradient, each layer's winners best first
    (a gradient insertion reuses them instead of ranking the layer again)."""

    counts: list[int]
    ranked: dict[str, Tensor] | None = None


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


def rank_by_gradient(
    gradients: Mapping[str, Tensor | None], masks: Mapping[str, Tensor], total: int
) -> Allocated:
    """GGR: the global top-``total`` inactive ``abs`` gradients; layer ``l`` gets as many as
    it holds, and its winners, best first. Gradients tied at the ``total``-th go to the
    layers in order, then by position, on one device as across shards, so that both give
    every layer the same count and the same positions
    (:func:`~lightning_ggr.sparse.topk.global_topk_in_order`). Small layers share a
    selection (one buffer no larger than the largest layer at a time); one host read (a
    second, and the layers' scores once more, only when more than ``TIE_MARGIN`` gradients
    left out tie with the ``total``-th)."""
    names = list(masks)
    devices = {masks[n].device for n in names}
    layout = current_layout()
    if layout is not None:  # across layers and shards: exact, ties in (layer, rank) order
        dtypes = {_score_dtype(g.dtype) for g in gradients.values() if g is not None}
        found = select_across_shards(
            [masks[n].numel() for n in names], [0] * len(names), [total],
            lambda i, out: gradient_scores(gradients.get(names[i]), masks[names[i]], out),
            dtype=torch.float64 if torch.float64 in dtypes else torch.float32, largest=True,
            device=next(iter(devices)), layout=layout).indices
        counts = all_sum([index.numel() for index in found], layout)
        return Allocated(counts, None)
    sizes = [masks[n].numel() for n in names]
    take = min(total + TIE_MARGIN, sum(sizes))  # more: the values tied with the total-th

    def write(i: int, out: Tensor) -> None:
        gradient_scores(gradients.get(names[i]), masks[names[i]], out)

    if len(devices) == 1:  # one selection per buffer-full of small layers
        dtypes = {_score_dtype(g.dtype) for g in gradients.values() if g is not None}
        dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        device = devices.pop()
        top = global_topk_packed(sizes, write, take, device=device, dtype=dtype)
        buffer: list[Tensor] = []

        def scores(i: int) -> Tensor:  # again, into one buffer, when the total-th ties
            if not buffer:
                buffer.append(torch.empty(max(sizes), dtype=dtype, device=device))
            out = buffer[0][:sizes[i]]
            write(i, out)
            return out
    else:  # a model spread over devices: one layer at a time
        top = global_topk((gradient_scores(gradients.get(n), masks[n]) for n in names), take)

        def scores(i: int) -> Tensor:
            return gradient_scores(gradients.get(names[i]), masks[names[i]])
    counts, ranked = global_topk_in_order(top, total, scores, sum(sizes))
    return Allocated(counts, dict(zip(names, ranked, strict=True)))


def allocate_by_gradient(
    gradients: Mapping[str, Tensor], masks: Mapping[str, Tensor], total: int
) -> list[int]:
    """GGR: layer ``l`` gets as many as it holds of the global top-``total`` inactive gradients."""
    return rank_by_gradient(gradients, masks, total).counts


class Allocation(Protocol):
    """How many new weights each layer gets, given the masks after removal: a list of
    counts in the masks' order, or an :class:`Allocated`."""

    needs_gradients: bool
    moves_between_layers: bool

    def __call__(self, masks: Mapping[str, Tensor], gradients: Mapping[str, Tensor] | None,
                 removed: Mapping[str, int],
                 survivors: Mapping[str, int]) -> list[int] | Allocated: ...


class KeepAllocation:
    """Every layer regrows as many weights as it lost: layer densities stay fixed."""

    needs_gradients = False
    moves_between_layers = False

    def __call__(self, masks: Mapping[str, Tensor], gradients: Mapping[str, Tensor] | None,
                 removed: Mapping[str, int], survivors: Mapping[str, int]) -> list[int]:
        return [removed[name] for name in masks]


class GradientAllocation:
    """GGR's global gradient-based redistribution: see :func:`rank_by_gradient`."""

    needs_gradients = True
    moves_between_layers = True

    def __call__(self, masks: Mapping[str, Tensor], gradients: Mapping[str, Tensor] | None,
                 removed: Mapping[str, int], survivors: Mapping[str, int]) -> Allocated:
        assert gradients is not None
        return rank_by_gradient(gradients, masks, sum(removed.values()))


class ProportionalAllocation:
    """DSR's allocation in proportion to surviving counts: see :func:`allocate_proportional`."""

    needs_gradients = False
    moves_between_layers = True

    def __call__(self, masks: Mapping[str, Tensor], gradients: Mapping[str, Tensor] | None,
                 removed: Mapping[str, int], survivors: Mapping[str, int]) -> list[int]:
        alive = [survivors[name] for name in masks]
        capacity = [_extent(name, masks[name])[1] - survivors[name] for name in masks]
        return allocate_proportional(alive, capacity, sum(removed.values()))


# --------------------------------------------------------------------------- insertion


def random_scores(mask: Tensor, key: int, name: str | None = None,
                  exclude: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """Flat random-growth scores of one layer: its random keys for the draw ``key``
    (:func:`~lightning_ggr.sparse.draws.random_keys`) at inactive positions, ``-1`` at
    active ones and at ``exclude``; written into ``out`` (1-D, the mask's size, the keys'
    dtype) when given. Under a sharded rewiring the keys are those of this process's
    positions of the whole layer ``name``."""
    start, numel = _extent(name, mask)
    scores = random_keys(key, start, mask.numel(), numel, mask.device, out=out)
    scores.masked_fill_(mask.reshape(-1), -1)
    if exclude is not None and exclude.numel():
        scores.index_fill_(0, exclude, -1)
    return scores


def random_positions(mask: Tensor, count: int, generator: torch.Generator,
                     exclude: Tensor | None = None) -> Tensor:
    """Flat indices of ``count`` inactive positions (not in ``exclude``) drawn uniformly:
    those of largest random key for one key drawn from ``generator``."""
    if count <= 0:
        return _empty_index(mask)
    _single_process("random_positions")
    return topk(random_scores(mask, draw_key(generator), exclude=exclude), count)[1]


def gradient_positions(mask: Tensor, gradient: Tensor | None, count: int,
                       ranked: Tensor | None = None) -> Tensor:
    """Flat indices of the ``count`` inactive positions of largest ``abs(gradient)``; the
    first ``count`` of ``ranked`` (the layer's free positions best first) when given."""
    if count <= 0:
        return _empty_index(mask)
    if ranked is not None and ranked.numel() >= count:
        return ranked[:count]
    _single_process("gradient_positions")
    return topk(gradient_scores(gradient, mask), count)[1]


def random_positions_per_layer(
    masks: Mapping[str, Tensor], counts: Mapping[str, int],
    generators: Callable[[torch.device], torch.Generator],
    exclude: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """:func:`random_positions` for every layer at once (a few selections for all layers):
    ``counts[name]`` inactive positions of each layer, not in ``exclude[name]``, uniformly at
    random: those of largest random key for the layer's key in one draw from
    ``generators(cpu)``, made only when some layer grows. The keys of a layer are distinct,
    so the choice has no ties: it is the same on every device and every split of the
    layer."""
    exclude = exclude or {}
    if not any(count > 0 for count in counts.values()):
        return {name: _empty_index(mask) for name, mask in masks.items()}
    key = draw_key(generators(torch.device("cpu")))

    def write(name: str, out: Tensor) -> None:
        random_scores(masks[name], layer_key(key, name), name, exclude.get(name), out=out)

    dtypes = {name: key_dtype(_extent(name, mask)[1]) for name, mask in masks.items()}
    return _topk_per_layer(masks, counts, write, dtypes, largest=True, pad=-1)


def gradient_positions_per_layer(
    masks: Mapping[str, Tensor], gradients: Mapping[str, Tensor | None] | None,
    counts: Mapping[str, int], ranked: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """:func:`gradient_positions` for every layer at once: the first ``counts[name]`` of
    ``ranked[name]`` where the allocation ranked enough, else a shared selection."""
    ranked = ranked or {}
    gradients = gradients or {}
    chosen: dict[str, Tensor] = {}
    rest: dict[str, int] = {}
    for name, mask in masks.items():
        count, order = counts[name], ranked.get(name)
        if count <= 0:
            chosen[name] = _empty_index(mask)
        elif order is not None and order.numel() >= count:
            chosen[name] = order[:count]
        else:
            rest[name] = count
    if rest:
        subset = {name: masks[name] for name in rest}
        dtypes = {name: _score_dtype(g.dtype) if (g := gradients.get(name)) is not None
                  else torch.float32 for name in rest}
        chosen.update(_topk_per_layer(
            subset, rest, lambda name, out: gradient_scores(gradients.get(name), masks[name],
                                                            out), dtypes, largest=True))
    return {name: chosen[name] for name in masks}


def grow_by_gradient(mask: Tensor, gradient: Tensor, count: int) -> Tensor:
    """The ``count`` inactive positions of largest ``|gradient|`` (RigL), as a bool tensor."""
    return _to_bool(gradient_positions(mask, gradient, count), mask)


def grow_at_random(mask: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` inactive positions drawn uniformly at random (SET), as a bool tensor.

    Draws nothing from ``generator`` when ``count`` is 0.
    """
    return _to_bool(random_positions(mask, count, generator), mask)


class Insertion(Protocol):
    """Where inside a layer its new weights go: flat (row-major) indices of ``count``
    inactive positions. ``ranked`` (when the allocation ranked them) are the layer's free
    positions by decreasing gradient. ``needs_random``: whether it draws from ``generator``
    (a generator on the mask's device).

    An insertion may also offer ``select(masks, gradients, counts, generators, ranked)``, the
    same for every layer at once (name -> indices; ``generators(device)`` gives a device's
    random source): :class:`Rewiring` then calls it once, so that layers can share
    selections. Without it, :class:`Rewiring` calls the insertion layer by layer."""

    needs_gradients: bool
    needs_random: bool

    def __call__(self, mask: Tensor, gradient: Tensor | None, count: int,
                 generator: torch.Generator, ranked: Tensor | None = None) -> Tensor: ...


class GradientInsertion:
    """RigL: at the inactive positions of largest gradient magnitude."""

    needs_gradients = True
    needs_random = False

    def __call__(self, mask: Tensor, gradient: Tensor | None, count: int,
                 generator: torch.Generator, ranked: Tensor | None = None) -> Tensor:
        return gradient_positions(mask, gradient, count, ranked)

    def select(self, masks: Mapping[str, Tensor], gradients: Mapping[str, Tensor | None] | None,
               counts: Mapping[str, int], generators: Callable[[torch.device], torch.Generator],
               ranked: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        return gradient_positions_per_layer(masks, gradients, counts, ranked)


class RandomInsertion:
    """SET: at uniformly random inactive positions."""

    needs_gradients = False
    needs_random = True

    def __call__(self, mask: Tensor, gradient: Tensor | None, count: int,
                 generator: torch.Generator, ranked: Tensor | None = None) -> Tensor:
        return random_positions(mask, count, generator)

    def select(self, masks: Mapping[str, Tensor], gradients: Mapping[str, Tensor | None] | None,
               counts: Mapping[str, int], generators: Callable[[torch.device], torch.Generator],
               ranked: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        return random_positions_per_layer(masks, counts, generators)


class MixedInsertion:
    """GGR: ``floor(gradient_ratio * c + 0.5)`` of a layer's ``c`` new weights by gradient,
    the rest at random among the inactive positions that remain.

    Args:
        gradient_ratio: share grown by gradient, in ``[0, 1]`` (the paper: 0.5).
    """

    needs_gradients = True
    needs_random = True

    def __init__(self, gradient_ratio: float = 0.5) -> None:
        self.gradient_ratio = check_fraction("gradient_ratio", gradient_ratio)

    def __call__(self, mask: Tensor, gradient: Tensor | None, count: int,
                 generator: torch.Generator, ranked: Tensor | None = None) -> Tensor:
        by_gradient = _round_half_up(self.gradient_ratio * count)
        chosen = gradient_positions(mask, gradient, by_gradient, ranked)
        if count > by_gradient:
            at_random = random_positions(mask, count - by_gradient, generator, exclude=chosen)
            chosen = torch.cat([chosen, at_random])
        return chosen

    def select(self, masks: Mapping[str, Tensor], gradients: Mapping[str, Tensor | None] | None,
               counts: Mapping[str, int], generators: Callable[[torch.device], torch.Generator],
               ranked: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        by_gradient = {name: _round_half_up(self.gradient_ratio * count)
                       for name, count in counts.items()}
        chosen = gradient_positions_per_layer(masks, gradients, by_gradient, ranked)
        at_random = random_positions_per_layer(
            masks, {name: counts[name] - by_gradient[name] for name in masks}, generators,
            exclude=chosen)
        return {name: torch.cat([chosen[name], at_random[name]])
                if chosen[name].numel() and at_random[name].numel()
                else (chosen[name] if chosen[name].numel() else at_random[name])
                for name in masks}


def _batched_select(insertion: Insertion) -> Callable[..., dict[str, Tensor]] | None:
    """The insertion's ``select`` for all layers at once, unless a subclass overrides
    ``__call__`` below the class that defines ``select`` (its own per-layer rule must win)."""
    mro = type(insertion).__mro__
    call_owner = next((c for c in mro if "__call__" in vars(c)), None)
    select_owner = next((c for c in mro if "select" in vars(c)), None)
    if select_owner is None:
        return None
    if call_owner is not None and call_owner is not select_owner and issubclass(
            call_owner, select_owner):
        return None
    return insertion.select


class DeviceGenerators:
    """The rewiring's random source on each device: ``root`` itself on its own device,
    elsewhere a generator seeded from one draw of ``root`` (a host-side draw: no device
    synchronisation). Same root state, same draws, on every process."""

    def __init__(self, root: torch.Generator) -> None:
        self.root = root
        self._made: dict[torch.device, torch.Generator] = {}

    def __call__(self, device: torch.device) -> torch.Generator:
        device = torch.device(device)
        if device == self.root.device:
            return self.root
        if device not in self._made:
            seed = int(torch.randint(0, 2**62, (1,), generator=self.root,
                                     device=self.root.device))
            self._made[device] = torch.Generator(device=device).manual_seed(seed)
        return self._made[device]


# ------------------------------------------------------------------------------ compose


class Rewiring:
    """One dynamic-sparse-training method: removal, then allocation, then insertion.

    Dropped weights become 0 and grown ones ``init_value``. Positions dropped in a rewiring
    may be grown again in the same rewiring (as in RigL): with ``reinit_regrown=False``
    (RigL's reference, ``reinit_when_same=False``) such a weight keeps its value and its
    state, as if it had never left; with ``True`` it restarts at ``init_value`` with its
    state's start values (``states``). The total active count is conserved. State (DSR's
    threshold) lives in the removal and is saved by :meth:`state_dict`.

    Args:
        removal: which active weights go.
        allocation: how many new weights each layer gets.
        insertion: where inside each layer they go.
        init_value: value of a newly grown weight (the paper: ``1e-10``).
        reinit_regrown: restart a weight dropped and regrown in the same rewiring.
    """

    def __init__(self, removal: Removal, allocation: Allocation, insertion: Insertion,
                 init_value: float = 1e-10, reinit_regrown: bool = False) -> None:
        self.removal = removal
        self.allocation = allocation
        self.insertion = insertion
        self.init_value = check_finite("init_value", init_value)
        self.reinit_regrown = bool(reinit_regrown)

    @property
    def needs_gradients(self) -> bool:
        """Whether rewiring reads the dense gradient (RigL- and GGR-style growth)."""
        return self.allocation.needs_gradients or self.insertion.needs_gradients

    @torch.no_grad()
    def __call__(
        self,
        weights: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        gradients: Mapping[str, Tensor | None] | None,
        drop_fraction: float,
        *,
        generator: torch.Generator,
        active: Mapping[str, int] | None = None,
        states: Mapping[str, Sequence[Tensor]] | None = None,
        on_grow: Callable[[str, Tensor], None] | None = None,
        layout: ShardLayout | None = None,
    ) -> RewiringReport:
        """Rewire ``masks`` and ``weights`` in place.

        With a ``layout`` (:mod:`lightning_ggr.sparse.sharded`), every tensor given is this
        process's part of its layer (its shard, or the whole of a replicated layer on rank
        0 and nothing elsewhere), every count (``active``, the report's) is the whole
        layer's, and the selections run across the processes: every process must call it.
        """
        with sharded_context(layout):
            return self._rewire(weights, masks, gradients, drop_fraction, generator=generator,
                                active=active, states=states, on_grow=on_grow)

    def _rewire(
        self,
        weights: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        gradients: Mapping[str, Tensor | None] | None,
        drop_fraction: float,
        *,
        generator: torch.Generator,
        active: Mapping[str, int] | None = None,
        states: Mapping[str, Sequence[Tensor]] | None = None,
        on_grow: Callable[[str, Tensor], None] | None = None,
    ) -> RewiringReport:
        """Rewire ``masks`` and ``weights`` in place (see :meth:`__call__`).

        Args:
            weights: name -> parameter; masked entries are expected to be 0.
            masks: name -> boolean mask, modified in place.
            gradients: name -> dense gradient of the rewiring step (required when
                :attr:`needs_gradients`; a ``None`` entry scores 0 everywhere).
            drop_fraction: fraction ``f`` of each layer's active weights to drop.
            generator: source of randomness for random insertion (see
                :class:`DeviceGenerators`).
            active: name -> active count of each mask, when the caller knows it (else it is
                read back from the masks, one transfer).
            states: name -> tensors shaped like the weight that follow it (optimizer state,
                a gradient not to apply to new weights), each a tensor or a ``(tensor,
                start)`` pair: zeroed at every dropped position, set to ``start`` (a number
                or a 0-dim tensor on its device; 0 for a bare tensor) at every new one (the
                value the optimizer gives a fresh parameter, see
                :mod:`lightning_ggr.sparse.optimizer_state`); a regrown position keeps its
                entries unless ``reinit_regrown``.
            on_grow: called with each layer's name and its new positions (a bool tensor:
                grown ones, regrown ones too when ``reinit_regrown``), e.g. to reset their
                optimizer state. Builds one bool tensor per layer: prefer ``states``.
        """
        if self.needs_gradients and gradients is None:
            raise ValueError("this method grows by gradient: pass the dense gradients")
        names = list(masks)
        following = {name: [_with_start(entry) for entry in entries]
                     for name, entries in (states or {}).items()}
        active = _active_or_count(masks, active)
        dropped = self.removal(weights, masks, drop_fraction, active=active)
        dropped = {n: _as_index(dropped[n]) for n in names}
        removed = _summed({n: dropped[n].numel() for n in names})
        keep = not self.reinit_regrown
        saved: dict[str, list[Tensor]] = {}
        for name in names:
            index = dropped[name]
            if keep and index.numel():
                saved[name] = [_gather(t, index) for t in
                               (weights[name], *(t for t, _ in following.get(name, ())))]
            _write_(masks[name], index, False)
        survivors = {n: active[n] - removed[n] for n in names}
        result = self.allocation(masks, gradients, removed, survivors)
        counts, ranked = ((result.counts, result.ranked) if isinstance(result, Allocated)
                          else (list(result), None))

        generators = DeviceGenerators(generator)
        counted = dict(zip(names, counts, strict=True))
        select = _batched_select(self.insertion)
        if select is not None:  # every layer at once: shared selections
            selected = select(masks, gradients, counted, generators, ranked)
        else:
            _single_process(f"{type(self.insertion).__name__} (an insertion without "
                            "select(), or one whose __call__ overrides it)")
            selected = {}
            for name, count in counted.items():
                selected[name] = self.insertion(
                    masks[name], None if gradients is None else gradients.get(name), count,
                    generator, ranked=None if ranked is None else ranked.get(name))
        grown = {}
        for name, count in counted.items():
            mask = masks[name]
            new = _as_index(selected[name])
            _write_(mask, new, True)
            index = dropped[name]
            regrown = _gather(mask, index) if index.numel() else None
            targets = [(weights[name], self.init_value), *following.get(name, ())]
            for position, (tensor, value) in enumerate(targets):
                if isinstance(value, Tensor):  # a 0-dim tensor on the device: no host read
                    start = value
                    _write_(tensor, new, value.expand(new.numel()))
                else:
                    start = device_scalar(value, tensor.dtype, tensor.device)
                    _write_(tensor, new, value)
                if regrown is not None:
                    zero = device_scalar(0.0, tensor.dtype, tensor.device)
                    back = torch.where(regrown, saved[name][position] if keep else start, zero)
                    _write_(tensor, index, back)
            if on_grow is not None:
                positions = _to_bool(new, mask)
                if keep and index.numel():
                    _write_(positions, index, False)
                on_grow(name, positions)
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
