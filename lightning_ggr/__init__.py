"""lightning-ggr: dynamic sparse training (GGR, SET, RigL, DSR) for PyTorch Lightning."""

from lightning_ggr.callback import DynamicSparsityCallback
from lightning_ggr.sparse import (
    METHODS,
    RewiringSchedule,
    SparseEngine,
    global_topk_counts,
    initial_densities,
    select_sparse_parameters,
)

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "DynamicSparsityCallback",
    "RewiringSchedule",
    "SparseEngine",
    "__version__",
    "global_topk_counts",
    "initial_densities",
    "select_sparse_parameters",
]
