"""What the callback makes sparse on models it did not write, and the summary that says so
(issue 11: items 3, 5, 6, 7 and 9 through a real fit; the model matrix is test_real_models)."""

from __future__ import annotations

import json
import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn.utils import parametrizations
from torch.utils.data import DataLoader, TensorDataset

from lightning_ggr import DynamicSparsityCallback
from lightning_ggr.callbacks.reporting import SELECTION_TAG
from tests.helpers import SPARSE_NAMES, TinyModule, make_trainer, tiny_dataloader

pytestmark = pytest.mark.usefixtures("single_thread")


def vectors(samples: int = 32, features: int = 8, classes: int = 3) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(samples, features, generator=generator),
                                    torch.randint(0, classes, (samples,), generator=generator)),
                      batch_size=8)


def tokens(samples: int = 32, length: int = 6, vocab: int = 40) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab, (samples, length), generator=generator)
    return DataLoader(TensorDataset(x, x.roll(-1, dims=1)), batch_size=8)


class Classifier(pl.LightningModule):
    """Wraps ``net``; ``trained`` picks what the optimizer holds (default: all that need grad)."""

    def __init__(self, net: nn.Module, trained=None) -> None:
        super().__init__()
        self.net = net
        self.trained = trained
        self.steps = 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        out = self(x)
        if out.dim() == 3:
            out, y = out.flatten(0, 1), y.flatten()
        return nn.functional.cross_entropy(out, y)

    def configure_optimizers(self):
        params = self.trained() if self.trained is not None else [
            p for p in self.parameters() if p.requires_grad]
        return torch.optim.SGD(params, lr=0.05, momentum=0.9)


def sparse(**kwargs) -> DynamicSparsityCallback:
    kwargs = {"sparsity": 0.5, "interval": "step", "update_interval": 2, "stop_step": 5,
              "log_figures": False, **kwargs}
    return DynamicSparsityCallback(**kwargs)


def fit(tmp_path, module, callback, data, steps: int = 6, **kwargs) -> pl.Trainer:
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, [callback], max_steps=steps, **kwargs)
    trainer.fit(module, data)
    return trainer


def backbone() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 3))


# --------------------------------------------------------- item 3: frozen and untrained
def test_frozen_and_untrained_weights_are_left_dense_and_untouched(tmp_path):
    """On main both were masked (and GGR drained them: they get no update)."""
    net = backbone()
    net[0].requires_grad_(False)
    module = Classifier(net, trained=lambda: [p for p in net.parameters()
                                              if p.requires_grad and p is not net[2].weight])
    before = {n: p.detach().clone() for n, p in net.named_parameters() if n[0] in "02"}
    callback = sparse()
    fit(tmp_path, module, callback, vectors())
    assert list(callback.masks) == ["net.4.weight"]
    assert callback.engine.rewirings == 2
    for name, value in before.items():
        if name != "2.bias":  # trained, dense
            assert torch.equal(dict(net.named_parameters())[name], value), name
    assert callback.selection.dense["net.0.weight"] == "frozen (requires_grad=False)"
    assert callback.selection.dense["net.2.weight"] == "not in the optimizer"


# ------------------------------------------------------------------- item 5: lazy layers
class LazyModule(Classifier):
    def __init__(self, example: bool = True) -> None:
        super().__init__(nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.Linear(16, 3)))
        if example:
            self.example_input_array = torch.zeros(2, 8)


def test_lazy_layers_are_materialized_from_example_input_array(tmp_path):
    """On main: "parameter 'net.0.weight' is not materialized" in setup, example or not."""
    module = LazyModule()
    callback = sparse()
    fit(tmp_path, module, callback, vectors())
    mask = callback.masks["net.0.weight"]
    assert mask.shape == (16, 8) and int(mask.sum()) < mask.numel()
    assert (module.net[0].weight[~mask] == 0).all()
    assert callback.engine.rewirings == 2


def test_lazy_layers_without_example_input_array_are_refused_before_training(tmp_path):
    module = LazyModule(example=False)
    with pytest.raises(ValueError, match=r"parameters \['net\.0\.weight', 'net\.0\.bias'\] are "
                                         r"not materialized at fit start \(lazy modules\): set "
                                         "`example_input_array`"):
        fit(tmp_path, module, sparse(), vectors())
    assert module.steps == 0


def test_a_lazy_model_resumes_without_example_input_array(tmp_path):
    """The checkpoint materializes the lazy layers itself (Lightning loads the model state
    before on_fit_start); the saved masks are adopted."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    first = sparse()
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path / "a", [first, checkpoint], max_steps=4,
                           enable_checkpointing=True)
    trainer.fit(LazyModule(), vectors())
    saved = {n: m.clone() for n, m in first.masks.items()}
    resumed, module = sparse(), LazyModule(example=False)
    make_trainer(tmp_path / "b", [resumed], max_steps=6).fit(
        module, vectors(), ckpt_path=tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert module.steps >= 1  # resumed, then trained
    assert list(resumed.masks) == list(saved)
    # The saved state was adopted: the count goes on from the checkpoint's (step 2, then 4).
    assert (first.engine.rewirings, resumed.engine.rewirings) == (1, 2)
    assert (module.net[0].weight[~resumed.masks["net.0.weight"]] == 0).all()


class BuiltInConfigureModel(Classifier):
    """Builds its layers in ``configure_model``, which runs after the callbacks' ``setup``."""

    def __init__(self) -> None:
        super().__init__(nn.Identity())

    def configure_model(self) -> None:
        if isinstance(self.net, nn.Identity):
            self.net = backbone()


@pytest.mark.parametrize("kwargs", [{}, {"include": ["net.0.weight", "net.4.weight"]}],
                         ids=["default", "include"])
def test_a_model_built_in_configure_model_is_selected_at_fit_start(tmp_path, kwargs):
    """On main the callback's setup saw no layer yet: "the model has no sparse parameter"."""
    callback = sparse(**kwargs)
    fit(tmp_path, BuiltInConfigureModel(), callback, vectors())
    expected = ["net.0.weight", "net.2.weight", "net.4.weight"] if not kwargs else kwargs[
        "include"]
    assert list(callback.masks) == expected
    assert callback.engine.rewirings == 2


# -------------------------------------------------------------- item 6: parametrizations
class Parametrized(nn.Module):
    def __init__(self, norm) -> None:
        super().__init__()
        self.a = norm(nn.Linear(8, 16))
        self.b = nn.Linear(16, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_spectral_norm_layer_is_sparse_through_its_original(tmp_path):
    """On main the spectral_norm layer was silently dense."""
    net = Parametrized(parametrizations.spectral_norm)
    callback = sparse()
    fit(tmp_path, Classifier(net), callback, vectors())
    name = "net.a.parametrizations.weight.original"
    assert list(callback.masks) == [name, "net.b.weight"]
    mask = callback.masks[name]
    assert int(mask.sum()) < mask.numel()
    assert (net.a.weight[~mask] == 0).all()  # recomputed from the masked original
    assert callback.selection[name].reason == "spectral_norm(Linear)"


def test_weight_norm_layer_stays_dense_and_finite(tmp_path):
    """Guard: masking weight_norm's v would make every row with no active weight NaN."""
    net = Parametrized(parametrizations.weight_norm)
    callback = sparse(sparsity=0.95)
    fit(tmp_path, Classifier(net), callback, vectors())
    assert list(callback.masks) == ["net.b.weight"]
    assert torch.isfinite(net.a.weight).all()
    assert "NaN" in callback.selection.dense["net.a.parametrizations.weight.original1"]


# -------------------------------------------------------------- item 7: sparse gradients
def test_sparse_gradient_embedding_is_refused_before_training(tmp_path):
    """On main: NotImplementedError inside the masking kernel at the first optimizer step."""
    net = nn.Sequential(nn.Embedding(40, 16, sparse=True), nn.Linear(16, 40))
    module = Classifier(net)
    callback = sparse(include=["net.0.weight", "net.1.weight"])
    with pytest.raises(ValueError, match=r"'net\.0\.weight' gets sparse gradients"):
        fit(tmp_path, module, callback, tokens())
    assert module.steps == 0


# ------------------------------------------------------------ item 9: the selection summary
def test_the_selection_summary_is_printed_and_logged_as_text(tmp_path, caplog):
    logger = TensorBoardLogger(tmp_path, name="run")
    texts = []
    logger.experiment.add_text = lambda tag, text, global_step=None: texts.append((tag, text))
    callback = sparse(sparsity=0.8)
    module = TinyModule()
    with caplog.at_level(logging.INFO):
        fit(tmp_path, module, callback, tiny_dataloader(), logger=logger)
    printed = [r.getMessage() for r in caplog.records if "what is sparse" in r.getMessage()]
    assert len(printed) == 1
    table = printed[0]
    lines = table.splitlines()
    assert lines[0] == "DynamicSparsityCallback: ggr, sparsity 0.8, erk; what is sparse:"
    assert lines[1].split("|")[1:] == [" Parameter    ", " Shape   ", " Params ", " Kind   ",
                                       " Density ", " Active ", " Role / dense because"]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")]
            for line in lines[3:-3]}
    assert list(rows) == [n for n, _ in module.named_parameters()]
    counts = callback.initial_counts
    for name in SPARSE_NAMES:
        numel = dict(module.named_parameters())[name].numel()
        assert rows[name][4:7] == ["sparse", f"{counts[name] / numel:.3f}", str(counts[name])]
    assert rows["net.0.bias"][4:] == ["dense", "1.000", "6", "bias"]
    assert rows["net.0.weight"][7] == "Conv2d" and rows["net.6.weight"][7] == "Linear"
    total = sum(p.numel() for p in module.parameters())
    weights = sum(module.get_parameter(n).numel() for n in SPARSE_NAMES)
    active = sum(counts.values()) + total - weights
    assert lines[-2] == f"3 sparse tensors ({weights} params), 3 dense ({total - weights} params)"
    assert lines[-1] == (
        f"sparsity 0.80 over {100 * weights / total:.1f}% of the parameters = "
        f"{(weights - sum(counts.values())) / total:.3f} of all parameters are zero "
        f"({active:,} of {total:,} active)")
    assert [t for t in texts if t[0] == SELECTION_TAG] == [
        (SELECTION_TAG, "\n".join("    " + line for line in lines))]
    summary = json.loads((tmp_path / "run" / "version_0" / "lightning_ggr_summary.json")
                         .read_text())
    assert summary["selection"]["coverage"] == pytest.approx(weights / total)
    assert summary["selection"]["dense"] == {"net.0.bias": "bias", "net.2.bias": "bias",
                                             "net.6.bias": "bias"}


def test_the_selection_summary_can_be_turned_off(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        fit(tmp_path, TinyModule(), sparse(selection_summary=False), tiny_dataloader())
    assert not [r for r in caplog.records if "what is sparse" in r.getMessage()]


# ------------------------------------------------------------------------------- resume
def test_resume_keeps_the_checkpoints_selection_and_says_when_it_differs(tmp_path):
    """On main a resumed run recomputed the selection, and refused ("saved masks do not match")
    when it differed, e.g. a checkpoint written before this selection rule."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    first = sparse()
    torch.manual_seed(0)
    make_trainer(tmp_path / "a", [first, checkpoint], max_steps=4,
                 enable_checkpointing=True).fit(TinyModule(), tiny_dataloader())
    resumed = sparse(exclude=["net.6.weight"])
    with pytest.warns(UserWarning, match=r"only saved: \['net\.6\.weight'\], only now: \[\]\): "
                                         "the saved selection is kept"):
        make_trainer(tmp_path / "b", [resumed], max_steps=6).fit(
            TinyModule(), tiny_dataloader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt",
            weights_only=True)
    assert list(resumed.masks) == list(SPARSE_NAMES)
    assert resumed.selection["net.6.weight"].sparse
