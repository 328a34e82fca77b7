"""The paper's networks for small images, built on torchvision's definitions.

Each builder takes torchvision's ImageNet model (``weights=None``) and changes only what
small inputs need, so that the last feature map is 4x4 for 32x32 (CIFAR-100) and for
64x64 (Tiny-ImageNet) inputs:

- ResNet-18: ``conv1`` becomes 3x3 stride 1 (was 7x7 stride 2); the stem max-pool is
  removed for 32x32 and kept for 64x64.
- MobileNetV2: the first conv has stride 1 (was 2); for 32x32 the first 24-channel block
  also has stride 1 (was 2).
- VGG16, 32x32: unchanged, ImageNet classifier included (``AdaptiveAvgPool2d(7)`` copies
  the 1x1 map 49 times, so the first linear layer has 25088 x 4096 ~ 102.8M weights).
- VGG16, 64x64: the last conv block and its max-pool are removed and the 512x4x4 map is
  flattened straight into the classifier: 8192 -> 4096 -> 4096 -> classes.

All conv and linear weights then get uniform Kaiming initialization (the paper's),
biases zero; batch-norm keeps torchvision's ones and zeros.
"""

from __future__ import annotations

from typing import Literal, get_args

import torchvision
from torch import Tensor, nn

from lightning_ggr.sparse.analysis import count_parameters  # noqa: F401  (zoo's public name)

ModelName = Literal["resnet18", "mobilenet_v2", "vgg16", "small_cnn"]
MODEL_NAMES: tuple[str, ...] = get_args(ModelName)
INPUT_SIZES: tuple[int, ...] = (32, 64)


def kaiming_uniform_init_(model: nn.Module) -> nn.Module:
    """Re-initialize every conv and linear layer with uniform Kaiming initialization.

    Weights ~ ``U(-b, b)`` with ``b = sqrt(2) * sqrt(3 / fan_in)`` (He et al. 2015, ReLU gain,
    fan-in mode); biases are set to zero.

    Args:
        model: the network, changed in place.

    Returns:
        The same ``model``, for chaining.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def _check(name: str, num_classes: int, input_size: int, in_channels: int) -> None:
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels!r}")
    if name != "small_cnn" and input_size not in INPUT_SIZES:
        raise ValueError(
            f"input_size of {name} must be one of {', '.join(map(str, INPUT_SIZES))}, "
            f"got {input_size!r}"
        )


def resnet18(num_classes: int = 100, input_size: int = 32, in_channels: int = 3) -> nn.Module:
    """torchvision's ResNet-18 with a 3x3 stride-1 stem for 32x32 or 64x64 inputs.

    Args:
        num_classes: size of the output layer.
        input_size: 32 (stem max-pool removed) or 64 (stem max-pool kept).
        in_channels: image channels.
    """
    _check("resnet18", num_classes, input_size, in_channels)
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    if input_size == 32:
        model.maxpool = nn.Identity()
    return kaiming_uniform_init_(model)


def mobilenet_v2(num_classes: int = 100, input_size: int = 32, in_channels: int = 3) -> nn.Module:
    """torchvision's MobileNetV2 with a stride-1 first conv (and second stage, for 32x32).

    Args:
        num_classes: size of the output layer.
        input_size: 32 (first conv and first 24-channel block at stride 1) or 64 (first
            conv at stride 1).
        in_channels: image channels.
    """
    _check("mobilenet_v2", num_classes, input_size, in_channels)
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes)
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(
        in_channels, stem.out_channels, kernel_size=3, stride=1, padding=1, bias=False
    )
    if input_size == 32:
        # features[2] is the first 24-channel inverted residual; conv[1][0] its depthwise conv.
        model.features[2].conv[1][0].stride = (1, 1)
    return kaiming_uniform_init_(model)


def vgg16(num_classes: int = 100, input_size: int = 32, in_channels: int = 3) -> nn.Module:
    """torchvision's VGG16 (no batch-norm), as the paper uses it on small images.

    Args:
        num_classes: size of the output layer.
        input_size: 32 (torchvision's VGG16 unchanged, ~134.7M parameters with 100 classes)
            or 64 (last conv block and max-pool removed, 8192-input classifier, ~58.8M
            parameters with 200 classes).
        in_channels: image channels.
    """
    _check("vgg16", num_classes, input_size, in_channels)
    model = torchvision.models.vgg16(weights=None, num_classes=num_classes)
    if in_channels != 3:
        model.features[0] = nn.Conv2d(in_channels, 64, kernel_size=3, padding=1)
    if input_size == 64:
        model.features = model.features[:24]  # up to the max-pool after the 4th block
        model.avgpool = nn.Identity()
        model.classifier[0] = nn.Linear(512 * 4 * 4, 4096)
    return kaiming_uniform_init_(model)


class SmallCNN(nn.Module):
    """A small CNN for tiny images (the digits quick-start): three convs and two linears.

    conv3x3(32) -> conv3x3(64) -> max-pool -> conv3x3(64) -> adaptive avg-pool to 2x2 ->
    linear(256, 128) -> linear(128, classes), batch-norm and ReLU after each conv. About
    91k parameters for 10 classes, any input size of at least 2x2.

    Args:
        num_classes: size of the output layer.
        in_channels: image channels.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        _check("small_cnn", num_classes, 0, in_channels)

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                    nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, 32), *block(32, 64), nn.MaxPool2d(2), *block(64, 64),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 2 * 2, 128), nn.ReLU(inplace=True),
            nn.Linear(128, num_classes),
        )
        kaiming_uniform_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x))


def build_model(
    name: str, num_classes: int = 100, input_size: int = 32, in_channels: int = 3
) -> nn.Module:
    """Build a zoo network by name.

    Args:
        name: ``"resnet18"``, ``"mobilenet_v2"``, ``"vgg16"`` or ``"small_cnn"``.
        num_classes: size of the output layer (CIFAR-100: 100, Tiny-ImageNet: 200).
        input_size: image height and width, 32 or 64 (``small_cnn``: any).
        in_channels: image channels.

    Returns:
        The initialized network. Build under ``with torch.device("meta"):`` to count
        parameters or check shapes without allocating memory.
    """
    if name == "resnet18":
        return resnet18(num_classes, input_size, in_channels)
    if name == "mobilenet_v2":
        return mobilenet_v2(num_classes, input_size, in_channels)
    if name == "vgg16":
        return vgg16(num_classes, input_size, in_channels)
    if name == "small_cnn":
        return SmallCNN(num_classes, in_channels)
    raise ValueError(f"model must be one of {', '.join(map(repr, MODEL_NAMES))}; got {name!r}")
