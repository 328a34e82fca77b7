"""The engine: dynamic sparse training in plain PyTorch (no Lightning import)."""

from lightning_ggr.sparse.analysis import (
    LayerAnalysis,
    SparsityAnalysis,
    analyze_masks,
    count_parameters,
    sparse_flops,
)
from lightning_ggr.sparse.densities import (
    active_counts,
    erk_score,
    initial_densities,
    layer_budget,
)
from lightning_ggr.sparse.engine import SparseEngine
from lightning_ggr.sparse.export import (
    SparseModelFile,
    compact_sequential,
    load_sparse_model,
    module_masks,
    read_sparse_model,
    save_sparse_model,
)
from lightning_ggr.sparse.inference import (
    InferenceReport,
    LayerChoice,
    SparseConv2d,
    SparseLinear,
    to_inference,
)
from lightning_ggr.sparse.masks import apply_masks_, mask_optimizer_state_, random_mask
from lightning_ggr.sparse.methods import METHODS, MethodName, MethodSpec, get_method
from lightning_ggr.sparse.rewiring import Rewiring, RewiringReport
from lightning_ggr.sparse.schedules import RewiringSchedule, cosine_drop_fraction
from lightning_ggr.sparse.selection import (
    ParameterEntry,
    Selection,
    plan_selection,
    select_sparse_parameters,
)
from lightning_ggr.sparse.sharded import consolidate_masks, hold_masks_in_model
from lightning_ggr.sparse.topk import global_topk_counts

__all__ = [
    "METHODS",
    "InferenceReport",
    "LayerAnalysis",
    "LayerChoice",
    "MethodName",
    "MethodSpec",
    "ParameterEntry",
    "Rewiring",
    "RewiringReport",
    "RewiringSchedule",
    "Selection",
    "SparseConv2d",
    "SparseEngine",
    "SparseLinear",
    "SparseModelFile",
    "SparsityAnalysis",
    "active_counts",
    "analyze_masks",
    "apply_masks_",
    "compact_sequential",
    "consolidate_masks",
    "cosine_drop_fraction",
    "count_parameters",
    "erk_score",
    "get_method",
    "global_topk_counts",
    "hold_masks_in_model",
    "initial_densities",
    "layer_budget",
    "load_sparse_model",
    "mask_optimizer_state_",
    "module_masks",
    "plan_selection",
    "random_mask",
    "read_sparse_model",
    "save_sparse_model",
    "select_sparse_parameters",
    "sparse_flops",
    "to_inference",
]
