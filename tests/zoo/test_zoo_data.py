"""Data modules on tiny files in the real on-disk formats; missing, corrupt and fake data."""

import hashlib
import pickle
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.datasets import CIFAR100

from lightning_ggr.zoo import data as data_module
from lightning_ggr.zoo.data import (
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFAR100DataModule,
    DatasetUnavailableError,
    DigitsDataModule,
    TinyImageNetDataModule,
    load_digits,
    relayout_tiny_imagenet_val,
    stratified_split,
)

# ----------------------------------------------------------------------------- CIFAR-100


def cifar_images(count: int, offset: int) -> tuple[np.ndarray, list[int]]:
    """Image i is a constant color (offset + i, 2 * i, 255 - i); its label is i % 100."""
    pixels = np.zeros((count, 3, 32, 32), dtype=np.uint8)
    for i in range(count):
        pixels[i, 0], pixels[i, 1], pixels[i, 2] = offset + i, 2 * i, 255 - i
    return pixels.reshape(count, 3072), [i % 100 for i in range(count)]


def write_cifar100(root: Path, n_train: int = 20, n_test: int = 8) -> dict[str, str]:
    """Write ``cifar-100-python/{train,test,meta}`` as the real pickles; return their MD5s."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, count, offset in (("train", n_train, 0), ("test", n_test, 100)):
        data, labels = cifar_images(count, offset)
        batch = {"filenames": [f"{name}_{i}.png" for i in range(count)], "batch_label": name,
                 "fine_labels": labels, "coarse_labels": [x // 5 for x in labels],
                 "data": data}
        (folder / name).write_bytes(pickle.dumps(batch))
    meta = {"fine_label_names": [f"class_{i}" for i in range(100)],
            "coarse_label_names": [f"super_{i}" for i in range(20)]}
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return {name: hashlib.md5((folder / name).read_bytes()).hexdigest()
            for name in ("train", "test", "meta")}


@pytest.fixture
def cifar_dir(tmp_path, monkeypatch):
    """Tiny CIFAR-100 files that torchvision's integrity check accepts.

    torchvision checks the MD5 of the real files; the class attributes holding those sums
    are pointed at our files' sums, so torchvision's own loading code runs unchanged.
    """
    sums = write_cifar100(tmp_path)
    monkeypatch.setattr(CIFAR100, "train_list", [["train", sums["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", sums["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": sums["meta"]})
    return tmp_path


def normalized(color: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(color, CIFAR100_MEAN,
                                                              CIFAR100_STD, strict=True)])


def test_cifar100_reads_real_format(cifar_dir):
    dm = CIFAR100DataModule(data_dir=str(cifar_dir), batch_size=4, num_workers=0,
                            download=False)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_dataset) == 20 and len(dm.val_dataset) == 8
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.tolist() == [0, 1, 2, 3]
    for i in range(4):  # test images: normalized, not augmented
        expected = normalized((100 + i, 2 * i, 255 - i))
        assert torch.allclose(images[i].mean(dim=(1, 2)), expected, atol=1e-5)
        assert torch.allclose(images[i], expected[:, None, None].expand(3, 32, 32), atol=1e-5)


def test_cifar100_training_images_are_augmented(cifar_dir):
    dm = CIFAR100DataModule(data_dir=str(cifar_dir), batch_size=20, num_workers=0,
                            download=False)
    dm.setup("fit")
    torch.manual_seed(0)
    padded_crops = 0
    for _ in range(5):
        images, labels = next(iter(dm.train_dataloader()))
        assert images.shape == (20, 3, 32, 32)
        for image, label in zip(images, labels, strict=True):
            # Random crop with padding 4: zero padding (black) enters at some borders.
            black = normalized((0, 0, 0))
            border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], 1)
            padded_crops += bool((border - black[:, None]).abs().max(0).values.lt(1e-5).any())
            interior = image[:, 8:24, 8:24].mean(dim=(1, 2))
            assert torch.allclose(interior, normalized((label, 2 * label, 255 - label)),
                                  atol=1e-5)
    assert padded_crops > 50  # 100 crops; a crop at offset (4, 4) has no padding


@pytest.mark.parametrize("cls", [CIFAR100DataModule, TinyImageNetDataModule])
def test_training_transform_flips_horizontally(cls):
    transform = cls(fake_data=True).train_transform()
    size = cls.image_size
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[:, size // 2:] = 255  # left half black, right half white
    image = Image.fromarray(pixels)
    torch.manual_seed(0)
    left_darker = [bool(out[:, :, : size // 4].mean() < out[:, :, -size // 4:].mean())
                   for out in (transform(image) for _ in range(40))]
    assert 5 < sum(left_darker) < 35  # both orientations, about half each


def test_cifar100_validation_split(cifar_dir):
    dm = CIFAR100DataModule(data_dir=str(cifar_dir), num_workers=0, val_split=0.25,
                            download=False, seed=3)
    dm.setup("fit")
    assert len(dm.train_dataset) == 15 and len(dm.val_dataset) == 5
    val_labels = sorted(label for _, label in dm.val_dataset)
    train_labels = sorted(label for _, label in dm.train_dataset)
    assert sorted(val_labels + train_labels) == list(range(20))  # disjoint, complete
    again = CIFAR100DataModule(data_dir=str(cifar_dir), num_workers=0, val_split=0.25,
                               download=False, seed=3)
    again.setup("fit")
    assert sorted(label for _, label in again.val_dataset) == val_labels  # seeded
    assert len(dm.test_dataset) == 8


def test_cifar100_missing_without_download(tmp_path):
    dm = CIFAR100DataModule(data_dir=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(DatasetUnavailableError) as error:
        dm.prepare_data()
    message = str(error.value)
    assert str(tmp_path / "nowhere" / "cifar-100-python") in message
    assert "download=True" in message and CIFAR100.url in message


def test_cifar100_corrupt_file(tmp_path):
    write_cifar100(tmp_path)  # real MD5 sums: our tiny files do not match them
    dm = CIFAR100DataModule(data_dir=str(tmp_path), download=False)
    with pytest.raises(DatasetUnavailableError, match="missing or corrupt at"):
        dm.setup("fit")


def test_cifar100_download_failure_says_how_to_get_it(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    dm = CIFAR100DataModule(data_dir=str(tmp_path), download=True)
    with pytest.raises(DatasetUnavailableError) as error:
        dm.prepare_data()
    message = str(error.value)
    assert "could not be downloaded" in message and "name resolution" in message
    assert CIFAR100.url in message and str(tmp_path) in message


# ------------------------------------------------------------------------- Tiny-ImageNet

WNIDS = ["n01443537", "n01629819", "n01641577"]
COLORS = {"n01443537": (255, 0, 0), "n01629819": (0, 255, 0), "n01641577": (0, 0, 255)}


def write_tiny_imagenet(data_dir: Path, per_class: int = 2, gray: bool = True) -> Path:
    """The tiny-imagenet-200 tree with 3 classes of solid-color 64x64 JPEGs."""
    root = data_dir / "tiny-imagenet-200"
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (root / "words.txt").write_text("".join(f"{w}\tthing {i}\n" for i, w in enumerate(WNIDS)))
    lines = []
    for wnid in WNIDS:
        images = root / "train" / wnid / "images"
        images.mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(per_class):
            Image.new("RGB", (64, 64), COLORS[wnid]).save(images / f"{wnid}_{i}.JPEG")
        for _ in range(per_class):
            name = f"val_{len(lines)}.JPEG"
            Image.new("RGB", (64, 64), COLORS[wnid]).save(root / "val" / "images" / name)
            lines.append(f"{name}\t{wnid}\t0\t0\t63\t63")
    if gray:  # the real set has grayscale JPEGs; ImageFolder must turn them into RGB
        Image.new("L", (64, 64), 128).save(root / "train" / WNIDS[0] / "images" / "gray.JPEG")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    (root / "test" / "images").mkdir(parents=True)
    return root


def tiny_module(data_dir: Path, **kwargs) -> TinyImageNetDataModule:
    return TinyImageNetDataModule(**{"data_dir": str(data_dir), "batch_size": 3,
                                     "num_workers": 0, "download": False, **kwargs})


def test_val_relayout_moves_files_into_class_folders(tmp_path):
    root = write_tiny_imagenet(tmp_path)
    relayout_tiny_imagenet_val(root)
    assert not (root / "val" / "images").exists()
    assert sorted(p.name for p in (root / "val" / WNIDS[1] / "images").iterdir()) == [
        "val_2.JPEG", "val_3.JPEG"]
    assert (root / "val" / ".class_folders_done").exists()
    before = sorted(str(p) for p in root.rglob("*"))
    relayout_tiny_imagenet_val(root)  # idempotent
    assert sorted(str(p) for p in root.rglob("*")) == before


def test_val_relayout_resumes_after_interruption(tmp_path):
    root = write_tiny_imagenet(tmp_path)
    # An interrupted run: two files moved, no completion marker.
    for name, wnid in (("val_0.JPEG", WNIDS[0]), ("val_5.JPEG", WNIDS[2])):
        (root / "val" / wnid / "images").mkdir(parents=True)
        (root / "val" / "images" / name).rename(root / "val" / wnid / "images" / name)
    relayout_tiny_imagenet_val(root)
    assert not (root / "val" / "images").exists()
    for wnid in WNIDS:
        assert len(list((root / "val" / wnid / "images").iterdir())) == 2


def test_val_relayout_reports_a_missing_file(tmp_path):
    root = write_tiny_imagenet(tmp_path)
    (root / "val" / "images" / "val_3.JPEG").unlink()
    with pytest.raises(DatasetUnavailableError, match=r"corrupt: .*val_3.JPEG.* is missing"):
        relayout_tiny_imagenet_val(root)
    assert not (root / "val" / ".class_folders_done").exists()


def test_tiny_imagenet_reads_the_tree(tmp_path):
    write_tiny_imagenet(tmp_path)
    dm = tiny_module(tmp_path)
    dm.prepare_data()
    dm.setup("fit")
    assert len(dm.train_dataset) == 7 and len(dm.val_dataset) == 6
    assert dm.test_dataset is dm.val_dataset
    # All of it, gray JPEG included: ImageFolder's loader converts to RGB.
    assert [images.shape[1:] for images, _ in dm.train_dataloader()] == [(3, 64, 64)] * 3
    seen = 0
    for images, labels in dm.val_dataloader():
        for image, label in zip(images, labels, strict=True):
            # The validation label matches the class whose color the image has.
            color = torch.tensor(COLORS[WNIDS[label]], dtype=torch.float32) / 255
            mean = torch.tensor(data_module.TINY_IMAGENET_MEAN)
            std = torch.tensor(data_module.TINY_IMAGENET_STD)
            pixel = image[:, 32, 32] * std + mean
            assert torch.allclose(pixel, color, atol=0.03)
            seen += 1
    assert seen == 6


def test_tiny_imagenet_missing_without_download(tmp_path):
    dm = tiny_module(tmp_path / "empty")
    with pytest.raises(DatasetUnavailableError) as error:
        dm.prepare_data()
    message = str(error.value)
    assert str(tmp_path / "empty" / "tiny-imagenet-200") in message
    assert "wnids.txt" in message and TinyImageNetDataModule.url in message
    assert "download=True" in message


def test_tiny_imagenet_class_mismatch_is_corrupt(tmp_path):
    root = write_tiny_imagenet(tmp_path)
    (root / "wnids.txt").write_text("\n".join([*WNIDS, "n09999999"]))
    with pytest.raises(DatasetUnavailableError, match=r"class folders .* differ from wnids"):
        tiny_module(tmp_path).setup("fit")


def test_tiny_imagenet_download_extracts_then_renames(tmp_path, monkeypatch):
    calls = []

    def fake_download(url, download_root, extract_root=None, filename=None, md5=None):
        calls.append((url, Path(download_root), filename, md5))
        assert not (tmp_path / "tiny-imagenet-200").exists()  # extraction goes elsewhere
        write_tiny_imagenet(Path(extract_root))

    monkeypatch.setattr(data_module, "download_and_extract_archive", fake_download)
    dm = tiny_module(tmp_path, download=True)
    dm.prepare_data()
    assert calls == [(TinyImageNetDataModule.url, tmp_path, "tiny-imagenet-200.zip",
                      "90528d7ca1a48142e341f4ef8d21d0de")]
    assert (tmp_path / "tiny-imagenet-200" / "val" / ".class_folders_done").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-imagenet-200"]  # no leftovers
    dm.prepare_data()  # present: no second download
    assert len(calls) == 1


def test_tiny_imagenet_download_failure(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise URLError("offline")

    monkeypatch.setattr(data_module, "download_and_extract_archive", offline)
    with pytest.raises(DatasetUnavailableError, match=r"could not be downloaded.*offline.*"
                                                      r"cs231n.stanford.edu"):
        tiny_module(tmp_path, download=True).prepare_data()


# ------------------------------------------------------------------------- fake and digits


@pytest.mark.parametrize(("cls", "size", "classes"), [(CIFAR100DataModule, 32, 100),
                                                       (TinyImageNetDataModule, 64, 200)])
def test_fake_data_touches_no_files(tmp_path, cls, size, classes):
    dm = cls(data_dir=str(tmp_path / "absent"), batch_size=8, num_workers=0, fake_data=True,
             download=True)
    dm.prepare_data()
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, size, size)
    assert 0 <= labels.min() and labels.max() < classes
    assert len(dm.train_dataset) == 256 and len(dm.val_dataset) == 64
    assert not (tmp_path / "absent").exists()
    assert (dm.num_classes, dm.image_size) == (classes, size)


def test_test_stage_then_fit_stage(tmp_path):
    dm = CIFAR100DataModule(data_dir=str(tmp_path), num_workers=0, fake_data=True)
    dm.setup("test")
    assert dm.train_dataset is None and len(dm.test_dataset) == 64
    dm.setup("fit")
    assert len(dm.train_dataset) == 256


def test_digits():
    dm = DigitsDataModule(batch_size=32)
    dm.setup("fit")
    assert (len(dm.train_dataset), len(dm.test_dataset)) == (1437, 360)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 1, 8, 8) and labels.dtype == torch.long
    train_images = torch.stack([image for image, _ in dm.train_dataset])
    assert train_images.mean().abs() < 1e-4 and (train_images.std() - 1).abs() < 1e-3
    test_labels = torch.stack([label for _, label in dm.test_dataset])
    assert torch.bincount(test_labels).min() >= 35  # stratified: ~36 per class


def test_the_shipped_digits_are_the_1797_images_and_their_notice():
    """The quick-start's data ships in the package (scikit-learn is no dependency): 1,797
    8x8 images with pixels 0..16 and their labels, pinned by content, with the source and
    licence beside them."""
    images, labels = load_digits()
    assert (images.shape, images.dtype, labels.shape, labels.dtype) == (
        (1797, 8, 8), torch.uint8, (1797,), torch.int64)
    assert int(images.max()) == 16 and int(labels.max()) == 9
    assert torch.bincount(labels).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174,
                                               180]
    digest = hashlib.sha256(images.numpy().tobytes() + labels.to(torch.uint8).numpy()
                            .tobytes()).hexdigest()
    assert digest == "87ff0c9e40dc7e2c0e34e7257799c2e3f3aec1a016363bb11cad869ec428a826"
    notice = data_module.DIGITS_FILE.with_name("digits_NOTICE.txt").read_text()
    assert "CC BY 4.0" in notice and "Alpaydin" in notice


def test_the_shipped_digits_equal_scikit_learns():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    images, labels = load_digits()
    assert np.array_equal(images.numpy(), digits.images)
    assert np.array_equal(labels.numpy(), digits.target)


def test_stratified_split_gives_every_class_its_share():
    """ceil(0.2 * 1797) = 360 test images; class c gets 360 * n_c / 1797 rounded by
    largest remainder: the floors (35, 36, 35, 36, 36, 36, 36, 35, 34, 36) sum to 355, and
    the 5 left go to the largest remainders: 7 (.86), 8 (.86), 3 (.66), 0 (.66) and, of the
    tied 1 and 5 (.46, 182 images each), the first."""
    _, labels = load_digits()
    train, test = stratified_split(labels, 0.2, seed=0)
    assert len(test) == 360 and len(train) == 1437
    assert torch.equal(torch.cat([train, test]).sort().values, torch.arange(1797))
    assert torch.bincount(labels[test]).tolist() == [36, 37, 35, 37, 36, 36, 36, 36, 35, 36]
    again, other = stratified_split(labels, 0.2, seed=0)[1], stratified_split(labels, 0.2, 1)[1]
    assert torch.equal(again, test) and not torch.equal(other, test)


def test_digits_upsampled_rgb_and_validation_split():
    dm = DigitsDataModule(image_size=32, channels=3, val_split=0.1)
    dm.setup("fit")
    image, _ = dm.train_dataset[0]
    assert image.shape == (3, 32, 32) and torch.equal(image[0], image[2])
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (1293, 144,
                                                                                  360)


@pytest.mark.parametrize(
    ("cls", "kwargs", "match"),
    [
        (CIFAR100DataModule, {"batch_size": 0}, "batch_size must be >= 1, got 0"),
        (TinyImageNetDataModule, {"num_workers": -1}, "num_workers must be >= 0, got -1"),
        (CIFAR100DataModule, {"val_split": 1.0}, r"val_split must be in \[0, 1\), got 1.0"),
        (DigitsDataModule, {"image_size": 4}, "image_size must be >= 8, got 4"),
        (DigitsDataModule, {"channels": 2}, "channels must be one of 1, 3; got 2"),
    ],
)
def test_bad_arguments(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_dataloaders_before_setup_raise():
    with pytest.raises(RuntimeError, match=r"setup\(\) must run before the dataloaders"):
        CIFAR100DataModule(fake_data=True).train_dataloader()
