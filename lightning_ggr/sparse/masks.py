"""Which parameters are sparse, their boolean masks, and applying masks to tensors."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

#: Convolution types (their weight is ``(out, in / groups, *kernel)``, transposed:
#: ``(in, out / groups, *kernel)``).
CONV_MODULES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)

#: Module types whose ``weight`` is sparse by default.
DEFAULT_SPARSE_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, *CONV_MODULES)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def select_sparse_parameters(
    module: nn.Module,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
) -> dict[str, nn.Parameter]:
    """The parameters to train sparse, keyed by their ``named_parameters()`` names.

    By default the ``weight`` of every linear and (transposed) convolution layer; biases,
    normalization and embedding parameters stay dense. ``include`` replaces the default
    with the parameters whose name matches any of its shell-style patterns (``fnmatch``,
    e.g. ``"features.*.weight"``); ``exclude`` then removes matches.

    Raises:
        ValueError: a pattern matches no parameter, nothing is selected, or a selected
            parameter is shared by several modules (its mask would be ambiguous).
    """
    named = dict(module.named_parameters())
    if include is not None:
        for pattern in include:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in named):
                raise ValueError(f"include pattern {pattern!r} matches no parameter of the model")
        selected = [n for n in named if _matches(n, include)]
    else:
        selected = []
        for module_name, child in module.named_modules():
            if isinstance(child, DEFAULT_SPARSE_MODULES) and isinstance(
                getattr(child, "weight", None), nn.Parameter
            ):
                name = f"{module_name}.weight" if module_name else "weight"
                if name in named:
                    selected.append(name)
    if exclude is not None:
        for pattern in exclude:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in selected):
                raise ValueError(
                    f"exclude pattern {pattern!r} matches no selected sparse parameter"
                )
        selected = [n for n in selected if not _matches(n, exclude)]
    if not selected:
        raise ValueError(
            "the model has no sparse parameter: no Linear/Conv weight was found and none "
            "was named by `include`"
        )
    for name in selected:
        if named[name].is_meta or isinstance(named[name], nn.parameter.UninitializedParameter):
            raise ValueError(f"parameter {name!r} is not materialized; run a forward pass first")
    _refuse_shared(module, set(selected), named)
    return {name: named[name] for name in selected}


def _refuse_shared(module: nn.Module, selected: set[str], named: Mapping[str, Tensor]) -> None:
    by_id = {id(named[n]): n for n in selected}
    owners: dict[str, list[str]] = {n: [] for n in selected}
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) in by_id:
            owners[by_id[id(param)]].append(name)
    shared = {n: names for n, names in owners.items() if len(names) > 1}
    if shared:
        name, names = next(iter(shared.items()))
        raise ValueError(
            f"sparse parameter {name!r} is shared by {names}: a shared weight cannot have one "
            "mask per layer; exclude it with `exclude`"
        )


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
