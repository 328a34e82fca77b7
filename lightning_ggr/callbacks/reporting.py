"""What `DynamicSparsityCallback` tells the user: metrics, TensorBoard views, the run summary.

The callback owns the training contract (masks, schedule, rewiring); everything it reports
goes through a :class:`SparsityReporter`, which reads the engine and never changes it.

Naming a run. The run summary records a ``model`` and a ``dataset``. A LightningModule that
implements :class:`NamedModel` (a ``model_name`` string attribute) names the model, else a
``model_name`` or ``model`` string hyper-parameter, else the class name. A LightningModule
or DataModule that implements :class:`NamedDataset` (a ``dataset_name`` string attribute)
names the dataset, else the DataModule's class name.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_ggr.sparse.engine import SparseEngine
from lightning_ggr.sparse.rewiring import RewiringReport


@runtime_checkable
class NamedModel(Protocol):
    """A LightningModule that names its network for the run summary (``"resnet18"``)."""

    model_name: str


@runtime_checkable
class NamedDataset(Protocol):
    """A LightningModule or DataModule that names its data for the run summary."""

    dataset_name: str


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The entries of ``metrics`` (e.g. ``trainer.callback_metrics``) that are one number."""
    return {
        str(key): float(value)
        for key, value in metrics.items()
        if isinstance(value, Tensor | float | int) and torch.as_tensor(value).numel() == 1
    }


def model_name(pl_module: pl.LightningModule) -> str:
    """The run's model name (see the module docstring for the rule)."""
    if isinstance(pl_module, NamedModel) and isinstance(pl_module.model_name, str):
        return pl_module.model_name
    hparams = dict(getattr(pl_module, "hparams", {}) or {})
    name = hparams.get("model_name", hparams.get("model"))
    return name if isinstance(name, str) else type(pl_module).__name__


def dataset_name(trainer: pl.Trainer, pl_module: pl.LightningModule) -> str | None:
    """The run's dataset name (see the module docstring for the rule); None without one."""
    datamodule = getattr(trainer, "datamodule", None)
    for owner in (pl_module, datamodule):
        if isinstance(owner, NamedDataset) and isinstance(owner.dataset_name, str):
            return owner.dataset_name
    return None if datamodule is None else type(datamodule).__name__


class SparsityReporter:
    """Logs a sparse run: densities and rewiring metrics to every logger, pictures to
    TensorBoard (rank 0), and the run summary JSON next to the logs when fit or test ends.

    Args:
        log_figures: draw the density chart, mask images and weight histograms.
        mask_layers: parameter names or patterns whose masks are drawn (see
            :func:`~lightning_ggr.callbacks.plots.resolve_mask_layers`).
    """

    def __init__(self, log_figures: bool = True, mask_layers: list[str] | None = None) -> None:
        self.log_figures = log_figures
        self.mask_layers = mask_layers
        #: Global density shown on the progress bar.
        self.global_density = 1.0
        self._summary_path: Path | None = None

    def check(self, params: Mapping[str, Tensor]) -> None:
        """Fail before training when ``mask_layers`` names no sparse parameter."""
        if self.mask_layers is not None:
            from lightning_ggr.callbacks.plots import resolve_mask_layers

            resolve_mask_layers(params, self.mask_layers)

    # ------------------------------------------------------------------------ events
    def training_started(self, trainer: pl.Trainer, engine: SparseEngine) -> None:
        self.log_densities(trainer, engine, trainer.global_step)
        self.log_views(trainer, engine)

    def rewired(self, trainer: pl.Trainer, engine: SparseEngine, report: RewiringReport,
                step: int) -> None:
        """Log one rewiring, or warn that a due one was postponed (non-finite gradients)."""
        if report.skipped:
            rank_zero_warn(f"step {step}: non-finite gradients, rewiring postponed to the next "
                           "step with finite gradients")
            metrics = {"rewiring/skipped": float(engine.skipped_rewirings)}
        else:
            metrics = {
                "rewiring/count": float(engine.rewirings),
                "rewiring/drop_fraction": report.drop_fraction,
                "rewiring/removed": float(report.total_removed),
                "rewiring/grown": float(report.total_grown),
                "rewiring/moved": float(report.total_moved),
            }
            if report.threshold is not None:
                metrics["rewiring/dsr_threshold"] = report.threshold
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        if not report.skipped:
            self.log_densities(trainer, engine, step)
            self.log_views(trainer, engine, moved=report.moved)

    def batch_ended(self, pl_module: pl.LightningModule) -> None:
        pl_module.log("density", self.global_density, prog_bar=True, logger=False,
                      on_step=True, on_epoch=False)

    def epoch_ended(self, trainer: pl.Trainer, engine: SparseEngine) -> None:
        self.log_views(trainer, engine)

    # ------------------------------------------------------------------------ pieces
    def log_densities(self, trainer: pl.Trainer, engine: SparseEngine, step: int) -> None:
        """``density/<param>`` and ``density/global`` to every logger."""
        self.global_density = engine.global_density()
        metrics = {f"density/{name}": d for name, d in engine.layer_densities().items()}
        metrics["density/global"] = self.global_density
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def log_views(self, trainer: pl.Trainer, engine: SparseEngine,
                  moved: Mapping[str, int] | None = None) -> None:
        """The TensorBoard pictures (rank 0, TensorBoard loggers only, if enabled)."""
        if not self.log_figures or not trainer.is_global_zero:
            return
        writers = [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not writers:
            return
        from lightning_ggr.callbacks.plots import log_sparsity_views

        for writer in writers:
            log_sparsity_views(writer, engine.params, engine.masks, engine.initial_counts,
                               trainer.global_step, mask_layers=self.mask_layers, moved=moved)

    def write_summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                      engine: SparseEngine, config: Mapping[str, Any]) -> None:
        """Write ``lightning_ggr_summary.json`` into the logger's folder (rank 0).

        A run without a logger leaves no file behind. Testing after fitting in the same run
        keeps the fit's metrics (``val/*``) and adds the new ones.
        """
        if not trainer.is_global_zero or not trainer.loggers or trainer.log_dir is None:
            return
        from lightning_ggr.callbacks.summary import (
            SUMMARY_FILENAME,
            build_run_summary,
            read_run_summary,
            write_run_summary,
        )

        config = {**config, "model": model_name(pl_module),
                  "dataset": dataset_name(trainer, pl_module)}
        example = getattr(pl_module, "example_input_array", None)
        summary = build_run_summary(
            masks=engine.masks, params=engine.params, initial_counts=engine.initial_counts,
            config=config, metrics=scalar_metrics(trainer.callback_metrics), module=pl_module,
            example_input=example[:1] if isinstance(example, Tensor) else None,
        )
        path = Path(trainer.log_dir) / SUMMARY_FILENAME
        if path == self._summary_path and path.exists():
            previous = read_run_summary(path).get("metrics") or {}
            summary["metrics"] = {**previous, **summary["metrics"]}
        write_run_summary(path, summary)
        self._summary_path = path
