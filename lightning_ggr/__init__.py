"""lightning-ggr: dynamic sparse training (GGR, SET, RigL, DSR) for PyTorch Lightning.

Three rooms, one direction of dependency (zoo -> callbacks -> sparse):

- ``lightning_ggr.sparse``: the engine, plain PyTorch (masks, densities, rewiring, analysis,
  export, inference); it never imports Lightning;
- ``lightning_ggr.callbacks``: the Lightning integration (``DynamicSparsityCallback``);
- ``lightning_ggr.zoo``: the paper's models, data, command line and results tables.

The callback is imported lazily, on first access, so ``import lightning_ggr`` and the engine
work where Lightning is not installed.
"""

from importlib import import_module
from typing import Any

from lightning_ggr import _moved
from lightning_ggr.sparse import (
    METHODS,
    RewiringSchedule,
    SparseEngine,
    analyze_masks,
    compact_sequential,
    global_topk_counts,
    initial_densities,
    load_sparse_model,
    save_sparse_model,
    select_sparse_parameters,
    to_inference,
)

#: The package version (the one source: ``pyproject.toml`` reads it from here).
__version__ = "0.1.0"

_moved.install()

#: Public names that live in modules importing Lightning: name -> module. The zoo's names
#: stay importable from here for code written before they moved to ``lightning_ggr.zoo``.
_LAZY = {
    "DynamicSparsityCallback": "lightning_ggr.callbacks.sparsity",
    "ImageClassifier": "lightning_ggr.zoo",
    "CIFAR100DataModule": "lightning_ggr.zoo",
    "TinyImageNetDataModule": "lightning_ggr.zoo",
    "DigitsDataModule": "lightning_ggr.zoo",
    "DatasetUnavailableError": "lightning_ggr.zoo",
    "build_model": "lightning_ggr.zoo",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        try:
            module = import_module(_LAZY[name])
        except ImportError as error:
            raise ImportError(
                f"lightning_ggr.{name} needs Lightning ({error}); install the package with its "
                "dependencies (pip install lightning-ggr), or use the engine alone: "
                "lightning_ggr.SparseEngine"
            ) from error
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'lightning_ggr' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "METHODS",
    "DynamicSparsityCallback",
    "RewiringSchedule",
    "SparseEngine",
    "__version__",
    "analyze_masks",
    "compact_sequential",
    "global_topk_counts",
    "initial_densities",
    "load_sparse_model",
    "save_sparse_model",
    "select_sparse_parameters",
    "to_inference",
]
