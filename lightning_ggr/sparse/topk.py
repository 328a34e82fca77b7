"""Streaming global top-k over many tensors (paper section 3.3, step 1)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def global_topk_counts(scores: Iterable[Tensor], k: int) -> list[int]:
    """How many of the ``k`` largest values over all ``scores`` fall in each tensor.

    The tensors are never concatenated: a running top-``k`` is merged with one tensor's
    own top-``k`` at a time and only the top-``k`` of that union is kept, so the peak
    extra memory is ``O(k + largest tensor)`` rather than the sum of all tensors. The
    scores may be a generator, so the caller can build each tensor only when it is
    consumed. Ties are broken arbitrarily (as by :func:`torch.topk`).

    Args:
        scores: one tensor per layer, any shapes, on one device.
        k: how many values to select, ``0 <= k <= total number of elements``.

    Returns:
        ``counts`` with ``counts[i]`` the number of selected values in ``scores[i]``;
        ``sum(counts) == k``.
    """
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be an int, got {k!r}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    best_values: Tensor | None = None
    best_owner: Tensor | None = None
    layers = 0
    for index, score in enumerate(scores):
        layers = index + 1
        flat = score.detach().reshape(-1)
        take = min(k, flat.numel())
        if take == 0:
            continue
        values = flat.topk(take, sorted=False).values
        owner = torch.full((take,), index, dtype=torch.long, device=flat.device)
        if best_values is not None:
            values = torch.cat([best_values, values])
            owner = torch.cat([best_owner, owner])
            if values.numel() > k:
                keep = values.topk(k, sorted=False).indices
                values, owner = values[keep], owner[keep]
        best_values, best_owner = values, owner
    selected = 0 if best_owner is None else best_owner.numel()
    if selected < k:
        raise ValueError(f"k={k} exceeds the {selected} values in all scores together")
    if best_owner is None:
        return [0] * layers
    return torch.bincount(best_owner, minlength=layers).tolist()
