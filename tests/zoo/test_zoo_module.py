"""ImageClassifier: the paper's LR recipe, logged keys, model by name or module, checks."""

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_ggr.zoo import DigitsDataModule, ImageClassifier, SmallCNN, WarmupMultiStep

pytestmark = pytest.mark.usefixtures("single_thread")


def trainer(tmp_path, **kwargs) -> pl.Trainer:
    options = {"default_root_dir": tmp_path, "accelerator": "cpu", "devices": 1,
               "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
               "enable_model_summary": False}
    return pl.Trainer(**{**options, **kwargs})


def digits_classifier(**kwargs) -> ImageClassifier:
    return ImageClassifier(**{"model": "small_cnn", "num_classes": 10, "input_size": 8,
                              "in_channels": 1, **kwargs})


def test_warmup_then_step_decay():
    schedule = WarmupMultiStep(steps_per_epoch=4, warmup_epochs=1, milestones=[2, 3], gamma=0.2)
    factors = [schedule(step) for step in range(16)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # linear warm-up, per step
    assert factors[4:8] == pytest.approx([1.0] * 4)
    assert factors[8:12] == pytest.approx([0.2] * 4)  # epoch 2 starts at step 8
    assert factors[12:] == pytest.approx([0.04] * 4)
    assert WarmupMultiStep(10, 0, [], 0.2)(0) == 1.0  # no warm-up


class RecordLR(Callback):
    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_learning_rate_per_step_in_training(tmp_path):
    record = RecordLR()
    module = digits_classifier(lr=0.3, warmup_epochs=1, milestones=[2], lr_decay=0.5)
    trainer(tmp_path, max_epochs=3, limit_train_batches=3, limit_val_batches=0,
            callbacks=[record]).fit(module, DigitsDataModule(batch_size=16))
    expected = [0.1, 0.2, 0.3, 0.3, 0.3, 0.3, 0.15, 0.15, 0.15]
    assert record.lrs == pytest.approx(expected)
    optimizer = module.optimizers().optimizer
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["momentum"], group["weight_decay"], group["nesterov"]) == (0.9, 5e-4, False)


def test_steps_per_epoch_counts_accumulation(tmp_path):
    record = RecordLR()
    module = digits_classifier(lr=0.4, warmup_epochs=1, milestones=[])
    # 4 batches, accumulating 2: 2 optimizer steps per epoch, so warm-up is 2 steps long.
    trainer(tmp_path, max_epochs=1, limit_train_batches=4, limit_val_batches=0,
            accumulate_grad_batches=2, callbacks=[record]).fit(module,
                                                               DigitsDataModule(batch_size=8))
    assert record.lrs == pytest.approx([0.2, 0.2, 0.4, 0.4])


class CountHostReads(Callback):
    """Counts the tensor-to-Python conversions (``aten::_local_scalar_dense``: on a GPU each
    one waits for the device) from the start of batch 2 to the start of batch 6."""

    def __init__(self):
        self.reads = None
        self._profile = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 2:
            self._profile = torch.profiler.profile(activities=[
                torch.profiler.ProfilerActivity.CPU])
            self._profile.__enter__()
        elif batch_idx == 6:
            self._profile.__exit__(None, None, None)
            self.reads = sum(e.name == "aten::_local_scalar_dense"
                             for e in self._profile.events())


class RecordLoggedLR(Callback):
    def __init__(self):
        self.logged, self.set = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.set.append(trainer.optimizers[0].param_groups[0]["lr"])  # the step's rate

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logged.append(trainer.callback_metrics["train/lr"])  # read after the fit


@pytest.mark.parametrize("progress_bar", [False, True])
def test_training_steps_read_nothing_back_without_a_progress_bar(tmp_path, progress_bar):
    """Without a progress bar a training step converts no tensor to a Python number (each
    conversion is a GPU synchronisation); with one, the loss is on it (and is read)."""
    count, lrs = CountHostReads(), RecordLoggedLR()
    fit = trainer(tmp_path, max_epochs=1, limit_train_batches=7, limit_val_batches=0,
                  enable_progress_bar=progress_bar, callbacks=[count, lrs])
    fit.fit(digits_classifier(milestones=[]), DigitsDataModule(batch_size=16))
    assert (count.reads > 0) if progress_bar else (count.reads == 0)
    assert ("train/loss" in fit.progress_bar_metrics) is progress_bar
    # train/lr is logged as a float32 tensor on the model's device, the rate of the step.
    assert [(v.dtype, v.device.type, float(v)) for v in lrs.logged] == [
        (torch.float32, "cpu", pytest.approx(lr)) for lr in lrs.set]


def test_logs_the_documented_keys_and_learns(tmp_path):
    module = digits_classifier(lr=0.05, milestones=[])
    fit = trainer(tmp_path, max_epochs=2)
    data = DigitsDataModule(batch_size=64)
    fit.fit(module, data)
    keys = set(fit.callback_metrics)
    assert {"train/loss", "train/acc", "train/lr", "val/loss", "val/acc",
            "val/acc_top5"} <= keys
    assert fit.callback_metrics["val/acc"] > 0.8  # small CNN on digits, 2 epochs
    assert fit.callback_metrics["val/acc_top5"] >= fit.callback_metrics["val/acc"]
    fit.test(module, data, verbose=False)
    assert {"test/loss", "test/acc", "test/acc_top5"} <= set(fit.callback_metrics)
    assert module.dataset_name == "digits"


def test_hyperparameters_and_checkpoint_round_trip(tmp_path):
    module = digits_classifier(lr=0.2, milestones=[5, 7])
    assert module.model_name == "small_cnn"
    assert isinstance(module.model, SmallCNN)
    assert module.hparams.model == "small_cnn" and module.hparams.lr == 0.2
    assert module.example_input_array.shape == (1, 1, 8, 8)
    fit = trainer(tmp_path, max_steps=1, limit_val_batches=0)
    fit.fit(module, DigitsDataModule(batch_size=8))
    path = tmp_path / "model.ckpt"
    fit.save_checkpoint(path)
    restored = ImageClassifier.load_from_checkpoint(path)
    assert restored.hparams.milestones == [5, 7]
    for key, value in module.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value)


def test_accepts_any_module():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    module = ImageClassifier(net, num_classes=10)
    assert module.model is net
    assert module.model_name == "Sequential"
    assert "model" not in module.hparams  # the module is in the state_dict, not a hparam
    assert module(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_five_classes_or_fewer_use_top_k_equal_to_classes():
    module = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), num_classes=3)
    assert module.val_acc_top5.top_k == 3


def test_mismatched_datamodule_is_refused(tmp_path):
    module = ImageClassifier("small_cnn", num_classes=100, in_channels=1)
    with pytest.raises(ValueError, match=r"num_classes of the model \(100\) differs from the "
                                         r"datamodule's DigitsDataModule.num_classes \(10\)"):
        trainer(tmp_path, fast_dev_run=True).fit(module, DigitsDataModule())


def test_mismatched_image_size_is_refused(tmp_path):
    module = ImageClassifier("resnet18", num_classes=10, input_size=64, in_channels=3)
    with pytest.raises(ValueError, match=r"input_size of the model \(64\) differs.*\(32\)"):
        trainer(tmp_path, fast_dev_run=True).fit(module, DigitsDataModule(image_size=32,
                                                                          channels=3))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": "resnet34"}, "model must be one of 'resnet18'.*got 'resnet34'"),
        ({"model": 3}, "model must be one of .* or an nn.Module; got 3"),
        ({"num_classes": 1}, "num_classes must be >= 2, got 1"),
        ({"lr": 0.0}, r"lr must be > 0, got 0.0"),
        ({"momentum": 1.0}, r"momentum must be in \[0, 1\), got 1.0"),
        ({"weight_decay": -1e-4}, "weight_decay must be >= 0, got -0.0001"),
        ({"warmup_epochs": -1}, "warmup_epochs must be >= 0, got -1"),
        ({"milestones": [60, 30]}, r"milestones must be .* increasing, got \[60, 30\]"),
        ({"lr_decay": 0.0}, r"lr_decay must be in \(0, 1\], got 0.0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageClassifier(**{"model": "small_cnn", "num_classes": 10, **kwargs})


def test_mid_epoch_resume_is_bit_identical(tmp_path):
    """configure_optimizers once read the epoch length by setting up the train dataloader,
    before Lightning restored a resumable loader's position: a run resumed mid-epoch retrained
    the epoch's first batches (the trap of Lightning's own OneCycleLR example)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from tests.helpers.setups import ResumableLoader

    generator = torch.Generator().manual_seed(0)
    images = (torch.randn(32, 1, 8, 8, generator=generator),
              torch.randint(0, 10, (32,), generator=generator))

    class Seen(Callback):
        def __init__(self):
            self.sums = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.sums.append(round(float(batch[0].sum()), 4))

    def run(where, ckpt_path=None):
        torch.manual_seed(0)
        module = digits_classifier(lr=0.2, warmup_epochs=1, milestones=[1])
        seen = Seen()
        every_5 = ModelCheckpoint(dirpath=where, filename="{step}", every_n_train_steps=5,
                                  save_top_k=-1)
        trainer(tmp_path, max_epochs=2, callbacks=[seen, every_5], enable_checkpointing=True,
                limit_val_batches=0).fit(module, ResumableLoader(batch_size=4, tensors=images),
                                         ckpt_path=ckpt_path)
        return seen.sums, module.state_dict(), module.optimizers().param_groups[0]["lr"]

    seen, weights, lr = run(tmp_path / "a")
    seen_resumed, weights_resumed, lr_resumed = run(tmp_path / "b", tmp_path / "a" / "step=5.ckpt")
    assert seen_resumed == seen[5:]
    assert lr_resumed == lr
    for key, value in weights.items():
        assert torch.equal(weights_resumed[key], value), key


def test_a_stream_without_length_is_refused_before_training_unless_the_rate_is_constant(
        tmp_path):
    from torch.utils.data import DataLoader, IterableDataset

    class Images(IterableDataset):
        def __iter__(self):
            generator = torch.Generator().manual_seed(0)
            for _ in range(8):
                yield torch.randn(1, 8, 8, generator=generator), torch.tensor(3)

    module = digits_classifier(warmup_epochs=1)
    with pytest.raises(ValueError, match=r"needs a train dataloader with a length"):
        trainer(tmp_path, max_steps=2).fit(module, DataLoader(Images(), batch_size=4))
    constant = digits_classifier(lr=0.3, warmup_epochs=0, milestones=[])
    trainer(tmp_path, max_steps=2).fit(constant, DataLoader(Images(), batch_size=4))
    assert constant.optimizers().param_groups[0]["lr"] == pytest.approx(0.3)
