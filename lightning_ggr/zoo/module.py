"""`ImageClassifier`: a LightningModule for image classification with the paper's recipe."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_ggr.callbacks.training_length import optimizer_steps_per_epoch
from lightning_ggr.zoo.models import MODEL_NAMES, ModelName, build_model


class WarmupMultiStep:
    """Learning-rate factor per optimizer step: linear warm-up, then step decay at epochs.

    ``factor(s) = min(1, (s + 1) / W) * gamma ** #{m in milestones : m <= s // E}`` with
    ``E`` optimizer steps per epoch and ``W = warmup_epochs * E`` warm-up steps: the first
    step uses ``lr / W``, step ``W - 1`` reaches ``lr``, and the rate is multiplied by
    ``gamma`` when epoch ``m`` (0-based) begins, as ``MultiStepLR`` stepped per epoch does.
    A picklable callable for ``torch.optim.lr_scheduler.LambdaLR``.

    The epoch length may be set later (``steps_per_epoch=None``, then
    :meth:`set_steps_per_epoch`): it is known only once the train dataloader is set up, and
    setting it up in ``configure_optimizers`` breaks a mid-epoch resume. Until then ``E = 1``.

    Args:
        steps_per_epoch: optimizer steps per epoch, ``>= 1``, or ``None`` (set later).
        warmup_epochs: epochs of linear warm-up (0: none).
        milestones: epochs at which the rate is multiplied by ``gamma``.
        gamma: the decay factor.
    """

    def __init__(self, steps_per_epoch: int | None, warmup_epochs: int,
                 milestones: Sequence[int], gamma: float) -> None:
        self.warmup_epochs = int(warmup_epochs)
        self.milestones = [int(m) for m in milestones]
        self.gamma = float(gamma)
        self.set_steps_per_epoch(1 if steps_per_epoch is None else steps_per_epoch)

    def set_steps_per_epoch(self, steps_per_epoch: int) -> None:
        """Set the epoch length ``E`` (optimizer steps, ``>= 1``)."""
        if steps_per_epoch < 1:
            raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch!r}")
        self.steps_per_epoch = int(steps_per_epoch)
        self.warmup_steps = self.warmup_epochs * self.steps_per_epoch

    def __call__(self, step: int) -> float:
        warmup = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        epoch = step // self.steps_per_epoch
        return warmup * self.gamma ** sum(m <= epoch for m in self.milestones)


class ImageClassifier(pl.LightningModule):
    """Image classifier trained with SGD and the GGR paper's learning-rate recipe.

    Cross-entropy loss; top-1 and top-5 accuracy (torchmetrics). SGD with ``lr`` warmed up
    linearly from 0 over the first ``warmup_epochs`` (per step), then multiplied by
    ``lr_decay`` at each of the ``milestones`` epochs. Weight decay applies to every
    parameter. Defaults are the paper's CIFAR-100 recipe (100 epochs; Tiny-ImageNet:
    200 epochs, milestones 60/120/160); momentum 0.9 and weight decay 5e-4 are the usual
    values for these models (the paper does not state them).

    Logs ``train/loss``, ``train/acc``, ``train/lr``, ``val/loss``, ``val/acc``,
    ``val/acc_top5``, ``test/loss``, ``test/acc``, ``test/acc_top5``.

    Args:
        model: a zoo network by name (``"resnet18"``, ``"mobilenet_v2"``, ``"vgg16"``,
            ``"small_cnn"``; see ``lightning_ggr.zoo.build_model``) or any ``nn.Module``
            that maps images to ``num_classes`` logits.
        num_classes: number of classes (CIFAR-100: 100, Tiny-ImageNet: 200, digits: 10).
        input_size: image height and width for a zoo network: 32 or 64 (``small_cnn``: any);
            must equal the datamodule's ``image_size``. Ignored for an ``nn.Module``.
        in_channels: image channels for a zoo network (ignored for an ``nn.Module``).
        lr: peak learning rate.
        momentum: SGD momentum.
        weight_decay: L2 penalty (SGD's ``weight_decay``).
        nesterov: use Nesterov momentum.
        warmup_epochs: epochs of linear warm-up from 0 to ``lr``, per step (0: none).
        milestones: epochs (0-based, increasing) at which the rate is multiplied by
            ``lr_decay``.
        lr_decay: multiplicative decay at each milestone.
    """

    def __init__(
        self,
        model: ModelName | nn.Module = "resnet18",
        num_classes: int = 100,
        input_size: int = 32,
        in_channels: int = 3,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
        warmup_epochs: int = 1,
        milestones: Sequence[int] = (30, 60, 80),
        lr_decay: float = 0.2,
    ) -> None:
        super().__init__()
        _check_hyperparameters(num_classes, lr, momentum, weight_decay, warmup_epochs,
                               milestones, lr_decay)
        if isinstance(model, nn.Module):
            # The network itself is saved in the checkpoint's state_dict, not as a hparam.
            self.save_hyperparameters(ignore=["model"])
            self.model_name: str = type(model).__name__
            self.model = model
        elif isinstance(model, str):
            self.save_hyperparameters()
            self.model_name = model
            self.model = build_model(model, num_classes, input_size, in_channels)
            # One input, for Lightning's model summary and the run summary's FLOP count.
            self.example_input_array = torch.zeros(1, in_channels, input_size, input_size)
        else:
            raise ValueError(
                f"model must be one of {', '.join(map(repr, MODEL_NAMES))} or an nn.Module; "
                f"got {model!r}"
            )
        self.num_classes = num_classes
        self.input_size = input_size
        #: Name of the datamodule's dataset (its ``dataset_name``), known after ``setup``.
        self.dataset_name: str | None = None
        top5 = min(5, num_classes)
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc_top5 = MulticlassAccuracy(num_classes, top_k=top5, average="micro")

    def setup(self, stage: str) -> None:
        """Read the dataset name and check the datamodule's classes and image size match."""
        datamodule = self.trainer.datamodule
        if datamodule is None:
            return
        self.dataset_name = getattr(datamodule, "dataset_name", None)
        data_classes = getattr(datamodule, "num_classes", None)
        if data_classes is not None and data_classes != self.num_classes:
            raise ValueError(
                f"num_classes of the model ({self.num_classes}) differs from the datamodule's "
                f"{type(datamodule).__name__}.num_classes ({data_classes}); set the model's "
                f"num_classes to {data_classes}"
            )
        data_size = getattr(datamodule, "image_size", None)
        if (data_size is not None and isinstance(self.hparams.get("model"), str)
                and data_size != self.input_size):
            raise ValueError(
                f"input_size of the model ({self.input_size}) differs from the datamodule's "
                f"{type(datamodule).__name__}.image_size ({data_size}); make them equal"
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch
        logits = self(images)
        loss = F.cross_entropy(logits, targets)
        self.train_acc(logits, targets)
        # On the progress bar only when there is one: Lightning turns progress-bar values
        # into Python numbers after every step, which makes the host wait for the GPU.
        self.log("train/loss", loss, prog_bar=self.trainer.progress_bar_callback is not None)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        # A tensor filled on the device: logging the Python float would copy it to the GPU
        # with a blocking copy (a synchronisation) at every step.
        self.log("train/lr", torch.full((), self.trainer.optimizers[0].param_groups[0]["lr"],
                                        device=loss.device))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc, self.val_acc_top5)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc, self.test_acc_top5)

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, acc: MulticlassAccuracy,
                  acc_top5: MulticlassAccuracy) -> None:
        images, targets = batch
        logits = self(images)
        acc(logits, targets)
        acc_top5(logits, targets)
        self.log(f"{stage}/loss", F.cross_entropy(logits, targets), sync_dist=True)
        self.log(f"{stage}/acc", acc, prog_bar=True)
        self.log(f"{stage}/acc_top5", acc_top5)

    def configure_optimizers(self) -> dict[str, Any]:
        """SGD and the per-step warm-up / multi-step schedule (see ``WarmupMultiStep``).

        The schedule's epoch length is set in :meth:`on_train_start`: reading it here would
        set up the train dataloader before Lightning restores a checkpoint's loop state, and a
        resumable dataloader would restart its epoch from the first batch.
        """
        hp = self.hparams
        optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum,
                                    weight_decay=hp.weight_decay, nesterov=hp.nesterov)
        schedule = WarmupMultiStep(None, hp.warmup_epochs, hp.milestones, hp.lr_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self._lr_schedule = (scheduler, schedule)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}

    def on_train_start(self) -> None:
        """Set the schedule's epoch length, now known, and the rate of the current step."""
        scheduler, schedule = getattr(self, "_lr_schedule", (None, None))
        if not any(config.scheduler is scheduler for config in self.trainer.lr_scheduler_configs):
            return  # not ours (a learning-rate search swapped in its own)
        schedule.set_steps_per_epoch(self._steps_per_epoch())
        # What LambdaLR sets at each step (the same product: a resumed rate is unchanged).
        for group, base in zip(scheduler.optimizer.param_groups, scheduler.base_lrs,
                               strict=True):
            group["lr"] = base * schedule(scheduler.last_epoch)

    def _steps_per_epoch(self) -> int:
        steps = optimizer_steps_per_epoch(self.trainer)  # the fit loop has set up the data
        if not math.isfinite(steps):
            if self.hparams.warmup_epochs == 0 and not self.hparams.milestones:
                return 1  # the schedule is constant: epoch length does not matter
            raise ValueError(
                "ImageClassifier schedules the learning rate by epoch and needs a train "
                "dataloader with a length (or warmup_epochs=0 and milestones=[]); got one "
                "without __len__"
            )
        return max(1, int(steps))


def _check_hyperparameters(num_classes: int, lr: float, momentum: float, weight_decay: float,
                           warmup_epochs: int, milestones: Sequence[int],
                           lr_decay: float) -> None:
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if not 0 <= momentum < 1:
        raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs!r}")
    steps = list(milestones)
    if any(m < 0 for m in steps) or any(b <= a for a, b in itertools.pairwise(steps)):
        raise ValueError(
            f"milestones must be non-negative and strictly increasing, got {list(milestones)!r}"
        )
    if not 0 < lr_decay <= 1:
        raise ValueError(f"lr_decay must be in (0, 1], got {lr_decay!r}")
