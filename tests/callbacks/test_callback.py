"""DynamicSparsityCallback inside a real Trainer (CPU)."""

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_ggr import DynamicSparsityCallback
from tests.helpers.models import SPARSE_NAMES, TinyModule, make_trainer
from tests.helpers.models import tiny_dataloader as loader

trainer = make_trainer


class Invariants(pl.Callback):
    """After every optimizer step: masked weights and optimizer state are exactly zero."""

    def __init__(self, sparse):
        self.sparse = sparse
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        params = dict(pl_module.named_parameters())
        optimizer = trainer.optimizers[0]
        for name, mask in self.sparse.masks.items():
            assert (params[name][~mask] == 0).all(), name
            for value in optimizer.state[params[name]].values():
                if torch.is_tensor(value) and value.shape == mask.shape:
                    assert (value[~mask] == 0).all(), f"optimizer state of {name}"
        self.checked += 1


@pytest.mark.parametrize("method", ["set", "rigl", "dsr", "ggr"])
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamax", "noisy"])
def test_masks_weights_and_optimizer_state_stay_exact(tmp_path, method, optimizer):
    sparse = DynamicSparsityCallback(method=method, sparsity=0.8, interval="step",
                                     update_interval=3, stop_fraction=0.75, log_figures=False)
    check = Invariants(sparse)
    trainer(tmp_path, [sparse, check]).fit(TinyModule(optimizer), loader())
    module_names = [n for n, _ in TinyModule().named_parameters()]
    assert list(sparse.masks) == list(SPARSE_NAMES)
    assert set(sparse.masks) <= set(module_names)
    assert check.checked == 16
    assert sparse.engine.rewirings == 3  # steps 3, 6, 9 < stop 12
    total = sum(m.numel() for m in sparse.masks.values())
    assert sum(int(m.sum()) for m in sparse.masks.values()) == round(0.2 * total)
    densities = sparse.layer_densities()
    assert densities == {n: int(m.sum()) / m.numel() for n, m in sparse.masks.items()}


def test_epoch_interval_rewires_at_the_start_of_every_epoch_but_the_first(tmp_path):
    sparse = DynamicSparsityCallback(method="ggr", sparsity=0.9, interval="epoch",
                                     stop_fraction=1.0, log_figures=False)
    steps = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if sparse.last_report is not None and sparse.engine.rewirings > len(steps):
                steps.append(trainer.global_step - 1)

    trainer(tmp_path, [sparse, Spy()], max_epochs=4).fit(TinyModule(), loader())
    assert steps == [8, 16, 24]  # 8 steps per epoch


def test_dense_baseline_never_rewires(tmp_path):
    sparse = DynamicSparsityCallback(sparsity=0.0, interval="step", log_figures=False)
    trainer(tmp_path, [sparse]).fit(TinyModule(), loader())
    assert sparse.engine.rewirings == 0
    assert all(m.all() for m in sparse.masks.values())


def test_include_and_exclude_select_parameters(tmp_path):
    sparse = DynamicSparsityCallback(sparsity=0.5, exclude=["net.6.*"], log_figures=False)
    trainer(tmp_path, [sparse], max_epochs=1).fit(TinyModule(), loader())
    assert list(sparse.masks) == ["net.0.weight", "net.2.weight"]
    sparse = DynamicSparsityCallback(sparsity=0.5, include=["net.6.weight"], log_figures=False)
    trainer(tmp_path, [sparse], max_epochs=1).fit(TinyModule(), loader())
    assert list(sparse.masks) == ["net.6.weight"]


@pytest.mark.slow
def test_bf16_mixed_precision_trains_without_nan(tmp_path):
    sparse = DynamicSparsityCallback(method="ggr", sparsity=0.8, interval="step",
                                     update_interval=2, log_figures=False)
    trainer(tmp_path, [sparse, Invariants(sparse)], precision="bf16-mixed").fit(
        TinyModule(), loader())
    assert sparse.engine.rewirings >= 3
    assert all(torch.isfinite(p).all() for p in sparse.engine.params.values())


def read_scalars(log_dir):
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags}


def test_densities_and_rewiring_counts_reach_tensorboard(tmp_path):
    logger = TensorBoardLogger(tmp_path, name="tb")
    sparse = DynamicSparsityCallback(method="ggr", sparsity=0.8, interval="step",
                                     update_interval=4, stop_step=13, drop_fraction=0.2,
                                     log_figures=False)
    trainer(tmp_path, [sparse], logger=logger).fit(TinyModule(), loader())
    scalars = read_scalars(logger.log_dir)
    for name in sparse.masks:
        assert f"density/{name}" in scalars
        assert scalars[f"density/{name}"][-1][1] == pytest.approx(sparse.layer_densities()[name])
    total = sum(m.numel() for m in sparse.masks.values())
    assert scalars["density/global"][0] == (0, pytest.approx(round(0.2 * total) / total))
    removed = scalars["rewiring/removed"]
    assert [step for step, _ in removed] == [4, 8, 12]
    fractions = [value for _, value in scalars["rewiring/drop_fraction"]]
    assert fractions == pytest.approx([0.1 * (1 + math.cos(math.pi * s / 13)) for s in (4, 8, 12)])
    assert scalars["rewiring/grown"] == removed
    assert "rewiring/moved" in scalars


def test_figures_histograms_and_summary_come_out_of_a_real_run(tmp_path):
    from lightning_ggr.callbacks.summary import SUMMARY_FILENAME, read_run_summary

    logger = TensorBoardLogger(tmp_path, name="tb")
    sparse = DynamicSparsityCallback(method="ggr", sparsity=0.8, interval="step",
                                     update_interval=2, mask_layers=["net.0.weight"])
    trainer(tmp_path, [sparse], logger=logger, max_epochs=1).fit(TinyModule(), loader())
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0, "histograms": 0,
                                                             "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert "sparsity/density_per_layer" in tags["images"]
    assert "masks/net.0.weight" in tags["images"]
    assert {f"weights/{name}" for name in sparse.masks} <= set(tags["histograms"])
    assert {f"moved/{name}" for name in sparse.masks} <= set(tags["scalars"])
    summary = read_run_summary(f"{logger.log_dir}/{SUMMARY_FILENAME}")
    assert summary["method"] == "ggr" and summary["sparsity"] == 0.8
    assert summary["model"] == "TinyModule"
    assert summary["layers"]["net.6.weight"]["active"] == int(sparse.masks["net.6.weight"].sum())
    total = sum(m.numel() for m in sparse.masks.values())
    assert summary["global_density"] == pytest.approx(round(0.2 * total) / total)


@pytest.mark.parametrize("interval", ["epoch", "step"])
def test_views_are_drawn_once_per_step_when_a_rewiring_follows_an_epoch_end(tmp_path, interval):
    """Epochs of 8 steps; a rewiring at step 8 (the first step of epoch 1) is logged at the
    global step where epoch 0 ended: the epoch's images were drawn there too (issue 17). Now
    each step has one set: train start, the rewiring at 8 (with its changes, in place of epoch
    0's end), the ends of epochs 1 and 2 (steps 16 and 24, the last at train end)."""
    logger = TensorBoardLogger(tmp_path, name="tb")
    drawn = []
    logger.experiment.add_image = lambda tag, image, step=None, **kwargs: drawn.append(
        (tag, step))
    moved = []
    add_scalar = logger.experiment.add_scalar
    logger.experiment.add_scalar = lambda tag, value, step=None, **kwargs: (
        moved.append(step) if tag.startswith("moved/") else add_scalar(tag, value, step))
    sparse = DynamicSparsityCallback(sparsity=0.8, interval=interval,
                                     update_interval=1 if interval == "epoch" else 8,
                                     stop_step=9, mask_layers=["net.0.weight"])
    trainer(tmp_path, [sparse], logger=logger, max_epochs=3).fit(TinyModule(), loader())
    steps = [0, 8, 16, 24]
    assert drawn == [(tag, step) for step in steps
                     for tag in ("sparsity/density_per_layer", "masks/net.0.weight")]
    assert sorted(set(moved)) == [8]  # the views at step 8 are the rewiring's


def test_unknown_mask_layer_fails_before_training(tmp_path):
    sparse = DynamicSparsityCallback(sparsity=0.5, mask_layers=["nope.*"])
    with pytest.raises(ValueError, match="mask_layers"):
        trainer(tmp_path, [sparse], max_epochs=1).fit(TinyModule(), loader())


def test_fitting_twice_with_one_callback_warns(tmp_path):
    sparse = DynamicSparsityCallback(sparsity=0.5, log_figures=False)
    trainer(tmp_path, [sparse], max_epochs=1).fit(TinyModule(), loader())
    with pytest.warns(UserWarning, match="already trained a model"):
        trainer(tmp_path, [sparse], max_epochs=1).fit(TinyModule(), loader())


class WithUnusedLayer(TinyModule):
    """A sparse layer that never sees a gradient (an auxiliary head left unused)."""

    def __init__(self):
        super().__init__()
        self.aux = torch.nn.Linear(24, 4)


@pytest.mark.parametrize("method", ["ggr", "rigl"])
def test_a_layer_without_gradient_does_not_crash_gradient_growth(tmp_path, method):
    sparse = DynamicSparsityCallback(method=method, sparsity=0.8, interval="step",
                                     update_interval=2, log_figures=False)
    trainer(tmp_path, [sparse, Invariants(sparse)], max_epochs=1).fit(WithUnusedLayer(),
                                                                       loader())
    assert sparse.engine.rewirings == 1
    assert "aux.weight" in sparse.masks


def test_init_value_that_underflows_the_parameter_dtype_warns(tmp_path):
    sparse = DynamicSparsityCallback(sparsity=0.5, log_figures=False)
    with pytest.warns(UserWarning, match="init_value=1e-10 is 0 in torch.float16"):
        trainer(tmp_path, [sparse], max_epochs=1, precision="16-true").fit(TinyModule(),
                                                                          loader())


def test_test_after_fit_keeps_the_fit_metrics_in_the_summary(tmp_path):
    from lightning_ggr.callbacks.summary import SUMMARY_FILENAME, read_run_summary

    class Evaluated(TinyModule):
        def validation_step(self, batch, batch_idx):
            self.log("val/loss", self.loss(batch))

        def test_step(self, batch, batch_idx):
            self.log("test/loss", self.loss(batch))

    logger = TensorBoardLogger(tmp_path, name="tb")
    sparse = DynamicSparsityCallback(sparsity=0.5, log_figures=False)
    fit_trainer = trainer(tmp_path, [sparse], logger=logger, max_epochs=1)
    module = Evaluated()
    fit_trainer.fit(module, loader(), loader())
    fit_trainer.test(module, loader())
    metrics = read_run_summary(f"{logger.log_dir}/{SUMMARY_FILENAME}")["metrics"]
    assert {"val/loss", "test/loss"} <= set(metrics)


def test_density_reaches_the_progress_bar_without_a_log_call_every_step(tmp_path):
    """Logged only when it changes (train start, rewirings), as a CPU tensor: a float would be
    copied to the module's device every step, and read back by the progress bar."""
    sparse = DynamicSparsityCallback(method="ggr", sparsity=0.8, interval="step",
                                     update_interval=4, stop_step=9, log_figures=False)
    logged = []

    class Spy(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            original = pl_module.log

            def log(name, value, *args, **kwargs):
                if name == "density":
                    logged.append(value)
                return original(name, value, *args, **kwargs)

            pl_module.log = log

    fit = trainer(tmp_path, [Spy(), sparse], max_epochs=2)
    fit.fit(TinyModule(), loader())
    assert sparse.engine.rewirings == 2  # steps 4 and 8 of 16
    assert 1 <= len(logged) <= 3  # the start, and a rewiring only if the density moved
    assert all(torch.is_tensor(v) and v.device.type == "cpu" for v in logged)
    assert fit.progress_bar_metrics["density"] == pytest.approx(sparse.engine.global_density())


def test_an_eps_that_vanishes_in_float16_warns_and_masked_weights_stay_zero(tmp_path):
    """Regression: under ``precision="16-true"`` Adam's default eps=1e-8 is 0, so its step
    turned every masked weight into NaN (0 / 0), and the network after it. The callback
    now re-zeroes masked weights after every step and warns about eps."""
    class Adam(TinyModule):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01)

    sparse = DynamicSparsityCallback(sparsity=0.5, log_figures=False, init_value=1e-3)
    with pytest.warns(UserWarning, match=r"eps=1e-08 is 0 in torch.float16"):
        trainer(tmp_path, [sparse], max_epochs=1, precision="16-true").fit(Adam(), loader())
    for name, param in sparse.engine.params.items():
        assert (param.detach()[~sparse.masks[name]] == 0).all(), name
