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
