"""Streaming global top-k over many tensors (paper section 3.3, step 1)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

#: On a CPU, ``Tensor.topk`` builds a (value, index) work vector of the whole input (16 bytes
#: per element, outside torch's allocator: 1.6 GB for VGG16's fc1) and is slow when ``k`` is
#: large; larger inputs take another route (see :func:`topk`). A GPU's radix select needs
#: neither.
CPU_TOPK_CHUNK = 1 << 22


def topk(scores: Tensor, k: int, largest: bool = True) -> tuple[Tensor, Tensor]:
    """``scores.topk(k, sorted=False)`` of a 1-D tensor, the same set of values (ties broken
    arbitrarily), with O(n) bytes of work memory on a CPU.

    A CPU input above ``CPU_TOPK_CHUNK`` elements is first narrowed to the candidates beyond a
    threshold estimated from a strided sample (exact: every value beyond the threshold is a
    candidate, and the threshold leaves at least ``k``), else it is selected chunk by chunk
    (the top ``k`` of the union of every chunk's top ``k`` is the top ``k`` of all).
    """
    n = scores.numel()
    if scores.device.type != "cpu" or n <= CPU_TOPK_CHUNK or k == 0:
        return scores.topk(k, largest=largest, sorted=False)
    narrowed = _topk_by_threshold(scores, k, largest)
    if narrowed is not None:
        return narrowed
    values = index = None
    for start in range(0, n, CPU_TOPK_CHUNK):
        part = scores[start:start + CPU_TOPK_CHUNK]
        v, i = part.topk(min(k, part.numel()), largest=largest, sorted=False)
        i = i + start
        if values is not None:
            v, i = torch.cat([values, v]), torch.cat([index, i])
            if v.numel() > k:
                v, keep = v.topk(k, largest=largest, sorted=False)
                i = i[keep]
        values, index = v, i
    assert values is not None and index is not None
    return values, index


def _topk_by_threshold(scores: Tensor, k: int, largest: bool) -> tuple[Tensor, Tensor] | None:
    """The top ``k`` among the values at or beyond a threshold that a strided sample puts a
    little past the ``k``-th (``None`` when the threshold leaves fewer than ``k`` candidates,
    or too many to gain anything)."""
    n = scores.numel()
    sample = scores[:: max(1, n // (1 << 16))]
    size = sample.numel()
    share = k / n
    above = math.ceil(share * size + 4 * math.sqrt(share * size) + 16)
    if above >= size:
        return None
    threshold = sample.topk(above, largest=largest, sorted=False).values
    threshold = threshold.min() if largest else threshold.max()
    # Chunk by chunk, so the comparison's temporary stays small. `not (x < t)` keeps NaN,
    # which topk ranks above everything; `x <= t` leaves it out, as topk(largest=False) does.
    found, total = [], 0
    for start in range(0, n, CPU_TOPK_CHUNK):
        part = scores[start:start + CPU_TOPK_CHUNK]
        chosen = (part < threshold).logical_not_() if largest else part <= threshold
        found.append(chosen.nonzero().squeeze(1).add_(start))
        total += found[-1].numel()
        if total > 8 * k + CPU_TOPK_CHUNK:
            return None
    candidates = torch.cat(found)
    del found
    if candidates.numel() < k:
        return None
    values, keep = scores[candidates].topk(k, largest=largest, sorted=False)
    return values, candidates[keep]


Winners = tuple[Tensor, Tensor, Tensor]  # values, owner, flat index


def _merge(best: Winners | None, new: list[Tensor], k: int) -> Winners:
    """The ``k`` largest of two sets of winners (O(k) memory: at most 2k wait). ``new`` is
    emptied as it is consumed, so that its tensors are freed as soon as they are copied: the
    caller hands over its only references."""
    if best is None:
        values, owner, index = new
        new.clear()
        return values, owner, index
    merged = []
    for old in best:
        merged.append(torch.cat([old, new.pop(0)]))
    values, owner, index = merged
    del merged
    if values.numel() > k:
        values, keep = values.topk(k, sorted=False)
        owner, index = owner[keep], index[keep]
    return values, owner, index


class GlobalTopK(NamedTuple):
    """The ``k`` largest values over many tensors: each one's value, tensor and flat index."""

    values: Tensor
    owner: Tensor
    index: Tensor
    tensors: int

    def counts(self) -> list[int]:
        """How many of the ``k`` fall in each tensor: the one host read of the selection.

        ``index_add_`` rather than ``torch.bincount``, which reads its input's range back to
        the host on CUDA (two synchronisations).
        """
        counts = torch.zeros(self.tensors, dtype=torch.int64, device=self.owner.device)
        counts.index_add_(0, self.owner, torch.ones_like(self.owner))
        return counts.tolist()

    def ranked(self, counts: list[int]) -> list[Tensor]:
        """Per tensor, the flat indices of its selected values, largest first (``counts``
        from :meth:`counts`)."""
        order = torch.argsort(self.values, descending=True, stable=True)
        order = order[torch.argsort(self.owner[order], stable=True)]
        return list(torch.split(self.index[order], counts))


def global_topk(scores: Iterable[Tensor], k: int) -> GlobalTopK:
    """The ``k`` largest values over all ``scores``, without concatenating them.

    A running top-``k`` is merged with one tensor's own top-``k`` at a time and only the top
    ``k`` of that union is kept, so the peak extra memory is one tensor's scores plus O(k)
    rather than the sum of all tensors. The scores may be a generator, so the caller can
    build each tensor only when it is consumed (and reuse its buffer). Nothing is read back
    to the host. Ties are broken arbitrarily (as by :func:`torch.topk`).

    Raises:
        ValueError: ``k`` exceeds the number of values.
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {k!r}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    best: Winners | None = None
    layers = 0
    device = None
    # Not enumerate(): it keeps its last (index, tensor) pair alive until the next tensor
    # exists, which would double the peak.
    position = -1
    for score in scores:
        position += 1
        layers = position + 1
        flat = score.detach().reshape(-1)
        device = flat.device if device is None else device
        take = min(k, flat.numel())
        if take == 0:
            del score, flat
            continue
        values, index = topk(flat, take)
        del score, flat  # the merge below and the next tensor need not share memory with it
        owner = torch.full((take,), position, dtype=torch.int64, device=device)
        winners = [values, owner, index]
        del values, owner, index
        best = _merge(best, winners, k)
    selected = 0 if best is None else best[0].numel()
    if selected < k:
        raise ValueError(f"k={k} exceeds the {selected} values in all scores together")
    if best is None:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return GlobalTopK(empty.float(), empty, empty, layers)
    return GlobalTopK(*best, layers)


def device_ints(values: Sequence[int], device: torch.device) -> Tensor:
    """Host integers as an int64 tensor on ``device`` without waiting for it: on CUDA through
    pinned memory and an asynchronous copy (``torch.tensor(values, device="cuda")`` copies from
    pageable memory and synchronises)."""
    host = torch.tensor(list(values), dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)


def global_topk_packed(
    sizes: Sequence[int], write: Callable[[int, Tensor], None], k: int, *,
    device: torch.device, dtype: torch.dtype = torch.float32,
) -> GlobalTopK:
    """:func:`global_topk` over ``len(sizes)`` score vectors that ``write(i, out)`` fills into
    a 1-D ``out`` of ``sizes[i]`` elements, several small ones per selection.

    The vectors are packed (first-fit decreasing) into buffers no larger than the largest of
    them, filled one after the other, and one ``topk`` serves each
    buffer-full instead of one per vector: on a GPU a ``topk`` is some twenty kernel launches
    whatever its size, and launches, not bytes, bound the rewiring of a network with many
    small layers (ResNet-18: 5 selections instead of 21). The peak extra memory stays one
    buffer of the largest vector's size plus O(k). Nothing is read back to the host.
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {k!r}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    total = sum(sizes)
    if k > total:
        raise ValueError(f"k={k} exceeds the {total} values in all scores together")
    if k == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return GlobalTopK(empty.to(dtype), empty, empty, len(sizes))
    capacity = max(sizes)
    # First-fit decreasing: ResNet-18's 21 layers fill 5 buffers (next-fit in layer order: 7).
    bins: list[list[int]] = []
    room: list[int] = []
    for position in sorted((i for i, n in enumerate(sizes) if n), key=lambda i: -sizes[i]):
        for b, free in enumerate(room):
            if sizes[position] <= free:
                bins[b].append(position)
                room[b] -= sizes[position]
                break
        else:
            bins.append([position])
            room.append(capacity - sizes[position])
    best: Winners | None = None
    for members in bins:
        members.sort()
        offsets = [0]
        for position in members:
            offsets.append(offsets[-1] + sizes[position])
        filled = offsets.pop()
        # One buffer per bin, freed before the merge so that the merge does not share the
        # peak with the scores (the caching allocator hands the same block back next time).
        buffer = torch.empty(filled, dtype=dtype, device=device)
        for position, offset in zip(members, offsets, strict=True):
            write(position, buffer[offset:offset + sizes[position]])
        values, flat = topk(buffer, min(k, filled))
        del buffer
        if len(members) == 1:
            owner, index = torch.full_like(flat, members[0]), flat
        else:  # which member each winner came from: one small asynchronous copy
            table = device_ints(offsets + members, device)
            local = torch.searchsorted(table[:len(members)], flat, right=True).sub_(1)
            owner, index = table[len(members):][local], flat - table[local]
        winners = [values, owner, index]
        del values, owner, index, flat
        best = _merge(best, winners, k)  # 2k winners at most wait
    assert best is not None
    return GlobalTopK(*best, len(sizes))


#: A vector joins a group of rows only when at least ``1 / ROW_PADDING`` as long as the
#: group's rows (so padding costs at most about 4x the shortest member).
ROW_PADDING = 4


def row_groups(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Positions of the nonempty ``sizes`` in groups that can share one 2-D buffer of at most
    ``capacity`` elements, one row per member as long as the group's first (longest) member.

    First fit over the sizes in decreasing order; a member is at least ``1 / ROW_PADDING`` of
    the row length, and rows longer than ``CPU_TOPK_CHUNK`` stay alone (a CPU's ``topk`` of a
    long row needs the 1-D route of :func:`topk`). Deterministic: the same sizes give the same
    groups on every process.
    """
    groups: list[list[int]] = []
    for position in sorted((i for i, n in enumerate(sizes) if n), key=lambda i: -sizes[i]):
        for group in groups:
            width = sizes[group[0]]
            if (width <= CPU_TOPK_CHUNK and sizes[position] * ROW_PADDING >= width
                    and (len(group) + 1) * width <= capacity):
                group.append(position)
                break
        else:
            groups.append([position])
    return groups


def first_positions(flags: Tensor, count: int) -> Tensor:
    """Positions of the first ``count`` True entries of the 1-D bool ``flags`` (at least
    ``count`` of them are True), ascending, without reading the device where torch can
    (``nonzero_static``: on a CPU, and on CUDA from torch 2.6); else through ``nonzero`` (a
    synchronisation)."""
    if count == 0:
        return torch.zeros(0, dtype=torch.int64, device=flags.device)
    try:
        return torch.nonzero_static(flags, size=count).squeeze(1)
    except NotImplementedError:  # pragma: no cover - CUDA before torch 2.6
        return flags.nonzero().squeeze(1)[:count]


#: Scores compared with a tied value at a time: the comparison's temporary (1 byte per
#: score) stays this small beside the scores of the largest layer.
TIE_CHUNK = 1 << 22


def _equal_counts(scores: Tensor, value: Tensor) -> list[Tensor]:
    """How many of ``scores`` equal ``value`` (a 1-element tensor), per chunk of
    ``TIE_CHUNK`` positions, as 0-dim tensors on the scores' device (nothing is read)."""
    value = value.to(scores.device, non_blocking=True)
    return [torch.count_nonzero(scores[start:start + TIE_CHUNK] == value)
            for start in range(0, scores.numel(), TIE_CHUNK)]


def _first_equal(scores: Tensor, value: Tensor, take: int,
                 counts: Sequence[int] | None = None) -> Tensor:
    """Positions of the first ``take`` of ``scores`` equal to ``value``, chunk by chunk;
    ``counts``: how many each chunk holds (:func:`_equal_counts`, read), unless the scores
    fit in one chunk."""
    value = value.to(scores.device, non_blocking=True)
    if counts is None:
        if scores.numel() > TIE_CHUNK:
            raise ValueError("counts per chunk are needed beyond TIE_CHUNK scores")
        return first_positions(scores == value, take)
    parts = [torch.zeros(0, dtype=torch.int64, device=scores.device)]
    for count, start in zip(counts, range(0, scores.numel(), TIE_CHUNK), strict=True):
        if take <= 0:
            break
        here = min(count, take)
        if here:
            parts.append(first_positions(scores[start:start + TIE_CHUNK] == value, here)
                         .add_(start))
            take -= here
    return torch.cat(parts)


def topk_rows(
    sizes: Sequence[int], ks: Sequence[int], write: Callable[[int, Tensor], None], *,
    largest: bool, pad: float, device: torch.device, dtype: torch.dtype = torch.float32,
) -> list[Tensor]:
    """For each of several score vectors, the flat indices of its ``ks[i]`` largest (or
    smallest) values, with one ``topk`` per group of similar lengths instead of one per vector.

    ``write(i, out)`` fills the 1-D ``out`` (``sizes[i]`` elements) with vector ``i``'s scores.
    Vectors of similar lengths (:func:`row_groups`) are written as the rows of one 2-D buffer,
    the tail of a shorter row set to ``pad`` (a value never selected: ``-inf`` for the
    largest, ``+inf`` for the smallest), and one ``topk(max k, dim=1, sorted=True)`` ranks
    every row: row ``r``'s first ``ks[r]`` entries are its own top ``ks[r]``. On a GPU a
    ``topk`` is some twenty kernel launches whatever its size, and a rewiring of a network of
    many small layers was bound by launches (ResNet-18: 8 selections instead of 21). The
    buffer is as large as the longest vector (the peak of one layer's scores, as before). A
    vector with ``ks[i] == 0`` is not written; its result is empty. Ties are broken
    arbitrarily, as by :func:`torch.topk`.

    Precondition (not checked: it would read the device): each vector holds at least
    ``ks[i]`` values that rank strictly before ``pad`` (``topk`` ranks NaN above everything),
    or a padded row may return positions past its end. The engine's scores always do: a
    layer never selects more than its finite candidates.
    """
    for i, (size, k) in enumerate(zip(sizes, ks, strict=True)):
        if not 0 <= k <= size:
            raise ValueError(f"k must be in [0, {size}] for score vector {i} of {size} "
                             f"values, got {k}")
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    results = [empty] * len(sizes)
    wanted = [size if k > 0 else 0 for size, k in zip(sizes, ks, strict=True)]
    if not any(wanted):
        return results
    capacity = max(wanted)
    buffer = torch.empty(capacity, dtype=dtype, device=device)
    for group in row_groups(wanted, capacity):
        width = sizes[group[0]]
        if len(group) == 1:
            row = buffer[:width]
            write(group[0], row)
            results[group[0]] = topk(row, ks[group[0]], largest=largest)[1]
            continue
        rows = buffer[:len(group) * width].view(len(group), width)
        if any(sizes[position] < width for position in group):
            rows.fill_(pad)  # one launch for every short row's tail
        for r, position in enumerate(group):
            write(position, rows[r, :sizes[position]])
        index = rows.topk(max(ks[p] for p in group), dim=1, largest=largest, sorted=True)[1]
        for r, position in enumerate(group):
            results[position] = index[r, :ks[position]]
    return results


#: Values selected beyond GGR's ``k`` (:func:`global_topk_in_order`): when fewer than this
#: many values left out tie with the ``k``-th, the ties are split from the winners alone.
TIE_MARGIN = 1024


def global_topk_in_order(top: GlobalTopK, k: int, scores: Callable[[int], Tensor],
                         total: int) -> tuple[list[int], list[Tensor]]:
    """The ``k`` largest values over several tensors with the ties at the ``k``-th value
    taken in tensor order, then position order: per tensor, how many it holds and their flat
    indices, best first (ties by position). The same result whatever ``topk`` did with ties
    (the rule of :func:`~lightning_ggr.sparse.sharded.select_across_shards` over all layers,
    so that GGR's allocation agrees on one device and across shards).

    ``top`` is the top ``min(k + TIE_MARGIN, total)`` of the ``total`` values
    (:func:`global_topk` or :func:`global_topk_packed`, ties broken arbitrarily; any margin
    above 0 works). Sorted by (value, tensor, position), its first ``k`` are the answer
    unless values were left out and its last one still equals the ``k``-th (more ties than
    the margin: zero gradients, say). The per-tensor counts and
    that check come back in one host read (the read GGR always had), at the price of three
    sorts of the ``k + TIE_MARGIN`` winners (two before). Only in the second case
    ``scores(i)`` gives tensor ``i``'s flat scores again (once to count its values equal to
    the ``k``-th, chunk by chunk, once more for a tensor that takes some of them) and a
    second read splits the tied ones. Scores must be comparable (no NaN).
    """
    tensors = top.tensors
    device = top.values.device
    if k == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return [0] * tensors, [empty] * tensors
    values, owner, index = top.values, top.owner, top.index
    # (value desc, tensor, position): stable sorts, the last one decides
    order = torch.argsort(owner.mul(1 << 42).add_(index), stable=True)
    order = order[torch.argsort(values[order], descending=True, stable=True)]
    kth = values[order[k - 1:k]]  # (1,): a 1-element index, never a read of the device
    if values.numel() < total:  # some values were left out: do they tie too?
        overflow = kth.eq(values[order[-1:]])
    else:
        overflow = torch.zeros(1, dtype=torch.bool, device=device)
    order = order[:k]
    order = order[torch.argsort(owner[order], stable=True)]  # per tensor, in that order
    counts = torch.zeros(tensors + 1, dtype=torch.int64, device=device)
    counts.index_add_(0, owner[order], torch.ones_like(order))
    counts[tensors:].copy_(overflow)  # the one host read of the selection carries it too
    read = counts.tolist()
    counts_list, tied = read[:tensors], bool(read[tensors])
    ranked = index[order]
    if not tied:
        return counts_list, list(torch.split(ranked, counts_list))
    # More values tie with the k-th than the winners hold: every value above it is among
    # them, and the ones equal to it go to the tensors in order, then by position.
    above = torch.zeros(tensors, dtype=torch.int64, device=device)
    above.index_add_(0, owner[order], (values[order] > kth).long())
    equal: list[list[Tensor]] = []  # per tensor, its values equal to the k-th per chunk
    for i in range(tensors):
        equal.append([count.to(device, non_blocking=True)
                      for count in _equal_counts(scores(i), kth)])
    read = torch.cat([above, torch.stack([c for chunks in equal for c in chunks])
                      if any(equal) else above[:0]]).tolist()
    over_all, per_chunk, at = read[:tensors], [], tensors
    for chunks in equal:
        per_chunk.append(read[at:at + len(chunks)])
        at += len(chunks)
    remaining = k - sum(over_all)
    out_counts, out_ranked, start = [], [], 0
    for i in range(tensors):
        over = over_all[i]
        take = min(sum(per_chunk[i]), remaining)
        remaining -= take
        best = ranked[start:start + over]
        start += counts_list[i]
        if take:
            best = torch.cat([best, _first_equal(scores(i), kth, take, per_chunk[i])
                              .to(best.device)])
        out_counts.append(over + take)
        out_ranked.append(best)
    return out_counts, out_ranked


def global_topk_counts(scores: Iterable[Tensor], k: int) -> list[int]:
    """How many of the ``k`` largest values over all ``scores`` fall in each tensor.

    Streams the tensors as :func:`global_topk` does: the peak extra memory is
    ``O(k + largest tensor)`` rather than the sum of all tensors, and the counts are read
    back to the host once.

    Args:
        scores: one tensor per layer, any shapes, on one device.
        k: how many values to select, ``0 <= k <= total number of elements``.

    Returns:
        ``counts`` with ``counts[i]`` the number of selected values in ``scores[i]``;
        ``sum(counts) == k``.
    """
    return global_topk(scores, k).counts()
