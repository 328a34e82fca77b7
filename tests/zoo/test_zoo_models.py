"""The zoo networks: parameter counts, stems for small inputs, output shapes, initialization."""

import math

import pytest
import torch
from torch import nn

from lightning_ggr.zoo.models import (
    MODEL_NAMES,
    SmallCNN,
    build_model,
    count_parameters,
    kaiming_uniform_init_,
)

pytestmark = pytest.mark.usefixtures("single_thread")

# Measured once and documented in docs/zoo.md; a change in torchvision or in our
# adaptations shows up here.
PARAMETER_COUNTS = {
    ("resnet18", 32, 100): 11_220_132,
    ("resnet18", 64, 200): 11_271_432,
    ("mobilenet_v2", 32, 100): 2_351_972,
    ("mobilenet_v2", 64, 200): 2_480_072,
    ("vgg16", 32, 100): 134_670_244,
    ("vgg16", 64, 200): 58_794_504,
}


def meta_model(name: str, num_classes: int, input_size: int, in_channels: int = 3) -> nn.Module:
    # The meta device allocates nothing: the 134.7M-parameter VGG16 costs nothing here.
    with torch.device("meta"):
        return build_model(name, num_classes, input_size, in_channels)


@pytest.mark.parametrize(("name", "input_size", "num_classes"), list(PARAMETER_COUNTS))
def test_parameter_counts(name, input_size, num_classes):
    model = meta_model(name, num_classes, input_size)
    assert count_parameters(model) == PARAMETER_COUNTS[(name, input_size, num_classes)]


def test_vgg16_matches_the_paper():
    cifar = meta_model("vgg16", 100, 32)
    assert cifar.classifier[0].weight.shape == (4096, 512 * 7 * 7)  # ImageNet classifier
    assert cifar.classifier[0].weight.numel() == pytest.approx(102.8e6, rel=1e-3)
    tiny = meta_model("vgg16", 200, 64)
    assert [m.in_features for m in tiny.classifier if isinstance(m, nn.Linear)] == [8192, 4096,
                                                                                  4096]
    assert sum(isinstance(m, nn.Conv2d) for m in tiny.features) == 10  # last block removed
    assert count_parameters(tiny) == pytest.approx(58.8e6, rel=1e-3)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vgg16"])
@pytest.mark.parametrize(("input_size", "num_classes"), [(32, 100), (64, 200)])
def test_last_feature_map_is_4x4_and_logits_have_class_count(name, input_size, num_classes):
    model = meta_model(name, num_classes, input_size)
    shapes = []
    last = {"resnet18": "layer4", "mobilenet_v2": "features", "vgg16": "features"}[name]
    getattr(model, last).register_forward_hook(lambda m, i, out: shapes.append(out.shape))
    logits = model(torch.empty(2, 3, input_size, input_size, device="meta"))
    assert logits.shape == (2, num_classes)
    expected_side = 1 if (name, input_size) == ("vgg16", 32) else 4  # VGG16-CIFAR: 5 pools
    assert tuple(shapes[0][-2:]) == (expected_side, expected_side)


def test_resnet_stem_follows_input_size():
    cifar, tiny = meta_model("resnet18", 100, 32), meta_model("resnet18", 200, 64)
    for model in (cifar, tiny):
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(cifar.maxpool, nn.Identity)
    assert isinstance(tiny.maxpool, nn.MaxPool2d)


def test_mobilenet_stem_follows_input_size():
    cifar, tiny = meta_model("mobilenet_v2", 100, 32), meta_model("mobilenet_v2", 200, 64)
    assert cifar.features[0][0].stride == (1, 1) and tiny.features[0][0].stride == (1, 1)
    assert cifar.features[2].conv[1][0].stride == (1, 1)
    assert tiny.features[2].conv[1][0].stride == (2, 2)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_in_channels(name):
    size = 8 if name == "small_cnn" else 32
    model = meta_model(name, 10, size, in_channels=1)
    assert model(torch.empty(3, 1, size, size, device="meta")).shape == (3, 10)


def test_real_forward_and_backward_on_cpu():
    model = build_model("mobilenet_v2", 10, 32)
    logits = model(torch.randn(2, 3, 32, 32))
    logits.sum().backward()
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_kaiming_uniform_bounds():
    # kaiming_uniform_ with ReLU gain: U(-b, b), b = sqrt(6 / fan_in). PyTorch's default
    # init (a=sqrt(5)) would give b = 1 / sqrt(fan_in), a factor sqrt(6) smaller.
    model = build_model("resnet18", 100, 32)
    conv = model.layer1[0].conv1.weight  # 64 x 64 x 3 x 3, fan_in 576
    bound = math.sqrt(6 / 576)
    assert conv.abs().max() <= bound
    assert conv.abs().max() > 0.99 * bound
    assert conv.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    assert torch.count_nonzero(model.fc.bias) == 0
    linear = nn.Linear(1000, 10)
    kaiming_uniform_init_(linear)
    assert linear.weight.abs().max() > 0.99 * math.sqrt(6 / 1000)


def test_small_cnn():
    model = SmallCNN(num_classes=10, in_channels=1)
    assert count_parameters(model) == 90_090
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    assert model(torch.randn(4, 1, 32, 32)).shape == (4, 10)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "resnet50"}, "model must be one of 'resnet18', 'mobilenet_v2'.*got 'resnet50'"),
        ({"name": "vgg16", "input_size": 48}, "input_size of vgg16 must be one of 32, 64, got 48"),
        ({"name": "resnet18", "num_classes": 1}, "num_classes must be >= 2, got 1"),
        ({"name": "small_cnn", "in_channels": 0}, "in_channels must be >= 1, got 0"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        meta_model(**{"num_classes": 10, "input_size": 32, **kwargs})
