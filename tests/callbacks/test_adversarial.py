"""Guarantees an adversarial review found broken (docs/guarantees.md, docs/usage.md): resume
after changing include/exclude, an optimizer replaced mid-fit, the run summary's FLOP count,
ModelPruning's rewind, patterns naming layers built in the module's setup, a drop fraction
that moves nothing."""

from __future__ import annotations

import json
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ModelPruning
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ggr import DynamicSparsityCallback

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------- helpers
def loader(samples: int = 32, batch: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(samples, 8, generator=g),
                         torch.randint(0, 4, (samples,), generator=g))
    return DataLoader(data, batch_size=batch, shuffle=False)  # 8 batches per epoch


class MLP(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                                 nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def make_trainer(root, callbacks, **kwargs) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 2)
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(default_root_dir=root, callbacks=callbacks, accelerator="cpu", devices=1,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


def sparse(**kwargs) -> DynamicSparsityCallback:
    kwargs.setdefault("sparsity", 0.8)
    kwargs.setdefault("log_figures", False)
    kwargs.setdefault("selection_summary", False)
    return DynamicSparsityCallback(**kwargs)


def masked_nonzero(callback: DynamicSparsityCallback) -> int:
    engine = callback.engine
    return sum(int((p.detach()[~engine.masks[n]] != 0).sum()) for n, p in engine.params.items())


# ------------------------------------------- 1. resume after changing include / exclude
@pytest.mark.parametrize(
    ("before", "after"),
    [
        (dict(exclude=["net.4.weight"]), dict()),  # the output layer made sparse too
        (dict(exclude=["net.4.weight"]), dict(exclude=["net.0.weight"])),
        # the same selection, patterns listed in another order
        (dict(include=["net.0.weight", "net.2.weight"]),
         dict(include=["net.2.weight", "net.0.weight"])),
    ],
    ids=["exclude-dropped", "exclude-changed", "include-reordered"],
)
def test_resume_with_changed_include_or_exclude_keeps_the_checkpoints_masks(
        tmp_path, before, after):
    """docs/usage.md, "On resume": the checkpoint's masks are the selection; when this
    callback would select differently today it warns and keeps the saved one. A single
    callback whose include/exclude changed (so its state_key changed) instead finds "no
    DynamicSparsityCallback state" and draws new random masks over the trained weights
    (on_load_checkpoint, sparsity.py:357-365, only falls back to the class-name key)."""
    torch.manual_seed(0)
    first = sparse(interval="step", update_interval=2, **before)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    make_trainer(tmp_path, [first, checkpoints], enable_checkpointing=True).fit(MLP(), loader())
    saved = {name: mask.clone() for name, mask in first.masks.items()}

    torch.manual_seed(1)
    second = sparse(interval="step", update_interval=2, **after)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [second], max_epochs=3).fit(
            MLP(), loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "holds no DynamicSparsityCallback state" in m], messages
    # The checkpoint's stop point (step 8) is kept, so nothing rewires after the resume: the
    # masks must be exactly the saved ones.
    assert set(second.masks) == set(saved)
    for name, mask in saved.items():
        assert torch.equal(second.masks[name], mask), name


def test_several_callbacks_resume_their_own_state_whatever_the_pattern_order(tmp_path):
    """Two callbacks (one per part of the model): one lists its include patterns in another
    order after the resume; each still adopts its own saved masks."""
    torch.manual_seed(0)
    first = [sparse(include=["net.0.weight", "net.2.weight"]), sparse(include=["net.4.weight"])]
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    make_trainer(tmp_path, [*first, checkpoints], enable_checkpointing=True).fit(MLP(), loader())
    torch.manual_seed(1)
    second = [sparse(include=["net.2.weight", "net.0.weight"]), sparse(include=["net.4.weight"])]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, second, max_epochs=3).fit(
            MLP(), loader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert not [w for w in caught if "holds no DynamicSparsityCallback state" in str(w.message)]
    for before, after in zip(first, second, strict=True):
        assert set(after.masks) == set(before.masks)
        for name, mask in before.masks.items():
            assert torch.equal(after.masks[name], mask), name


# ---------------------------------------------------- 2. ModelPruning's lottery ticket
class MaskedWeightsRecorder(pl.Callback):
    """Listed last: counts non-zero masked weights after every training batch."""

    def __init__(self, callback: DynamicSparsityCallback) -> None:
        self.callback = callback
        self.bad: list[tuple[int, int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        count = masked_nonzero(self.callback)
        if count:
            self.bad.append((trainer.global_step, count))


def test_model_pruning_with_its_default_lottery_ticket_rewind_keeps_masked_weights_zero(
        tmp_path):
    """ModelPruning (Lightning's own callback, defaults) rewinds the weights to their values
    at fit start after each pruning (``use_lottery_ticket_hypothesis=True``): it writes the
    dense initial weights into the masked positions and they stay non-zero (and in the
    forward pass) for the rest of training; only the end-of-fit check zeroes them. Either
    refuse the combination before training (as for StochasticWeightAveraging) or keep the
    masked weights exactly 0 after every step (docs/guarantees.md section 1)."""
    torch.manual_seed(0)
    callback = sparse(method="ggr", interval="step", update_interval=2)
    recorder = MaskedWeightsRecorder(callback)
    trainer = make_trainer(tmp_path, [callback, ModelPruning("l1_unstructured", amount=0.3),
                                      recorder], max_epochs=2)
    with pytest.raises(ValueError, match="use_lottery_ticket_hypothesis=False"):
        trainer.fit(MLP(), loader())
    assert trainer.global_step == 0  # refused before training
    # Without the rewind the two callbacks work together.
    torch.manual_seed(0)
    callback = sparse(method="ggr", interval="step", update_interval=2)
    recorder = MaskedWeightsRecorder(callback)
    pruning = ModelPruning("l1_unstructured", amount=0.3, use_lottery_ticket_hypothesis=False)
    make_trainer(tmp_path, [callback, pruning, recorder], max_epochs=2).fit(MLP(), loader())
    assert recorder.bad == []


# --------------------------- 5. the run summary's FLOP count crashes a finished fit
class RawBytes(MLP):
    """The loader yields raw uint8 features; the module scales them on the device in
    ``on_after_batch_transfer`` (where Lightning recommends it). Its ``example_input_array``
    is a raw batch, as Lightning's ModelSummary expects (it applies the transfer hooks)."""

    def __init__(self) -> None:
        super().__init__()
        self.example_input_array = torch.zeros(2, 8, dtype=torch.uint8)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if isinstance(batch, torch.Tensor):
            return batch.float() / 255
        x, y = batch
        return x.float() / 255, y


def test_run_summary_runs_the_example_input_as_lightning_does(tmp_path):
    """With a logger and an ``example_input_array``, on_fit_end counts FLOPs by calling
    ``module(example_input)`` directly (lightning_ggr/sparse/analysis.py:330-333): without
    the batch-transfer hooks and the precision plugin's input conversion that Lightning's
    own ModelSummary applies. Here Lightning's summary works at fit start, the whole
    training runs, and then fit raises ``RuntimeError: mat1 and mat2 must have the same
    dtype, but got Byte and Float`` from on_fit_end (no run summary written)."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = DataLoader(TensorDataset(torch.randint(0, 255, (32, 8), generator=g, dtype=torch.uint8),
                                    torch.randint(0, 4, (32,), generator=g)), batch_size=4)
    trainer = pl.Trainer(default_root_dir=tmp_path, callbacks=[sparse()], accelerator="cpu",
                         devices=1, max_epochs=1, logger=CSVLogger(tmp_path),
                         enable_progress_bar=False)  # Lightning's ModelSummary on (default)
    trainer.fit(RawBytes(), data)  # must not raise
    summary = tmp_path / "lightning_logs" / "version_0" / "lightning_ggr_summary.json"
    assert json.loads(summary.read_text())["flops"]["dense"] > 0  # counted, not skipped


@pytest.mark.parametrize("precision", ["64-true", "bf16-true"])
def test_run_summary_does_not_crash_a_finished_fit_under_true_precision(tmp_path, precision):
    """The same call under "64-true"/"bf16-true" with a float32 example (model summary off,
    as in this project's own test trainer): fit ends in ``RuntimeError: mat1 and mat2 must
    have the same dtype`` after training. (With Lightning's ModelSummary on, Lightning
    itself fails on such an example at fit start.)"""
    torch.manual_seed(0)
    model = MLP()
    model.example_input_array = torch.randn(2, 8)
    callback = sparse()
    trainer = make_trainer(tmp_path, [callback], precision=precision,
                           logger=CSVLogger(tmp_path))
    trainer.fit(model, loader())  # must not raise
    summary = tmp_path / "lightning_logs" / "version_0" / "lightning_ggr_summary.json"
    assert json.loads(summary.read_text())["flops"]["dense"] > 0


def test_an_example_input_the_module_cannot_run_only_drops_the_flop_count(tmp_path):
    """The FLOP count is a report-only figure: a failing example warns and the summary is
    written without it; the finished fit does not crash."""
    torch.manual_seed(0)
    model = MLP()
    model.example_input_array = torch.randn(2, 5)  # the wrong width
    with pytest.warns(UserWarning, match="no FLOP count"):
        make_trainer(tmp_path, [sparse()], logger=CSVLogger(tmp_path)).fit(model, loader())
    summary = tmp_path / "lightning_logs" / "version_0" / "lightning_ggr_summary.json"
    assert "flops" not in json.loads(summary.read_text())


# ---------------------------------------------- 7. the optimizer replaced in the middle of fit
class SwapsOptimizer(MLP):
    """Adam for epoch 0, then SGD: re-runs configure_optimizers at the start of epoch 1
    (``trainer.strategy.setup_optimizers(trainer)``, the usual way to switch optimizers)."""

    def configure_optimizers(self):
        if self.current_epoch == 0:
            return torch.optim.Adam(self.parameters(), lr=0.01)
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    def on_train_epoch_start(self) -> None:
        if self.current_epoch == 1:
            self.trainer.strategy.setup_optimizers(self.trainer)


def test_an_optimizer_replaced_mid_fit_still_has_its_masked_weights_held_at_zero(tmp_path):
    """The callback binds to the optimizer object it found in on_fit_start
    (sparsity.py:684-700) and ignores every other one (``optimizer is not self._optimizer``,
    sparsity.py:279). After the swap nothing masks the gradients, the clock stops and no
    rewiring runs: masked weights train densely for the rest of the fit, in silence until
    the end-of-fit check. Expected: follow the optimizer that now holds the sparse weights,
    or refuse/warn when it changes."""
    torch.manual_seed(0)
    callback = sparse(interval="step", update_interval=2)
    recorder = MaskedWeightsRecorder(callback)
    told = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            make_trainer(tmp_path, [callback, recorder], max_epochs=3).fit(SwapsOptimizer(),
                                                                         loader())
        except (ValueError, RuntimeError) as refused:
            told.append(str(refused))
    told += [str(w.message) for w in caught if "optimizer" in str(w.message)
             and "lightning_ggr" in (w.filename or "")]
    assert not told, told  # followed, not refused
    assert recorder.bad == [], recorder.bad[:3]
    assert callback.engine.rewirings == 5  # steps 2, 4, ..., 10 before the stop at 12
    assert callback._optimizer is not None and isinstance(callback._optimizer, torch.optim.SGD)
    for name, param in callback.engine.params.items():
        buffer = callback._optimizer.state[param].get("momentum_buffer")  # masked too
        if buffer is not None:
            assert int((buffer[~callback.masks[name]] != 0).sum()) == 0, name


# --------------------------------------- 8. a drop fraction that can never move a weight
def test_a_drop_fraction_too_small_to_move_any_weight_is_not_silent(tmp_path):
    """drop_fraction=0.01 on layers of 17-21 active weights rounds to 0 removals in every
    layer at every rewiring: 15 "rewirings" move nothing, the masks stay the initial random
    ones, and no warning says so (the train-end check counts rewirings, not moved weights).
    A setting that makes the callback do nothing must be an error or a warning."""
    torch.manual_seed(0)
    callback = sparse(sparsity=0.8, drop_fraction=0.01, interval="step", update_interval=1)
    module = MLP()
    module.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    initial = {}

    class Initial(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            initial.update({n: m.clone() for n, m in callback.masks.items()})

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [callback, Initial()], max_epochs=4).fit(module, loader())
    warned = [str(w.message) for w in caught if "drop_fraction=0.01" in str(w.message)]
    assert len(warned) == 1, [str(w.message) for w in caught]  # once, naming the fix
    assert "Raise drop_fraction" in warned[0]


# --------------------------------- 11. patterns over layers the module builds in setup()
class HeadBuiltInSetup(pl.LightningModule):
    """A backbone built in __init__, the head in ``setup()`` (its size known from the data):
    Lightning runs the callbacks' ``setup`` before the LightningModule's."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())

    def setup(self, stage: str) -> None:
        if not hasattr(self, "head"):
            self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "patterns",
    [dict(exclude=["head.weight"]), dict(include=["backbone.*.weight", "head.weight"])],
    ids=["exclude-head", "include-head"],
)
def test_patterns_naming_a_layer_built_in_setup_are_accepted(tmp_path, patterns):
    """sparsity.py:199-200 checks include/exclude in the callback's setup whenever the module
    already has *some* parameters; a head built in the module's own setup() (or
    configure_model) does not exist yet, so a valid `exclude=["head.weight"]` (keep the
    classifier dense) is refused before training: "exclude pattern 'head.weight' matches no
    selected sparse parameter". The code means to defer the check to on_fit_start for such
    modules (its comment), but only does so when the module has no parameter at all."""
    torch.manual_seed(0)
    callback = sparse(**patterns)
    make_trainer(tmp_path, [callback]).fit(HeadBuiltInSetup(), loader())
    if "exclude" in patterns:
        assert set(callback.masks) == {"backbone.0.weight", "backbone.2.weight"}
    else:
        assert set(callback.masks) == {"backbone.0.weight", "backbone.2.weight", "head.weight"}
