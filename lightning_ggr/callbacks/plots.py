"""Pictures of a sparse network for TensorBoard: density per layer, masks, weight histograms.

No Lightning import: :func:`log_sparsity_views` takes a
``torch.utils.tensorboard.SummaryWriter`` (what ``TensorBoardLogger.experiment`` is). The
caller decides when (rewiring steps, epoch ends) and where (rank 0 only). Figures are drawn
with Matplotlib's Agg canvas directly, never through ``pyplot``, so no GUI backend or global
figure state is involved.

Views and their tags (described in words in ``docs/analysis.md``):

- ``sparsity/density_per_layer``: the paper's Figure 2, initial vs current density of each
  sparse layer with the active counts;
- ``masks/<param name>``: the paper's Figure 3, a layer's mask as an image, white = active;
- ``weights/<param name>``: histogram of ``|w|`` over the active weights;
- ``moved/<param name>``: net change of the layer's active count at a rewiring.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

#: Largest side, in pixels, of a mask image; larger masks are pooled down to it.
MAX_IMAGE_SIDE = 1024
#: How many layers :func:`log_sparsity_views` draws as mask images by default.
DEFAULT_MASK_LAYERS = 3

_INITIAL_COLOR = "#9ecae1"
_CURRENT_COLOR = "#08519c"
_COUNT_COLOR = "#d95f02"


def density_figure(
    initial_counts: Mapping[str, int],
    current_counts: Mapping[str, int],
    sizes: Mapping[str, int],
) -> Figure:
    """Density and active count of every layer, initial vs current (the paper's Figure 2).

    Bars: density ``n_l / N_l`` at initialization (light) and now (dark), on the left axis
    (linear, from 0 to a quarter above the largest density shown, at most 1.05). Markers:
    active counts ``n_l`` at initialization (hollow) and now (filled), on the right axis
    (log scale: counts span orders of magnitude). The x axis is the layer index ``1..L`` in
    the order of ``sizes``; a key beside the chart maps each index to its parameter name.
    Drawn on an Agg canvas (no ``pyplot``).

    Args:
        initial_counts: name -> active weights at initialization.
        current_counts: name -> active weights now.
        sizes: name -> number of weights ``N_l`` (the order of the layers).
    """
    names = list(sizes)
    missing = [n for n in names if n not in initial_counts or n not in current_counts]
    if missing:
        raise ValueError(f"no active count for layers {missing}")
    count = len(names)
    index = np.arange(1, count + 1)
    size = np.array([max(int(sizes[n]), 1) for n in names], dtype=float)
    initial = np.array([int(initial_counts[n]) for n in names], dtype=float)
    current = np.array([int(current_counts[n]) for n in names], dtype=float)

    key_columns = max(1, math.ceil(count / 40))
    key_rows = math.ceil(count / key_columns) if count else 1
    longest = max((len(n) for n in names), default=4) + 5
    key_width = 0.075 * longest * key_columns
    chart_width = max(6.0, 0.28 * count + 2.0)
    height = max(4.0, 0.14 * key_rows + 1.2)
    figure = Figure(figsize=(chart_width + key_width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(1, 2, width_ratios=[chart_width, key_width])
    axes = figure.add_subplot(grid[0, 0])
    key = figure.add_subplot(grid[0, 1])

    width = 0.4
    axes.bar(index - width / 2, initial / size, width, color=_INITIAL_COLOR,
             label="density, initial")
    axes.bar(index + width / 2, current / size, width, color=_CURRENT_COLOR,
             label="density, current")
    # Zoomed to the densities shown: at 99% sparsity bars on a 0..1 axis would be invisible.
    top = float(max(np.max(initial / size), np.max(current / size))) if count else 1.0
    axes.set_ylim(0.0, min(1.05, max(1.25 * top, 0.01)))
    axes.set_xlabel("layer")
    axes.set_ylabel("density (active / total)")
    step = max(1, math.ceil(count / 30))
    axes.set_xticks(index[::step])
    axes.set_xlim(0.3, count + 0.7)

    counts_axis = axes.twinx()
    # A layer with no active weight has no place on a log axis: its bar (0) shows it.
    counts_axis.plot(index, np.where(initial > 0, initial, np.nan), "o", mfc="none",
                     color=_COUNT_COLOR, label="active weights, initial")
    counts_axis.plot(index, np.where(current > 0, current, np.nan), "o", color=_COUNT_COLOR,
                     label="active weights, current")
    counts_axis.set_yscale("log")
    counts_axis.set_ylabel("active weights (log scale)", color=_COUNT_COLOR)
    total_initial, total_current = int(initial.sum()), int(current.sum())
    axes.set_title(
        f"{count} sparse layers; active weights {total_current:,} of {int(size.sum()):,} "
        f"(initial {total_initial:,})",
        fontsize="medium",
    )
    handles = axes.get_legend_handles_labels()
    twin_handles = counts_axis.get_legend_handles_labels()
    figure.legend(handles[0] + twin_handles[0], handles[1] + twin_handles[1],
                  loc="outside upper left", ncols=4, fontsize="small", frameon=False)

    key.axis("off")
    key.set_title("layer key", fontsize="small", loc="left")
    for column in range(key_columns):
        lines = [
            f"{i + 1:>3}  {names[i]}"
            for i in range(column * key_rows, min((column + 1) * key_rows, count))
        ]
        key.text(column / key_columns, 1.0, "\n".join(lines), va="top", ha="left",
                 family="monospace", fontsize=7, transform=key.transAxes)
    return figure


def figure_to_image(figure: Figure) -> Tensor:
    """Render ``figure`` with Agg to a float ``(3, H, W)`` tensor in ``[0, 1]``."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    return torch.from_numpy(rgba[..., :3].copy()).permute(2, 0, 1).float().div_(255.0)


def mask_image(mask: Tensor, max_side: int = MAX_IMAGE_SIDE) -> Tensor:
    """A mask as a grayscale image ``(1, H, W)`` in ``[0, 1]``, white = active (paper Figure 3).

    A weight ``(out, in, *kernel)`` is drawn as ``(out, in * prod(kernel))``: row ``o`` is
    neuron ``o``, and each input channel is a run of ``prod(kernel)`` adjacent pixels. A 1-D
    mask is one row. When a side exceeds ``max_side``, blocks of ``ceil(side / max_side)``
    entries are averaged into one pixel (its gray level is the block's density), so every
    side ends at most ``max_side`` pixels and the picture stays cheap to store.
    """
    if mask.dim() == 0:
        raise ValueError("mask_image needs a mask with at least one dimension, got a scalar")
    grid = mask.detach().bool().reshape(1, -1) if mask.dim() == 1 else mask.detach().bool()
    grid = grid.reshape(grid.shape[0], -1)
    rows, cols = int(grid.shape[0]), int(grid.shape[1])
    block_rows, block_cols = math.ceil(rows / max_side), math.ceil(cols / max_side)
    if block_rows == 1 and block_cols == 1:
        return grid.float().unsqueeze(0).cpu()
    out_rows, out_cols = math.ceil(rows / block_rows), math.ceil(cols / block_cols)
    padded = torch.zeros(out_rows * block_rows, out_cols * block_cols, dtype=torch.bool,
                         device=grid.device)
    padded[:rows, :cols] = grid
    sums = padded.view(out_rows, block_rows, out_cols, block_cols).sum(dim=(1, 3))
    # Border blocks hold fewer real entries: divide by their true size.
    row_sizes = torch.full((out_rows,), block_rows, device=grid.device)
    row_sizes[-1] = rows - (out_rows - 1) * block_rows
    col_sizes = torch.full((out_cols,), block_cols, device=grid.device)
    col_sizes[-1] = cols - (out_cols - 1) * block_cols
    image = sums.float() / (row_sizes[:, None] * col_sizes[None, :]).float()
    return image.unsqueeze(0).cpu()


def default_mask_layers(
    masks: Mapping[str, Tensor], count: int = DEFAULT_MASK_LAYERS
) -> list[str]:
    """The first ``count`` convolution masks with more than one input per kernel.

    Depthwise kernels (one input each) draw as a single column, so they are skipped; a model
    without such convolutions gets its first ``count`` masks of any kind.
    """
    convs = [n for n, m in masks.items() if m.dim() >= 3 and int(m.shape[1]) > 1]
    return (convs or list(masks))[:count]


def resolve_mask_layers(
    masks: Mapping[str, Tensor], mask_layers: Sequence[str] | None = None
) -> list[str]:
    """The mask names to draw: :func:`default_mask_layers` for ``None``, else every name
    matching one of ``mask_layers`` (exact names or shell-style patterns such as
    ``"features.*.weight"``), in the order of ``masks``.

    Raises:
        ValueError: an entry matches no sparse parameter (call this before training to fail
            early).
    """
    if mask_layers is None:
        return default_mask_layers(masks)
    if isinstance(mask_layers, str):
        raise TypeError(f"mask_layers must be a list of names, got the string {mask_layers!r}")
    unknown = [p for p in mask_layers if not any(fnmatch.fnmatchcase(n, p) for n in masks)]
    if unknown:
        raise ValueError(f"mask_layers {unknown} match no sparse parameter; known: {list(masks)}")
    return [n for n in masks if any(fnmatch.fnmatchcase(n, p) for p in mask_layers)]


@torch.no_grad()
def log_sparsity_views(
    writer: SummaryWriter,
    params: Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    initial_counts: Mapping[str, int],
    step: int,
    *,
    mask_layers: Sequence[str] | None = None,
    moved: Mapping[str, int] | None = None,
    tag: str = "",
    active: Mapping[str, int] | None = None,
    images: Mapping[str, Tensor | None] | None = None,
    histograms: Mapping[str, Mapping[str, Any] | None] | None = None,
) -> None:
    """Write the sparsity views of one moment of training to a TensorBoard ``SummaryWriter``.

    Tags: ``sparsity/density_per_layer`` (image of :func:`density_figure`);
    ``masks/<name>`` (image of :func:`mask_image`) for each layer named or matched by
    ``mask_layers`` (see :func:`resolve_mask_layers`; default: :func:`default_mask_layers`);
    ``weights/<name>`` (histogram of ``|w|`` over the active weights) for every sparse layer
    that has active weights and a parameter in ``params``; ``moved/<name>`` (scalar, net
    change of the layer's active count at this rewiring) for each entry of ``moved``.

    Cheap enough for every rewiring: one small figure, a few pooled images, and histograms
    of the active values only. Call it on rank 0 only. ``tag`` is appended to the first part
    of every tag (``sparsity_1/density_per_layer``): one suffix per callback of a Trainer.

    A sharded run passes what it gathered instead of reading the masks and weights:
    ``active`` counts, the whole ``images`` of the drawn masks and the raw ``histograms``
    (``add_histogram_raw`` fields, from
    :func:`~lightning_ggr.sparse.sharded.histogram_across_shards`).
    """
    layers = resolve_mask_layers(masks, mask_layers)
    current = (dict(active) if active is not None
               else {name: int(mask.sum()) for name, mask in masks.items()})
    sizes = {name: mask.numel() for name, mask in masks.items()}
    figure = density_figure(initial_counts, current, sizes)
    writer.add_image(f"sparsity{tag}/density_per_layer", figure_to_image(figure), step)
    for name in layers:
        whole = masks[name] if images is None else images.get(name)
        if whole is not None:
            writer.add_image(f"masks{tag}/{name}", mask_image(whole), step)
    if histograms is not None:
        for name, raw in histograms.items():
            if raw is not None and current.get(name):
                writer.add_histogram_raw(f"weights{tag}/{name}", global_step=step, **raw)
    else:
        for name, mask in masks.items():
            if name not in params or current[name] == 0:
                continue
            values = params[name].detach()[mask.to(params[name].device)].abs().float().cpu()
            writer.add_histogram(f"weights{tag}/{name}", values, step)
    for name, change in (moved or {}).items():
        writer.add_scalar(f"moved{tag}/{name}", int(change), step)
