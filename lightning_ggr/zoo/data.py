"""Data modules of the benchmark: CIFAR-100, Tiny-ImageNet-200 and the 8x8 digits.

CIFAR-100 and Tiny-ImageNet read the real datasets with torchvision (``CIFAR100``,
``ImageFolder``) and download them on request; ``fake_data=True`` replaces both splits by
``torchvision.datasets.FakeData`` of the right image size and class count (no files read
or written), for smoke runs. The digits ship with the package (``digits.npz``, 45 KB: the
set scikit-learn bundles; no download).

Splits: ``val_split`` holds out that fraction of the training set (seeded, evaluated with
the test-time transform) for validation; with ``val_split=0`` (the default) validation
runs on the test split, as the paper reports test accuracy at the end of training.
Tiny-ImageNet's test split has no labels: its labelled validation set is the test split.

``CIFAR100DataModule(on_device=True)`` holds the images on the training device and crops,
flips and normalizes whole batches there (:func:`random_crop_flip`): no loader worker
processes, no per-image Python, no host-to-device image copies.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision.datasets import CIFAR100, FakeData, ImageFolder
from torchvision.datasets.utils import download_and_extract_archive
from torchvision.transforms import v2

__all__ = [
    "CIFAR100DataModule",
    "DatasetUnavailableError",
    "DigitsDataModule",
    "TinyImageNetDataModule",
    "device_indices",
    "random_crop_flip",
    "relayout_tiny_imagenet_val",
]

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
TINY_IMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINY_IMAGENET_STD = (0.2770, 0.2691, 0.2821)


class DatasetUnavailableError(RuntimeError):
    """A dataset is missing or corrupt and cannot be downloaded; the message says where and how."""


def random_crop_flip(images: Tensor, generator: torch.Generator, padding: int = 4) -> Tensor:
    """Random crop with ``padding`` zero padding and random horizontal flip, per image, of a
    whole batch ``(N, C, H, W)`` at once (one gather, no Python loop over images).

    The distribution of torchvision's ``RandomCrop(H, padding)`` + ``RandomHorizontalFlip()``:
    each image's offset is uniform over the ``(2 * padding + 1) ** 2`` positions and it is
    flipped with probability 1/2. The zeros padded in are zeros of ``images``' own values
    (black for raw ``uint8`` pixels, as torchvision pads before normalizing). Runs on
    ``images``' device; ``generator`` must be on that device. For a given generator state
    the draws are fixed: offsets ``(N, 1)`` rows, then columns, then flips.
    """
    n, c, h, w = images.shape
    device = images.device
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=device)
    dx = torch.randint(0, 2 * padding + 1, (n, 1), generator=generator, device=device)
    flip = torch.rand(n, 1, generator=generator, device=device) < 0.5
    rows = dy + torch.arange(h, device=device)
    cols = dx + torch.where(flip, torch.arange(w - 1, -1, -1, device=device),
                            torch.arange(w, device=device))
    return padded[torch.arange(n, device=device).view(n, 1, 1, 1),
                  torch.arange(c, device=device).view(1, c, 1, 1),
                  rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


def device_indices(indices: Any, device: torch.device) -> Tensor:
    """A batch of sample indices (a list, as a sampler yields them) as a tensor on ``device``
    without a host-device synchronisation: on CUDA the indices are copied from pinned memory,
    asynchronously (a plain copy of a Python list, as ``tensor[list]`` makes, blocks the host
    until the GPU has finished its queued work, once per batch)."""
    index = torch.as_tensor(indices, dtype=torch.long)
    if device.type != "cuda":
        return index.to(device)
    return index.pin_memory().to(device, non_blocking=True)


class _DeviceImages(Dataset):
    """One split as ``uint8`` images and labels on one device, served a batch at a time.

    ``DataLoader`` hands ``__getitems__`` a batch's indices (any sampler, Lightning's
    ``DistributedSampler`` included); the batch is gathered, cropped and flipped when
    ``augment`` (with :attr:`generator`, on the device), then normalized as torchvision's
    ``ToDtype(float32, scale=True)`` + ``Normalize`` do it.
    """

    def __init__(self, images: Tensor, labels: Tensor, mean: tuple[float, float, float],
                 std: tuple[float, float, float], padding: int | None) -> None:
        self.images = images
        self.labels = labels
        self.padding = padding
        self.mean = torch.tensor(mean, dtype=torch.float32, device=images.device).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=images.device).view(-1, 1, 1)
        #: The augmentation's random stream, on the images' device (set by the datamodule).
        self.generator: torch.Generator | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        images, labels = self.__getitems__([index])
        return images[0], labels[0]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        index = device_indices(indices, self.images.device)
        images = self.images[index]
        if self.padding is not None:
            if self.generator is None:
                raise RuntimeError("the training split's generator is set by "
                                   "train_dataloader(); build the loader with it")
            images = random_crop_flip(images, self.generator, self.padding)
        return images.to(torch.float32).mul_(1.0 / 255).sub(self.mean).div_(self.std), \
            self.labels[index]


def _whole_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``collate_fn`` of the on-device loaders: ``__getitems__`` already made the batch."""
    return batch


def _as_tensors(dataset: Dataset) -> tuple[Tensor, Tensor]:
    """The ``uint8`` images ``(N, C, H, W)`` and labels of an untransformed image dataset:
    torchvision's ``CIFAR100`` (its arrays, no PIL), a ``Subset`` of one, or any dataset of
    (PIL image, label) pairs (``FakeData``)."""
    if isinstance(dataset, Subset):
        images, labels = _as_tensors(dataset.dataset)
        index = torch.as_tensor(list(dataset.indices), dtype=torch.long)
        return images[index], labels[index]
    if isinstance(dataset, CIFAR100):
        return (torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous(),
                torch.as_tensor(dataset.targets, dtype=torch.long))
    pairs = [dataset[i] for i in range(len(dataset))]  # type: ignore[arg-type]
    return (torch.stack([v2.functional.pil_to_tensor(image) for image, _ in pairs]),
            torch.as_tensor([label for _, label in pairs], dtype=torch.long))


class _Transformed(Dataset):
    """A dataset of (PIL image, label) with a transform applied to the image."""

    def __init__(self, base: Dataset, transform: Callable[[Any], Tensor]) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.base[index]
        return self.transform(image), label


def _check_loader_args(batch_size: int, num_workers: int, val_split: float) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers!r}")
    if not 0 <= val_split < 1:
        raise ValueError(f"val_split must be in [0, 1), got {val_split!r}")


#: The 8x8 digits shipped with the package (source and licence: digits_NOTICE.txt beside it).
DIGITS_FILE = Path(__file__).with_name("digits.npz")


def load_digits() -> tuple[Tensor, Tensor]:
    """The 1,797 8x8 handwritten digits shipped with the package: images ``(1797, 8, 8)``
    ``uint8`` with pixels 0..16, labels ``(1797,)`` ``int64`` 0..9. The test set of UCI's
    "Optical Recognition of Handwritten Digits" (Alpaydin and Kaynak, CC BY 4.0), as
    scikit-learn's ``load_digits`` has it, without needing scikit-learn."""
    import numpy as np

    with np.load(DIGITS_FILE) as arrays:
        return (torch.from_numpy(arrays["images"].copy()),
                torch.from_numpy(arrays["labels"].astype(np.int64)))


def stratified_split(labels: Tensor, test_fraction: float, seed: int
                     ) -> tuple[Tensor, Tensor]:
    """Seeded split of ``range(len(labels))`` into (train, test) indices, both sorted, with
    every class in the test part in proportion: ``ceil(test_fraction * n)`` test indices,
    handed out to the classes by largest remainder, drawn at random within each class."""
    classes, counts = torch.unique(labels, return_counts=True)
    total = math.ceil(test_fraction * len(labels))
    exact = counts.double() * total / len(labels)
    share = exact.floor().long()
    for index in torch.argsort(exact - share, descending=True, stable=True)[
            :total - int(share.sum())]:
        share[index] += 1
    generator = torch.Generator().manual_seed(seed)
    test = []
    for label, size in zip(classes.tolist(), share.tolist(), strict=True):
        members = (labels == label).nonzero().squeeze(1)
        test.append(members[torch.randperm(len(members), generator=generator)[:size]])
    test_index = torch.cat(test).sort().values
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[test_index] = False
    return keep.nonzero().squeeze(1), test_index


def _split(n: int, val_split: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split of ``range(n)`` into (train indices, validation indices)."""
    n_val = round(val_split * n)
    if val_split > 0 and not 0 < n_val < n:
        raise ValueError(f"val_split={val_split} leaves no validation or no training sample "
                         f"out of {n}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


class _ImageDataModule(pl.LightningDataModule):
    """Shared split and loader logic; subclasses provide the untransformed datasets."""

    dataset_name: str
    num_classes: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    #: Sizes of the fake train and test splits.
    fake_sizes: tuple[int, int] = (256, 64)

    def __init__(self, data_dir: str, batch_size: int, num_workers: int, val_split: float,
                 download: bool, fake_data: bool, seed: int) -> None:
        super().__init__()
        _check_loader_args(batch_size, num_workers, val_split)
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_split = val_split
        self.download = download
        self.fake_data = fake_data
        self.seed = seed
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    def train_transform(self) -> Callable[[Any], Tensor]:
        """Random crop (padding 1/8 of the size), horizontal flip, normalization."""
        return v2.Compose([
            v2.RandomCrop(self.image_size, padding=self.image_size // 8),
            v2.RandomHorizontalFlip(),
            *self._to_tensor(),
        ])

    def eval_transform(self) -> Callable[[Any], Tensor]:
        """Normalization only."""
        return v2.Compose(self._to_tensor())

    def _to_tensor(self) -> list[Callable[[Any], Any]]:
        return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(self.mean, self.std)]

    def _load(self, train: bool) -> Dataset:
        """The untransformed split (PIL image, label) from disk; raise if unavailable."""
        raise NotImplementedError

    def _base(self, train: bool) -> Dataset:
        if self.fake_data:
            size = self.fake_sizes[0 if train else 1]
            return FakeData(size, (3, self.image_size, self.image_size), self.num_classes,
                            random_offset=0 if train else 10**6)
        return self._load(train)

    def setup(self, stage: str) -> None:
        if self.test_dataset is None:
            self.test_dataset = self._split_dataset(self._base(train=False), train=False)
        if stage == "test" or self.train_dataset is not None:
            return
        train = self._base(train=True)
        if self.val_split > 0:
            train_idx, val_idx = _split(len(train), self.val_split, self.seed)
            self.train_dataset = self._split_dataset(Subset(train, train_idx), train=True)
            self.val_dataset = self._split_dataset(Subset(train, val_idx), train=False)
        else:
            self.train_dataset = self._split_dataset(train, train=True)
            self.val_dataset = self.test_dataset

    #: Hold the images on the training device (``CIFAR100DataModule(on_device=True)``).
    on_device: bool = False

    def _split_dataset(self, base: Dataset, train: bool) -> Dataset:
        """One split, transformed per image on the host, or held on the device."""
        if not self.on_device:
            return _Transformed(base, self.train_transform() if train else self.eval_transform())
        images, labels = _as_tensors(base)
        device = self.device
        return _DeviceImages(images.to(device), labels.to(device), self.mean, self.std,
                             padding=self.image_size // 8 if train else None)

    @property
    def device(self) -> torch.device:
        """Where ``on_device`` holds the images: the attached Trainer's device (its root
        device under DDP: each process holds a copy), else the CPU."""
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must run before the dataloaders")
        if isinstance(dataset, _DeviceImages):  # whole batches made on the device
            return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle,
                              num_workers=0, collate_fn=_whole_batch)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        dataset = self.train_dataset
        if isinstance(dataset, _DeviceImages) and dataset.generator is None:
            # Seeded by the process's torch seed (``seed_everything``), one stream per rank,
            # kept across reloads of the loader.
            trainer = getattr(self, "trainer", None)
            rank = trainer.global_rank if trainer is not None else 0
            dataset.generator = torch.Generator(device=dataset.images.device).manual_seed(
                (torch.initial_seed() + rank) % 2**63)
        return self._loader(dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False)


class CIFAR100DataModule(_ImageDataModule):
    """CIFAR-100 (32x32, 100 classes) through torchvision's ``CIFAR100``.

    Training images are randomly cropped (padding 4), flipped horizontally and normalized
    with the CIFAR-100 channel statistics; evaluation images are only normalized.
    ``prepare_data`` downloads ``cifar-100-python.tar.gz`` (169 MB) into ``data_dir`` if
    ``download`` is set and the files are missing; torchvision verifies their MD5 sums.

    Args:
        data_dir: folder holding (or to receive) ``cifar-100-python/``.
        batch_size: samples per batch (the paper: 128).
        num_workers: dataloader worker processes.
        val_split: fraction of the 50,000 training images held out for validation
            (0: validate on the test split).
        download: download the dataset if missing.
        fake_data: use random images of the right size instead (256 train, 64 test);
            nothing is read or downloaded.
        seed: seed of the validation split.
        on_device: hold every split on the training device (the Trainer's, when the
            datamodule is attached to one; else the CPU) as ``uint8`` images (150 MB for
            CIFAR-100's 50,000 training images) and make each batch there at once: the same
            augmentation (random crop with padding 4, zero padding before normalization,
            horizontal flip) and normalization as the host path, drawn from a generator on
            the device seeded by the process's torch seed (``seed_everything``) and rank.
            No loader worker processes (``num_workers`` is not used) and no image copies to
            the device. Lightning's ``DistributedSampler`` shards it under DDP like the host
            path (each process holds a copy of the images).
    """

    dataset_name = "cifar100"
    num_classes = 100
    image_size = 32
    mean = CIFAR100_MEAN
    std = CIFAR100_STD
    url = CIFAR100.url

    def __init__(self, data_dir: str = "data", batch_size: int = 128, num_workers: int = 4,
                 val_split: float = 0.0, download: bool = True, fake_data: bool = False,
                 seed: int = 0, on_device: bool = False) -> None:
        if not isinstance(on_device, bool):
            raise TypeError(f"on_device must be True or False, got {on_device!r}")
        super().__init__(data_dir, batch_size, num_workers, val_split, download, fake_data, seed)
        self.on_device = on_device

    def prepare_data(self) -> None:
        if not self.fake_data:
            self._load(train=True)

    def _load(self, train: bool) -> Dataset:
        folder = self.data_dir / CIFAR100.base_folder
        try:
            return CIFAR100(str(self.data_dir), train=train, download=self.download)
        except (RuntimeError, OSError) as err:
            how = (f"download {self.url} and extract it into '{self.data_dir}'"
                   f" (it creates '{folder}')")
            if self.download:
                raise DatasetUnavailableError(
                    f"CIFAR-100 could not be downloaded into '{self.data_dir}': {err}. Without "
                    f"network access, {how}."
                ) from err
            raise DatasetUnavailableError(
                f"CIFAR-100 is missing or corrupt at '{folder}' (torchvision: {err}). Set "
                f"download=True (--data.init_args.download true), or {how}."
            ) from err


TINY_IMAGENET_FOLDER = "tiny-imagenet-200"
_LAYOUT_DONE = ".class_folders_done"


def relayout_tiny_imagenet_val(root: str | os.PathLike[str]) -> None:
    """Move Tiny-ImageNet's validation images into one folder per class, for ``ImageFolder``.

    ``val/images/<file>`` goes to ``val/<wnid>/images/<file>`` as ``val/val_annotations.txt``
    says. Idempotent and safe to interrupt or to run from several processes at once: each
    move is an atomic rename, a file already at its destination is skipped, and
    ``val/.class_folders_done`` is written only when every listed file is in place (the
    emptied ``val/images`` is then removed).

    Args:
        root: the ``tiny-imagenet-200`` folder.

    Raises:
        DatasetUnavailableError: ``val_annotations.txt`` is missing, or lists a file that is
            in neither place.
    """
    val = Path(root) / "val"
    if (val / _LAYOUT_DONE).exists():
        return
    annotations = val / "val_annotations.txt"
    if not annotations.is_file():
        raise DatasetUnavailableError(
            f"Tiny-ImageNet is missing or corrupt: '{annotations}' not found. "
            f"{TinyImageNetDataModule.how_to_get(Path(root).parent)}"
        )
    for line in annotations.read_text().splitlines():
        if not line.strip():
            continue
        filename, wnid = line.split("\t")[:2]
        source = val / "images" / filename
        target = val / wnid / "images" / filename
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(source, target)
        except FileNotFoundError:
            if not target.exists():  # not moved by a concurrent process either
                raise DatasetUnavailableError(
                    f"Tiny-ImageNet is corrupt: '{source}' (listed in '{annotations}') is "
                    f"missing. {TinyImageNetDataModule.how_to_get(Path(root).parent)}"
                ) from None
    images = val / "images"
    if images.is_dir() and not any(images.iterdir()):
        images.rmdir()
    marker = val / f"{_LAYOUT_DONE}.{os.getpid()}"
    marker.touch()
    os.replace(marker, val / _LAYOUT_DONE)


class TinyImageNetDataModule(_ImageDataModule):
    """Tiny-ImageNet-200 (64x64, 200 classes) read with torchvision's ``ImageFolder``.

    ``prepare_data`` downloads ``tiny-imagenet-200.zip`` (237 MB, MD5-checked) into
    ``data_dir`` if ``download`` is set and the folder is missing, extracts it beside
    (then renames it into place, so an interrupted extraction leaves nothing half-made),
    and moves the validation images into class folders once (see
    ``relayout_tiny_imagenet_val``). The labelled validation set is the test split.
    Training images are randomly cropped (padding 8), flipped and normalized.

    Args:
        data_dir: folder holding (or to receive) ``tiny-imagenet-200/``.
        batch_size: samples per batch (the paper: 128).
        num_workers: dataloader worker processes.
        val_split: fraction of the 100,000 training images held out for validation
            (0: validate on the official validation set, which is also the test split).
        download: download the dataset if missing.
        fake_data: use random images of the right size instead (256 train, 64 test);
            nothing is read or downloaded.
        seed: seed of the validation split.
    """

    dataset_name = "tinyimagenet"
    num_classes = 200
    image_size = 64
    mean = TINY_IMAGENET_MEAN
    std = TINY_IMAGENET_STD
    url = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
    md5 = "90528d7ca1a48142e341f4ef8d21d0de"

    def __init__(self, data_dir: str = "data", batch_size: int = 128, num_workers: int = 4,
                 val_split: float = 0.0, download: bool = True, fake_data: bool = False,
                 seed: int = 0) -> None:
        super().__init__(data_dir, batch_size, num_workers, val_split, download, fake_data, seed)

    @property
    def root(self) -> Path:
        """The ``tiny-imagenet-200`` folder."""
        return self.data_dir / TINY_IMAGENET_FOLDER

    @classmethod
    def how_to_get(cls, data_dir: Path) -> str:
        """The sentence telling a user how to obtain the dataset."""
        return (f"Set download=True (--data.init_args.download true), or download {cls.url} "
                f"and extract it into '{data_dir}'.")

    def prepare_data(self) -> None:
        if self.fake_data:
            return
        if not self.root.is_dir() and self.download:
            self._download()
        self._check_extracted()
        relayout_tiny_imagenet_val(self.root)

    def _download(self) -> None:
        partial = self.data_dir / f".{TINY_IMAGENET_FOLDER}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        try:
            download_and_extract_archive(self.url, str(self.data_dir), extract_root=str(partial),
                                         filename=f"{TINY_IMAGENET_FOLDER}.zip", md5=self.md5)
        except (RuntimeError, OSError) as err:
            raise DatasetUnavailableError(
                f"Tiny-ImageNet could not be downloaded into '{self.data_dir}': {err}. Without "
                f"network access: download {self.url} elsewhere and extract it into "
                f"'{self.data_dir}'."
            ) from err
        os.replace(partial / TINY_IMAGENET_FOLDER, self.root)
        shutil.rmtree(partial, ignore_errors=True)

    def _check_extracted(self) -> None:
        required = ["wnids.txt", "train"]
        if not (self.root / "val" / _LAYOUT_DONE).exists():
            required.append("val/val_annotations.txt")
        missing = [name for name in required if not (self.root / name).exists()]
        if missing:
            raise DatasetUnavailableError(
                f"Tiny-ImageNet is missing or corrupt at '{self.root}' (not found: "
                f"{', '.join(missing)}). {self.how_to_get(self.data_dir)}"
            )

    def _load(self, train: bool) -> Dataset:
        self._check_extracted()
        relayout_tiny_imagenet_val(self.root)  # no-op once done (prepare_data does it)
        dataset = ImageFolder(str(self.root / ("train" if train else "val")))
        wnids = sorted((self.root / "wnids.txt").read_text().split())
        if dataset.classes != wnids:
            raise DatasetUnavailableError(
                f"Tiny-ImageNet is corrupt at '{self.root}': the class folders of "
                f"'{dataset.root}' ({len(dataset.classes)}) differ from wnids.txt "
                f"({len(wnids)}). {self.how_to_get(self.data_dir)}"
            )
        return dataset


class DigitsDataModule(pl.LightningDataModule):
    """The 8x8 handwritten digits shipped with the package (1,797 images, 10 classes; the set
    scikit-learn bundles, see :func:`load_digits`): no download, no scikit-learn.

    Pixels are scaled to [0, 1] and standardized with the training mean and std; no
    augmentation. A stratified, seeded 20% of the images form the test split. Meant for
    the quick-start and tests: ``small_cnn`` takes the 8x8 images as they are; a zoo
    network takes them upsampled (``image_size=32, channels=3``).

    Args:
        batch_size: samples per batch.
        num_workers: dataloader worker processes (0 is fastest for this tiny set).
        val_split: fraction of the training images held out for validation (0: validate
            on the test split).
        image_size: height and width, ``>= 8``; larger sizes upsample bilinearly.
        channels: 1, or 3 (the gray image repeated).
        seed: seed of the test and validation splits.
    """

    dataset_name = "digits"
    num_classes = 10

    def __init__(self, batch_size: int = 64, num_workers: int = 0, val_split: float = 0.0,
                 image_size: int = 8, channels: int = 1, seed: int = 0) -> None:
        super().__init__()
        _check_loader_args(batch_size, num_workers, val_split)
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {image_size!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be one of 1, 3; got {channels!r}")
        self.save_hyperparameters()
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_split = val_split
        self.image_size = image_size
        self.channels = channels
        self.seed = seed
        self.train_dataset: Dataset | None = None
        self.val_dataset: Dataset | None = None
        self.test_dataset: Dataset | None = None

    def setup(self, stage: str) -> None:
        if self.train_dataset is not None:
            return
        pixels, labels = load_digits()
        images = pixels.float().unsqueeze(1) / 16.0
        train_idx, test_idx = stratified_split(labels, 0.2, self.seed)
        mean, std = images[train_idx].mean(), images[train_idx].std()
        images = (images - mean) / std
        if self.image_size != 8:
            images = F.interpolate(images, size=self.image_size, mode="bilinear",
                                   align_corners=False)
        images = images.expand(-1, self.channels, -1, -1).contiguous()
        train = TensorDataset(images[train_idx], labels[train_idx])
        self.test_dataset = TensorDataset(images[test_idx], labels[test_idx])
        if self.val_split > 0:
            train_part, val_part = _split(len(train), self.val_split, self.seed)
            self.train_dataset = Subset(train, train_part)
            self.val_dataset = Subset(train, val_part)
        else:
            self.train_dataset, self.val_dataset = train, self.test_dataset

    def _loader(self, dataset: Dataset | None, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("DigitsDataModule.setup() must run before the dataloaders")
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_dataset, shuffle=False)
