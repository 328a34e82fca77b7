"""Checkpoint and resume: stopping half-way and resuming is bit-identical to a straight run."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ggr import DynamicSparsityCallback
from tests.helpers import SPARSE_NAMES, TinyModule, make_trainer, tiny_dataloader
from tests.helpers.setups import MLP, ResumableLoader, RewiringLog, ggr_warnings, sparse
from tests.helpers.setups import loader as setup_loader

EPOCHS = 4  # 8 optimizer steps per epoch (32 samples, batch 4): 32 steps in all
STOP_AT_EPOCH = 2  # the interrupted run stops after 16 steps


def callback(method: str) -> DynamicSparsityCallback:
    # stop_fraction (not stop_step): the schedule depends on the training length, which the
    # resumed run must recompute exactly as the straight one did.
    return DynamicSparsityCallback(method=method, sparsity=0.8, interval="step",
                                   update_interval=3, stop_fraction=0.75, drop_fraction=0.3,
                                   seed=7, log_figures=False)


class StopAfterEpochs(pl.Callback):
    """Simulates an interrupted job: ends fit after ``epochs`` epochs."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


class FirstStep(pl.Callback):
    """Records the global step of the first optimizer step of this fit."""

    def __init__(self) -> None:
        self.step: int | None = None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.step is None:
            self.step = trainer.global_step


def fit(root, method, optimizer, callbacks=(), ckpt_path=None, **kwargs):
    pl.seed_everything(0, verbose=False)
    model = TinyModule(optimizer=optimizer, lr=0.02)
    sparse = callback(method)
    trainer = make_trainer(root, [sparse, *callbacks], max_epochs=EPOCHS, deterministic=True,
                           **kwargs)
    trainer.fit(model, tiny_dataloader(), ckpt_path=ckpt_path,
                weights_only=True if ckpt_path else None)
    return model, sparse, trainer


def assert_nested_equal(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_nested_equal(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_nested_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.slow
@pytest.mark.parametrize(("method", "optimizer"), [("ggr", "sgd"), ("dsr", "adam"),
                                                   ("set", "adamw")])
def test_stop_and_resume_is_bit_identical_to_a_straight_run(tmp_path, method, optimizer):
    straight_model, straight, straight_trainer = fit(tmp_path / "straight", method, optimizer)
    assert straight.engine.rewirings == 7  # steps 3, 6, ..., 21 < stop 24

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    _, first_half, _ = fit(tmp_path / "half", method, optimizer,
                           [StopAfterEpochs(STOP_AT_EPOCH), checkpoints],
                           enable_checkpointing=True)
    assert first_half.engine.rewirings == 5  # steps 3 ... 15
    path = tmp_path / "ckpt" / "last.ckpt"

    # Only tensors and Python primitives: the checkpoint loads with weights_only=True.
    state = torch.load(path, weights_only=True)["callbacks"]["DynamicSparsityCallback"]
    assert set(state) >= {"masks", "last_slot", "last_rewiring_step", "threshold",
                          "generator_state", "initial_counts"}
    assert list(state["masks"]) == list(SPARSE_NAMES)
    assert all(mask.dtype == torch.bool for mask in state["masks"].values())
    assert state["last_rewiring_step"] == 15
    assert (state["threshold"] is not None) == (method == "dsr")

    first = FirstStep()
    model, resumed, trainer = fit(tmp_path / "resumed", method, optimizer, [first],
                                  ckpt_path=path)
    assert first.step == 16  # resumed half-way, not from scratch
    assert resumed.engine.rewirings == 7

    assert_nested_equal(resumed.masks, straight.masks, "masks")
    assert_nested_equal(model.state_dict(), straight_model.state_dict(), "weights")
    assert_nested_equal(trainer.optimizers[0].state_dict(),
                        straight_trainer.optimizers[0].state_dict(), "optimizer")
    # The run identity is the interrupted run's (kept in the checkpoint), not the straight one's.
    resumed_state, straight_state = resumed.state_dict(), straight.state_dict()
    assert resumed_state.pop("run_id") == first_half.state_dict()["run_id"]
    straight_state.pop("run_id")
    assert_nested_equal(resumed_state, straight_state, "callback state")


def test_resume_adopts_the_saved_masks_instead_of_drawing_new_ones(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    _, saved, _ = fit(tmp_path / "a", "ggr", "sgd", [StopAfterEpochs(1), checkpoints],
                      enable_checkpointing=True)
    saved_masks = {name: mask.clone() for name, mask in saved.masks.items()}

    class MasksAtFitStart(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            # Runs after DynamicSparsityCallback.on_fit_start (callback order).
            self.masks = {n: m.clone() for n, m in trainer.callbacks[0].masks.items()}
            params = dict(pl_module.named_parameters())
            self.zero_where_masked = all(
                bool((params[n][~m] == 0).all()) for n, m in self.masks.items())

    spy = MasksAtFitStart()
    fit(tmp_path / "b", "ggr", "sgd", [spy], ckpt_path=tmp_path / "ckpt" / "last.ckpt",
        max_steps=9)
    assert_nested_equal(spy.masks, saved_masks, "masks at fit start")
    assert spy.zero_where_masked


def test_resuming_from_a_checkpoint_without_callback_state_warns(tmp_path):
    pl.seed_everything(0, verbose=False)
    dense = make_trainer(tmp_path / "dense", [ModelCheckpoint(dirpath=tmp_path / "ckpt",
                                                              save_last=True, save_top_k=0)],
                         max_epochs=1, enable_checkpointing=True)
    dense.fit(TinyModule(), tiny_dataloader())
    with pytest.warns(UserWarning, match="holds no DynamicSparsityCallback state"):
        _, sparse, _ = fit(tmp_path / "sparse", "ggr", "sgd",
                           ckpt_path=tmp_path / "ckpt" / "last.ckpt", max_steps=10)
    counts = sparse.engine.active_counts()
    assert sum(counts.values()) == sum(sparse.initial_counts.values())
    # The dense run's momentum was restored after on_fit_start: it must not move masked
    # weights off 0 in the resumed steps (SGD gets no post-step re-zeroing).
    for name, mask in sparse.masks.items():
        assert (sparse.engine.params[name][~mask] == 0).all(), name


def test_resuming_with_other_settings_than_the_checkpoint_warns(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    fit(tmp_path / "a", "ggr", "sgd", [StopAfterEpochs(1), checkpoints],
        enable_checkpointing=True)
    pl.seed_everything(0, verbose=False)
    sparse = DynamicSparsityCallback(method="set", sparsity=0.5, interval="step",
                                     update_interval=3, stop_step=20, log_figures=False)
    trainer = make_trainer(tmp_path / "b", [sparse], max_steps=10)
    with pytest.warns(UserWarning, match=r"method='ggr'.*sparsity=0.8"):
        trainer.fit(TinyModule(), tiny_dataloader(), ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    # The saved topology wins (the masks are the state of the weights), at its own sparsity.
    assert sparse.engine.global_density() == pytest.approx(0.2, abs=0.01)


def test_save_weights_only_checkpoints_warn_that_the_topology_is_lost(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_weights_only=True)
    with pytest.warns(UserWarning, match=r"save_weights_only=True.*loses the sparse topology"):
        fit(tmp_path, "ggr", "sgd", [checkpoints], enable_checkpointing=True, max_steps=6)


def test_a_checkpoint_loaded_for_testing_does_not_leak_into_a_later_fit(tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    fit(tmp_path / "a", "ggr", "sgd", [checkpoints], enable_checkpointing=True)

    class Tested(TinyModule):
        def test_step(self, batch, batch_idx):
            self.log("test/loss", self.loss(batch))

    sparse = DynamicSparsityCallback(method="ggr", sparsity=0.8, interval="step",
                                     update_interval=2, stop_step=7, log_figures=False)
    make_trainer(tmp_path / "b", [sparse]).test(Tested(), tiny_dataloader(),
                                                ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    make_trainer(tmp_path / "b", [sparse], max_steps=8).fit(TinyModule(), tiny_dataloader())
    assert sparse.engine.rewirings == 3  # steps 2, 4, 6 of its own schedule


# ------------------------------------------------------ resuming in real set-ups (issue 10)
def _mid_epoch_resume(root, with_callback: bool, **cb_kwargs):
    """A 3-epoch run saving every 5 steps, then a resume from the mid-epoch step-5 checkpoint
    (a resumable loader). Returns (straight, resumed), each (batches seen, weights)."""

    def run(where, ckpt_path=None):
        torch.manual_seed(0)
        model = MLP()
        callbacks = [sparse(**cb_kwargs)] if with_callback else []
        every_5 = ModelCheckpoint(dirpath=where / "ckpt", filename="{step}",
                                  every_n_train_steps=5, save_top_k=-1)
        trainer = make_trainer(where, [*callbacks, every_5], max_epochs=3,
                               enable_checkpointing=True)
        trainer.fit(model, ResumableLoader(), ckpt_path=ckpt_path)
        return model.seen, {n: p.detach().clone() for n, p in model.named_parameters()}

    straight = run(root / "a")
    return straight, run(root / "b", ckpt_path=root / "a" / "ckpt" / "step=5.ckpt")


@pytest.mark.parametrize("cb_kwargs", [
    pytest.param({}, id="defaults-epoch-stop_fraction"),
    pytest.param({"interval": "step", "update_interval": 3}, id="step-stop_fraction"),
])
def test_mid_epoch_resume_keeps_the_dataloader_position_and_is_bit_identical(tmp_path,
                                                                             cb_kwargs):
    """Reading the training length in on_fit_start set the dataloader up before Lightning
    restored its position: the resumed run retrained the epoch's first batches."""
    # Control: without the callback Lightning resumes the resumable loader exactly.
    (seen, weights), (seen_resumed, weights_resumed) = _mid_epoch_resume(tmp_path / "plain",
                                                                         False)
    assert seen_resumed == seen[5:]
    assert_nested_equal(weights_resumed, weights, "weights without the callback")

    (seen, weights), (seen_resumed, weights_resumed) = _mid_epoch_resume(tmp_path / "dst", True,
                                                                         **cb_kwargs)
    assert seen_resumed == seen[5:]
    assert_nested_equal(weights_resumed, weights, "weights")


def _fit_then_resume(root, first: dict, second: dict):
    """Fit 2 epochs (16 steps) with ``first``, then resume to 4 epochs with ``second``.
    Returns the rewiring steps of the resumed fit and its lightning_ggr warnings."""
    cb = sparse(**first)
    trainer = make_trainer(root, [cb], max_epochs=2)
    trainer.fit(MLP(), setup_loader())
    trainer.save_checkpoint(root / "first.ckpt")
    resumed = sparse(**second)
    log = RewiringLog(resumed)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        make_trainer(root, [resumed, log], max_epochs=4).fit(
            MLP(), setup_loader(), ckpt_path=root / "first.ckpt")
    return log.steps, ggr_warnings(records)


@pytest.mark.parametrize(("second", "expected"), [
    pytest.param({"interval": "step", "update_interval": 4}, [16, 20, 24, 28], id="every-4"),
    pytest.param({"interval": "epoch", "update_interval": 1}, [16, 24], id="step-to-epoch"),
])
def test_resuming_with_another_interval_continues_rewiring_and_says_so(tmp_path, second,
                                                                       expected):
    """The first fit rewires every 2 steps (2, 4, ..., 14). The saved position was a slot in
    the old unit (7), so the resumed schedule waited for slot 8 (step 32 or epoch 8)."""
    first = {"interval": "step", "update_interval": 2, "stop_step": 30}
    steps, said = _fit_then_resume(tmp_path, first, {**second, "stop_step": 30})
    assert steps == expected
    assert [m for m in said if "another schedule than the checkpoint's" in m]


def test_resuming_a_finished_run_for_longer_keeps_its_stop_point(tmp_path):
    """4 epochs (stop 16) resumed for 12: stop_fraction over the new length moved the stop to
    48 and rewiring restarted at steps 32 and 40, its drop fraction back up."""
    cb = sparse()
    trainer = make_trainer(tmp_path, [cb], max_epochs=4)
    trainer.fit(MLP(), setup_loader())
    trainer.save_checkpoint(tmp_path / "done.ckpt")
    assert cb.engine.schedule.stop_step == 16

    resumed = sparse()
    log = RewiringLog(resumed)
    with pytest.warns(UserWarning, match=r"stop point, step 16, is kept.*would be step 48.*"
                                         r"stop_step=48"):
        make_trainer(tmp_path, [resumed, log], max_epochs=12).fit(
            MLP(), setup_loader(), ckpt_path=tmp_path / "done.ckpt")
    assert resumed.engine.schedule.stop_step == 16 and log.steps == []
    # Asked for explicitly, the stop moves.
    moved = sparse(stop_step=48)
    log = RewiringLog(moved)
    make_trainer(tmp_path, [moved, log], max_epochs=12).fit(
        MLP(), setup_loader(), ckpt_path=tmp_path / "done.ckpt")
    assert log.steps == [32, 40]


def test_a_fresh_callback_over_a_trained_sparse_model_warns(tmp_path):
    """load_from_checkpoint + fit without ckpt_path: new random masks kept only about a
    quarter of the trained weights, silently."""
    cb = sparse(interval="step", update_interval=2, stop_step=12)
    trainer = make_trainer(tmp_path, [cb], max_steps=16)
    trainer.fit(MLP(), setup_loader())
    trainer.save_checkpoint(tmp_path / "sparse.ckpt")
    model = MLP.load_from_checkpoint(tmp_path / "sparse.ckpt")
    fresh = sparse(interval="step", update_interval=2, stop_step=12, seed=1)
    with pytest.warns(UserWarning, match=r"already 75% exact zeros.*resume from its checkpoint"):
        make_trainer(tmp_path, [fresh], max_steps=4).fit(model, setup_loader())
    # A dense model does not warn.
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [sparse(interval="step", update_interval=2, stop_step=12)],
                     max_steps=4).fit(MLP(), setup_loader())
    assert not [m for m in ggr_warnings(records) if "exact zeros" in m]


def test_a_checkpoint_of_an_earlier_version_resumes(tmp_path):
    """States saved before the clock, the schedule and the last rewiring's epoch were stored
    (a slot only), and under the class name whatever the selection."""
    first = sparse(include=["net.0.weight"], interval="epoch", stop_step=40)
    trainer = make_trainer(tmp_path, [first], max_epochs=3)
    trainer.fit(MLP(), setup_loader())  # rewires at 8, 16
    checkpoint = tmp_path / "new.ckpt"
    trainer.save_checkpoint(checkpoint)
    saved = torch.load(checkpoint, weights_only=True)
    state = saved["callbacks"].pop(first.state_key)
    assert state["last_slot"] == 2 and state["last_rewiring_epoch"] == 2
    for key in ("optimizer_steps", "schedule", "last_rewiring_epoch", "pending_step"):
        del state[key]
    saved["callbacks"]["DynamicSparsityCallback"] = state
    torch.save(saved, tmp_path / "old.ckpt")

    resumed = sparse(include=["net.0.weight"], interval="epoch", stop_step=40)
    log = RewiringLog(resumed)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [resumed, log], max_epochs=5).fit(
            MLP(), setup_loader(), ckpt_path=tmp_path / "old.ckpt")
    assert not [m for m in ggr_warnings(records) if "holds no DynamicSparsityCallback" in m]
    assert resumed.engine.rewirings == 4
    assert log.steps == [24, 32]  # epochs 3 and 4, after the saved slot 2
