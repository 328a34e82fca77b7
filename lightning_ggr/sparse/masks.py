"""Boolean masks: drawing them, applying them to tensors and to optimizer state.

The per-step work of the engine is :class:`MaskPass`: one multi-tensor multiply per
(device, dtype) group over integer views of the tensors, exact over NaN and inf, with no
allocation and no host synchronisation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from lightning_ggr.sparse.draws import draw_key, top_keys_mask

# Their home is optimizer_state.py; imported here for the names' earlier users.
from lightning_ggr.sparse.optimizer_state import (  # noqa: F401
    optimizer_state_tensors,
    reset_optimizer_state_,
)
from lightning_ggr.sparse.sharded import local_tensor

#: The integer type of each floating type's width: a tensor's bits are viewed as these to
#: multiply them by 0 or 1 (see :class:`MaskPass`).
INTEGER_VIEWS: dict[torch.dtype, torch.dtype] = {
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float64: torch.int64,
}


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(dim) for dim in shape)


def random_mask(
    shape: Sequence[int], active: int, generator: torch.Generator | None = None,
    device: torch.device | str | None = None, *, key: int | None = None,
) -> Tensor:
    """A boolean mask with exactly ``active`` ``True`` entries at uniform random positions.

    The positions of largest random key (:mod:`lightning_ggr.sparse.draws`) for ``key``, or
    for one key drawn from ``generator`` when ``key`` is not given: the same key gives the
    same mask on every device and for every split of the layer across processes. Computed
    on ``device`` (default: the generator's, else the CPU) in one pass, 1 byte per weight.
    """
    numel = _numel(shape)
    if not 0 <= active <= numel:
        raise ValueError(f"active must be in [0, {numel}] for a mask of shape {tuple(shape)}, "
                         f"got {active}")
    if key is None:
        if generator is None:
            raise TypeError("random_mask needs a generator or a key")
        key = draw_key(generator)
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    return top_keys_mask(key, numel, int(active), device).view(*shape)


def count_active(masks: Iterable[Tensor]) -> list[int]:
    """The number of ``True`` entries of each mask, read with one transfer per device."""
    masks = list(masks)
    counts: list[int] = [0] * len(masks)
    by_device: dict[torch.device, list[int]] = {}
    for index, mask in enumerate(masks):
        by_device.setdefault(mask.device, []).append(index)
    for indices in by_device.values():
        values = torch.stack([torch.count_nonzero(masks[i]) for i in indices]).tolist()
        for i, value in zip(indices, values, strict=True):
            counts[i] = int(value)
    return counts


_SCALARS: dict[tuple[str, torch.dtype, torch.device], Tensor] = {}


def device_scalar(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached 0-dim tensor holding ``value`` on ``device``, for ``torch.where`` operands:
    built once (a CPU scalar next to CUDA tensors costs host time at every call, and a new one
    is a kernel launch each time). Never modify it in place."""
    key = (repr(float(value)), dtype, torch.device(device))  # repr: NaN equals NaN here
    scalar = _SCALARS.get(key)
    if scalar is None:
        scalar = _SCALARS.setdefault(key, torch.full((), value, dtype=dtype, device=device))
    return scalar


@torch.no_grad()
def apply_masks_(tensors: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
    """Zero every masked entry of ``tensors`` in place: one pass each, no allocation.

    ``torch.where(mask, t, 0, out=t)`` reads the 1-byte mask directly and writes an exact 0
    even where ``t`` holds NaN or inf. One operation per tensor: for repeated use over many
    tensors, :class:`MaskPass` is one operation per group, and faster.
    """
    for tensor, mask in zip(tensors, masks, strict=True):
        tensor, mask = local_tensor(tensor), local_tensor(mask)  # a DTensor: its shard
        torch.where(mask, tensor, device_scalar(0.0, tensor.dtype, tensor.device), out=tensor)


class MaskPass:
    """Zeroes the masked entries of tensors shaped like ``params``, with one
    ``torch._foreach_mul_`` per (device, dtype) group whatever the number of layers.

    Next to each boolean mask it keeps a 0/1 integer copy as wide as its parameter's dtype
    (``int32`` for float32, ``int16`` for bfloat16/float16), laid out like the parameter, and
    multiplies the tensors' *bit patterns* (``t.view(int32)``) by it:

    - exact: the bits times 0 are +0.0, times 1 unchanged, so a NaN or inf at a masked
      position becomes an exact 0 (a float multiply would leave NaN);
    - one multi-tensor launch per group on CUDA, one call on a CPU; no allocation, no host
      synchronisation;
    - cost: ``element_size`` bytes per sparse weight (4 for float32) besides the 1-byte bool
      masks.

    A tensor of another dtype than its parameter (or of a dtype without an integer view)
    falls back to an exact ``torch.where``. Call :meth:`refresh` whenever the masks change.

    Sharded parameters (DTensors of FSDP2) and every tensor that follows them (gradients,
    optimizer state, masks) are handled through their local shards: the same operation on
    this process's rows, no collective.
    """

    def __init__(self, params: Sequence[Tensor], masks: Sequence[Tensor]) -> None:
        if len(params) != len(masks):
            raise ValueError(f"got {len(params)} parameters and {len(masks)} masks")
        self.params = list(params)
        self.masks = [local_tensor(mask) for mask in masks]
        held = [local_tensor(param) for param in self.params]
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for index, param in enumerate(held):
            if param.dtype in INTEGER_VIEWS:
                groups.setdefault((param.device, param.dtype), []).append(index)
        #: (integer dtype, indices of the parameters of one device and dtype)
        self.groups = [(INTEGER_VIEWS[dtype], indices) for (_, dtype), indices in groups.items()]
        grouped = {i for _, indices in self.groups for i in indices}
        self.others = [i for i in range(len(self.params)) if i not in grouped]
        self.integer_masks: list[Tensor | None] = [
            torch.empty_like(p, dtype=INTEGER_VIEWS[p.dtype]) if i in grouped else None
            for i, p in enumerate(held)
        ]
        self.refresh()

    @property
    def nbytes(self) -> int:
        """Memory of the integer masks."""
        return sum(m.numel() * m.element_size() for m in self.integer_masks if m is not None)

    @torch.no_grad()
    def refresh(self) -> None:
        """Copy the boolean masks into the integer ones (after a rewiring or a mask load)."""
        for mask, integer in zip(self.masks, self.integer_masks, strict=True):
            if integer is not None:
                integer.copy_(mask)

    @torch.no_grad()
    def gradients_(self) -> None:
        """Zero every masked entry of the parameters' gradients (``None`` ones are skipped)."""
        self._run([[p.grad] for p in self.params])

    @torch.no_grad()
    def apply_(self, pairs: Iterable[tuple[int, Tensor | None]]) -> None:
        """Zero the masked entries of each ``tensor`` of ``(parameter index, tensor)``, in
        place; the tensor has its parameter's shape."""
        per_param: list[list[Tensor | None]] = [[] for _ in self.params]
        for index, tensor in pairs:
            per_param[index].append(tensor)
        self._run(per_param)

    def _run(self, per_param: Sequence[Sequence[Tensor | None]]) -> None:
        for integer, indices in self.groups:
            views, masks = [], []
            for i in indices:
                for tensor in per_param[i]:
                    if tensor is None:
                        continue
                    tensor = local_tensor(tensor)
                    if INTEGER_VIEWS.get(tensor.dtype) != integer:  # rare: a hook cast it
                        apply_masks_([tensor], [self.masks[i]])
                        continue
                    views.append(tensor.view(integer))
                    masks.append(self.integer_masks[i])
            if views:
                torch._foreach_mul_(views, masks)
        for i in self.others:
            tensors = [local_tensor(t) for t in per_param[i] if t is not None]
            apply_masks_(tensors, [self.masks[i]] * len(tensors))


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


def vanishing_eps(optimizer: torch.optim.Optimizer) -> tuple[float, torch.dtype] | None:
    """An ``eps`` of ``optimizer`` that is 0 in the dtype of parameters it steps (Adam's
    default ``1e-8`` in float16, ``precision="16-true"``), with that dtype; ``None`` when
    there is none. Such an optimizer divides ``0 / (0 + eps)`` wherever a gradient and its
    state are 0, which is NaN: at every masked weight, at every step."""
    for group in optimizer.param_groups:
        eps = group.get("eps")
        if not isinstance(eps, float) or eps == 0:
            continue
        for param in group["params"]:
            if param.is_floating_point() and float(torch.tensor(eps, dtype=param.dtype)) == 0:
                return eps, param.dtype
    return None


def preserves_zeros(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer``'s step keeps masked weights at 0 by itself (see above): not
    when its ``eps`` vanishes in its parameters' dtype (:func:`vanishing_eps`)."""
    return type(optimizer) in ZERO_PRESERVING_OPTIMIZERS and vanishing_eps(optimizer) is None


@torch.no_grad()
def mask_optimizer_state_(
    optimizers: Iterable[torch.optim.Optimizer], params: Sequence[Tensor], masks: Sequence[Tensor],
    mask_pass: MaskPass | None = None,
) -> None:
    """Zero the optimizer state at every masked position, so no momentum revives a weight.

    With ``mask_pass`` (over the same parameters and masks) every state tensor of a group
    goes through one multi-tensor operation.
    """
    for optimizer in optimizers:
        if mask_pass is not None:
            mask_pass.apply_((i, value) for i, param in enumerate(params)
                             for value in optimizer_state_tensors(optimizer, param))
            continue
        for param, mask in zip(params, masks, strict=True):
            values = list(optimizer_state_tensors(optimizer, param))
            apply_masks_(values, [mask] * len(values))
