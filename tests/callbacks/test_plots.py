"""TensorBoard views: density figure, mask images, histograms, moved counts."""

from __future__ import annotations

import pytest
import torch
from matplotlib.figure import Figure
from tensorboard.backend.event_processing import event_accumulator
from torch.utils.tensorboard import SummaryWriter

from lightning_ggr.callbacks.plots import (
    default_mask_layers,
    density_figure,
    figure_to_image,
    log_sparsity_views,
    mask_image,
    resolve_mask_layers,
)


def test_mask_image_linear_is_the_mask():
    mask = torch.rand(4, 5) < 0.5
    image = mask_image(mask)
    assert image.shape == (1, 4, 5)
    assert image.dtype == torch.float32
    assert torch.equal(image[0], mask.float())


def test_mask_image_white_is_active():
    assert torch.all(mask_image(torch.ones(3, 2, dtype=torch.bool)) == 1.0)
    assert torch.all(mask_image(torch.zeros(3, 2, dtype=torch.bool)) == 0.0)


def test_mask_image_conv_layout_out_by_in_kernel():
    mask = torch.rand(3, 2, 2, 3) < 0.5
    image = mask_image(mask)
    assert image.shape == (1, 3, 2 * 2 * 3)
    for o, i, a, b in [(0, 0, 0, 0), (2, 1, 1, 2), (1, 1, 0, 1)]:
        assert image[0, o, i * 6 + a * 3 + b] == float(mask[o, i, a, b])


def test_mask_image_vector_is_one_row():
    assert mask_image(torch.tensor([True, False, True])).shape == (1, 1, 3)
    with pytest.raises(ValueError, match="at least one dimension"):
        mask_image(torch.tensor(True))


def test_mask_image_downsamples_by_block_density():
    mask = torch.rand(10, 7) < 0.5
    image = mask_image(mask, max_side=4)  # blocks of 3 rows x 2 columns
    assert image.shape == (1, 4, 4)
    for r in range(4):
        for c in range(4):
            block = mask[3 * r:3 * r + 3, 2 * c:2 * c + 2]
            assert image[0, r, c] == pytest.approx(block.float().mean().item())
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0


def test_mask_image_large_mask_fits_default_side():
    image = mask_image(torch.rand(2100, 30) < 0.1)
    assert image.shape == (1, 700, 30)


def test_density_figure():
    sizes = {"a.weight": 100, "b.weight": 1000, "c.weight": 10}
    initial = {"a.weight": 50, "b.weight": 100, "c.weight": 10}
    current = {"a.weight": 80, "b.weight": 80, "c.weight": 0}
    figure = density_figure(initial, current, sizes)
    assert isinstance(figure, Figure)
    chart = figure.axes[0]
    heights = [patch.get_height() for patch in chart.patches]
    assert heights == pytest.approx([0.5, 0.1, 1.0, 0.8, 0.08, 0.0])
    assert [tick for tick in chart.get_xticks()] == [1, 2, 3]
    key_text = " ".join(t.get_text() for t in figure.axes[1].texts)
    assert "1  a.weight" in key_text and "3  c.weight" in key_text
    labels = [t.get_text() for t in figure.legends[0].get_texts()]
    assert labels == ["density, initial", "density, current", "active weights, initial",
                      "active weights, current"]
    image = figure_to_image(figure)
    assert image.shape[0] == 3 and image.min() >= 0 and image.max() <= 1


def test_density_figure_missing_count_raises():
    with pytest.raises(ValueError, match="no active count"):
        density_figure({}, {"a": 1}, {"a": 2})


def test_default_mask_layers_skip_depthwise():
    masks = {
        "stem.weight": torch.ones(8, 3, 3, 3, dtype=torch.bool),
        "dw.weight": torch.ones(8, 1, 3, 3, dtype=torch.bool),
        "pw.weight": torch.ones(16, 8, 1, 1, dtype=torch.bool),
        "c4.weight": torch.ones(16, 16, 3, 3, dtype=torch.bool),
        "c5.weight": torch.ones(16, 16, 3, 3, dtype=torch.bool),
        "fc.weight": torch.ones(10, 16, dtype=torch.bool),
    }
    assert default_mask_layers(masks) == ["stem.weight", "pw.weight", "c4.weight"]
    assert default_mask_layers({"fc.weight": masks["fc.weight"]}) == ["fc.weight"]


def _read(log_dir):
    accumulator = event_accumulator.EventAccumulator(
        str(log_dir),
        size_guidance={
            event_accumulator.IMAGES: 0,
            event_accumulator.HISTOGRAMS: 0,
            event_accumulator.SCALARS: 0,
            event_accumulator.TENSORS: 0,
            event_accumulator.COMPRESSED_HISTOGRAMS: 0,
        },
    )
    accumulator.Reload()
    return accumulator


def _sparse_model_state():
    torch.manual_seed(0)
    params = {
        "conv1.weight": torch.randn(4, 3, 3, 3),
        "conv2.weight": torch.randn(8, 4, 3, 3),
        "fc.weight": torch.randn(10, 32),
    }
    masks = {name: torch.rand(p.shape) < 0.3 for name, p in params.items()}
    masks["fc.weight"][:] = False  # a collapsed layer: no histogram, still in the figure
    params = {name: p * masks[name] for name, p in params.items()}
    initial = {name: int(m.numel() * 0.3) for name, m in masks.items()}
    return params, masks, initial


def test_log_sparsity_views_tags_in_event_file(tmp_path):
    params, masks, initial = _sparse_model_state()
    writer = SummaryWriter(log_dir=str(tmp_path))
    log_sparsity_views(writer, params, masks, initial, step=3,
                       moved={"conv1.weight": 5, "conv2.weight": -5, "fc.weight": 0})
    log_sparsity_views(writer, params, masks, initial, step=7, mask_layers=["fc.weight"])
    writer.close()
    accumulator = _read(tmp_path)
    tags = accumulator.Tags()
    assert set(tags["images"]) == {
        "sparsity/density_per_layer", "masks/conv1.weight", "masks/conv2.weight",
        "masks/fc.weight",
    }
    assert set(tags["histograms"]) == {"weights/conv1.weight", "weights/conv2.weight"}
    assert set(tags["scalars"]) == {"moved/conv1.weight", "moved/conv2.weight",
                                    "moved/fc.weight"}
    density_steps = [event.step for event in accumulator.Images("sparsity/density_per_layer")]
    assert density_steps == [3, 7]
    image = accumulator.Images("masks/conv2.weight")[0]
    assert (image.height, image.width) == (8, 4 * 9)
    assert [e.value for e in accumulator.Scalars("moved/conv2.weight")] == [-5.0]
    histogram = accumulator.Histograms("weights/conv1.weight")[0].histogram_value
    assert histogram.num == int(masks["conv1.weight"].sum())
    assert histogram.min >= 0.0


def test_log_sparsity_views_unknown_layer_raises(tmp_path):
    params, masks, initial = _sparse_model_state()
    writer = SummaryWriter(log_dir=str(tmp_path))
    with pytest.raises(ValueError, match="match no sparse parameter"):
        log_sparsity_views(writer, params, masks, initial, 0, mask_layers=["nope.weight"])
    writer.close()


def test_resolve_mask_layers_names_and_patterns():
    masks = {n: torch.ones(2, 2, dtype=torch.bool) for n in ("a.0.weight", "a.1.weight", "b")}
    assert resolve_mask_layers(masks, ["b", "a.*.weight"]) == ["a.0.weight", "a.1.weight", "b"]
    assert resolve_mask_layers(masks, []) == []
    assert resolve_mask_layers(masks) == default_mask_layers(masks)
    with pytest.raises(ValueError, match=r"\['c\*'\] match no sparse parameter"):
        resolve_mask_layers(masks, ["b", "c*"])
    with pytest.raises(TypeError, match="list of names"):
        resolve_mask_layers(masks, "b")


def test_density_axis_zooms_to_low_densities():
    from lightning_ggr.callbacks.plots import density_figure

    sizes = {"a": 1000, "b": 10_000}
    low = density_figure({"a": 10, "b": 100}, {"a": 30, "b": 80}, sizes)
    assert low.axes[0].get_ylim() == pytest.approx((0.0, 0.0375))
    high = density_figure({"a": 900, "b": 100}, {"a": 1000, "b": 80}, sizes)
    assert high.axes[0].get_ylim() == pytest.approx((0.0, 1.05))
