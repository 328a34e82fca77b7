"""The benchmark zoo: the paper's networks, data modules and LightningModule.

Optional for users of the callback: ``DynamicSparsityCallback`` works with any
LightningModule. These classes reproduce the paper's experiments and drive the
``lightning-ggr`` command line.
"""

from lightning_ggr.sparse.analysis import count_parameters
from lightning_ggr.zoo.data import (
    CIFAR100DataModule,
    DatasetUnavailableError,
    DigitsDataModule,
    TinyImageNetDataModule,
    relayout_tiny_imagenet_val,
)
from lightning_ggr.zoo.models import (
    MODEL_NAMES,
    SmallCNN,
    build_model,
    kaiming_uniform_init_,
)
from lightning_ggr.zoo.module import ImageClassifier, WarmupMultiStep

__all__ = [
    "MODEL_NAMES",
    "CIFAR100DataModule",
    "DatasetUnavailableError",
    "DigitsDataModule",
    "ImageClassifier",
    "SmallCNN",
    "TinyImageNetDataModule",
    "WarmupMultiStep",
    "build_model",
    "count_parameters",
    "kaiming_uniform_init_",
    "relayout_tiny_imagenet_val",
]
