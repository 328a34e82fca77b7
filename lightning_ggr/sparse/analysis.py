"""What a sparse network looks like: densities, empty neurons and inputs, compact size, FLOPs.

Pure PyTorch (no Lightning). The quantities follow the paper's Table 4 and Figure 2:

- A layer's weight is viewed as ``(out, in, K)``: ``out`` neurons (rows; output channels of a
  convolution), ``in`` inputs (columns; input channels) and ``K = prod(kernel)`` positions
  per (neuron, input) pair (1 for a linear layer).
- A neuron is *empty* when none of its weights is active: ``not mask[o].any()``. An input is
  *empty* when no neuron of the layer uses it: ``not mask[:, i].any()``. For a convolution
  both are counted by channel, as the paper does.
- ``params_star`` (the paper's Params*) is the number of dense parameters left when every
  empty neuron and every empty input is removed from each tensor:
  ``sum_l (out_l - e_out_l) * (in_l - e_in_l) * K_l``.

Grouped and transposed convolutions, and linear maps stored ``(in, out)`` (transformers'
``Conv1D``), need the module to be read correctly (pass ``module`` to :func:`analyze_masks`);
see :func:`analyze_masks` for the rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_ggr.sparse.selection import CONV_MODULES as _CONV_TYPES
from lightning_ggr.sparse.selection import is_transposed_linear


def count_parameters(module: nn.Module) -> int:
    """Number of parameters of ``module``, each shared tensor once (``meta`` modules too)."""
    return sum(p.numel() for p in module.parameters())


def _pct(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


@dataclass(frozen=True)
class LayerAnalysis:
    """Sparsity figures of one masked weight tensor.

    ``neurons`` and ``inputs`` are the output and input channels of the layer (for a grouped
    convolution: of the whole layer, all groups together); ``kernel`` is ``prod(kernel
    size)``, 1 for a linear layer.
    """

    name: str
    shape: tuple[int, ...]
    groups: int
    transposed: bool
    active: int
    total: int
    neurons: int
    empty_neurons: int
    inputs: int
    empty_inputs: int
    kernel: int
    params_star: int
    mean_abs_active: float | None = None

    @property
    def density(self) -> float:
        """``active / total``."""
        return self.active / self.total if self.total else 0.0

    @property
    def empty_neurons_pct(self) -> float:
        """``100 * empty_neurons / neurons``."""
        return _pct(self.empty_neurons, self.neurons)

    @property
    def empty_inputs_pct(self) -> float:
        """``100 * empty_inputs / inputs``."""
        return _pct(self.empty_inputs, self.inputs)

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON-serializable values (the percentages included)."""
        return {
            "shape": list(self.shape),
            "groups": self.groups,
            "transposed": self.transposed,
            "active": self.active,
            "total": self.total,
            "density": self.density,
            "neurons": self.neurons,
            "empty_neurons": self.empty_neurons,
            "empty_neurons_pct": self.empty_neurons_pct,
            "inputs": self.inputs,
            "empty_inputs": self.empty_inputs,
            "empty_inputs_pct": self.empty_inputs_pct,
            "kernel": self.kernel,
            "params_star": self.params_star,
            "mean_abs_active": self.mean_abs_active,
        }


@dataclass(frozen=True)
class SparsityAnalysis:
    """Per-layer :class:`LayerAnalysis` and the totals over all sparse layers.

    The overall percentages pool neurons (and inputs) over all layers, as one population:
    ``empty_neurons_pct = 100 * sum_l e_out_l / sum_l out_l`` (likewise for inputs), so a
    large layer weighs by its number of neurons, not one vote per layer.
    """

    layers: dict[str, LayerAnalysis]

    @property
    def active(self) -> int:
        return sum(layer.active for layer in self.layers.values())

    @property
    def total(self) -> int:
        return sum(layer.total for layer in self.layers.values())

    @property
    def density(self) -> float:
        """Global density ``sum_l n_l / sum_l N_l``."""
        return self.active / self.total if self.total else 0.0

    @property
    def neurons(self) -> int:
        return sum(layer.neurons for layer in self.layers.values())

    @property
    def empty_neurons(self) -> int:
        return sum(layer.empty_neurons for layer in self.layers.values())

    @property
    def empty_neurons_pct(self) -> float:
        return _pct(self.empty_neurons, self.neurons)

    @property
    def inputs(self) -> int:
        return sum(layer.inputs for layer in self.layers.values())

    @property
    def empty_inputs(self) -> int:
        return sum(layer.empty_inputs for layer in self.layers.values())

    @property
    def empty_inputs_pct(self) -> float:
        return _pct(self.empty_inputs, self.inputs)

    @property
    def params_star(self) -> int:
        """The paper's Params*: dense size of all layers with empty neurons and inputs removed."""
        return sum(layer.params_star for layer in self.layers.values())

    def to_dict(self) -> dict[str, Any]:
        """``{"overall": {...}, "layers": {name: {...}}}`` of plain, JSON-serializable values."""
        return {
            "overall": {
                "active": self.active,
                "total": self.total,
                "density": self.density,
                "neurons": self.neurons,
                "empty_neurons": self.empty_neurons,
                "empty_neurons_pct": self.empty_neurons_pct,
                "inputs": self.inputs,
                "empty_inputs": self.empty_inputs,
                "empty_inputs_pct": self.empty_inputs_pct,
                "params_star": self.params_star,
            },
            "layers": {name: layer.to_dict() for name, layer in self.layers.items()},
        }


def layer_layouts(module: nn.Module) -> dict[str, tuple[int, bool]]:
    """``weight`` name -> ``(groups, transposed)`` of every convolution in ``module``, and of
    every linear map stored ``(in, out)`` (transformers' ``Conv1D``: one group, transposed)."""
    layouts = {}
    for module_name, child in module.named_modules():
        name = f"{module_name}.weight" if module_name else "weight"
        if isinstance(child, _CONV_TYPES):
            layouts[name] = (int(child.groups), bool(child.transposed))
        elif is_transposed_linear(child):
            layouts[name] = (1, True)
    return layouts


def canonical_view(mask: Tensor, groups: int = 1, transposed: bool = False) -> Tensor:
    """``mask`` as ``(groups, out_per_group, in_per_group, K)``.

    A weight of shape ``(out, in / groups, *kernel)`` (convolution, linear: no kernel) is
    split by group along ``out``; a transposed convolution's ``(in, out / groups, *kernel)``
    is split along ``in`` and its two channel dimensions swapped. A 1-D mask is read as
    ``(n, 1)``: ``n`` neurons with one input each.
    """
    if mask.dim() == 0:
        raise ValueError("a mask must have at least one dimension, got a scalar")
    if mask.dim() == 1:
        return mask.reshape(1, -1, 1, 1)
    first, second = int(mask.shape[0]), int(mask.shape[1])
    if first % groups:
        raise ValueError(f"mask of shape {tuple(mask.shape)} cannot be split in {groups} groups")
    view = mask.reshape(groups, first // groups, second, -1)
    return view.transpose(1, 2) if transposed else view


def analyze_layer(
    name: str,
    mask: Tensor,
    param: Tensor | None = None,
    *,
    groups: int = 1,
    transposed: bool = False,
) -> LayerAnalysis:
    """The :class:`LayerAnalysis` of one mask (see :func:`analyze_masks`)."""
    mask = mask.detach().bool()
    view = canonical_view(mask, groups, transposed)
    neuron_used = view.any(dim=3).any(dim=2)  # (groups, out_g)
    input_used = view.any(dim=3).any(dim=1)  # (groups, in_g)
    kernel = int(view.shape[3])
    kept_out = neuron_used.sum(dim=1)
    kept_in = input_used.sum(dim=1)
    params_star = int((kept_out * kept_in).sum()) * kernel
    active = int(mask.sum())
    mean_abs = None
    if param is not None:
        if tuple(param.shape) != tuple(mask.shape):
            raise ValueError(
                f"parameter {name!r} has shape {tuple(param.shape)}, its mask {tuple(mask.shape)}"
            )
        values = param.detach()[mask.to(param.device)]
        mean_abs = float(values.abs().float().mean()) if active else 0.0
    return LayerAnalysis(
        name=name,
        shape=tuple(int(d) for d in mask.shape),
        groups=groups,
        transposed=transposed,
        active=active,
        total=mask.numel(),
        neurons=neuron_used.numel(),
        empty_neurons=int((~neuron_used).sum()),
        inputs=input_used.numel(),
        empty_inputs=int((~input_used).sum()),
        kernel=kernel,
        params_star=params_star,
        mean_abs_active=mean_abs,
    )


def analyze_masks(
    masks: Mapping[str, Tensor],
    params: Mapping[str, Tensor] | None = None,
    *,
    module: nn.Module | None = None,
) -> SparsityAnalysis:
    """Density, empty neurons and inputs, and Params* of every masked layer (paper Table 4).

    Args:
        masks: parameter name -> boolean mask (``True`` = active weight).
        params: optional name -> weight; when given, each layer also reports
            ``mean_abs_active``, the mean ``|w|`` over its active weights.
        module: optional model the names belong to; needed to read grouped and transposed
            convolutions and transformers' ``Conv1D`` (a linear map stored ``(in, out)``)
            correctly (without it every weight is ``(out, in, *kernel)`` with one group).

    Grouped convolutions: neuron ``o`` of group ``g`` only sees the input channels of group
    ``g``, so the input channel ``g * in_g + j`` is empty when no neuron of group ``g`` uses
    position ``j``, and ``params_star = K * sum_g kept_out_g * kept_in_g`` (the groups
    shrink independently). A depthwise convolution thus has as many inputs as neurons, and
    channel ``c`` is an empty input exactly when it is an empty neuron. Without ``module``
    a depthwise ``(C, 1, k, k)`` mask gives the same ``params_star`` but counts one input.
    """
    layouts = layer_layouts(module) if module is not None else {}
    layers = {}
    for name, mask in masks.items():
        groups, transposed = layouts.get(name, (1, False))
        param = None if params is None else params.get(name)
        layers[name] = analyze_layer(name, mask, param, groups=groups, transposed=transposed)
    return SparsityAnalysis(layers)


# ------------------------------------------------------------------------------------ FLOPs


def _weight_names(module: nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in module.named_parameters()}


@torch.no_grad()
def sparse_flops(
    module: nn.Module, masks: Mapping[str, Tensor], example_input: Tensor
) -> tuple[int, int]:
    """Multiply-adds of one forward pass of ``example_input``: ``(sparse, dense)``.

    Counted for every ``nn.Linear``, transformers' ``Conv1D`` and (transposed) convolution
    the forward pass calls, from the output sizes seen by forward hooks:

    - convolution: ``n_w * prod(output spatial size)`` per sample, ``n_w`` the weights used
      (the weight's shape already holds ``in / groups``, so grouped and depthwise
      convolutions come out right); a transposed convolution:
      ``n_w * prod(input spatial size)``;
    - linear (``Conv1D`` too, whatever the orientation of its weight): ``n_w`` per output
      row (times any extra leading dimensions).

    ``n_w`` is the active count ``mask.sum()`` for the sparse number and ``weight.numel()``
    for the dense one; a layer without mask counts dense in both. Biases, normalization,
    activations and pooling are not counted. The result is for the whole ``example_input``:
    pass a batch of one for per-sample numbers. The module runs in eval mode (no running
    statistic changes) and its training flags are restored afterwards.
    """
    names = _weight_names(module)
    counts = [0, 0]

    def hook(layer: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        weight = layer.weight
        name = names.get(id(weight))
        dense = weight.numel()
        sparse = int(masks[name].sum()) if name in masks else dense
        if isinstance(layer, nn.Linear) or is_transposed_linear(layer):
            positions = output.numel() // max(int(output.shape[-1]), 1)
        elif getattr(layer, "transposed", False):
            source = inputs[0]
            positions = source.numel() // max(int(layer.in_channels), 1)
        else:
            channel_dim = 1 if output.dim() == layer.weight.dim() else 0
            positions = output.numel() // max(int(output.shape[channel_dim]), 1)
        counts[0] += sparse * positions
        counts[1] += dense * positions

    handles = [
        child.register_forward_hook(hook)
        for child in module.modules()
        if isinstance(child, (nn.Linear, *_CONV_TYPES)) or is_transposed_linear(child)
    ]
    modes = {child: child.training for child in module.modules()}
    parameter = next(module.parameters(), None)
    if parameter is not None:
        example_input = example_input.to(parameter.device)
    try:
        module.eval()
        module(example_input)
    finally:
        for handle in handles:
            handle.remove()
        for child, mode in modes.items():
            child.training = mode
    return counts[0], counts[1]

