"""Boolean masks: drawing them, applying them to tensors and to optimizer state."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def random_mask(
    shape: Sequence[int], active: int, generator: torch.Generator, device: torch.device | str
) -> Tensor:
    """A boolean mask with exactly ``active`` ``True`` entries at uniform random positions."""
    numel = 1
    for dim in shape:
        numel *= int(dim)
    scores = torch.rand(numel, generator=generator, device=generator.device)
    mask = torch.zeros(numel, dtype=torch.bool, device=generator.device)
    if active > 0:
        mask[scores.topk(active, sorted=False).indices] = True
    return mask.view(*shape).to(device)


_ZEROS: dict[torch.dtype, Tensor] = {}


@torch.no_grad()
def apply_masks_(tensors: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
    """Zero every masked entry of ``tensors`` in place: one pass each, no allocation.

    ``torch.where(mask, t, 0, out=t)`` reads the 1-byte mask directly (``t.mul_(mask)`` and
    ``torch._foreach_mul_`` first copy it to a float tensor) and writes an exact 0 even
    where ``t`` holds NaN or inf.
    """
    for tensor, mask in zip(tensors, masks, strict=True):
        zero = _ZEROS.get(tensor.dtype)
        if zero is None:
            zero = _ZEROS.setdefault(tensor.dtype, torch.zeros((), dtype=tensor.dtype))
        torch.where(mask, tensor, zero, out=tensor)


#: Optimizers whose step leaves a weight at exactly 0 when its gradient and its state are 0
#: there (including weight decay, momentum and Nesterov): re-zeroing masked weights after
#: their step is a no-op and is skipped. Exact types only: a subclass may change ``step``.
#: (Adamax is not here: its infinity-norm state becomes ``eps`` at masked positions.)
ZERO_PRESERVING_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
)


def preserves_zeros(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s step keeps masked weights at 0 by itself (see above)."""
    return type(optimizer) in ZERO_PRESERVING_OPTIMIZERS


def optimizer_state_tensors(
    optimizer: torch.optim.Optimizer, param: Tensor
) -> Iterable[Tensor]:
    """State tensors of ``param`` in ``optimizer`` shaped like it (momentum, Adam moments)."""
    state = optimizer.state.get(param, {})
    for value in state.values():
        if isinstance(value, Tensor) and value.shape == param.shape:
            yield value


@torch.no_grad()
def reset_optimizer_state_(
    optimizers: Iterable[torch.optim.Optimizer], param: Tensor, positions: Tensor
) -> None:
    """Zero the optimizer state of ``param`` at ``positions``: a new weight starts afresh."""
    for optimizer in optimizers:
        for value in optimizer_state_tensors(optimizer, param):
            value.masked_fill_(positions, 0)


@torch.no_grad()
def mask_optimizer_state_(
    optimizers: Iterable[torch.optim.Optimizer], params: Sequence[Tensor], masks: Sequence[Tensor]
) -> None:
    """Zero the optimizer state at every masked position, so no momentum revives a weight."""
    for optimizer in optimizers:
        for param, mask in zip(params, masks, strict=True):
            values = list(optimizer_state_tensors(optimizer, param))
            apply_masks_(values, [mask] * len(values))
