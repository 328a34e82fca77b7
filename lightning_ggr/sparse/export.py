"""Saving a trained sparse model for inference, and compacting it into a smaller dense one.

- :func:`save_sparse_model` / :func:`load_sparse_model` / :func:`read_sparse_model`: a file
  about density x the dense size, read with ``torch.load(weights_only=True)`` (tensors and
  plain Python only). Files of format version 1 (dense weights plus bool masks) still load.
- :func:`compact_sequential`: a dense ``nn.Sequential`` with the empty neurons and inputs
  removed, computing the same function as the sparse model in eval mode.

Masks are keyed by the names of the module they were made for. The callback's masks carry
the LightningModule's attribute prefix (``"net.tok.weight"`` for ``lm.net``): saving or
converting ``lm.net`` with them strips the prefix when exactly one prefix fits every mask
(:func:`module_masks`), and otherwise fails with a message that shows the right call.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ggr.sparse.selection import is_transposed_linear

#: Value of the ``format`` key of a saved sparse model.
FORMAT = "lightning_ggr.sparse_model"
#: Version written by :func:`save_sparse_model`: 2 stores each masked tensor as its active
#: values plus their positions; 1 (still read) stored dense weights and bool masks.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

#: Integer types for the gaps between consecutive active positions, smallest first
#: (``uint8`` is the one unsigned type every torch version saves, loads and sums).
_GAP_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
#: Bit ``j`` of byte ``i`` of a bitmask is element ``8 i + j``.
_BIT_SHIFTS = torch.arange(8, dtype=torch.uint8)


def module_masks(module: nn.Module, masks: Mapping[str, Tensor],
                 caller: str = "module_masks") -> dict[str, Tensor]:
    """``masks`` keyed by ``module``'s own parameter names.

    Names that already are ``module``'s are kept. Masks named from an enclosing module (the
    callback's ``"net.tok.weight"`` when ``module`` is ``lm.net``) lose their prefix when
    exactly one prefix ``p`` makes every mask name ``p.<name of a parameter of module with
    the mask's shape>``.

    Raises:
        ValueError: a mask names no parameter, the prefix is ambiguous, or only some masks
            belong to ``module`` (the message shows the call that selects them).
    """
    params = dict(module.named_parameters())
    if all(name in params for name in masks):
        return dict(masks)

    def fits(prefix: str, name: str) -> bool:
        rest = name[len(prefix) + 1:]
        return (name.startswith(prefix + ".") and rest in params
                and tuple(params[rest].shape) == tuple(masks[name].shape))

    prefixes = {
        ".".join(parts[:cut])
        for parts in (name.split(".") for name in masks)
        for cut in range(1, len(parts))
        if ".".join(parts[cut:]) in params
    }
    covered = {prefix: [name for name in masks if fits(prefix, name)] for prefix in prefixes}
    complete = sorted(prefix for prefix, names in covered.items() if len(names) == len(masks))
    if len(complete) == 1:
        prefix = complete[0]
        return {name[len(prefix) + 1:]: mask for name, mask in masks.items()}
    if len(complete) > 1:
        raise ValueError(
            f"{caller}: the mask names fit the module's parameters after removing any of the "
            f"prefixes {', '.join(map(repr, complete))}; pass masks keyed by the module's own "
            "parameter names"
        )
    partial = max(covered, key=lambda prefix: (len(covered[prefix]), prefix), default=None)
    if partial is not None and covered[partial]:
        outside = next(name for name in masks if name not in covered[partial])
        raise ValueError(
            f"{caller}: {len(covered[partial])} of the {len(masks)} masks belong to this module "
            f"under the prefix {partial!r}; the others (e.g. {outside!r}) do not. Pass this "
            f"module's masks: {{name.removeprefix({partial + '.'!r}): mask for name, mask in "
            f"masks.items() if name.startswith({partial + '.'!r})}}"
        )
    unknown = next(name for name in masks if name not in params)
    raise ValueError(
        f"mask {unknown!r} names no parameter of the model; masks are keyed by the names "
        "of the module they were made for (the callback's by the LightningModule's): pass "
        "that module, or one of its submodules"
    )


def _check_zero(module: nn.Module, masks: Mapping[str, Tensor], what: str) -> None:
    params = dict(module.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"mask {name!r} names no parameter of the model")
        param = params[name]
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(f"mask of {name!r} has shape {tuple(mask.shape)}, the parameter "
                             f"{tuple(param.shape)}")
        outside = param.detach()[~mask.to(param.device, torch.bool)]
        if bool((outside != 0).any()):
            raise ValueError(
                f"{what}: {int((outside != 0).sum())} masked weights of {name!r} are not zero; "
                "apply the masks first (the callback does at every step)"
            )


def encode_positions(mask: Tensor) -> dict[str, Any]:
    """The active positions of ``mask`` in the smaller of two encodings.

    ``"bitmask"``: ``ceil(n / 8)`` bytes (bit ``j`` of byte ``i`` is element ``8 i + j`` of
    the flattened mask); ``"gaps"``: per active position its distance to the previous one
    (the first: its index), in the smallest of ``uint8``/``int16``/``int32``/``int64`` that
    holds the largest gap, ``k * itemsize`` bytes. Ties go to the bitmask.
    """
    flat = mask.detach().to("cpu", torch.bool).reshape(-1)
    indices = flat.nonzero().reshape(-1)
    gaps = torch.diff(indices, prepend=indices.new_zeros(1))
    largest = int(gaps.max()) if gaps.numel() else 0
    gap_dtype = next(d for d in _GAP_DTYPES if largest <= torch.iinfo(d).max)
    bitmask_bytes = -(-flat.numel() // 8)
    if gaps.numel() * gap_dtype.itemsize < bitmask_bytes:
        return {"encoding": "gaps", "positions": gaps.to(gap_dtype)}
    padded = torch.zeros(bitmask_bytes * 8, dtype=torch.uint8)
    padded[: flat.numel()] = flat
    packed = (padded.reshape(-1, 8) << _BIT_SHIFTS).sum(dim=1, dtype=torch.uint8)
    return {"encoding": "bitmask", "positions": packed}


def decode_positions(encoded: Mapping[str, Any], shape: tuple[int, ...]) -> Tensor:
    """The bool mask of shape ``shape`` that :func:`encode_positions` encoded."""
    numel = math.prod(shape)
    positions = encoded["positions"]
    if encoded["encoding"] == "bitmask":
        bits = (positions.reshape(-1, 1) >> _BIT_SHIFTS) & 1
        return bits.reshape(-1)[:numel].to(torch.bool).reshape(shape)
    if encoded["encoding"] == "gaps":
        flat = torch.zeros(numel, dtype=torch.bool)
        flat[positions.to(torch.int64).cumsum(0)] = True
        return flat.reshape(shape)
    raise ValueError(f"unknown position encoding {encoded['encoding']!r}; "
                     "expected 'bitmask' or 'gaps'")


def save_sparse_model(
    module: nn.Module,
    masks: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Save ``module``'s ``state_dict`` with each masked tensor as its active values only.

    A masked tensor is stored as its active values, in the parameter's own dtype, plus the
    positions of its mask (not of its nonzeros: a grown weight may hold exactly 0) in the
    smaller of a bitmask and gap-encoded indices (:func:`encode_positions`); every other
    entry of the ``state_dict`` (biases, norms, buffers, dense layers) as it is, all on CPU.
    A tied alias of a masked tensor (a second name of the same tensor) is stored as its
    name only. The file holds ``{"format", "format_version": 2, "state_dict", "sparse",
    "aliases", "metadata"}`` and loads with ``torch.load(path, weights_only=True)``;
    ``metadata`` must hold plain Python. The round trip through :func:`load_sparse_model`
    is bit-exact. ``masks`` may carry an enclosing module's prefix (:func:`module_masks`).

    Raises:
        ValueError: a mask names no parameter, has the wrong shape, or a masked weight is
            not zero.
    """
    masks = module_masks(module, masks, "save_sparse_model")
    _check_zero(module, masks, "cannot save")
    params = dict(module.named_parameters())
    sparse_ids = {id(params[name]): name for name in masks}
    dense: dict[str, Tensor] = {}
    sparse: dict[str, dict[str, Any]] = {}
    aliases: dict[str, str] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        owner = sparse_ids.get(id(tensor))
        if owner is None:
            dense[name] = tensor.detach().cpu()
        elif owner != name:
            aliases[name] = owner
        else:
            mask = masks[name].detach().to("cpu", torch.bool)
            values = tensor.detach().cpu().reshape(-1)[mask.reshape(-1)].clone()
            sparse[name] = {"shape": list(tensor.shape), "values": values,
                            **encode_positions(mask)}
    torch.save(
        {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "state_dict": dense,
            "sparse": sparse,
            "aliases": aliases,
            "metadata": dict(metadata or {}),
        },
        path,
    )


@dataclass
class SparseModelFile:
    """What :func:`read_sparse_model` reads: tensors on CPU, masks as bool.

    Attributes:
        state_dict: the full ``state_dict`` (masked tensors rebuilt dense, zeros outside).
        masks: parameter name -> bool mask.
        metadata: the plain-Python metadata given to :func:`save_sparse_model`.
        format_version: 1 (dense weights and masks) or 2 (active values and positions).
    """

    state_dict: dict[str, Tensor]
    masks: dict[str, Tensor]
    metadata: dict[str, Any]
    format_version: int


def read_sparse_model(path: str | os.PathLike[str]) -> SparseModelFile:
    """Read a file of :func:`save_sparse_model` (any readable version) without a model.

    Loads with ``torch.load(weights_only=True)`` onto CPU.

    Raises:
        ValueError: not a sparse-model file, or a format version this package cannot read.
    """
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{os.fspath(path)!r} is not a sparse model saved by save_sparse_model")
    version = saved.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ValueError(
            f"{os.fspath(path)!r} has format_version {version!r}; this version of "
            f"lightning-ggr reads {', '.join(map(str, READABLE_VERSIONS))} (upgrade it)"
        )
    metadata = dict(saved.get("metadata") or {})
    if version == 1:
        masks = {name: mask.to(torch.bool) for name, mask in saved["masks"].items()}
        return SparseModelFile(dict(saved["state_dict"]), masks, metadata, 1)
    state_dict = dict(saved["state_dict"])
    masks = {}
    for name, entry in saved["sparse"].items():
        shape = tuple(entry["shape"])
        mask = decode_positions(entry, shape)
        values = entry["values"]
        if values.numel() != int(mask.sum()):
            raise ValueError(f"{os.fspath(path)!r} is inconsistent: {name!r} has "
                             f"{values.numel()} values for {int(mask.sum())} positions")
        tensor = torch.zeros(shape, dtype=values.dtype)
        tensor[mask] = values
        state_dict[name] = tensor
        masks[name] = mask
    for alias, name in saved["aliases"].items():
        state_dict[alias] = state_dict[name]
    return SparseModelFile(state_dict, masks, metadata, 2)


def load_sparse_model(
    module: nn.Module, path: str | os.PathLike[str], *, strict: bool = True
) -> dict[str, Tensor]:
    """Restore weights saved by :func:`save_sparse_model` into ``module``; return the masks.

    Loads with ``weights_only=True`` onto CPU (format version 2, or 1 of earlier versions),
    then copies into ``module``'s tensors (so they keep their device); the masks come back on
    their parameter's device.

    Raises:
        ValueError: not a sparse-model file, a mask does not fit the model, or a masked
            weight is not zero (the file was not saved from a masked model).
    """
    saved = read_sparse_model(path)
    module.load_state_dict(saved.state_dict, strict=strict)
    params = dict(module.named_parameters())
    masks = {
        name: mask.to(params[name].device if name in params else "cpu", torch.bool)
        for name, mask in saved.masks.items()
    }
    _check_zero(module, masks, f"{os.fspath(path)!r} is inconsistent")
    return masks


# ------------------------------------------------------------------------------ compaction

_ELEMENTWISE: tuple[type[nn.Module], ...] = (
    nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus,
    nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
)
_DROPOUT: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_NORMS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_MAX_POOLS: tuple[type[nn.Module], ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
_AVG_POOLS: tuple[type[nn.Module], ...] = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)
_CONVS: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_WEIGHTED = (nn.Linear, *_CONVS)


def _is_weighted(layer: nn.Module) -> bool:
    """A layer compaction slices: ``nn.Linear``, ``nn.Conv1d/2d/3d``, transformers' ``Conv1D``."""
    return isinstance(layer, _WEIGHTED) or is_transposed_linear(layer)


def _weight(layer: nn.Module) -> Tensor:
    """The layer's weight as ``(out, in, *kernel)``: transformers' ``Conv1D`` stores it
    ``(in, out)``."""
    weight = layer.weight.detach()
    return weight.t() if is_transposed_linear(layer) else weight
SUPPORTED_BETWEEN = (*_ELEMENTWISE, *_DROPOUT, *_NORMS, *_MAX_POOLS, *_AVG_POOLS, nn.Flatten)


def _leaves(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The modules of a (nested) Sequential in call order, with their qualified names."""
    leaves = []
    for name, child in module.named_children():
        qualified = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            leaves += _leaves(child, qualified + ".")
        else:
            leaves.append((qualified, child))
    return leaves


def _used(layer: nn.Module, mask: Tensor | None) -> Tensor:
    """Weights that take part: active in the mask (if any) and not exactly zero."""
    used = _weight(layer) != 0
    if mask is None:
        return used
    mask = mask.to(used.device, torch.bool)
    return used & (mask.t() if is_transposed_linear(layer) else mask)


@dataclass
class _Boundary:
    """The channels between a producer layer and the next weighted layer (the consumer)."""

    producer: int
    consumer: int
    ops: list[tuple[str, nn.Module]]
    channels: int
    group: int = 1  # features per channel after a Flatten (H * W of the flattened map)
    keep: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.bool))
    fold: Tensor | None = None  # bias correction of the consumer, per output


def _constant_through(
    value: Tensor, ops: list[tuple[str, nn.Module]], group: int
) -> tuple[Tensor, Tensor]:
    """Push a per-channel constant ``(C,)`` through the boundary's ops (eval semantics).

    Returns the constant as ``(C, group)`` as the consumer sees it, and whether each channel
    is still one constant over all positions (an average pool with zero padding breaks it
    at the borders unless the constant is 0).
    """
    exact = torch.ones_like(value, dtype=torch.bool)
    current = value.unsqueeze(1)  # (C, 1) before Flatten, (C, group) after
    for _, op in ops:
        if isinstance(op, nn.Flatten):
            current = current.expand(-1, group).clone()
        elif isinstance(op, _NORMS):
            shape = current.shape
            flat = current.reshape(-1)
            if op.running_mean is not None and op.running_var is not None:
                scale = torch.rsqrt(op.running_var + op.eps)
                flat = (flat - op.running_mean) * scale
            else:  # batch statistics: a constant channel normalizes to 0
                flat = torch.zeros_like(flat)
            if op.affine:
                flat = flat * op.weight + op.bias
            current = flat.reshape(shape)
        elif isinstance(op, _AVG_POOLS):
            padding = op.padding if isinstance(op.padding, tuple) else (op.padding,)
            divisor = getattr(op, "divisor_override", None)  # AvgPool2d/3d only
            if divisor:  # a window's sum over divisor: the constant is scaled, not kept
                dims = 3 if isinstance(op, nn.AvgPool3d) else 2
                kernel = (op.kernel_size if isinstance(op.kernel_size, tuple)
                          else (op.kernel_size,) * dims)
                current = current * (math.prod(kernel) / divisor)
                if any(p > 0 for p in padding) or op.ceil_mode:  # partial windows differ
                    exact &= (current == 0).all(dim=1)
            elif (any(p > 0 for p in padding) and op.count_include_pad) or op.ceil_mode:
                exact &= (current == 0).all(dim=1)
        elif isinstance(op, _ELEMENTWISE):
            current = op(current)
        # dropout (identity in eval) and max / adaptive pools keep a constant as it is
    return current, exact


def _plan(
    leaves: list[tuple[str, nn.Module]], masks: Mapping[str, Tensor]
) -> tuple[list[int], list[_Boundary]]:
    weighted = [i for i, (_, m) in enumerate(leaves) if _is_weighted(m)]
    if not weighted:
        raise ValueError("compact_sequential found no nn.Linear, nn.Conv1d/2d/3d or "
                         "transformers Conv1D to compact")
    for index in weighted:
        name, layer = leaves[index]
        if isinstance(layer, _CONVS) and layer.groups != 1:
            raise ValueError(f"compact_sequential supports convolutions with groups=1 only; "
                             f"{name!r} has groups={layer.groups}")
    boundaries = []
    for producer, consumer in itertools.pairwise(weighted):
        ops = leaves[producer + 1:consumer]
        flattened = False
        for name, op in ops:
            if not isinstance(op, SUPPORTED_BETWEEN):
                raise TypeError(
                    f"compact_sequential cannot compact through {name!r} "
                    f"({type(op).__name__}): between two weighted layers it supports "
                    "elementwise activations, dropout, BatchNorm1d/2d/3d, max / average / "
                    "adaptive pooling and Flatten"
                )
            if isinstance(op, nn.Flatten):
                if op.start_dim != 1 or op.end_dim != -1:
                    raise ValueError(f"{name!r}: only Flatten(start_dim=1, end_dim=-1) is "
                                     "supported")
                flattened = True
            elif flattened and isinstance(op, (*_MAX_POOLS, *_AVG_POOLS)):
                raise TypeError(f"{name!r}: pooling after Flatten is not supported")
        channels = _out_features(leaves[producer][1])
        inputs = _in_features(leaves[consumer][1])
        group = 1
        if flattened:
            if inputs % channels:
                raise ValueError(
                    f"{leaves[consumer][0]!r} takes {inputs} features, not a multiple of the "
                    f"{channels} channels of {leaves[producer][0]!r}"
                )
            group = inputs // channels
        elif inputs != channels:
            raise ValueError(f"{leaves[producer][0]!r} gives {channels} channels but "
                             f"{leaves[consumer][0]!r} takes {inputs}")
        if flattened and group != 1 and not isinstance(leaves[producer][1], _CONVS):
            raise ValueError(
                f"Flatten after {leaves[producer][0]!r} (a Linear) merges extra dimensions "
                "that are not channel-major; only a convolution may feed a Flatten that "
                "changes the width"
            )
        if isinstance(leaves[consumer][1], _CONVS) and group != 1:
            raise TypeError("a convolution after Flatten is not supported")
        boundaries.append(_Boundary(producer, consumer, list(ops), channels, group))
    return weighted, boundaries


def _zero_padded(conv: nn.Module) -> bool:
    """Whether ``conv`` pads its input with zeros (its border outputs see fewer inputs)."""
    if conv.padding_mode != "zeros":
        return False  # reflect / replicate / circular padding repeats a constant channel
    if isinstance(conv.padding, str):
        return conv.padding == "same" and any(
            (k - 1) * d > 0 for k, d in zip(conv.kernel_size, conv.dilation, strict=True)
        )
    return any(int(p) > 0 for p in conv.padding)


def _out_features(layer: nn.Module) -> int:
    return int(_weight(layer).shape[0])


def _in_features(layer: nn.Module) -> int:
    return int(_weight(layer).shape[1])


@torch.no_grad()
def _decide(boundary: _Boundary, leaves: list[tuple[str, nn.Module]],
            masks: Mapping[str, Tensor]) -> None:
    """Which channels of a boundary to keep, and the consumer's bias correction.

    Channel ``c`` goes when the consumer never reads it (its input column is empty), or when
    the producer's row ``c`` is empty, so the channel carries the constant ``b_c`` (its
    bias, 0 without) and that constant's effect on the consumer folds exactly into the
    consumer's bias: ``b'_o = b_o + sum_{k} W_o[c, k] * v_c`` (``v_c`` = ``b_c`` after the
    ops in between). It folds exactly for a linear consumer, and for a convolution without
    zero padding (otherwise border outputs see the padding instead of ``v_c``) or with
    ``v_c = 0``.
    """
    producer_name, producer = leaves[boundary.producer]
    consumer_name, consumer = leaves[boundary.consumer]
    produced = _used(producer, masks.get(f"{producer_name}.weight"))
    consumed = _used(consumer, masks.get(f"{consumer_name}.weight"))
    channels, group = boundary.channels, boundary.group
    row_empty = ~produced.reshape(channels, -1).any(dim=1)
    weight = _weight(consumer)
    out = weight.shape[0]
    column_used = consumed.reshape(out, channels, group, -1).any(dim=(0, 2, 3))
    bias = producer.bias.detach() if producer.bias is not None else torch.zeros(
        channels, dtype=weight.dtype, device=weight.device)
    constant, exact = _constant_through(bias.clone(), boundary.ops, group)
    if isinstance(consumer, _CONVS) and _zero_padded(consumer):
        exact &= (constant == 0).all(dim=1)
    foldable = row_empty & exact
    keep = column_used & ~foldable
    if not bool(keep.any()):  # keep one channel: layers of width 0 are not worth the trouble
        keep[0] = True
    removed_with_effect = ~keep & column_used
    fold = None
    if bool(removed_with_effect.any()):
        per_channel = weight.reshape(out, channels, group, -1).sum(dim=3)  # (out, C, group)
        contribution = per_channel * constant.to(weight.dtype).unsqueeze(0)
        fold = contribution[:, removed_with_effect].sum(dim=(1, 2))
        if not bool(fold.any()):
            fold = None  # zero constants: no bias to add
    boundary.keep = keep
    boundary.fold = fold


def _slice_weighted(layer: nn.Module, keep_out: Tensor | None, keep_in: Tensor | None,
                    group: int, fold: Tensor | None) -> nn.Module:
    weight = _weight(layer)
    bias = layer.bias.detach() if layer.bias is not None else None
    if fold is not None:
        bias = fold.clone() if bias is None else bias + fold
    if keep_in is not None:
        out = weight.shape[0]
        shaped = weight.reshape(out, keep_in.numel(), group, *weight.shape[2:])
        weight = shaped[:, keep_in].reshape(out, -1, *weight.shape[2:])
    if keep_out is not None:
        weight = weight[keep_out]
        bias = bias[keep_out] if bias is not None else None
    factory = {"device": weight.device, "dtype": weight.dtype}
    if is_transposed_linear(layer):  # the same type, its weight stored (in, out) again
        new: nn.Module = copy.deepcopy(layer)
        new.weight = nn.Parameter(weight.t().contiguous())
        new.bias = None if bias is None else nn.Parameter(bias.clone())
        new.nx, new.nf = int(weight.shape[1]), int(weight.shape[0])
        return new
    if isinstance(layer, nn.Linear):
        new = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, **factory)
    else:
        new = type(layer)(
            weight.shape[1], weight.shape[0], layer.kernel_size, stride=layer.stride,
            padding=layer.padding, dilation=layer.dilation, groups=1, bias=bias is not None,
            padding_mode=layer.padding_mode, **factory,
        )
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def _slice_norm(norm: nn.Module, keep: Tensor, group: int, flattened: bool) -> nn.Module:
    index = keep.repeat_interleave(group) if flattened else keep
    new = copy.deepcopy(norm)
    new.num_features = int(index.sum())
    for name in ("weight", "bias"):
        tensor = getattr(norm, name)
        if tensor is not None:
            setattr(new, name, nn.Parameter(tensor.detach()[index].clone(),
                                            requires_grad=tensor.requires_grad))
    for name in ("running_mean", "running_var"):
        tensor = getattr(norm, name)
        if tensor is not None:
            new.register_buffer(name, tensor.detach()[index].clone())
    return new


def _replace(root: nn.Module, qualified: str, new: nn.Module) -> None:
    parent_name, _, child = qualified.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


@torch.no_grad()
def compact_sequential(module: nn.Sequential, masks: Mapping[str, Tensor]) -> nn.Sequential:
    """A dense copy of ``module`` with its empty neurons and inputs removed.

    ``module`` is a (possibly nested) ``nn.Sequential`` of ``nn.Linear`` /
    ``nn.Conv1d/2d/3d`` (``groups=1``) layers and transformers' ``Conv1D`` (a linear map
    stored ``(in, out)``, sliced in that orientation and kept a ``Conv1D``), with only
    elementwise activations, dropout, ``BatchNorm1d/2d/3d``, max / average / adaptive pooling
    and ``Flatten`` between two of them (anything before the first or after the last
    weighted layer is copied as is). Names are those of ``module.named_parameters()``, as
    for the masks.

    Between two weighted layers, channel ``c`` is removed (the producer's output ``c``, the
    batch-norm entries ``c``, the consumer's input ``c``; after a ``Flatten`` all ``H*W``
    features of ``c``) when the consumer's column ``c`` is empty, or when the producer's
    row ``c`` is empty and the constant it then carries folds exactly into the consumer's
    bias (see ``_decide``). The model's own inputs and outputs are never removed, and a
    weight counts as used only if active and nonzero. Compaction is exact in eval mode
    (batch norm with its running statistics, dropout off): the copy is returned in eval mode
    and computes the same function as the masked ``module`` (up to float rounding); masked
    weights are zeroed in the copy first, ``module`` itself is not changed.

    Raises:
        TypeError: an unsupported module between two weighted layers.
        ValueError: a grouped convolution, a Flatten over other dimensions, mismatched sizes.
    """
    if not isinstance(module, nn.Sequential):
        raise TypeError(f"compact_sequential needs an nn.Sequential, got {type(module).__name__}")
    compact = copy.deepcopy(module).eval()
    params = dict(compact.named_parameters())
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"mask {name!r} names no parameter of the model")
        params[name].mul_(mask.to(params[name].device, torch.bool))
    leaves = _leaves(compact)
    weighted, boundaries = _plan(leaves, masks)
    for boundary in boundaries:
        _decide(boundary, leaves, masks)
    after = {b.producer: b for b in boundaries}
    before = {b.consumer: b for b in boundaries}
    for index in weighted:
        name, layer = leaves[index]
        outgoing, incoming = after.get(index), before.get(index)
        new = _slice_weighted(
            layer,
            keep_out=outgoing.keep if outgoing else None,
            keep_in=incoming.keep if incoming else None,
            group=incoming.group if incoming else 1,
            fold=incoming.fold if incoming else None,
        )
        _replace(compact, name, new)
    for boundary in boundaries:
        flattened = False
        for name, op in boundary.ops:
            if isinstance(op, nn.Flatten):
                flattened = True
            elif isinstance(op, _NORMS):
                _replace(compact, name, _slice_norm(op, boundary.keep, boundary.group,
                                                    flattened))
    return compact.eval()
