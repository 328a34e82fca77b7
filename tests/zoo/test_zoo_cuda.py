"""The zoo's training step on a GPU (skipped without one): with the images on the device
(``CIFAR100DataModule(on_device=True)``), ``ImageClassifier`` and the callback, a training
step that does not rewire makes the host wait for the GPU nowhere, so the host can queue the
next steps while the GPU works."""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lightning_ggr import DynamicSparsityCallback
from lightning_ggr.sparse.syncs import is_sync_warning
from lightning_ggr.zoo.data import CIFAR100DataModule
from lightning_ggr.zoo.module import ImageClassifier

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class CountSyncs(Callback):
    """Synchronising CUDA calls from the start of batch 2 to the start of batch 6 (four
    whole steps, Lightning's own work between the hooks included)."""

    def __init__(self) -> None:
        self.syncs: int | None = None
        self._caught = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 2:
            torch.cuda.synchronize()
            self._caught = warnings.catch_warnings(record=True)
            self._log = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif batch_idx == 6:
            torch.cuda.set_sync_debug_mode("default")
            self._caught.__exit__(None, None, None)
            self.syncs = sum(1 for w in self._log if is_sync_warning(w.message))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_training_steps_on_device_data_never_synchronise(precision):
    pl.seed_everything(0, verbose=False)
    count = CountSyncs()
    trainer = pl.Trainer(
        max_epochs=1, limit_train_batches=8, limit_val_batches=0, accelerator="cuda",
        devices=1, precision=precision, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[DynamicSparsityCallback(method="ggr", sparsity=0.9, interval="epoch"),
                   count])
    module = ImageClassifier("resnet18", num_classes=100, input_size=32)
    data = CIFAR100DataModule(fake_data=True, batch_size=32, on_device=True)
    trainer.fit(module, datamodule=data)
    assert data.train_dataset.images.is_cuda
    assert count.syncs == 0
