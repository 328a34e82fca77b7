"""Checkpoint and resume: stopping half-way and resuming is bit-identical to a straight run."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ggr import DynamicSparsityCallback
from tests.helpers import SPARSE_NAMES, TinyModule, make_trainer, tiny_dataloader

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
    assert_nested_equal(resumed.state_dict(), straight.state_dict(), "callback state")


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
