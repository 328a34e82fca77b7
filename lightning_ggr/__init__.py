"""lightning-ggr: dynamic sparse training (GGR, SET, RigL, DSR) for PyTorch Lightning.

The engine (`lightning_ggr.sparse`) is plain PyTorch; the names that need Lightning
(the callback, the benchmark zoo) are imported lazily, on first access, so
``import lightning_ggr.sparse`` works without Lightning.
"""

from importlib import import_module
from typing import Any

from lightning_ggr.export import compact_sequential, load_sparse_model, save_sparse_model
from lightning_ggr.sparse import (
    METHODS,
    RewiringSchedule,
    SparseEngine,
    analyze_masks,
    global_topk_counts,
    initial_densities,
    select_sparse_parameters,
)

__version__ = "0.1.0"

#: Public names that live in modules importing Lightning: name -> module.
_LAZY = {
    "DynamicSparsityCallback": "lightning_ggr.callback",
    "ImageClassifier": "lightning_ggr.zoo",
    "CIFAR100DataModule": "lightning_ggr.zoo",
    "TinyImageNetDataModule": "lightning_ggr.zoo",
    "DigitsDataModule": "lightning_ggr.zoo",
    "DatasetUnavailableError": "lightning_ggr.zoo",
    "build_model": "lightning_ggr.zoo",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_ggr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "METHODS",
    "CIFAR100DataModule",
    "DatasetUnavailableError",
    "DigitsDataModule",
    "DynamicSparsityCallback",
    "ImageClassifier",
    "RewiringSchedule",
    "SparseEngine",
    "TinyImageNetDataModule",
    "__version__",
    "analyze_masks",
    "build_model",
    "compact_sequential",
    "global_topk_counts",
    "initial_densities",
    "load_sparse_model",
    "save_sparse_model",
    "select_sparse_parameters",
]
