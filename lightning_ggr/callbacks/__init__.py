"""The Lightning integration: `DynamicSparsityCallback` and what it reports.

- ``sparsity``: the callback, Lightning hooks mapped onto the engine (``lightning_ggr.sparse``);
- ``reporting``: metrics, TensorBoard views and the run summary of a sparse run;
- ``plots``: the figures (Matplotlib, no ``pyplot``); ``summary``: the run-summary file.
"""

from lightning_ggr.callbacks.reporting import NamedDataset, NamedModel, SparsityReporter
from lightning_ggr.callbacks.sparsity import DynamicSparsityCallback

__all__ = ["DynamicSparsityCallback", "NamedDataset", "NamedModel", "SparsityReporter"]
