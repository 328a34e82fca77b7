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
    decode_positions,
    encode_positions,
    load_sparse_model,
    module_masks,
    read_sparse_model,
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
    assert raw["format_version"] == 2
    assert set(raw["sparse"]) == set(masks)  # masked tensors: values and positions only
    assert not set(raw["state_dict"]) & set(masks)
    for name, entry in raw["sparse"].items():
        assert entry["values"].numel() == int(masks[name].sum())

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
    saved["sparse"]["0.weight"]["values"] = torch.ones(13)
    torch.save(saved, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match=r"inconsistent: '0\.weight' has 13 values for"):
        load_sparse_model(nn.Sequential(nn.Linear(4, 3)), tmp_path / "bad.pt")
    saved["format_version"] = 3
    torch.save(saved, tmp_path / "future.pt")
    with pytest.raises(ValueError, match="has format_version 3; this version of lightning-ggr"):
        load_sparse_model(nn.Sequential(nn.Linear(4, 3)), tmp_path / "future.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a sparse model"):
        load_sparse_model(model, tmp_path / "other.pt")


# --------------------------------------------------------------------------- file format


def _random_masked_linear(shape: tuple[int, int], density: float, dtype=torch.float32,
                          seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(shape[1], shape[0])).to(dtype)
    masks = {"0.weight": torch.rand(shape, generator=generator) < density}
    with torch.no_grad():
        model[0].weight.mul_(masks["0.weight"])
    return model, masks


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=1, max_size=3),
       density=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_positions_round_trip_in_the_smaller_encoding(shape, density, seed):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=generator) < density
    encoded = encode_positions(mask)
    assert torch.equal(decode_positions(encoded, tuple(shape)), mask)
    positions = encoded["positions"]
    bitmask_bytes = -(-mask.numel() // 8)
    # the smallest gap type for the largest gap
    indices = mask.reshape(-1).nonzero().reshape(-1).tolist()
    largest = max([b - a for a, b in itertools.pairwise([0, *indices])], default=0)
    gap_bytes = len(indices) * next(size for size, top in ((1, 255), (2, 2**15 - 1), (4, 2**31 - 1))
                                    if largest <= top)
    assert positions.numel() * positions.element_size() == min(bitmask_bytes, gap_bytes)
    assert encoded["encoding"] == ("gaps" if gap_bytes < bitmask_bytes else "bitmask")


def test_gap_types_grow_with_the_largest_gap():
    for gap, dtype in ((255, torch.uint8), (256, torch.int16), (40_000, torch.int32)):
        mask = torch.zeros(gap + 1, dtype=torch.bool)
        mask[gap] = True
        encoded = encode_positions(mask)
        assert encoded["encoding"] == "gaps" and encoded["positions"].dtype == dtype
        assert torch.equal(decode_positions(encoded, (gap + 1,)), mask)
    with pytest.raises(ValueError, match="unknown position encoding 'runs'"):
        decode_positions({"encoding": "runs", "positions": torch.zeros(1)}, (1,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_round_trip_is_bit_exact_in_the_parameters_dtype(tmp_path, dtype):
    model, masks = _random_masked_linear((24, 40), 0.2, dtype)
    with torch.no_grad():  # a grown weight that holds exactly 0 keeps its position
        position = masks["0.weight"].nonzero()
        model[0].weight[tuple(position[0])] = 0.0
        model[0].weight[tuple(position[1])] = -0.0
    save_sparse_model(model, masks, tmp_path / "m.pt")
    raw = torch.load(tmp_path / "m.pt", weights_only=True)
    assert raw["sparse"]["0.weight"]["values"].dtype == dtype
    fresh = nn.Sequential(nn.Linear(40, 24)).to(dtype)
    loaded = load_sparse_model(fresh, tmp_path / "m.pt")
    assert torch.equal(loaded["0.weight"], masks["0.weight"])
    active = masks["0.weight"]
    # active values bit for bit (a -0.0 among them too); masked positions are zero (+0.0:
    # the sign of a masked zero, -0.0 after masking a negative weight, is not kept)
    assert torch.equal(fresh[0].weight.detach()[active].view(torch.uint8),
                       model[0].weight.detach()[active].view(torch.uint8))
    assert torch.equal(fresh[0].weight, model[0].weight)
    assert torch.equal(fresh[0].bias.detach().view(torch.uint8),
                       model[0].bias.detach().view(torch.uint8))


@pytest.mark.parametrize(("sparsity", "limit"), [(0.99, 0.03), (0.9, 0.15)])
def test_file_is_about_density_times_the_dense_size(tmp_path, sparsity, limit):
    model, masks = _random_masked_linear((1024, 1024), 1 - sparsity)
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    save_sparse_model(model, masks, tmp_path / "sparse.pt")
    ratio = (tmp_path / "sparse.pt").stat().st_size / (tmp_path / "dense.pt").stat().st_size
    assert ratio <= limit


def test_files_of_format_version_1_still_load(tmp_path):
    """What save_sparse_model wrote before version 2: dense weights and bool masks."""
    model, masks = _random_masked_linear((5, 7), 0.4)
    version_1 = {"format": "lightning_ggr.sparse_model", "format_version": 1,
                 "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
                 "masks": masks, "metadata": {"method": "set"}}
    torch.save(version_1, tmp_path / "v1.pt")
    fresh = nn.Sequential(nn.Linear(7, 5))
    loaded = load_sparse_model(fresh, tmp_path / "v1.pt")
    assert torch.equal(loaded["0.weight"], masks["0.weight"])
    assert torch.equal(fresh[0].weight, model[0].weight)
    read = read_sparse_model(tmp_path / "v1.pt")
    assert read.format_version == 1 and read.metadata == {"method": "set"}
    version_1["state_dict"]["0.weight"] = torch.ones(5, 7)
    torch.save(version_1, tmp_path / "v1_bad.pt")
    with pytest.raises(ValueError, match="inconsistent"):
        load_sparse_model(fresh, tmp_path / "v1_bad.pt")


def test_a_tied_weight_is_stored_once(tmp_path):
    class TiedLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok = nn.Embedding(300, 64)
            self.head = nn.Linear(64, 300, bias=False)
            self.head.weight = self.tok.weight

    model = TiedLM()
    masks = {"tok.weight": torch.rand(300, 64) < 0.05}
    with torch.no_grad():
        model.tok.weight.mul_(masks["tok.weight"])
    save_sparse_model(model, masks, tmp_path / "tied.pt")
    raw = torch.load(tmp_path / "tied.pt", weights_only=True)
    assert raw["aliases"] == {"head.weight": "tok.weight"} and not raw["state_dict"]
    fresh = TiedLM()
    load_sparse_model(fresh, tmp_path / "tied.pt")
    assert fresh.head.weight is fresh.tok.weight
    assert torch.equal(fresh.tok.weight, model.tok.weight)


# ------------------------------------------------------------- masks of an enclosing module


class _Wrapper(nn.Module):
    """A LightningModule-like holder: the callback's masks are named 'net.*' and 'aux.*'."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
        self.aux = nn.Linear(4, 2)


def _wrapper_masks(wrapper: _Wrapper, names=("net.0.weight", "net.2.weight")):
    params = dict(wrapper.named_parameters())
    masks = {name: torch.rand(params[name].shape) < 0.5 for name in names}
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    return masks


def test_saving_an_inner_network_with_the_outer_masks_strips_the_prefix(tmp_path):
    wrapper = _Wrapper()
    masks = _wrapper_masks(wrapper)
    assert module_masks(wrapper.net, masks).keys() == {"0.weight", "2.weight"}
    assert module_masks(wrapper, masks).keys() == masks.keys()
    save_sparse_model(wrapper.net, masks, tmp_path / "net.pt")
    fresh = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))
    loaded = load_sparse_model(fresh, tmp_path / "net.pt")
    assert torch.equal(loaded["0.weight"], masks["net.0.weight"])
    assert torch.equal(fresh[2].weight, wrapper.net[2].weight)


def test_masks_partly_outside_the_module_fail_with_the_right_call():
    wrapper = _Wrapper()
    masks = _wrapper_masks(wrapper, ("net.0.weight", "net.2.weight", "aux.weight"))
    with pytest.raises(ValueError) as error:
        save_sparse_model(wrapper.net, masks, "unused.pt")
    message = str(error.value)
    assert "2 of the 3 masks belong to this module under the prefix 'net'" in message
    assert "'aux.weight'" in message
    call = message[message.index("{name.removeprefix"):]
    selected = eval(call, {"masks": masks})  # the call the message shows works
    assert module_masks(wrapper.net, selected).keys() == {"0.weight", "2.weight"}
    with pytest.raises(ValueError, match=r"mask 'other\.weight' names no parameter of the "
                                         "model; masks are keyed by the names"):
        module_masks(wrapper.net, {"other.weight": torch.ones(3, dtype=torch.bool)})


def test_an_ambiguous_prefix_is_refused():
    holder = nn.Module()
    holder.a = nn.Module()
    holder.a.w = nn.Parameter(torch.zeros(2))
    holder.w = nn.Parameter(torch.zeros(2))
    masks = {"x.a.w": torch.ones(2, dtype=torch.bool)}
    with pytest.raises(ValueError, match=r"any of the prefixes 'x', 'x\.a'"):
        module_masks(holder, masks)


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
