"""Which tensors are sparse, and the reason each other one is dense (issue 11, items 1-8).

Plain PyTorch: the selection never needs Lightning.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

from lightning_ggr import SparseEngine, select_sparse_parameters
from lightning_ggr.sparse import erk_score
from lightning_ggr.sparse.selection import (
    check_selection_patterns,
    plan_selection,
    selection_from_names,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def small_vit(num_classes: int = 10) -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                             hidden_dim=32, mlp_dim=64, num_classes=num_classes)


class CrossAttention(nn.Module):
    """kdim/vdim != embed_dim: separate q/k/v projection weights."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(16, 2, kdim=8, vdim=4, batch_first=True)
        self.head = nn.Linear(16, 3)


class TiedLM(nn.Module):
    """GPT-2-style tied embedding / decoder; ``embedding_first`` is the registration order."""

    def __init__(self, embedding_first: bool, vocab: int = 40, dim: int = 16,
                 sparse_embedding: bool = False) -> None:
        super().__init__()
        if embedding_first:
            self.embed = nn.Embedding(vocab, dim, sparse=sparse_embedding)
            self.body = nn.Linear(dim, dim)
            self.decoder = nn.Linear(dim, vocab, bias=False)
        else:
            self.decoder = nn.Linear(dim, vocab, bias=False)
            self.body = nn.Linear(dim, dim)
            self.embed = nn.Embedding(vocab, dim, sparse=sparse_embedding)
        self.decoder.weight = self.embed.weight


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Linear(16, 16),
                         nn.BatchNorm1d(16), nn.Linear(16, 3))


# ---------------------------------------------------------------------- item 1: attention
def test_attention_in_proj_weight_is_sparse_by_default():
    vit = small_vit()
    selection = plan_selection(vit)
    for layer in (0, 1):
        name = f"encoder.layers.encoder_layer_{layer}.self_attention.in_proj_weight"
        assert selection[name].sparse
        assert selection[name].reason == "MultiheadAttention in_proj (Q,K,V stacked)"
        out = f"encoder.layers.encoder_layer_{layer}.self_attention.out_proj.weight"
        assert selection[out].reason == "MultiheadAttention out_proj (Linear)"


def test_attention_separate_q_k_v_weights_are_sparse_by_default():
    selected = select_sparse_parameters(CrossAttention())
    assert list(selected) == ["attention.q_proj_weight", "attention.k_proj_weight",
                              "attention.v_proj_weight", "attention.out_proj.weight",
                              "head.weight"]


def test_vit_selection_is_every_linear_map_and_says_why_the_rest_is_dense():
    vit = small_vit()
    selection = plan_selection(vit)
    expected = {n for n, p in vit.named_parameters()
                if p.dim() >= 2 and n not in ("class_token", "encoder.pos_embedding")}
    assert set(selection.params) == expected
    assert list(selection.params) == [n for n, _ in vit.named_parameters() if n in expected]
    dense = selection.dense
    assert dense["class_token"].startswith("not a Linear/Conv/attention weight")
    assert dense["encoder.pos_embedding"].startswith("not a Linear/Conv/attention weight")
    assert dense["encoder.ln.weight"] == "norm (LayerNorm)"
    assert dense["heads.head.bias"] == "bias"
    assert dense["encoder.layers.encoder_layer_0.self_attention.in_proj_bias"] == "bias"
    total = sum(p.numel() for p in vit.parameters())
    assert selection.total_params == total
    assert selection.coverage == pytest.approx(sum(p.numel() for p in selection.params.values())
                                               / total)


def test_stacked_in_proj_is_one_layer_for_erk():
    """One (3E, E) tensor, one mask, one ERK score of its own shape: its ERK density is
    2/3 that of an (E, E) projection (the documented choice)."""
    engine = SparseEngine(select_sparse_parameters(small_vit()), sparsity=0.9,
                          distribution="erk")
    prefix = "encoder.layers.encoder_layer_0.self_attention."
    ratio = (engine.initial_density[prefix + "in_proj_weight"]
             / engine.initial_density[prefix + "out_proj.weight"])
    assert ratio == pytest.approx(erk_score((96, 32)) / erk_score((32, 32)), rel=1e-9)
    assert ratio == pytest.approx(2 / 3)
    assert engine.masks[prefix + "in_proj_weight"].shape == (96, 32)


# --------------------------------------------------------------------- item 2: tied weights
@pytest.mark.parametrize("embedding_first", [True, False], ids=["embedding-first", "decoder-first"])
def test_tied_weight_is_one_sparse_tensor_in_every_order(embedding_first):
    model = TiedLM(embedding_first)
    selection = plan_selection(model)
    first, other = ("embed", "decoder") if embedding_first else ("decoder", "embed")
    assert list(selection.params) == [f"{first}.weight", "body.weight"]
    entry = selection[f"{other}.weight"]  # any alias finds the entry
    assert entry.name == f"{first}.weight" and entry.aliases == (f"{other}.weight",)
    assert entry.tensor is model.decoder.weight
    kinds = {"embed": "Embedding", "decoder": "Linear"}
    assert entry.reason == (f"tied: {first}.weight ({kinds[first]}) = "
                            f"{other}.weight ({kinds[other]})")


@pytest.mark.parametrize("alias", ["embed.weight", "decoder.weight"])
@pytest.mark.parametrize("embedding_first", [True, False], ids=["embedding-first", "decoder-first"])
def test_excluding_a_tied_weight_by_any_of_its_names_works(embedding_first, alias):
    model = TiedLM(embedding_first)
    selection = plan_selection(model, exclude=[alias])
    assert list(selection.params) == ["body.weight"]
    assert selection[alias].reason.startswith("excluded; tied: ")


def test_including_a_tied_weight_by_its_alias_selects_it_once():
    model = TiedLM(embedding_first=True)
    assert list(select_sparse_parameters(model, include=["decoder.weight"])) == ["embed.weight"]


def test_a_shared_module_is_one_tensor():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    selection = plan_selection(model)
    assert list(selection.params) == ["0.weight"]
    assert selection["2.weight"].name == "0.weight"
    assert selection.dense == {"0.bias": "bias; tied: 0.bias (Linear) = 2.bias (Linear)"}


# ------------------------------------------------------------- item 3: frozen / untrained
def test_frozen_tensors_stay_dense():
    model = mlp()
    model[0].requires_grad_(False)
    selection = plan_selection(model)
    assert list(selection.params) == ["2.weight", "4.weight"]
    assert selection.dense["0.weight"] == "frozen (requires_grad=False)"


@pytest.mark.parametrize("given", ["optimizer", "tensors"])
def test_tensors_no_optimizer_holds_stay_dense(given):
    model = mlp()
    optimizer = torch.optim.SGD(model[4].parameters(), lr=0.1)
    trained = [optimizer] if given == "optimizer" else list(model[4].parameters())
    selection = plan_selection(model, trained=trained)
    assert list(selection.params) == ["4.weight"]
    assert selection.dense["0.weight"] == "not in the optimizer"
    assert selection.dense["2.weight"] == "not in the optimizer"


def test_trained_must_hold_optimizers_or_tensors():
    with pytest.raises(TypeError, match="trained must hold optimizers or tensors, got 'x'"):
        plan_selection(mlp(), trained=["x"])


def test_including_a_frozen_tensor_by_name_is_an_error():
    model = mlp()
    model[0].requires_grad_(False)
    with pytest.raises(ValueError, match=r"include names '0\.weight', which is frozen"):
        plan_selection(model, include=["0.weight", "2.weight"])
    # Reached by a wildcard only: dense, with the reason.
    assert plan_selection(model, include=["[024].weight"]).dense["0.weight"].startswith("frozen")


def test_nothing_trainable_says_why():
    model = mlp()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match=r"the model has no sparse parameter: its 3 "
                                         r"Linear/Conv/attention weights are all frozen"):
        plan_selection(model)
    with pytest.raises(ValueError, match="are all not in the optimizer"):
        plan_selection(mlp(), trained=[])


# ------------------------------------------------------------------ item 4: 1-D tensors
def test_include_wildcard_reaching_1d_tensors_is_refused():
    with pytest.raises(ValueError, match=r"include=\['\*weight'\] matches the 1-D parameters "
                                         r"\['1\.weight', '3\.weight'\]"):
        select_sparse_parameters(mlp(), include=["*weight"])
    with pytest.raises(ValueError, match="1-D parameters"):
        check_selection_patterns(mlp(), include=["*"])


def test_1d_tensors_are_sparse_only_when_named_exactly():
    model = mlp()
    assert list(select_sparse_parameters(model, include=["0.weight", "1.weight"])) == [
        "0.weight", "1.weight"]
    # exclude may remove what a wildcard reached.
    assert list(select_sparse_parameters(model, include=["*weight"],
                                         exclude=["1.weight", "3.weight"])) == [
        "0.weight", "2.weight", "4.weight"]


# --------------------------------------------------------------------- item 5: lazy layers
def test_lazy_parameters_are_refused_until_materialized():
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 3))
    check_selection_patterns(model)  # patterns alone are fine before shapes exist
    with pytest.raises(ValueError, match=r"parameters \['0\.weight'\] are not materialized "
                                         r"\(lazy modules\).*example_input_array"):
        select_sparse_parameters(model)
    model(torch.zeros(2, 8))
    assert list(select_sparse_parameters(model)) == ["0.weight", "2.weight"]


# ---------------------------------------------------------------- item 6: parametrizations
def parametrized(norm) -> nn.Sequential:
    return nn.Sequential(norm(nn.Linear(8, 16)), nn.ReLU(), nn.Linear(16, 3))


def test_spectral_norm_masks_its_original():
    selection = plan_selection(parametrized(parametrizations.spectral_norm))
    assert list(selection.params) == ["0.parametrizations.weight.original", "2.weight"]
    assert selection["0.parametrizations.weight.original"].reason == "spectral_norm(Linear)"


def test_weight_norm_over_rows_stays_dense_with_the_reason():
    model = parametrized(parametrizations.weight_norm)  # dim=0, the default
    selection = plan_selection(model)
    assert list(selection.params) == ["2.weight"]
    assert selection.dense["0.parametrizations.weight.original0"] == "weight_norm magnitude g"
    assert "0/0 = NaN" in selection.dense["0.parametrizations.weight.original1"]
    with pytest.raises(ValueError, match=r"'0\.parametrizations\.weight\.original1', which "
                                         "cannot be masked: weight_norm v"):
        plan_selection(model, include=["0.parametrizations.weight.original1"])


def test_weight_norm_over_the_whole_tensor_masks_v():
    model = parametrized(lambda m: parametrizations.weight_norm(m, dim=None))
    selection = plan_selection(model)
    assert list(selection.params) == ["0.parametrizations.weight.original1", "2.weight"]
    engine = SparseEngine(selection.params, sparsity=0.9)
    mask = engine.masks["0.parametrizations.weight.original1"]
    assert (model[0].weight[~mask] == 0).all()
    assert torch.isfinite(model[0].weight).all()


def test_other_parametrizations_stay_dense_with_the_reason():
    model = nn.Sequential(parametrizations.orthogonal(nn.Linear(8, 8)), nn.Linear(8, 3))
    selection = plan_selection(model)
    assert list(selection.params) == ["1.weight"]
    assert "a zero of its input is not a zero of the weight" in selection.dense[
        "0.parametrizations.weight.original"]


# -------------------------------------------------------------- item 7: sparse gradients
def test_sparse_gradient_embedding_is_refused_by_name_and_when_tied():
    model = nn.Sequential(nn.Embedding(40, 16, sparse=True), nn.Linear(16, 40))
    with pytest.raises(ValueError, match=r"parameter '0\.weight' gets sparse gradients"):
        check_selection_patterns(model, include=["0.weight", "1.weight"])
    with pytest.raises(ValueError, match=r"'embed\.weight' gets sparse gradients.*sparse=False "
                                         "or exclude it"):
        plan_selection(TiedLM(embedding_first=True, sparse_embedding=True))
    # Dense by default when untied: embeddings are not sparse candidates.
    assert list(select_sparse_parameters(model)) == ["1.weight"]


# ----------------------------------------------------------------------- item 8: messages
def test_exclude_everything_blames_exclude():
    with pytest.raises(ValueError, match=r"exclude=\['\*'\] removed every sparse candidate \(3 "
                                         r"Linear/Conv/attention weights\)") as error:
        select_sparse_parameters(mlp(), exclude=["*"])
    assert "no Linear/Conv" not in str(error.value)


def test_no_layer_weight_at_all():
    with pytest.raises(ValueError, match="the model has no sparse parameter: no "
                                         "Linear/Conv/attention weight was found"):
        select_sparse_parameters(nn.Sequential(nn.LayerNorm(4), nn.Embedding(3, 4)))


def test_other_tensors_say_why_they_are_dense():
    model = nn.Module()
    model.lstm = nn.LSTM(4, 4)
    model.prelu = nn.PReLU()
    model.bilinear = nn.Bilinear(3, 3, 2)
    model.head = nn.Linear(4, 2)
    dense = plan_selection(model).dense
    assert dense["lstm.weight_ih_l0"].startswith("recurrent weight (LSTM)")
    assert dense["lstm.bias_hh_l0"] == "bias"
    assert dense["prelu.weight"] == "1-D"
    assert dense["bilinear.weight"].startswith("not a Linear/Conv/attention weight")
    assert list(select_sparse_parameters(model, include=["lstm.weight_*"])) == [
        "lstm.weight_ih_l0", "lstm.weight_hh_l0"]


# --------------------------------------------------------------------------------- resume
def test_a_saved_selection_is_adopted_as_it_was():
    model = mlp()
    selection = selection_from_names(model, ["2.weight", "1.weight"])
    assert list(selection.params) == ["1.weight", "2.weight"]
    assert selection.dense["0.weight"] == "not in the saved masks"
    with pytest.raises(ValueError, match=r"does not have: \['fc\.weight'\]"):
        selection_from_names(model, ["fc.weight"])


def test_public_function_keeps_its_positional_arguments():
    model = mlp()
    assert list(select_sparse_parameters(model, ["0.weight"], None)) == ["0.weight"]
    assert list(select_sparse_parameters(model, None, ["4.weight"])) == ["0.weight", "2.weight"]


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_hook_based_reparametrizations_stay_dense_with_the_reason():
    from torch.nn.utils import prune, weight_norm

    model = nn.Sequential(weight_norm(nn.Linear(8, 8)), prune.identity(nn.Linear(8, 8), "weight"),
                          nn.Linear(8, 3))
    dense = plan_selection(model).dense
    assert dense["0.weight_g"].startswith("weight_norm magnitude g")
    assert "0/0 = NaN" in dense["0.weight_v"]
    assert dense["1.weight_orig"].startswith("reparametrized by a hook (weight_orig)")
    assert list(select_sparse_parameters(model, include=["1.weight_orig", "2.weight"])) == [
        "1.weight_orig", "2.weight"]


def test_is_transposed_linear_recognises_transformers_conv1d_without_importing_it():
    from lightning_ggr.sparse.selection import is_transposed_linear

    def conv1d_class(module_name):
        class Conv1D(nn.Module):
            def __init__(self, nf, nx):
                super().__init__()
                self.nf, self.nx = nf, nx
                self.weight = nn.Parameter(torch.empty(nx, nf))

        Conv1D.__module__ = module_name
        return Conv1D

    assert is_transposed_linear(conv1d_class("transformers.pytorch_utils")(4, 3))
    assert not is_transposed_linear(conv1d_class("my_project.layers")(4, 3))
    assert not is_transposed_linear(nn.Conv1d(3, 4, 1))
    assert not is_transposed_linear(nn.Linear(3, 4))


# ------------------------------------------------ transformers' Conv1D (issue 17, item 6)
def test_conv1d_stand_in_is_transformers_conv1d():
    """The tests' stand-in (no transformers needed) computes what the real class does and is
    recognised the same way."""
    transformers_utils = pytest.importorskip("transformers.pytorch_utils")
    from lightning_ggr.sparse.selection import is_transposed_linear
    from tests.helpers.models import Conv1D

    real, stand_in = transformers_utils.Conv1D(6, 4), Conv1D(6, 4)
    stand_in.load_state_dict(real.state_dict())
    x = torch.randn(2, 3, 4)
    assert torch.equal(real(x), stand_in(x))
    assert tuple(real.weight.shape) == tuple(stand_in.weight.shape) == (4, 6)
    assert is_transposed_linear(real) and is_transposed_linear(stand_in)


def test_conv1d_weight_is_sparse_by_default_with_its_role():
    from tests.helpers.models import Conv1D

    model = nn.Sequential(Conv1D(8, 4), nn.ReLU(), Conv1D(3, 8), nn.LayerNorm(3))
    selection = plan_selection(model)
    assert list(selection.params) == ["0.weight", "2.weight"]
    assert selection["0.weight"].reason == "Conv1D (transformers, linear stored in x out)"
    assert selection.dense == {"0.bias": "bias", "2.bias": "bias", "3.weight": "norm (LayerNorm)",
                               "3.bias": "bias"}


def test_erk_density_of_a_linear_map_does_not_depend_on_its_orientation():
    """ERK's score sum(shape) / prod(shape) is symmetric in a 2-D weight's dimensions: a
    Conv1D stored (in, out) gets the density of the Linear stored (out, in)."""
    from tests.helpers.models import Conv1D

    torch.manual_seed(0)
    transposed = SparseEngine(select_sparse_parameters(
        nn.Sequential(Conv1D(40, 10), Conv1D(5, 40))), sparsity=0.8)
    plain = SparseEngine(select_sparse_parameters(
        nn.Sequential(nn.Linear(10, 40), nn.Linear(40, 5))), sparsity=0.8)
    assert transposed.initial_counts == plain.initial_counts
    assert erk_score((10, 40)) == erk_score((40, 10))
