"""Sparse layers for inference and to_inference: equal outputs, the timing rule, the report,
threads restored, saving and scripting the converted model, models nobody here wrote."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lightning_ggr
from lightning_ggr.sparse import inference
from lightning_ggr.sparse.export import load_sparse_model, save_sparse_model
from lightning_ggr.sparse.inference import (
    SparseConv2d,
    SparseLinear,
    csr_compute_dtype,
    to_inference,
)
from lightning_ggr.sparse.selection import select_sparse_parameters

pytestmark = pytest.mark.usefixtures("single_thread")

#: Tolerances of a sparse product against the dense one (other summation order).
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5},
             torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2}}


def fake_times(layer: tuple[list[float], list[float]],
               model: tuple[list[float], list[float]] | None = None):
    """A stand-in for ``time_interleaved``: fixed (dense, sparse) times for every layer, and
    for the whole model (told apart by its larger budget)."""
    def timing(first, second, device="cpu", budget_s=None):
        whole_model = budget_s is not None and budget_s > inference.TIMING_BUDGET_S
        return (model or layer) if whole_model else layer
    return timing


@pytest.fixture
def always_sparse(monkeypatch):
    """Every convertible layer is 'measured' twice as fast, and so is the model: for tests
    of what the sparse model computes, not of speed (no timing runs)."""
    monkeypatch.setattr(inference, "time_interleaved", fake_times(([1.0], [0.5])))


def random_masks(model: nn.Module, density: float, seed: int = 0,
                 names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Uniform random masks over ``names`` (default: the default sparse selection)."""
    generator = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    names = list(select_sparse_parameters(model)) if names is None else names
    return {name: torch.rand(params[name].shape, generator=generator) < density
            for name in names}


def masked_copy(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """The masked dense model in eval mode (the reference a conversion must equal)."""
    reference = copy.deepcopy(model).eval()
    params = dict(reference.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)
    return reference


def assert_converts_exactly(model, masks, example, dtype=torch.float32):
    """to_inference (everything sparse) equals the masked dense model and leaves ``model``
    untouched; returns the converted model."""
    before = copy.deepcopy(model.state_dict())
    converted = to_inference(model, masks, example)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    reference = masked_copy(model, masks)
    with torch.inference_mode():
        expected = reference(*example) if isinstance(example, tuple) else reference(example)
        actual = converted(*example) if isinstance(example, tuple) else converted(example)
    torch.testing.assert_close(actual, expected, **TOLERANCE[dtype])
    assert not converted.training
    return converted


# ------------------------------------------------------------------------ the sparse layers


@settings(max_examples=40, deadline=None)
@given(batch=st.lists(st.integers(1, 4), min_size=0, max_size=2),
       features=st.tuples(st.integers(1, 20), st.integers(1, 20)),
       density=st.floats(0.0, 1.0), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_sparse_linear_computes_the_masked_linear(batch, features, density, bias, seed):
    torch.manual_seed(seed)
    linear = nn.Linear(*features, bias=bias)
    mask = torch.rand(linear.weight.shape) < density
    sparse = SparseLinear.from_dense(linear, mask)
    x = torch.randn(*batch, features[0])
    expected = F.linear(x, linear.weight * mask, linear.bias)
    out = sparse(x)
    assert out.shape == expected.shape and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert sparse.values.numel() == int(mask.sum())  # the mask's positions, zeros included
    assert sparse.col_indices.dtype == torch.int32 and sparse.crow_indices.dtype == torch.int32


def test_sparse_linear_keeps_active_zeros_and_says_what_it_holds():
    linear = nn.Linear(8, 4)
    mask = torch.zeros(4, 8, dtype=torch.bool)
    mask[0, :2] = True
    with torch.no_grad():
        linear.weight[0, 0] = 0.0  # a grown weight that is exactly 0: still a position
    sparse = SparseLinear.from_dense(linear, mask)
    assert sparse.values.numel() == 2 and sparse.density == pytest.approx(2 / 32)
    assert repr(sparse) == ("SparseLinear(in_features=8, out_features=4, bias=True, "
                            "density=0.0625, format=CSR (int32 indices, float32 values))")
    assert SparseLinear.from_dense(linear).values.numel() == 31  # default: the nonzeros


def test_sparse_linear_in_bfloat16_computes_in_float32_on_a_cpu():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32).to(torch.bfloat16)
    mask = torch.rand(32, 64) < 0.3
    with torch.no_grad():
        linear.weight.mul_(mask)
    sparse = SparseLinear.from_dense(linear, mask)
    assert csr_compute_dtype(torch.bfloat16, "cpu") == torch.float32  # MKL: no bf16 kernel
    assert csr_compute_dtype(torch.float64, "cpu") == torch.float64
    assert sparse.values.dtype == torch.float32
    x = torch.randn(5, 64, dtype=torch.bfloat16)
    out = sparse(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, linear(x), rtol=2e-2, atol=2e-2)


def test_from_dense_refuses_what_it_cannot_compute():
    with pytest.raises(TypeError,
                       match=r"needs an nn\.Linear or a transformers Conv1D, got Conv2d"):
        SparseLinear.from_dense(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match=r"the mask has shape \(3, 4\), the weight \(4, 3\)"):
        SparseLinear.from_dense(nn.Linear(3, 4), torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"needs an nn\.Conv2d, got Linear"):
        SparseConv2d.from_dense(nn.Linear(3, 4))
    with pytest.raises(ValueError, match=r"groups=2 \(only 1 is converted\)"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="padding_mode='reflect'"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(ValueError, match="asymmetric 'same' padding"):
        SparseConv2d.from_dense(nn.Conv2d(4, 4, 2, padding="same"))
    crow = torch.tensor([0, 2], dtype=torch.int32)
    with pytest.raises(RuntimeError):  # invariants checked once, at construction
        SparseLinear(3, 1, crow, torch.tensor([0, 7], dtype=torch.int32), torch.ones(2))


@pytest.mark.parametrize(
    "settings_",
    [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, bias=False),
     dict(kernel_size=(3, 1), padding=(1, 0), dilation=(2, 1)), dict(kernel_size=1),
     dict(kernel_size=3, padding="same", dilation=2), dict(kernel_size=3, padding="valid")],
)
def test_sparse_conv2d_computes_the_masked_convolution(settings_):
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, **settings_)
    mask = torch.rand(conv.weight.shape) < 0.3
    with torch.no_grad():
        conv.weight.mul_(mask)
    sparse = SparseConv2d.from_dense(conv, mask)
    for x in (torch.randn(3, 5, 9, 8), torch.randn(5, 9, 8)):  # batched and unbatched
        out = sparse(x)
        assert out.shape == conv(x).shape and out.is_contiguous()
        torch.testing.assert_close(out, conv(x), rtol=1e-5, atol=1e-5)
    assert "density=" in repr(sparse) and "format=CSR (int32 indices" in repr(sparse)


# --------------------------------------------------------------------- the timing rule


@pytest.mark.parametrize(("sparse_ms", "chosen"), [(0.85, True), (0.95, False), (1.2, False)])
def test_a_layer_is_sparse_only_where_measured_faster_by_the_margin(monkeypatch, sparse_ms,
                                                                     chosen):
    """The decision: CSR when its median is at least SPEEDUP_MARGIN (10%) below dense's."""
    monkeypatch.setattr(inference, "time_interleaved",
                        fake_times(([1.0, 1.0, 1.3], [sparse_ms] * 3)))
    model = nn.Sequential(nn.Linear(6, 5))
    converted = to_inference(model, random_masks(model, 0.5), torch.randn(2, 6))
    assert isinstance(converted[0], SparseLinear) is chosen
    (layer,) = converted.inference_report.layers
    assert layer.sparse is chosen and layer.dense_ms == 1.0 and layer.sparse_ms == sparse_ms
    assert layer.dense_spread_ms == (1.0, 1.3)
    assert layer.reason == ("faster" if chosen else "CSR not 10% faster")
    assert converted.inference_report.kept_sparse is chosen


@pytest.mark.parametrize("model_sparse", [[2.1, 2.3], [1.95, 2.0]])  # slower; < 10% faster
def test_layers_faster_alone_stay_dense_when_the_whole_model_is_not_faster(monkeypatch,
                                                                          model_sparse):
    monkeypatch.setattr(inference, "time_interleaved",
                        fake_times(layer=([1.0], [0.5]), model=([2.0, 2.2], model_sparse)))
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True)
    converted = to_inference(layer, random_masks(layer, 0.5), torch.randn(1, 3, 16))
    report = converted.inference_report
    assert not report.kept_sparse and report.converted == []
    assert report.model_dense_ms == 2.1
    assert report.model_sparse_ms == pytest.approx(sum(model_sparse) / 2)
    assert report.model_dense_spread_ms == (2.0, 2.2)
    assert isinstance(converted.linear1, nn.Linear) and isinstance(converted.linear2, nn.Linear)
    assert converted.activation_relu_or_gelu == 1  # the fused path stays
    linear1 = next(c for c in report.layers if c.module == "linear1")
    assert linear1.reason == "faster alone, but the whole model was not"
    assert "not 10% faster: every layer kept dense" in str(report)


def test_time_interleaved_alternates_and_repeats_within_the_bounds(monkeypatch):
    order = []
    first_times, second_times = inference.time_interleaved(
        lambda: order.append("a"), lambda: order.append("b"))
    assert len(first_times) == len(second_times)
    assert inference.MIN_REPETITIONS <= len(first_times) <= inference.MAX_REPETITIONS
    timed = order[6:]  # after two warm-ups each and one estimate pair
    assert timed[:4] == ["a", "b", "b", "a"]


def test_to_inference_reports_every_masked_module(always_sparse):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.depthwise = nn.Conv2d(4, 4, 3, padding=1, groups=4)
            self.unused = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.depthwise(self.conv(x)).mean(dim=(2, 3)))

    model = Net()
    masks = random_masks(model, 0.5)
    converted = to_inference(model, masks, torch.randn(2, 3, 6, 6))
    report = converted.inference_report
    choices = {layer.module: layer for layer in report.layers}
    assert set(choices) == {"conv", "depthwise", "unused", "head"}
    assert isinstance(converted.conv, SparseConv2d) and isinstance(converted.head, SparseLinear)
    assert choices["depthwise"].reason == "groups=4 (only 1 is converted)"
    assert choices["unused"].reason == "not called by the example input"
    assert choices["conv"].input_shape == (2, 3, 6, 6)
    assert choices["head"].input_shape == (2, 4)
    assert report.converted == ["conv", "head"]
    text = str(report)
    assert "1 thread(s)" in text and "dense: groups=4" in text and "CSR" in text
    assert isinstance(converted.depthwise, nn.Conv2d) and isinstance(converted.unused, nn.Linear)


def test_threads_are_used_for_timing_and_restored_also_on_an_exception(monkeypatch):
    seen = []

    def fake_timing(first, second, device, budget_s=None):
        seen.append(torch.get_num_threads())
        return [1.0], [0.5]

    monkeypatch.setattr(inference, "time_interleaved", fake_timing)
    model = nn.Sequential(nn.Linear(6, 5))
    masks = random_masks(model, 0.5)
    before = torch.get_num_threads()
    converted = to_inference(model, masks, torch.randn(2, 6), threads=2)
    assert seen == [2, 2] and torch.get_num_threads() == before  # the layer, the model
    assert converted.inference_report.threads == 2
    with pytest.raises(RuntimeError):  # the example input does not fit the model
        to_inference(model, masks, torch.randn(2, 7), threads=2)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be an int >= 1, got 0"):
        to_inference(model, masks, torch.randn(2, 6), threads=0)
    with pytest.raises(TypeError, match=r"threads must be an int >= 1, got 1\.5"):
        to_inference(model, masks, torch.randn(2, 6), threads=1.5)


def test_to_inference_checks_the_masks():
    model = nn.Sequential(nn.Linear(6, 5))
    with pytest.raises(ValueError, match=r"mask 'net\.9\.weight' names no parameter"):
        to_inference(model, {"net.9.weight": torch.ones(5, 6, dtype=torch.bool)},
                     torch.randn(1, 6))
    with pytest.raises(ValueError, match=r"mask of '0\.weight' has shape \(6, 5\)"):
        to_inference(model, {"0.weight": torch.ones(6, 5, dtype=torch.bool)},
                     torch.randn(1, 6))
    with pytest.raises(TypeError, match=r"model must be an nn\.Module, got dict"):
        to_inference({}, {}, torch.randn(1, 6))


# ------------------------------------------------------------------- models of all kinds


class UserNet(nn.Module):
    """A model written the way a user would: not a Sequential, .view on a Linear's output,
    a residual, a layer called twice, an embedding, kwargs in forward."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.proj = nn.Linear(16, 32)
        self.mix = nn.Linear(8, 8)
        self.out = nn.Linear(32, 5)

    def forward(self, tokens, scale: float = 1.0):
        h = self.proj(self.embed(tokens)).view(tokens.shape[0], tokens.shape[1], 4, 8)
        h = h + torch.relu(self.mix(self.mix(h)))
        return self.out(h.flatten(2).mean(1)) * scale


def test_a_model_a_user_would_write(always_sparse):
    torch.manual_seed(0)
    model = UserNet()
    masks = random_masks(model, 0.3)
    tokens = torch.randint(0, 50, (3, 7))
    converted = assert_converts_exactly(model, masks, (tokens, 2.0))
    mix = next(c for c in converted.inference_report.layers if c.module == "mix")
    assert "called 2 times" in mix.reason and isinstance(converted.mix, SparseLinear)
    converted_kwargs = to_inference(model, masks, {"tokens": tokens, "scale": 2.0})
    assert isinstance(converted_kwargs.proj, SparseLinear)


def test_masks_with_an_enclosing_prefix_and_a_float_input_dtype(always_sparse):
    holder = nn.Module()
    holder.net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 3))
    masks = random_masks(holder, 0.4)  # named "net.0.weight", as the callback's
    assert set(masks) == {"net.0.weight", "net.2.weight"}
    converted = to_inference(holder.net, masks, torch.randn(4, 8))
    assert isinstance(converted[0], SparseLinear)
    net_masks = {name.removeprefix("net."): mask for name, mask in masks.items()}
    assert_converts_exactly(holder.net, net_masks, torch.randn(4, 8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_transformer_block_in_fp32_and_bf16(always_sparse, dtype):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, dim_feedforward=128, batch_first=True,
                                       dropout=0.1).to(dtype)
    masks = random_masks(layer, 0.2)
    assert "self_attn.in_proj_weight" in masks
    x = torch.randn(2, 9, 32, dtype=dtype)
    converted = assert_converts_exactly(layer, masks, x, dtype)
    choices = {c.module: c for c in converted.inference_report.layers}
    assert isinstance(converted.linear1, SparseLinear)
    assert isinstance(converted.linear2, SparseLinear)
    assert choices["self_attn.in_proj_weight"].reason == (
        "MultiheadAttention computes its projections itself")
    assert choices["self_attn.out_proj"].reason == (
        "MultiheadAttention reads out_proj.weight itself")
    # the fused inference path (which reads linear1.weight itself) is switched off
    assert converted.activation_relu_or_gelu == 0 and layer.activation_relu_or_gelu == 1


@pytest.mark.slow
def test_hugging_face_gpt2_with_transposed_conv1d_and_a_tied_head(always_sparse):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=16,
                                     vocab_size=60, attn_pdrop=0.0, resid_pdrop=0.0,
                                     embd_pdrop=0.0, eos_token_id=0, bos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    names = [name for name, module in model.named_modules()
             if type(module).__name__ == "Conv1D"]
    masks = random_masks(model, 0.3)  # the default selection: every Conv1D, the tied wte
    assert set(masks) == {f"{name}.weight" for name in names} | {"transformer.wte.weight"}
    tokens = torch.randint(0, 60, (2, 11))
    converted = to_inference(model, masks, tokens)
    reference = masked_copy(model, masks)
    with torch.inference_mode():
        torch.testing.assert_close(converted(tokens).logits, reference(tokens).logits,
                                   rtol=1e-4, atol=1e-4)
    for name in names:
        assert isinstance(converted.get_submodule(name), SparseLinear), name
    assert isinstance(converted.lm_head, SparseLinear)  # the tied head, by tensor identity
    choices = {c.module: c for c in converted.inference_report.layers}
    assert choices["transformer.wte"].reason == (
        "Embedding is not converted (Linear, Conv1D and Conv2d are)")
    attention = model.transformer.h[0].attn.c_attn
    assert tuple(attention.weight.shape) == (32, 96)  # stored (in, out)
    sparse = converted.transformer.h[0].attn.c_attn
    assert (sparse.in_features, sparse.out_features) == (32, 96)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vgg16", "small_cnn"])
def test_the_zoo_models(always_sparse, name):
    from lightning_ggr.zoo.models import build_model

    torch.manual_seed(0)
    size = 64 if name == "vgg16" else 32  # VGG16 at 32x32 has a 25088 x 4096 first layer
    model = build_model(name, 10, size, 3)
    masks = random_masks(model, 0.05)
    converted = assert_converts_exactly(model, masks, torch.randn(2, 3, size, size))
    kinds = {type(m) for m in converted.modules()}
    assert SparseConv2d in kinds and SparseLinear in kinds


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "regnet_x_400mf"])
def test_torchvision_models(always_sparse, name):
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, num_classes=10)
    masks = random_masks(model, 0.1)
    converted = assert_converts_exactly(model, masks, torch.randn(1, 3, 64, 64))
    grouped = [c for c in converted.inference_report.layers if c.reason.startswith("groups=")]
    assert (name == "regnet_x_400mf") == bool(grouped)  # regnet's grouped convs stay dense


# ------------------------------------------------- saving, loading, scripting, the real rule


def test_the_converted_model_pickles_and_rebuilds_from_the_sparse_file(tmp_path, always_sparse):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 36, 10))
    masks = random_masks(model, 0.2)
    x = torch.randn(2, 3, 6, 6)
    converted = to_inference(model, masks, x)
    with torch.inference_mode():
        expected = converted(x)
    # 1. the whole converted module, pickled (a trusted file: weights_only=False)
    buffer = io.BytesIO()
    torch.save(converted, buffer)
    buffer.seek(0)
    unpickled = torch.load(buffer, weights_only=False)
    # 2. its state_dict into another conversion of the same masks
    again = to_inference(model, masks, x)
    again.load_state_dict(converted.state_dict())
    # 3. the deployment path: the sparse file, then to_inference on the target machine
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in masks:
                param.mul_(masks[name])
    save_sparse_model(model, masks, tmp_path / "model.pt")
    fresh = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 36, 10))
    rebuilt = to_inference(fresh, load_sparse_model(fresh, tmp_path / "model.pt"), x)
    with torch.inference_mode():
        for other in (unpickled, again, rebuilt):
            assert torch.equal(other(x), expected)


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_torch_jit_script_and_trace_work_on_the_converted_model(always_sparse):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 36, 10))
    masks = random_masks(model, 0.2)
    x = torch.randn(2, 3, 6, 6)
    converted = to_inference(model, masks, x)
    with torch.inference_mode():
        expected = converted(x)
    scripted = torch.jit.script(converted)  # deprecated since torch 2.14, still works
    traced = torch.jit.trace(converted, (x,))
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    with torch.inference_mode():
        for other in (scripted, traced, loaded):
            torch.testing.assert_close(other(x), expected)


def test_real_timing_whatever_it_picks_computes_the_masked_model():
    """The unpatched rule on real times: no speed assertion (that is the benchmark's job),
    only that every layer was timed within the bounds and the result is the masked model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 4))
    masks = random_masks(model, 0.01)
    x = torch.randn(1, 512)
    converted = assert_converts_exactly(model, masks, x)
    report = converted.inference_report
    for choice in report.layers:
        assert choice.dense_ms > 0 and choice.sparse_ms > 0
        assert inference.MIN_REPETITIONS <= choice.repetitions <= inference.MAX_REPETITIONS
        faster = choice.sparse_ms <= 0.9 * choice.dense_ms
        assert choice.sparse == (faster and report.kept_sparse)
    if report.model_dense_ms is not None:
        assert report.kept_sparse == (report.model_sparse_ms <= 0.9 * report.model_dense_ms)


def test_to_inference_is_public():
    assert lightning_ggr.to_inference is lightning_ggr.sparse.to_inference is to_inference
