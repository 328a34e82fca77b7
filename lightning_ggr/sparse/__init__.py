"""The engine: dynamic sparse training in plain PyTorch (no Lightning import)."""

from lightning_ggr.sparse.analysis import (
    LayerAnalysis,
    SparsityAnalysis,
    analyze_masks,
    sparse_flops,
)
from lightning_ggr.sparse.densities import active_counts, erk_score, initial_densities
from lightning_ggr.sparse.engine import SparseEngine
from lightning_ggr.sparse.masks import (
    apply_masks_,
    mask_optimizer_state_,
    random_mask,
    select_sparse_parameters,
)
from lightning_ggr.sparse.methods import METHODS, MethodSpec, get_method
from lightning_ggr.sparse.rewiring import RewiringReport, rewire_
from lightning_ggr.sparse.schedules import RewiringSchedule, cosine_drop_fraction
from lightning_ggr.sparse.topk import global_topk_counts

__all__ = [
    "METHODS",
    "LayerAnalysis",
    "MethodSpec",
    "RewiringReport",
    "RewiringSchedule",
    "SparseEngine",
    "SparsityAnalysis",
    "active_counts",
    "analyze_masks",
    "apply_masks_",
    "cosine_drop_fraction",
    "erk_score",
    "get_method",
    "global_topk_counts",
    "initial_densities",
    "mask_optimizer_state_",
    "random_mask",
    "rewire_",
    "select_sparse_parameters",
    "sparse_flops",
]
