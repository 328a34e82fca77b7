"""``CIFAR100DataModule(on_device=True)``: images held on the training device, batches cropped,
flipped and normalized there. The same augmentation as the host path (every output is one of
torchvision's crops and flips; offsets uniform, flips half), deterministic per seed, and
sharded by Lightning's ``DistributedSampler`` under DDP. CPU only: the device is the CPU."""

import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torchvision.transforms import v2

from lightning_ggr.zoo.data import CIFAR100DataModule, random_crop_flip
from lightning_ggr.zoo.module import ImageClassifier

pytestmark = pytest.mark.usefixtures("single_thread")


def modules(**kwargs) -> tuple[CIFAR100DataModule, CIFAR100DataModule]:
    """The host path and the on-device path over the same fake images, set up for fit."""
    pair = tuple(CIFAR100DataModule(fake_data=True, num_workers=0, batch_size=16,
                                    on_device=on_device, **kwargs)
                 for on_device in (False, True))
    for dm in pair:
        dm.setup("fit")
    return pair


def host_crops(dm: CIFAR100DataModule, index: int) -> list[torch.Tensor]:
    """Every output torchvision's training transform can give for one image: the 81 crops of
    the zero-padded image and their mirror images, normalized as the host path does."""
    image = v2.functional.pil_to_tensor(dm.train_dataset.base[index][0])
    padded = v2.functional.pad(image, [4])
    normalize = dm.eval_transform()
    crops = [padded[:, top:top + 32, left:left + 32] for top in range(9) for left in range(9)]
    return [normalize(c) for c in crops] + [normalize(v2.functional.horizontal_flip(c))
                                           for c in crops]


def test_on_device_training_images_are_crops_and_flips_of_the_host_path():
    host, device = modules()
    device.train_dataloader()  # seeds the augmentation stream
    images, labels = device.train_dataset.__getitems__(list(range(12)))
    assert images.dtype == torch.float32 and images.shape == (12, 3, 32, 32)
    for i in range(12):
        assert labels[i] == host.train_dataset[i][1]
        assert any(torch.equal(images[i], crop) for crop in host_crops(host, i)), i


def test_on_device_evaluation_images_equal_the_host_path_bit_for_bit():
    host, device = modules(val_split=0.25)
    assert len(device.val_dataset) == len(host.val_dataset) == 64
    for split in ("val_dataset", "test_dataset"):
        ours, theirs = getattr(device, split), getattr(host, split)
        images, labels = ours.__getitems__(list(range(len(ours))))
        for i in range(len(ours)):
            image, label = theirs[i]
            assert torch.equal(images[i], image) and labels[i] == label


def test_random_crop_flip_draws_every_offset_and_flip_uniformly():
    """8,100 draws of one image whose pixels encode their position: each of the 81 offsets
    about 100 times (chi-square, 80 degrees of freedom, below its 0.1% point), flips half."""
    n, size, pad = 8100, 32, 4
    image = (torch.arange(size * size) + 1).view(1, 1, size, size).expand(n, 1, size, size)
    out = random_crop_flip(image, torch.Generator().manual_seed(0), pad)
    assert out.shape == image.shape
    centre, right = out[:, 0, 16, 16] - 1, out[:, 0, 16, 17] - 1  # never padding here
    rows, cols, next_cols = centre // size, centre % size, right % size
    flip = next_cols < cols
    dy = rows - 16 + pad
    dx = torch.where(flip, cols - (size - 1 - 16), cols - 16) + pad
    assert ((0 <= dy) & (dy <= 2 * pad) & (0 <= dx) & (dx <= 2 * pad)).all()
    counts = torch.bincount(dy * (2 * pad + 1) + dx, minlength=81).double()
    assert counts.numel() == 81
    chi_square = ((counts - n / 81) ** 2 / (n / 81)).sum()
    assert chi_square < 124.8, chi_square
    assert abs(int(flip.sum()) - n / 2) < 3.5 * (n / 4) ** 0.5  # 3.5 sigma
    # The padding is zeros of the input's values: some crops show them at a border.
    assert (out[:, 0, 0, :] == 0).any() and (out[:, 0, :, 0] == 0).any()


def epoch_batches(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    pl.seed_everything(seed, verbose=False)
    dm = CIFAR100DataModule(fake_data=True, batch_size=64, on_device=True)
    dm.setup("fit")
    loader = dm.train_dataloader()
    return list(loader) + list(loader)  # two epochs: the stream goes on


def test_on_device_batches_are_deterministic_per_seed():
    first, again, other = epoch_batches(0), epoch_batches(0), epoch_batches(1)
    assert len(first) == 8  # 256 fake images, batch 64, two epochs
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
               for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0][0], other[0][0])
    assert not torch.equal(first[0][0], first[4][0])  # a new shuffle and new crops per epoch


def crops_of_the_first_images(seed: int) -> torch.Tensor:
    pl.seed_everything(seed, verbose=False)
    dm = CIFAR100DataModule(fake_data=True, on_device=True)
    dm.setup("fit")
    dm.train_dataloader()
    return dm.train_dataset.__getitems__(list(range(32)))[0]


def test_the_augmentation_stream_is_seeded_by_the_torch_seed():
    """Not only the shuffle: the crops and flips of given images follow the seed too."""
    first = crops_of_the_first_images(0)
    assert torch.equal(first, crops_of_the_first_images(0))
    assert not torch.equal(first, crops_of_the_first_images(1))


def test_on_device_trains_in_a_trainer():
    dm = CIFAR100DataModule(fake_data=True, batch_size=32, on_device=True)
    module = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 100)),
                             num_classes=100, input_size=32)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=1,
                         accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert dm.device == torch.device("cpu") and trainer.global_step == 3
    assert dm.train_dataset.images.dtype == torch.uint8  # raw pixels: 1 byte each


def test_on_device_must_be_a_bool():
    with pytest.raises(TypeError, match="on_device must be True or False, got 'yes'"):
        CIFAR100DataModule(on_device="yes")


class RecordShard(pl.Callback):
    """Writes what each DDP process trains on: its sampler's indices and batch shapes."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.shapes: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.shapes.append([*batch[0].shape, batch[1].numel()])

    def on_train_epoch_end(self, trainer, pl_module):
        loader = trainer.train_dataloader
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps({
            "indices": list(loader.sampler), "shapes": self.shapes,
            "sampler": type(loader.sampler).__name__,
            "on_device": type(loader.dataset).__name__}))


@pytest.mark.slow
def test_on_device_is_sharded_under_ddp(tmp_path):
    from datetime import timedelta

    from tests.helpers.ddp import spawned_ddp

    dm = CIFAR100DataModule(fake_data=True, batch_size=16, on_device=True)
    module = ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 100)),
                             num_classes=100, input_size=32)
    trainer = pl.Trainer(max_epochs=1, strategy=spawned_ddp(timedelta(seconds=60)),
                         accelerator="cpu", devices=2,
                         limit_val_batches=0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[RecordShard(str(tmp_path))])
    trainer.fit(module, datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert {r["sampler"] for r in ranks} == {"DistributedSampler"}
    assert {r["on_device"] for r in ranks} == {"_DeviceImages"}
    assert not set(ranks[0]["indices"]) & set(ranks[1]["indices"])
    assert sorted(ranks[0]["indices"] + ranks[1]["indices"]) == list(range(256))
    for rank in ranks:  # 128 images per process: 8 whole batches of 16
        assert rank["shapes"] == [[16, 3, 32, 32, 16]] * 8
