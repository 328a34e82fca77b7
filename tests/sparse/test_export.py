"""Saving, loading and compacting sparse models."""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_ggr.sparse import count_parameters
from lightning_ggr.sparse.export import (
    compact_sequential,
    load_sparse_model,
    save_sparse_model,
)


def _randomize_norms(model: nn.Module, generator: torch.Generator) -> None:
    for module in model.modules():
        if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) * 2 - 1)
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) * 2 - 1)
            module.bias.data.copy_(torch.rand(n, generator=generator) * 2 - 1)


def _masked(model: nn.Module, density: float, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    masks = {
        name: torch.rand(p.shape, generator=generator) < density
        for name, p in model.named_parameters()
        if p.dim() > 1
    }
    with torch.no_grad():
        _randomize_norms(model, generator)
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Conv2d) and module.bias is not None:
                module.bias.copy_(torch.rand(module.bias.shape, generator=generator) * 2 - 1)
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    return masks


def _vgg_like() -> nn.Sequential:
    torch.manual_seed(0)
    features = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 12, 3), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(2),
    )
    classifier = nn.Sequential(
        nn.Linear(48, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(), nn.Linear(32, 10),
    )
    return nn.Sequential(OrderedDict(features=features, flatten=nn.Flatten(),
                                     classifier=classifier))


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path):
    model = _vgg_like()
    masks = _masked(model, 0.3, seed=1)
    path = tmp_path / "model.pt"
    save_sparse_model(model, masks, path, metadata={"method": "ggr", "sparsity": 0.7})
    raw = torch.load(path, weights_only=True)
    assert raw["metadata"] == {"method": "ggr", "sparsity": 0.7}
    assert all(m.dtype == torch.bool for m in raw["masks"].values())

    fresh = _vgg_like()
    loaded = load_sparse_model(fresh, path)
    assert loaded.keys() == masks.keys()
    assert all(torch.equal(loaded[n], masks[n]) for n in masks)
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items(),
                                 strict=True):
        assert torch.equal(a, b), name


def test_save_refuses_unmasked_weights(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3))
    masks = {"0.weight": torch.zeros(3, 4, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"masked weights of '0\.weight' are not zero"):
        save_sparse_model(model, masks, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="names no parameter"):
        save_sparse_model(model, {"nope": torch.ones(1, dtype=torch.bool)}, tmp_path / "m.pt")
    with pytest.raises(ValueError, match="has shape"):
        save_sparse_model(model, {"0.weight": torch.ones(4, 3, dtype=torch.bool)},
                          tmp_path / "m.pt")


def test_load_checks_format_and_masked_zeros(tmp_path):
    model = nn.Sequential(nn.Linear(4, 3))
    masks = {"0.weight": torch.rand(3, 4) < 0.5}
    with torch.no_grad():
        model[0].weight.mul_(masks["0.weight"])
    path = tmp_path / "m.pt"
    save_sparse_model(model, masks, path)
    saved = torch.load(path, weights_only=True)
    saved["state_dict"]["0.weight"] = torch.ones(3, 4)
    torch.save(saved, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="inconsistent"):
        load_sparse_model(nn.Sequential(nn.Linear(4, 3)), tmp_path / "bad.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a sparse model"):
        load_sparse_model(model, tmp_path / "other.pt")


# ------------------------------------------------------------------------------ compaction


def test_compact_matches_and_shrinks():
    model = _vgg_like()
    masks = _masked(model, 0.3, seed=2)
    masks["features.0.weight"][[1, 4]] = False  # empty neurons: constant channels via BN
    masks["features.4.weight"][:, [2, 5]] = False  # empty inputs
    masks["features.4.weight"][[3, 7, 9]] = False
    masks["classifier.0.weight"][:, :8] = False  # channel 0 and 1 of the flattened map
    masks["classifier.0.weight"][[0, 5]] = False
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in masks:
                p.mul_(masks[name])
    model.eval()
    original = copy.deepcopy(model.state_dict())
    compact = compact_sequential(model, masks)
    x = torch.randn(6, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), rtol=1e-5, atol=1e-5)
    assert not compact.training
    assert count_parameters(compact) < count_parameters(model)
    # names are kept; the empty channels are gone
    assert compact.features[0].out_channels <= 8 - 2
    assert compact.features[1].num_features == compact.features[0].out_channels
    assert compact.features[4].out_channels <= 12 - 3
    assert compact.classifier[0].in_features == compact.features[4].out_channels * 4
    assert compact.classifier[0].out_features <= 32 - 2
    assert compact.classifier[4].out_features == 10  # model outputs are kept
    assert compact.features[0].in_channels == 3  # model inputs are kept
    # the original is untouched
    assert all(torch.equal(original[k], v) for k, v in model.state_dict().items())


def test_compact_applies_masks_itself():
    model = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    masks = {"0.weight": torch.rand(4, 5) < 0.5, "2.weight": torch.rand(3, 4) < 0.5}
    masks["0.weight"][1] = False
    compact = compact_sequential(model, masks)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in masked.named_parameters():
            if name in masks:
                p.mul_(masks[name])
        x = torch.randn(7, 5)
        torch.testing.assert_close(compact(x), masked(x))


def test_compact_keeps_constant_channel_before_zero_padded_conv():
    # The empty neuron's constant (its bias, through ReLU) meets zero padding: border outputs
    # see it only partially, so it cannot fold and must stay.
    model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(), nn.Conv2d(3, 2, 3, padding=1))
    masks = {"0.weight": torch.ones(2 * 3, dtype=torch.bool).view(3, 2, 1, 1).clone(),
             "2.weight": torch.ones(2, 3, 3, 3, dtype=torch.bool)}
    masks["0.weight"][1] = False
    with torch.no_grad():
        model[0].bias.fill_(0.5)
    compact = compact_sequential(model, masks)
    assert compact[0].out_channels == 3
    x = torch.randn(2, 2, 5, 5)
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked[0].weight.mul_(masks["0.weight"])
        torch.testing.assert_close(compact(x), masked(x))
    # a zero constant (negative bias through ReLU) folds even with padding
    with torch.no_grad():
        model[0].bias[1] = -1.0
    zero_folded = compact_sequential(model, masks)
    assert zero_folded[0].out_channels == 2
    assert zero_folded[2].bias is not None


def test_compact_folds_into_a_consumer_without_bias():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2, bias=False))
    masks = {"0.weight": torch.ones(4, 3, dtype=torch.bool),
             "2.weight": torch.ones(2, 4, dtype=torch.bool)}
    masks["0.weight"][2] = False
    compact = compact_sequential(model, masks)
    assert compact[2].in_features == 3 and compact[2].bias is not None
    masked = copy.deepcopy(model)
    with torch.no_grad():
        masked[0].weight.mul_(masks["0.weight"])
        x = torch.randn(5, 3)
        torch.testing.assert_close(compact(x), masked(x))
    # a zero constant adds nothing: no bias is created
    relu = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        relu[0].bias.fill_(-1.0)
    assert compact_sequential(relu, masks)[2].bias is None


def test_compact_errors():
    with pytest.raises(TypeError, match=r"needs an nn\.Sequential"):
        compact_sequential(nn.Linear(2, 2), {})
    with pytest.raises(TypeError, match="cannot compact through '1'"):
        compact_sequential(nn.Sequential(nn.Linear(2, 3), nn.LayerNorm(3), nn.Linear(3, 2)),
                           {})
    with pytest.raises(ValueError, match="groups=1 only"):
        compact_sequential(nn.Sequential(nn.Conv2d(4, 4, 3, groups=2)), {})
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        compact_sequential(nn.Sequential(nn.ReLU()), {})
    with pytest.raises(ValueError, match="names no parameter"):
        compact_sequential(nn.Sequential(nn.Linear(2, 2)), {"x": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="not channel-major"):
        compact_sequential(nn.Sequential(nn.Linear(2, 3), nn.Flatten(), nn.Linear(6, 2)), {})
    with pytest.raises(ValueError, match="gives 3 channels but '2' takes 4"):
        compact_sequential(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(4, 2)), {})
    with pytest.raises(ValueError, match="only Flatten"):
        compact_sequential(nn.Sequential(nn.Linear(2, 3), nn.Flatten(0), nn.Linear(3, 2)), {})


def test_compact_anything_outside_the_chain_is_copied():
    model = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2),
                          nn.Softmax(dim=-1))
    masks = {"1.weight": torch.ones(3, 4, dtype=torch.bool),
             "3.weight": torch.zeros(2, 3, dtype=torch.bool)}
    masks["3.weight"][0, 0] = True
    compact = compact_sequential(model, masks)
    assert isinstance(compact[0], nn.LayerNorm) and isinstance(compact[4], nn.Softmax)
    assert compact[3].in_features == 1


@settings(max_examples=25, deadline=None)
@given(widths=st.lists(st.integers(1, 6), min_size=3, max_size=5),
       density=st.floats(0.0, 0.8), seed=st.integers(0, 2**16), norm=st.booleans())
def test_compact_linear_chain_property(widths, density, seed, norm):
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers += [nn.BatchNorm1d(b)] if norm else []
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers).eval()
    masks = _masked(model, density, seed)
    compact = compact_sequential(model, masks)
    x = torch.randn(4, widths[0])
    with torch.no_grad():
        torch.testing.assert_close(compact(x), model(x), rtol=1e-5, atol=1e-5)
    assert count_parameters(compact) <= count_parameters(model)


@pytest.mark.parametrize("padding", [0, 1])
def test_compact_sequential_is_exact_through_an_average_pool_with_divisor_override(padding):
    """AvgPool2d(divisor_override=d) sums a window over d: an empty channel's constant is
    scaled by kernel area / d before it is folded into the next layer's bias (with padding
    the border windows differ, so the channel is kept)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.ReLU(),
                        nn.AvgPool2d(2, padding=padding, divisor_override=1),
                        nn.Flatten(), nn.Linear(3 * (2 + padding) ** 2, 2))
    masks = {"0.weight": torch.ones(3, 2, 1, 1, dtype=torch.bool),
             "4.weight": torch.ones(2, 3 * (2 + padding) ** 2, dtype=torch.bool)}
    masks["0.weight"][1] = False  # channel 1 is empty: it carries its bias, 0.5
    with torch.no_grad():
        net[0].weight.mul_(masks["0.weight"])
        net[0].bias.fill_(0.5)
    net.eval()
    x = torch.randn(3, 2, 4, 4)
    compact = compact_sequential(net, masks)
    with torch.no_grad():
        assert torch.allclose(compact(x), net(x), atol=1e-5)


def test_compact_conv1d_chain_in_its_own_orientation():
    """transformers' Conv1D (weight stored (in, out)): empty neurons are empty columns,
    empty inputs empty rows; the compact copy keeps the type and the orientation."""
    from tests.helpers.models import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 4), nn.ReLU(), Conv1D(5, 6), nn.Tanh(), nn.Linear(5, 2))
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.bias.uniform_(-1, 1)
    masks = {"0.weight": torch.ones(4, 6, dtype=torch.bool),
             "2.weight": torch.ones(6, 5, dtype=torch.bool),
             "4.weight": torch.ones(2, 5, dtype=torch.bool)}
    masks["0.weight"][:, [1, 3]] = False  # neurons 1 and 3 of the first layer are empty
    masks["2.weight"][4] = False  # the second layer never reads channel 4
    masks["2.weight"][:, 0] = False  # neuron 0 of the second layer is empty
    compact = compact_sequential(model, masks)
    assert isinstance(compact[0], Conv1D) and isinstance(compact[2], Conv1D)
    # channels 1, 3 (empty rows: their bias folds into the consumer) and 4 (unread) go
    assert tuple(compact[0].weight.shape) == (4, 3) and compact[0].nf == 3
    assert tuple(compact[2].weight.shape) == (3, 4) and (compact[2].nx, compact[2].nf) == (3, 4)
    assert compact[4].in_features == 4
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in masked.named_parameters():
            if name in masks:
                p.mul_(masks[name])
        x = torch.randn(3, 7, 4)
        torch.testing.assert_close(compact(x), masked(x))
