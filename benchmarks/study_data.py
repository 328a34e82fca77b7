"""In-memory CIFAR-100 subset for the CPU-scale study (benchmarks only, not the package).

Reads ``cifar100_subset.npz`` (12k real CIFAR-100 images, see ``shared/data/README.md``)
into tensors once and serves them with the usual CIFAR augmentation (4-pixel padded
random crop, horizontal flip) done on whole batches of tensors: no worker processes,
no PIL, so one training run costs one CPU thread. With ``device="cuda"`` the images stay
on the GPU and the batches are augmented there (the ResNet-18 study).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    TensorDataset,
)

from lightning_ggr.zoo.data import device_indices, random_crop_flip

#: Per-channel mean/std of CIFAR-100's training set (the usual constants).
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def _to_tensor(x: np.ndarray) -> Tensor:
    t = torch.from_numpy(x).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(CIFAR100_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR100_STD).view(1, 3, 1, 1)
    return ((t - mean) / std).contiguous()


#: The package's batch augmentation (one home): 4-pixel padded random crop and flip. Here it
#: runs on normalized images, so the padding is 0 after normalization (the mean colour), not
#: black as in torchvision's transform; the committed studies ran so, and pairing new seeds
#: with them needs it unchanged.
augment_batch = random_crop_flip


class _OnDevice(TensorDataset):
    """``TensorDataset`` whose batch indices (a sampler's list) reach the device without a
    host-device synchronisation (``device_indices``): the same gather, one sync less per
    batch on a GPU."""

    def __getitem__(self, index):
        if isinstance(index, list):
            index = device_indices(index, self.tensors[0].device)
        return tuple(tensor[index] for tensor in self.tensors)


class _Augment:
    """``collate_fn`` for a loader that yields whole batches (``batch_size=None``)."""

    def __init__(self, seed: int, device: str | torch.device = "cpu") -> None:
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = batch
        return augment_batch(x, self.generator), y


class CifarSubsetDataModule(pl.LightningDataModule):
    """The 12k-image CIFAR-100 subset, held in memory.

    Args:
        path: the ``.npz`` file.
        val_size: images held out of the 10,000 training images for validation
            (stratified, fixed seed 0): the learning rate is tuned on them, never on test.
        batch_size: training batch size.
        seed: seed of the shuffling and augmentation streams.
        device: where the images live and batches are augmented (``"cuda"``: no host to
            device copies during training).
        eval_batch_size: validation and test batch size.
    """

    dataset_name = "cifar100_subset"

    def __init__(self, path: str | Path, val_size: int = 1000, batch_size: int = 128,
                 seed: int = 0, device: str | torch.device = "cpu",
                 eval_batch_size: int = 500) -> None:
        super().__init__()
        self.eval_batch_size = eval_batch_size
        self.device = torch.device(device)
        self.path = Path(path)
        self.val_size = val_size
        self.batch_size = batch_size
        self.seed = seed
        self.num_classes = 100
        self._loaded = False

    def setup(self, stage: str | None = None) -> None:
        if self._loaded:
            return
        data = np.load(self.path)
        x, y = _to_tensor(data["x_train"]), torch.from_numpy(data["y_train"]).long()
        rng = np.random.default_rng(0)
        per_class = self.val_size // self.num_classes
        val_idx = np.concatenate([
            rng.permutation(np.flatnonzero(data["y_train"] == c))[:per_class]
            for c in range(self.num_classes)
        ])
        train_mask = np.ones(len(y), dtype=bool)
        train_mask[val_idx] = False
        dev = self.device
        self.train_set = _OnDevice(x[train_mask].to(dev), y[train_mask].to(dev))
        self.val_set = _OnDevice(x[val_idx].to(dev), y[val_idx].to(dev))
        self.test_set = _OnDevice(_to_tensor(data["x_test"]).to(dev),
                                  torch.from_numpy(data["y_test"]).long().to(dev))
        self._loaded = True

    def train_dataloader(self) -> DataLoader:
        # The sampler yields index lists; TensorDataset slices whole batches at once.
        sampler = BatchSampler(
            RandomSampler(self.train_set, generator=torch.Generator().manual_seed(self.seed)),
            batch_size=self.batch_size, drop_last=True)
        return DataLoader(self.train_set, sampler=sampler, batch_size=None, num_workers=0,
                          collate_fn=_Augment(self.seed + 1, self.device))

    def _eval_loader(self, dataset: TensorDataset) -> DataLoader:
        # Whole batches sliced at once (on the GPU, one gather per batch, not one per image).
        sampler = BatchSampler(SequentialSampler(dataset), batch_size=self.eval_batch_size,
                               drop_last=False)
        return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)
