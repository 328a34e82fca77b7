"""Sparse layers for inference: trained masks turned into faster modules, where measured.

:func:`to_inference` copies a model, applies the masks to the copy, runs the example input
once to see every masked layer's real input (its batch, and for a transformer its sequence
length), and times each such layer dense and sparse at that shape, interleaved. A layer
becomes sparse only where the median of its sparse times is at least :data:`SPEEDUP_MARGIN`
below the median of its dense times, and only if the whole model with those layers is then
faster by the same margin; everywhere else it stays the dense module it was. The trained
model is not changed.

- ``nn.Linear`` and transformers' ``Conv1D`` (a linear map stored ``(in, out)``,
  :func:`~lightning_ggr.sparse.selection.is_transposed_linear`) -> :class:`SparseLinear`:
  the weight as a CSR matrix with int32 indices, ``y^T = b + W x^T`` through ``torch.addmm``
  (``F.linear`` with a CSR weight and int64 indices are both several times slower).
- ``nn.Conv2d`` with ``groups=1`` and zero padding -> :class:`SparseConv2d`: ``F.unfold``
  then the same CSR product. It pays only at high sparsity and small batches.
- Everything else stays dense and the report says why: ``nn.MultiheadAttention``'s
  projections (it reads ``in_proj_weight`` and ``out_proj.weight`` itself, not through a
  module call), grouped, 1-D, 3-D and transposed convolutions, embeddings.

On a CPU, MKL's sparse ``addmm`` has float32/float64 kernels only: a bfloat16 or float16
layer computes in float32 (its input cast up, its output cast back to the input's dtype),
which rounds no worse than the dense layer. On CUDA the same code runs cuSPARSE's CSR
product in the layer's own dtype where it has a kernel.
"""

from __future__ import annotations

import copy
import statistics
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from lightning_ggr.sparse.checks import check_int
from lightning_ggr.sparse.export import module_masks
from lightning_ggr.sparse.selection import is_transposed_linear

#: A layer is made sparse only when its median sparse time is at least this fraction below
#: its median dense time at the example input's shape (so timing noise does not swap in a
#: layer that is not faster); the same margin applies to the whole model afterwards.
SPEEDUP_MARGIN = 0.10
#: Seconds spent timing one layer (both variants together), within the repetition bounds;
#: the whole model gets :data:`MODEL_BUDGET_FACTOR` times as much.
TIMING_BUDGET_S = 0.25
MODEL_BUDGET_FACTOR = 4
MIN_REPETITIONS = 5
MAX_REPETITIONS = 200

_COMPUTE_DTYPES: dict[tuple[str, torch.dtype], torch.dtype] = {}


def _checked_csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    """A CSR tensor, its invariants checked (ValueError/RuntimeError if broken)."""
    with warnings.catch_warnings():
        # torch's once-per-process notice that sparse CSR support is in beta: nothing a user
        # of the converted model can act on.
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=True)


@torch.jit.unused
def _unchecked_csr(crow: Tensor, col: Tensor, values: Tensor, size: list[int]) -> Tensor:
    return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: list[int]) -> Tensor:
    """The CSR tensor of a layer's buffers, at each call (checked once, at construction)."""
    if torch.jit.is_scripting():  # TorchScript knows no check_invariants argument
        return torch.sparse_csr_tensor(crow, col, values, size)
    return _unchecked_csr(crow, col, values, size)


def csr_compute_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """``dtype`` if a CSR ``torch.addmm`` runs in it on ``device``, else ``torch.float32``.

    Probed once per (device type, dtype) on a 2 x 2 matrix: MKL (CPU) has no bfloat16 or
    float16 kernel; cuSPARSE has them.
    """
    device = torch.device(device)
    key = (device.type, dtype)
    if key not in _COMPUTE_DTYPES:
        crow = torch.tensor([0, 1, 2], dtype=torch.int32, device=device)
        col = torch.tensor([0, 1], dtype=torch.int32, device=device)
        values = torch.ones(2, dtype=dtype, device=device)
        matrix = _checked_csr(crow, col, values, (2, 2))
        try:
            torch.addmm(torch.zeros(2, 1, dtype=dtype, device=device), matrix,
                        torch.ones(2, 1, dtype=dtype, device=device))
            _COMPUTE_DTYPES[key] = dtype
        except (NotImplementedError, RuntimeError):
            _COMPUTE_DTYPES[key] = torch.float32
    return _COMPUTE_DTYPES[key]


def _csr_parts(matrix: Tensor, active: Tensor, dtype: torch.dtype) -> tuple[Tensor, ...]:
    """CSR ``(crow_indices, col_indices, values)`` of the 2-D ``matrix`` at the ``active``
    positions (the mask's, so a weight that is exactly 0 but active stays explicit)."""
    active = active.to(matrix.device, torch.bool)
    count = int(active.sum())
    index_dtype = torch.int32 if max(count, *matrix.shape) < 2**31 - 1 else torch.int64
    crow = torch.zeros(matrix.shape[0] + 1, dtype=torch.int64, device=matrix.device)
    crow[1:] = active.sum(dim=1).cumsum(0)
    col = active.nonzero()[:, 1]  # row-major: sorted by row, then column
    values = matrix[active].to(dtype)
    return crow.to(index_dtype), col.to(index_dtype), values.contiguous()


class _CSRLayer(nn.Module):
    """The CSR buffers and their description, shared by the sparse layers.

    (No class-level annotations of the buffers: ``torch.jit.script`` would read them.)
    """

    def _register_csr(self, crow: Tensor, col: Tensor, values: Tensor,
                      bias: Tensor | None) -> None:
        # Checked once here; each call then builds the CSR tensor without the check (buffers
        # that violate the invariants would make the product read out of bounds).
        _checked_csr(crow, col, values, (crow.numel() - 1, self._columns()))
        self.register_buffer("crow_indices", crow)
        self.register_buffer("col_indices", col)
        self.register_buffer("values", values)
        self.register_buffer("bias", bias)

    @property
    def density(self) -> float:
        """Active weights over all weights of the dense matrix."""
        rows = self.crow_indices.numel() - 1
        columns = self._columns()
        return self.values.numel() / (rows * columns) if rows * columns else 0.0

    def _columns(self) -> int:
        raise NotImplementedError

    def _format(self) -> str:
        index = str(self.col_indices.dtype).removeprefix("torch.")
        values = str(self.values.dtype).removeprefix("torch.")
        return f"density={self.density:.4f}, format=CSR ({index} indices, {values} values)"


class SparseLinear(_CSRLayer):
    """``nn.Linear``'s map ``y = x W^T + b`` with ``W`` a CSR matrix, through ``torch.addmm``.

    Same call as ``nn.Linear``: ``input`` of shape ``(*, in_features)`` gives a contiguous
    ``(*, out_features)`` in ``input``'s dtype. Computes ``b + W x^T`` in ``values.dtype``
    (see :func:`csr_compute_dtype`). Build it with :meth:`from_dense`.

    Buffers: ``crow_indices``, ``col_indices`` (int32), ``values``, ``bias`` (``(out,)`` or
    ``None``); the CSR tensor is assembled from them at each call (about 2 us), so the module
    deep-copies, pickles, moves with ``.to()`` and scripts with ``torch.jit``.
    """

    def __init__(self, in_features: int, out_features: int, crow_indices: Tensor,
                 col_indices: Tensor, values: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self._register_csr(crow_indices, col_indices, values, bias)

    @classmethod
    def from_dense(cls, module: nn.Module, mask: Tensor | None = None, *,
                   compute_dtype: torch.dtype | None = None) -> SparseLinear:
        """The sparse equivalent of an ``nn.Linear`` or a transformers ``Conv1D``.

        Args:
            module: the dense layer (not changed).
            mask: bool, the weight's shape, ``True`` = active; default: the nonzero weights.
            compute_dtype: dtype of the stored values and of the product; default
                :func:`csr_compute_dtype` of the weight's dtype and device.

        Raises:
            TypeError: ``module`` is neither.
            ValueError: ``mask`` does not have the weight's shape.
        """
        weight = _weight_of(module).detach()
        if is_transposed_linear(module):
            weight = weight.t()
            mask = None if mask is None else mask.t()
        elif not isinstance(module, nn.Linear):
            raise TypeError(f"SparseLinear.from_dense needs an nn.Linear or a transformers "
                            f"Conv1D, got {type(module).__name__}")
        active = _check_mask(weight != 0 if mask is None else mask, weight, "SparseLinear")
        dtype = compute_dtype or csr_compute_dtype(weight.dtype, weight.device)
        crow, col, values = _csr_parts(weight, active, dtype)
        bias = None if module.bias is None else module.bias.detach().to(dtype).clone()
        return cls(weight.shape[1], weight.shape[0], crow, col, values, bias)

    def _columns(self) -> int:
        return self.in_features

    def forward(self, input: Tensor) -> Tensor:
        flat = input.reshape(-1, self.in_features).to(self.values.dtype)
        weight = _csr(self.crow_indices, self.col_indices, self.values,
                      [self.out_features, self.in_features])
        if self.bias is None:
            out = torch.mm(weight, flat.t())
        else:
            out = torch.addmm(self.bias.unsqueeze(1), weight, flat.t())
        shape = list(input.shape[:-1])
        shape.append(self.out_features)
        return out.t().contiguous().to(input.dtype).reshape(shape)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self._format()}")


def _conv_padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """Symmetric zero padding of ``conv`` as two ints, or ``None`` if unfold cannot do it."""
    if conv.padding_mode != "zeros":
        return None
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        totals = [d * (k - 1) for k, d in zip(conv.kernel_size, conv.dilation, strict=True)]
        if any(total % 2 for total in totals):
            return None  # asymmetric
        return (totals[0] // 2, totals[1] // 2)
    return (int(conv.padding[0]), int(conv.padding[1]))


def conv2d_unsupported(conv: nn.Conv2d) -> str | None:
    """Why :class:`SparseConv2d` cannot compute ``conv``, or ``None`` if it can."""
    if conv.groups != 1:
        return f"groups={conv.groups} (only 1 is converted)"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r} (only 'zeros' is converted)"
    if _conv_padding(conv) is None:
        return "asymmetric 'same' padding"
    return None


class SparseConv2d(_CSRLayer):
    """``nn.Conv2d`` (``groups=1``, zero padding) as ``F.unfold`` and a CSR product.

    The weight is the ``(out_channels, in_channels * kH * kW)`` CSR matrix ``W``; the output
    is ``b + W cols`` with ``cols`` the unfolded input of all images side by side, returned
    contiguous in ``(N, C, H, W)`` layout and ``input``'s dtype. Same call as ``nn.Conv2d``
    (batched or unbatched input). Build it with :meth:`from_dense`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int],
                 stride: tuple[int, int], padding: tuple[int, int],
                 dilation: tuple[int, int], crow_indices: Tensor, col_indices: Tensor,
                 values: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.in_channels = int(in_channels)
        self.out_channels = int(out_channels)
        self.kernel_size = (int(kernel_size[0]), int(kernel_size[1]))
        self.stride = (int(stride[0]), int(stride[1]))
        self.padding = (int(padding[0]), int(padding[1]))
        self.dilation = (int(dilation[0]), int(dilation[1]))
        self._register_csr(crow_indices, col_indices, values, bias)

    @classmethod
    def from_dense(cls, module: nn.Conv2d, mask: Tensor | None = None, *,
                   compute_dtype: torch.dtype | None = None) -> SparseConv2d:
        """The sparse equivalent of ``module`` (see :meth:`SparseLinear.from_dense`).

        Raises:
            TypeError: not an ``nn.Conv2d``.
            ValueError: grouped, non-zero or asymmetric padding (:func:`conv2d_unsupported`),
                or a mask of the wrong shape.
        """
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"SparseConv2d.from_dense needs an nn.Conv2d, got "
                            f"{type(module).__name__}")
        reason = conv2d_unsupported(module)
        if reason is not None:
            raise ValueError(f"SparseConv2d cannot compute this convolution: {reason}")
        weight = _weight_of(module).detach()
        active = _check_mask(weight != 0 if mask is None else mask, weight, "SparseConv2d")
        dtype = compute_dtype or csr_compute_dtype(weight.dtype, weight.device)
        out_channels = weight.shape[0]
        crow, col, values = _csr_parts(weight.reshape(out_channels, -1),
                                       active.reshape(out_channels, -1), dtype)
        bias = None if module.bias is None else module.bias.detach().to(dtype).clone()
        padding = _conv_padding(module)
        assert padding is not None  # conv2d_unsupported said so
        return cls(weight.shape[1], out_channels, module.kernel_size, module.stride, padding,
                   module.dilation, crow, col, values, bias)

    def _columns(self) -> int:
        return self.in_channels * self.kernel_size[0] * self.kernel_size[1]

    def forward(self, input: Tensor) -> Tensor:
        batched = input.dim() == 4
        images = input if batched else input.unsqueeze(0)
        height, width = images.shape[-2], images.shape[-1]
        out_height = (height + 2 * self.padding[0]
                      - self.dilation[0] * (self.kernel_size[0] - 1) - 1) // self.stride[0] + 1
        out_width = (width + 2 * self.padding[1]
                     - self.dilation[1] * (self.kernel_size[1] - 1) - 1) // self.stride[1] + 1
        columns = F.unfold(images.to(self.values.dtype), self.kernel_size, self.dilation,
                           self.padding, self.stride)  # (N, C * kH * kW, L)
        count = images.shape[0]
        columns = columns.transpose(0, 1).reshape(columns.shape[1], -1)
        weight = _csr(self.crow_indices, self.col_indices, self.values,
                      [self.out_channels, self._columns()])
        if self.bias is None:
            out = torch.mm(weight, columns)
        else:
            out = torch.addmm(self.bias.unsqueeze(1), weight, columns)
        out = out.reshape(self.out_channels, count, out_height, out_width).transpose(0, 1)
        out = out.contiguous().to(input.dtype)
        return out if batched else out.squeeze(0)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"bias={self.bias is not None}, {self._format()}")


def _weight_of(module: nn.Module) -> Tensor:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, Tensor):
        raise TypeError(f"{type(module).__name__} has no weight tensor")
    return weight


def _check_mask(mask: Tensor, weight: Tensor, what: str) -> Tensor:
    if tuple(mask.shape) != tuple(weight.shape):
        raise ValueError(f"{what}: the mask has shape {tuple(mask.shape)}, the weight "
                         f"{tuple(weight.shape)}")
    return mask.to(weight.device, torch.bool)


# ----------------------------------------------------------------------------- the report


@dataclass
class LayerChoice:
    """What :func:`to_inference` decided for one module holding a masked weight.

    Attributes:
        module: the module's qualified name in the model.
        kind: its type name.
        parameter: the name of the masked weight (the mask's key).
        density: active weights over all weights.
        input_shape: shape of the input it was timed at (``None``: not timed).
        dense_ms, sparse_ms: median times over the interleaved repetitions (``None``: not
            timed); ``dense_spread_ms``, ``sparse_spread_ms``: their (min, max).
        repetitions: timed calls of each variant.
        sparse: whether the converted model computes it sparse.
        reason: why, in words.
    """

    module: str
    kind: str
    parameter: str
    density: float
    input_shape: tuple[int, ...] | None = None
    dense_ms: float | None = None
    sparse_ms: float | None = None
    dense_spread_ms: tuple[float, float] | None = None
    sparse_spread_ms: tuple[float, float] | None = None
    repetitions: int = 0
    sparse: bool = False
    reason: str = ""

    @property
    def speedup(self) -> float | None:
        """Median dense time over median sparse time."""
        if self.dense_ms is None or not self.sparse_ms:
            return None
        return self.dense_ms / self.sparse_ms


@dataclass
class InferenceReport:
    """Every masked module's choice, and the conditions it was timed under."""

    layers: list[LayerChoice] = field(default_factory=list)
    threads: int = 1
    device: str = "cpu"
    margin: float = SPEEDUP_MARGIN
    #: The whole model at the example input, dense and with the faster layers sparse
    #: (medians and (min, max) in ms; ``None`` when no layer was faster).
    model_dense_ms: float | None = None
    model_sparse_ms: float | None = None
    model_dense_spread_ms: tuple[float, float] | None = None
    model_sparse_spread_ms: tuple[float, float] | None = None
    #: ``False`` when the layers measured faster alone did not make the model faster by
    #: :data:`SPEEDUP_MARGIN`, so every layer was kept dense.
    kept_sparse: bool = False

    @property
    def converted(self) -> list[str]:
        """Names of the modules computed sparse."""
        return [layer.module for layer in self.layers if layer.sparse]

    def __str__(self) -> str:
        width = max([len(layer.module) for layer in self.layers] + [len("module")])
        kinds = max([len(layer.kind) for layer in self.layers] + [len("type")])
        lines = [
            f"to_inference on {self.device}, {self.threads} thread(s): a layer is CSR only "
            f"where its median time is at least {self.margin:.0%} below dense's",
            f"{'module':<{width}}  {'type':<{kinds}} {'density':>7}  {'input':<16} "
            f"{'dense ms':>9} {'CSR ms':>9} {'speed-up':>8}  choice",
        ]
        for layer in self.layers:
            shape = "x".join(map(str, layer.input_shape)) if layer.input_shape else "-"
            dense = f"{layer.dense_ms:9.3f}" if layer.dense_ms is not None else f"{'-':>9}"
            sparse = f"{layer.sparse_ms:9.3f}" if layer.sparse_ms is not None else f"{'-':>9}"
            speedup = f"{layer.speedup:7.2f}x" if layer.speedup is not None else f"{'-':>8}"
            choice = "CSR" if layer.sparse else f"dense: {layer.reason}"
            lines.append(f"{layer.module:<{width}}  {layer.kind:<{kinds}} {layer.density:7.4f}  "
                         f"{shape:<16} {dense} {sparse} {speedup}  {choice}")
        if self.model_dense_ms is not None and self.model_sparse_ms is not None:
            verdict = ("kept" if self.kept_sparse
                       else f"not {self.margin:.0%} faster: every layer kept dense")
            lines.append(f"whole model: dense {self.model_dense_ms:.3f} ms, with the CSR layers "
                         f"{self.model_sparse_ms:.3f} ms "
                         f"({self.model_dense_ms / self.model_sparse_ms:.2f}x): {verdict}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- conversion


def _masked_weight(module: nn.Module) -> Tensor | None:
    """The parameter a mask of ``module``'s weight is keyed by (``original`` behind a
    parametrization such as ``spectral_norm``), or ``None``."""
    if parametrize.is_parametrized(module, "weight"):
        return getattr(module.parametrizations["weight"], "original", None)
    weight = module._parameters.get("weight")
    return weight if isinstance(weight, Tensor) else None


def _run(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, tuple):
        return model(*example_input)
    if isinstance(example_input, Mapping):
        return model(**example_input)
    return model(example_input)


def _synchronize(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_interleaved(first: Callable[[], Any], second: Callable[[], Any],
                     device: torch.device | str = "cpu", budget_s: float | None = None,
                     min_repetitions: int | None = None) -> tuple[list[float], list[float]]:
    """Times in milliseconds of ``first`` and ``second``, called alternately.

    Two warm-up calls each, then as many repetitions as fit in ``budget_s`` (default
    :data:`TIMING_BUDGET_S`; at least ``min_repetitions``, default :data:`MIN_REPETITIONS`,
    at most :data:`MAX_REPETITIONS`); the order within a pair alternates, so drifting load
    affects both alike. On CUDA each call is synchronized. The benchmark
    (``benchmarks/inference.py``) times whole models with it too.
    """
    budget_s = TIMING_BUDGET_S if budget_s is None else budget_s
    least = MIN_REPETITIONS if min_repetitions is None else min_repetitions
    synchronize = _synchronize(torch.device(device))

    def timed(function: Callable[[], Any]) -> float:
        synchronize()
        start = time.perf_counter()
        function()
        synchronize()
        return (time.perf_counter() - start) * 1e3

    for _ in range(2):
        timed(first)
        timed(second)
    estimate = (timed(first) + timed(second)) / 1e3
    repetitions = int(min(MAX_REPETITIONS, max(least, budget_s / max(estimate, 1e-6))))
    times: tuple[list[float], list[float]] = ([], [])
    for repetition in range(repetitions):
        order = (0, 1) if repetition % 2 == 0 else (1, 0)
        for which in order:
            times[which].append(timed((first, second)[which]))
    return times


def _candidates(model: nn.Module, mask_of: Mapping[int, tuple[str, Tensor]]
                ) -> tuple[list[tuple[str, nn.Module, str, Tensor]], list[LayerChoice]]:
    """Modules that could be converted (name, module, parameter name, mask), and a choice
    for every other module holding a masked weight (it stays dense, with the reason)."""
    convertible, kept = [], []
    inside_attention = {
        id(child) for module in model.modules() if isinstance(module, nn.MultiheadAttention)
        for child in module.modules() if child is not module
    }
    attention_names = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            for attribute in attention_names:
                tensor = module._parameters.get(attribute)
                if tensor is not None and id(tensor) in mask_of:
                    parameter, mask = mask_of[id(tensor)]
                    kept.append(LayerChoice(
                        f"{name}.{attribute}" if name else attribute, "MultiheadAttention",
                        parameter, _density(mask),
                        reason="MultiheadAttention computes its projections itself"))
            continue
        weight = _masked_weight(module)
        if weight is None or id(weight) not in mask_of:
            continue
        parameter, mask = mask_of[id(weight)]
        kind = type(module).__name__
        reason = None
        if id(module) in inside_attention:
            reason = "MultiheadAttention reads out_proj.weight itself"
        elif isinstance(module, nn.Conv2d):
            reason = conv2d_unsupported(module)
        elif not (isinstance(module, nn.Linear) or is_transposed_linear(module)):
            reason = f"{kind} is not converted (Linear, Conv1D and Conv2d are)"
        if reason is None:
            convertible.append((name, module, parameter, mask))
        else:
            kept.append(LayerChoice(name, kind, parameter, _density(mask), reason=reason))
    return convertible, kept


def _density(mask: Tensor) -> float:
    return float(mask.sum()) / mask.numel() if mask.numel() else 0.0


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _median_and_spread(times: list[float]) -> tuple[float, tuple[float, float]]:
    return statistics.median(times), (min(times), max(times))


@torch.no_grad()
def to_inference(model: nn.Module, masks: Mapping[str, Tensor], example_input: Any, *,
                 threads: int | None = None) -> nn.Module:
    """A copy of ``model`` for inference with each masked layer sparse where that is faster.

    The copy is put in eval mode and the masks are applied to it (so it computes the masked
    dense model). The example input (a tensor, a tuple of positional arguments or a dict of
    keyword arguments, on the model's device) is run once to capture every masked layer's
    real input; each ``nn.Linear``, transformers ``Conv1D`` and ``nn.Conv2d`` (``groups=1``,
    zero padding) is then timed dense and as :class:`SparseLinear` / :class:`SparseConv2d`
    on that input (interleaved, :func:`time_interleaved`) and replaced only when the sparse
    median is at least :data:`SPEEDUP_MARGIN` below the dense one. Then the whole model is
    timed, dense against with those layers sparse: if it is not faster by the same margin
    (the time between layers, or a fused path given up, can cost more than the layers
    gained), every layer stays dense and the report says so. Give the input the
    deployed model will see: the choice depends on the batch size, the sequence length, the
    threads and the machine, which is why this runs where the model is deployed (rebuild
    it there from the sparse file: :func:`~lightning_ggr.sparse.export.load_sparse_model`,
    then this function).

    ``nn.TransformerEncoderLayer`` computes its feed-forward layers itself in its fused
    inference path; one with a converted ``linear1`` / ``linear2`` is switched to its
    ordinary path (``activation_relu_or_gelu = 0``, which only that check reads), and the
    whole-model check weighs what that costs.

    Args:
        model: the trained model (not changed).
        masks: parameter name -> bool mask (``True`` = active); names may carry an enclosing
            module's prefix (``lightning_ggr.sparse.module_masks``).
        example_input: what the deployed model is called with.
        threads: CPU threads to time with (``torch.set_num_threads``; the count is restored
            afterwards, also on an exception); default: the current count.

    Returns:
        The converted copy, in eval mode; its ``inference_report`` attribute
        (:class:`InferenceReport`) lists each masked module's choice and times.

    Raises:
        ValueError: a mask names no parameter of ``model`` or has the wrong shape; bad
            ``threads``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if threads is not None:
        threads = check_int("threads", threads, 1)
    masks = module_masks(model, masks, "to_inference")
    converted = copy.deepcopy(model).eval()
    params = dict(converted.named_parameters())
    mask_of: dict[int, tuple[str, Tensor]] = {}
    for name, mask in masks.items():
        param = params[name]
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(f"mask of {name!r} has shape {tuple(mask.shape)}, the parameter "
                             f"{tuple(param.shape)}")
        mask = mask.to(param.device, torch.bool)
        param.mul_(mask)
        mask_of[id(param)] = (name, mask)
    convertible, kept = _candidates(converted, mask_of)

    previous_threads = torch.get_num_threads()
    report = InferenceReport(threads=threads or previous_threads)
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        inputs: dict[str, Tensor] = {}
        calls: dict[str, int] = {}

        def capture(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
                calls[name] = calls.get(name, 0) + 1
                if name not in inputs and args and isinstance(args[0], Tensor):
                    inputs[name] = args[0]
            return hook

        handles = [module.register_forward_pre_hook(capture(name))
                   for name, module, _, _ in convertible]
        try:
            with torch.inference_mode():
                _run(converted, example_input)
        finally:
            for handle in handles:
                handle.remove()

        chosen: list[tuple[str, nn.Module]] = []
        for name, module, parameter, mask in convertible:
            choice = LayerChoice(name, type(module).__name__, parameter, _density(mask))
            report.layers.append(choice)
            if name not in inputs:
                choice.reason = ("not called by the example input" if name not in calls
                                 else "called without a positional tensor input")
                continue
            sparse_type = SparseConv2d if isinstance(module, nn.Conv2d) else SparseLinear
            sparse = sparse_type.from_dense(module, mask)
            input = inputs[name]
            report.device = str(input.device)
            with torch.inference_mode():
                dense_times, sparse_times = time_interleaved(
                    lambda module=module, input=input: module(input),
                    lambda sparse=sparse, input=input: sparse(input),
                    input.device)
            choice.input_shape = tuple(input.shape)
            choice.repetitions = len(dense_times)
            choice.dense_ms, choice.dense_spread_ms = _median_and_spread(dense_times)
            choice.sparse_ms, choice.sparse_spread_ms = _median_and_spread(sparse_times)
            choice.sparse = choice.sparse_ms <= (1 - SPEEDUP_MARGIN) * choice.dense_ms
            if choice.sparse:
                choice.reason = "faster"
                chosen.append((name, sparse))
            else:
                choice.reason = f"CSR not {SPEEDUP_MARGIN:.0%} faster"
            if calls[name] > 1:
                choice.reason += f" (called {calls[name]} times, timed at the first input)"
        if chosen:
            dense = copy.deepcopy(converted)
            _replace(converted, chosen)
            with torch.inference_mode():
                dense_times, sparse_times = time_interleaved(
                    lambda: _run(dense, example_input), lambda: _run(converted, example_input),
                    report.device, TIMING_BUDGET_S * MODEL_BUDGET_FACTOR)
            report.model_dense_ms, report.model_dense_spread_ms = _median_and_spread(dense_times)
            report.model_sparse_ms, report.model_sparse_spread_ms = _median_and_spread(
                sparse_times)
            report.kept_sparse = (report.model_sparse_ms
                                  <= (1 - SPEEDUP_MARGIN) * report.model_dense_ms)
            if not report.kept_sparse:
                converted = dense
                for choice in report.layers:
                    if choice.sparse:
                        choice.sparse = False
                        choice.reason = "faster alone, but the whole model was not"
    finally:
        torch.set_num_threads(previous_threads)
    report.layers.extend(kept)
    converted.inference_report = report
    return converted.eval()


def _replace(model: nn.Module, chosen: list[tuple[str, nn.Module]]) -> None:
    """Swap the chosen sparse modules in. ``nn.TransformerEncoderLayer``'s fused inference
    path reads ``linear1.weight`` and ``linear2.weight`` itself: a layer with a converted one
    takes its ordinary path (``activation_relu_or_gelu = 0``, which only that check reads)."""
    for name, sparse in chosen:
        _set_submodule(model, name, sparse)
    replaced = {name for name, _ in chosen}
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoderLayer) and any(
            (f"{name}.{child}" if name else child) in replaced
            for child in ("linear1", "linear2")
        ):
            module.activation_relu_or_gelu = 0
