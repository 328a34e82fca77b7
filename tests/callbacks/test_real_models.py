"""A matrix of real models nobody here wrote (issue 11, item 10; Hugging Face transformers
and timm models built from configs, no download: issue 17, item 6).

Small configurations on the CPU, a few GGR steps with two rewirings. Each model checks:

- the selection, exactly as documented (docs/usage.md, "What is sparse"): the sparse names
  and the reason of every dense tensor;
- masked weights exactly 0 (through every name of a tied tensor);
- the density requested over the selected tensors (``round(0.1 * N)`` active weights);
- the rewirings happened;
- the optimizer state (Adam moments, SGD momentum) exactly 0 at masked positions.

transformers and timm come with the ``dev`` extra; without them their tests skip.
"""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ggr import DynamicSparsityCallback
from lightning_ggr.sparse import layer_budget
from lightning_ggr.sparse.masks import optimizer_state_tensors
from tests.helpers import make_trainer

torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.usefixtures("single_thread")

SPARSITY = 0.9
STEPS = 5  # rewirings before the optimizer steps 2 and 4 (stop_step 5)


class Wrap(pl.LightningModule):
    """Trains ``net`` with Adam on (input, class) batches; ``trained`` picks the tensors the
    optimizer holds (default: every tensor that requires grad)."""

    def __init__(self, net: nn.Module, trained=None) -> None:
        super().__init__()
        self.net = net
        self.trained = trained

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        if out.dim() == 3:  # language model: (batch, length, vocab)
            out, y = out.flatten(0, 1), y.flatten()
        return nn.functional.cross_entropy(out, y)

    def configure_optimizers(self):
        params = self.trained() if self.trained is not None else [
            p for p in self.parameters() if p.requires_grad]
        return torch.optim.Adam(params, lr=1e-3)


def images(size: int, classes: int = 10, samples: int = 24, batch: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(samples, 3, size, size, generator=generator),
                                    torch.randint(0, classes, (samples,), generator=generator)),
                      batch_size=batch)


def tokens(vocab: int, length: int = 8, samples: int = 24, batch: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (samples, length), generator=generator)
    return DataLoader(TensorDataset(x, x.roll(-1, dims=1)), batch_size=batch)


def fit_sparse(tmp_path, module: pl.LightningModule, data) -> DynamicSparsityCallback:
    torch.manual_seed(0)
    callback = DynamicSparsityCallback(method="ggr", sparsity=SPARSITY, interval="step",
                                       update_interval=2, stop_step=5, log_figures=False,
                                       selection_summary=False)
    make_trainer(tmp_path, [callback], max_steps=STEPS).fit(module, data)
    return callback


def check_invariants(callback: DynamicSparsityCallback, module: pl.LightningModule) -> None:
    engine = callback.engine
    assert engine.rewirings == 2
    shapes = {name: tuple(p.shape) for name, p in engine.params.items()}
    assert engine.total_active == layer_budget(shapes, SPARSITY)
    total = sum(p.numel() for p in engine.params.values())
    assert abs(engine.total_active - (1 - SPARSITY) * total) <= 1
    (optimizer,) = module.trainer.optimizers
    for entry in callback.selection.entries:
        if not entry.sparse:
            continue
        mask = callback.masks[entry.name]
        for name in entry.names:  # a tied tensor, seen through each of its names
            assert (module.get_parameter(name)[~mask] == 0).all(), name
        state = list(optimizer_state_tensors(optimizer, entry.tensor))
        assert state, f"no optimizer state for {entry.name}"
        for value in state:
            assert (value[~mask] == 0).all(), entry.name


def dense_reasons(callback: DynamicSparsityCallback) -> set[str]:
    return set(callback.selection.dense.values())


# ---------------------------------------------------------------------------- the models
def test_resnet18(tmp_path):
    """Every convolution and the classifier; BatchNorm and biases dense."""
    module = Wrap(torchvision.models.resnet18(num_classes=10))
    callback = fit_sparse(tmp_path, module, images(16))
    convs = [f"layer{i}.{j}.conv{k}.weight" for i in (1, 2, 3, 4) for j in (0, 1) for k in (1, 2)]
    downsample = [f"layer{i}.0.downsample.0.weight" for i in (2, 3, 4)]
    assert set(callback.selection.params) == {
        f"net.{n}" for n in ["conv1.weight", *convs, *downsample, "fc.weight"]}
    assert dense_reasons(callback) == {"bias", "norm (BatchNorm2d)"}
    check_invariants(callback, module)


def test_mobilenet_v3_small(tmp_path):
    """Every Conv2d (depthwise and squeeze-excitation included) and Linear weight."""
    net = torchvision.models.mobilenet_v3_small(num_classes=10)
    module = Wrap(net)
    callback = fit_sparse(tmp_path, module, images(32))
    expected = {f"net.{name}.weight" for name, layer in net.named_modules()
                if type(layer) in (nn.Conv2d, nn.Linear)}
    assert len(expected) == 54
    assert set(callback.selection.params) == expected
    assert dense_reasons(callback) == {"bias", "norm (BatchNorm2d)"}
    check_invariants(callback, module)


def test_vision_transformer(tmp_path):
    """Attention included: in_proj_weight (Q, K, V stacked, one layer) and out_proj."""
    net = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2,
                                               num_heads=2, hidden_dim=32, mlp_dim=64,
                                               num_classes=10)
    module = Wrap(net)
    callback = fit_sparse(tmp_path, module, images(32))
    layers = [f"encoder.layers.encoder_layer_{i}." for i in (0, 1)]
    per_layer = ["self_attention.in_proj_weight", "self_attention.out_proj.weight",
                 "mlp.0.weight", "mlp.3.weight"]
    assert set(callback.selection.params) == {
        f"net.{n}" for n in ["conv_proj.weight", *(p + w for p in layers for w in per_layer),
                             "heads.head.weight"]}
    dense = callback.selection.dense
    assert dense["net.class_token"] == (
        "not a Linear/Conv/attention weight (VisionTransformer.class_token)")
    assert dense["net.encoder.pos_embedding"] == (
        "not a Linear/Conv/attention weight (Encoder.pos_embedding)")
    assert dense_reasons(callback) - {dense["net.class_token"],
                                      dense["net.encoder.pos_embedding"]} == {
        "bias", "norm (LayerNorm)"}
    check_invariants(callback, module)


class DemoTransformer(pl.LightningModule):
    """Lightning's demo ``Transformer`` (an ``nn.Transformer`` language model), small, on
    random tokens: its own ``LightningTransformer`` downloads WikiText-2."""

    def __init__(self) -> None:
        super().__init__()
        from lightning.pytorch.demos import Transformer

        self.model = Transformer(vocab_size=50, ninp=16, nhead=2, nhid=32, nlayers=1)

    def training_step(self, batch, batch_idx):
        inputs, target = batch
        output = self.model(inputs, target)
        return nn.functional.nll_loss(output, target.view(-1))

    def configure_optimizers(self):
        return torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)


def test_lightning_demo_transformer(tmp_path):
    """Six attention blocks' in_proj and out_proj, the feed-forward layers and the output
    layer; the (untied) input embedding dense."""
    module = DemoTransformer()
    callback = fit_sparse(tmp_path, module, tokens(50))
    encoder = "model.transformer.encoder.layers.0."
    decoder = "model.transformer.decoder.layers.0."
    attention = ["in_proj_weight", "out_proj.weight"]
    assert set(callback.selection.params) == {
        *(f"{encoder}self_attn.{w}" for w in attention),
        *(f"{decoder}{block}.{w}" for block in ("self_attn", "multihead_attn") for w in attention),
        *(f"{layer}linear{i}.weight" for layer in (encoder, decoder) for i in (1, 2)),
        "model.decoder.weight",
    }
    assert callback.selection.dense["model.embedding.weight"] == "embedding (Embedding)"
    assert dense_reasons(callback) == {"bias", "norm (LayerNorm)", "embedding (Embedding)"}
    check_invariants(callback, module)


class TiedLM(nn.Module):
    """GPT-2-style tied input embedding and output projection."""

    def __init__(self, embedding_first: bool, vocab: int = 100, dim: int = 32) -> None:
        super().__init__()
        if embedding_first:
            self.embed = nn.Embedding(vocab, dim)
            self.body = nn.Linear(dim, dim)
            self.decoder = nn.Linear(dim, vocab, bias=False)
        else:
            self.decoder = nn.Linear(dim, vocab, bias=False)
            self.body = nn.Linear(dim, dim)
            self.embed = nn.Embedding(vocab, dim)
        self.decoder.weight = self.embed.weight

    def forward(self, x):
        return self.decoder(torch.relu(self.body(self.embed(x))))


@pytest.mark.parametrize("embedding_first", [True, False], ids=["embedding-first", "decoder-first"])
def test_tied_embedding_language_model(tmp_path, embedding_first):
    """The tied tensor is one sparse tensor with one mask, in either registration order."""
    net = TiedLM(embedding_first)
    module = Wrap(net)
    callback = fit_sparse(tmp_path, module, tokens(100))
    first, other = ("embed", "decoder") if embedding_first else ("decoder", "embed")
    assert list(callback.selection.params) == [f"net.{first}.weight", "net.body.weight"]
    entry = callback.selection[f"net.{other}.weight"]
    assert entry.sparse and entry.reason.startswith("tied: ")
    assert callback.selection.dense == {"net.body.bias": "bias"}
    assert net.decoder.weight is net.embed.weight
    check_invariants(callback, module)


def test_frozen_backbone_fine_tune(tmp_path):
    """Only the new head is trained, so only it is sparse; the frozen pretrained weights
    are untouched (on main 90% of them were zeroed)."""
    net = torchvision.models.resnet18(num_classes=10)
    net.requires_grad_(False)
    net.fc = nn.Linear(512, 10)
    module = Wrap(net, trained=lambda: net.fc.parameters())
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not n.startswith("fc")}
    callback = fit_sparse(tmp_path, module, images(16))
    assert list(callback.selection.params) == ["net.fc.weight"]
    dense = callback.selection.dense
    assert dense["net.conv1.weight"] == "frozen (requires_grad=False)"
    assert {dense[f"net.{n}"] for n in frozen if n.endswith("conv1.weight")} == {
        "frozen (requires_grad=False)"}
    for name, value in frozen.items():
        assert torch.equal(net.get_parameter(name), value), name
    check_invariants(callback, module)


def test_compiled_module(tmp_path):
    """A ``torch.compile``d child (backend ``aot_eager``: the same graph capture as inductor,
    without its C++ compile): names gain ``_orig_mod``, masking and rewiring reach the
    compiled graph (its output equals the eager module's after the rewirings)."""
    eager = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                          nn.Flatten(), nn.Linear(32, 10))
    module = Wrap(torch.compile(eager, backend="aot_eager"))
    callback = fit_sparse(tmp_path, module, images(8))
    assert list(callback.selection.params) == ["net._orig_mod.0.weight",
                                               "net._orig_mod.4.weight"]
    check_invariants(callback, module)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(module.net(x), eager(x), atol=1e-6)


# ------------------------------------------------- transformers and timm (issue 17, item 6)
class CausalLM(Wrap):
    """A Hugging Face causal language model on (tokens, next tokens): its logits."""

    def forward(self, x):
        return self.net(input_ids=x).logits


def test_hugging_face_gpt2(tmp_path):
    """GPT-2's attention and MLP are transformers' Conv1D (weight stored in x out): all 8 are
    sparse, with the tied embedding / output layer; sparsity 0.9 covers them all. Analysis
    and FLOPs read the Conv1D weights in their orientation."""
    transformers = pytest.importorskip("transformers")
    from lightning_ggr.sparse.analysis import analyze_masks, sparse_flops

    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=16,
                                     vocab_size=100, bos_token_id=0, eos_token_id=0)
    net = transformers.GPT2LMHeadModel(config)
    module = CausalLM(net)
    callback = fit_sparse(tmp_path, module, tokens(100))
    blocks = [f"net.transformer.h.{i}." for i in (0, 1)]
    conv1d = [b + w for b in blocks for w in ("attn.c_attn.weight", "attn.c_proj.weight",
                                               "mlp.c_fc.weight", "mlp.c_proj.weight")]
    assert set(callback.selection.params) == {"net.transformer.wte.weight", *conv1d}
    for name in conv1d:
        assert callback.selection[name].reason == "Conv1D (transformers, linear stored in x out)"
        assert callback.layer_densities()[name] < 0.2, name
    tied = callback.selection["net.lm_head.weight"]
    assert tied.name == "net.transformer.wte.weight" and tied.reason == (
        "tied: net.transformer.wte.weight (Embedding) = net.lm_head.weight (Linear)")
    assert net.lm_head.weight is net.transformer.wte.weight
    assert callback.selection.dense["net.transformer.wpe.weight"] == "embedding (Embedding)"
    assert dense_reasons(callback) == {"bias", "norm (LayerNorm)", "embedding (Embedding)"}
    check_invariants(callback, module)
    masks = callback.masks
    c_attn = analyze_masks(masks, module=module).layers["net.transformer.h.0.attn.c_attn.weight"]
    assert (c_attn.neurons, c_attn.inputs, c_attn.transposed) == (96, 32, True)
    x = torch.randint(0, 100, (1, 8))
    per_token = 2 * (32 * 96 + 32 * 32 + 32 * 128 + 128 * 32) + 100 * 32  # lm_head too
    assert sparse_flops(module, masks, x) == (8 * callback.engine.total_active, 8 * per_token)


def test_hugging_face_llama_style_model(tmp_path):
    """A Llama-style model (nn.Linear projections, grouped K/V, gated MLP, untied head)."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    module = CausalLM(transformers.LlamaForCausalLM(config))
    callback = fit_sparse(tmp_path, module, tokens(100))
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    assert set(callback.selection.params) == {
        *(f"net.model.layers.{i}.{p}.weight" for i in (0, 1) for p in per_layer),
        "net.lm_head.weight"}
    dense = callback.selection.dense
    assert dense["net.model.embed_tokens.weight"] == "embedding (Embedding)"
    assert dense_reasons(callback) == {"embedding (Embedding)", "1-D"}  # the RMSNorm scales
    check_invariants(callback, module)


def test_timm_vision_transformer(tmp_path):
    """timm's ViT (pretrained=False): patch embedding, fused qkv, projections, MLP, head."""
    timm = pytest.importorskip("timm")
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                            patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=10)
    module = Wrap(net)
    callback = fit_sparse(tmp_path, module, images(32))
    blocks = [f"net.blocks.{i}." for i in (0, 1)]
    assert set(callback.selection.params) == {
        "net.patch_embed.proj.weight", "net.head.weight",
        *(b + w for b in blocks for w in ("attn.qkv.weight", "attn.proj.weight",
                                           "mlp.fc1.weight", "mlp.fc2.weight"))}
    dense = callback.selection.dense
    assert dense["net.cls_token"] == (
        "not a Linear/Conv/attention weight (VisionTransformer.cls_token)")
    assert dense_reasons(callback) - {dense["net.cls_token"], dense["net.pos_embed"]} == {
        "bias", "norm (LayerNorm)"}
    check_invariants(callback, module)
