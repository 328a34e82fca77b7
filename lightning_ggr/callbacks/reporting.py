"""What `DynamicSparsityCallback` tells the user: the selection summary and the schedule line
at the start, metrics, TensorBoard views, the account of the run at fit end, the run summary.

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
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.model_summary import get_human_readable_count
from torch import Tensor

from lightning_ggr.callbacks.account import (
    RunAccount,
    account_figures,
    account_metrics,
    format_account,
    format_schedule_line,
    format_table,
)
from lightning_ggr.sparse.analysis import sparse_flops
from lightning_ggr.sparse.engine import SparseEngine
from lightning_ggr.sparse.rewiring import RewiringReport
from lightning_ggr.sparse.selection import Selection
from lightning_ggr.sparse.sharded import (
    analyze_across_shards,
    gather_to_rank_zero,
    histogram_across_shards,
    owned,
)


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


def _count(number: int) -> str:
    return get_human_readable_count(int(number)).strip()


#: Tag of the selection summary in TensorBoard's Text tab.
SELECTION_TAG = "lightning_ggr/selection"
#: Tag of the schedule line in TensorBoard's Text tab.
SCHEDULE_TAG = "lightning_ggr/schedule"
#: Tag of the fit-end account in TensorBoard's Text tab.
ACCOUNT_TAG = "lightning_ggr/account"


def format_selection_table(selection: Selection, active: Mapping[str, int],
                           title: str = "") -> str:
    """The selection summary, in the manner of Lightning's ``ModelSummary``.

    One row per parameter tensor (a tied tensor once): name, shape, parameters, sparse or
    dense, density, active weights, and the role that made it sparse or why it is dense;
    then the totals, e.g. ``sparsity 0.90 over 94.3% of the parameters = 0.849 of all
    parameters are zero (3,671 of 24,234 active)``.

    Args:
        selection: from :func:`~lightning_ggr.sparse.selection.plan_selection`.
        active: sparse parameter name -> active weights (``engine.active_counts()``).
        title: a first line, if any.
    """
    rows = []
    for index, entry in enumerate(selection.entries):
        numel = entry.numel
        count = active[entry.name] if entry.sparse else numel
        shape = entry.shape
        rows.append((
            str(index), entry.name,
            "?" if shape is None else ("x".join(map(str, shape)) or "scalar"),
            _count(numel), "sparse" if entry.sparse else "dense",
            f"{count / numel:.3f}" if numel else "-", _count(count), entry.reason,
        ))
    columns = ("", "Parameter", "Shape", "Params", "Kind", "Density", "Active",
               "Role / dense because")
    lines = [title] if title else []
    lines += format_table(columns, rows, right=(3, 5, 6))
    total, sparse_total = selection.total_params, selection.sparse_params
    sparse_active = sum(active[name] for name in selection.params)
    sparse_count = len(selection.params)
    dense_count = len(rows) - sparse_count
    lines.append(f"{sparse_count} sparse tensor{'' if sparse_count == 1 else 's'} "
                 f"({_count(sparse_total)} params), {dense_count} dense "
                 f"({_count(total - sparse_total)} params)")
    zeros = sparse_total - sparse_active
    sparsity = zeros / sparse_total if sparse_total else 0.0
    lines.append(
        f"sparsity {sparsity:.2f} over {100 * sparse_total / total:.1f}% of the parameters = "
        f"{zeros / total:.3f} of all parameters are zero "
        f"({total - zeros:,} of {total:,} active)"
    )
    return "\n".join(lines)


class SparsityReporter:
    """Logs a sparse run: the selection summary at fit start, densities and rewiring metrics
    to every logger, pictures to TensorBoard (rank 0), and the run summary JSON next to the
    logs when fit or test ends.

    Several callbacks in one Trainer (one per network of a GAN) report apart: the reporter
    of the ``k``-th one (``k >= 1``) has the ``tag`` ``"_k"``, appended to the first part of
    every metric name (``density_1/global``, ``rewiring_1/count``, the progress bar's
    ``density_1``) and to the summary file's name (``lightning_ggr_summary_1.json``). The
    first one (and a single one) keeps the plain names.

    Args:
        log_figures: draw the density chart, mask images and weight histograms.
        mask_layers: parameter names or patterns whose masks are drawn (see
            :func:`~lightning_ggr.callbacks.plots.resolve_mask_layers`).
        selection_summary: print and log the selection summary at fit start and the schedule
            line when training starts.
        fit_end_summary: print and log the account of the run at fit end (its figures go to
            ``trainer.callback_metrics`` and the run summary either way).
    """

    def __init__(self, log_figures: bool = True, mask_layers: list[str] | None = None,
                 selection_summary: bool = True, fit_end_summary: bool = True) -> None:
        self.log_figures = log_figures
        self.mask_layers = mask_layers
        self.selection_summary = selection_summary
        self.fit_end_summary = fit_end_summary
        #: Running totals of the run's rewirings (checkpointed by the callback).
        self.account = RunAccount()
        #: Optimizer steps at which a rewiring is due over the whole run (``None``: unknown),
        #: set when training starts.
        self.planned: list[int] | None = None
        #: Global density shown on the progress bar.
        self.global_density = 1.0
        #: What the run summary records of the selection (set at fit start).
        self.selection_record: dict[str, Any] | None = None
        #: Suffix of metric groups and of the summary file ("" for the first callback).
        self.tag = ""
        self._shown_density: float | None = None
        self._summary_path: Path | None = None
        self._flops_warned = False
        self._epoch_views_pending = False
        #: The due step of the last postponement warned about, and the reasons said for it:
        #: a rewiring postponed step after step (a grad scaler's first overflows, a NaN that
        #: persists, reasons in turn) is said once per reason, and counted in the account.
        self._postponement_said: tuple[int | None, set[str]] = (None, set())

    def key(self, group: str, name: str) -> str:
        """The metric name ``<group><tag>/<name>``."""
        return f"{group}{self.tag}/{name}"

    def check(self, params: Mapping[str, Tensor]) -> None:
        """Fail before training when ``mask_layers`` names no sparse parameter."""
        if self.mask_layers is not None:
            from lightning_ggr.callbacks.plots import resolve_mask_layers

            resolve_mask_layers(params, self.mask_layers)

    # ------------------------------------------------------------------------ events
    def selection_chosen(self, trainer: pl.Trainer, selection: Selection, engine: SparseEngine,
                         title: str = "") -> None:
        """Print the selection summary (rank 0) and log it as TensorBoard text, if enabled;
        keep coverage and dense reasons for the run summary."""
        self.selection_record = {
            "coverage": selection.coverage,
            "sparse_params": selection.sparse_params,
            "total_params": selection.total_params,
            "dense": selection.dense,
        }
        if not self.selection_summary or not trainer.is_global_zero:
            return
        table = format_selection_table(selection, engine.active_counts(), title)
        self._show(trainer, table, SELECTION_TAG)

    def training_started(self, trainer: pl.Trainer, engine: SparseEngine) -> None:
        self._shown_density = None  # a new fit starts with an empty progress bar
        self.log_densities(trainer, engine, trainer.global_step)
        self.log_views(trainer, engine)

    def schedule_started(self, trainer: pl.Trainer, engine: SparseEngine,
                         planned: list[int] | None, stop_source: str, step: int) -> None:
        """Keep the planned rewirings; print the schedule line (rank 0) and log it as
        TensorBoard text, if the selection summary is enabled."""
        self.planned = planned
        if not self.selection_summary or not trainer.is_global_zero or engine.schedule is None:
            return
        line = format_schedule_line(engine.schedule, planned, stop_source,
                                    done=engine.rewirings, step=step,
                                    sparsity=engine.sparsity)
        self._show(trainer, f"DynamicSparsityCallback{self.tag} schedule: {line}",
                   SCHEDULE_TAG)

    def fit_ended(self, trainer: pl.Trainer, engine: SparseEngine, steps: int | None,
                  title: str) -> dict[str, Any]:
        """The account of the run: its totals into ``trainer.callback_metrics``; printed
        (rank 0) and logged as TensorBoard text if ``fit_end_summary``. Returns its figures
        (:func:`~lightning_ggr.callbacks.account.account_figures`)."""
        figures = account_figures(engine, self.account, self.planned, steps)
        metrics = trainer.callback_metrics
        for name, value in account_metrics(figures).items():
            metrics[self.key("rewiring", name)] = torch.tensor(value)
        if self.fit_end_summary and trainer.is_global_zero:
            shapes = {name: tuple(p.shape) for name, p in engine.params.items()}
            self._show(trainer, format_account(figures, shapes, title), ACCOUNT_TAG)
        return figures

    def _show(self, trainer: pl.Trainer, text: str, tag: str) -> None:
        """Print ``text`` (rank 0) and log it to TensorBoard's Text tab."""
        rank_zero_info(text)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # Indented four spaces: TensorBoard renders the text as Markdown code.
                indented = "\n".join("    " + row for row in text.splitlines())
                logger.experiment.add_text(f"{tag}{self.tag}", indented,
                                           global_step=trainer.global_step)

    def rewired(self, trainer: pl.Trainer, engine: SparseEngine, report: RewiringReport,
                step: int) -> None:
        """Log one rewiring, or warn that a due one was postponed (unusable gradients).

        ``step`` is the schedule's step (the optimizer holding the sparse weights); metrics
        are logged at ``trainer.global_step``, the x-axis of every other metric.
        """
        self.account.record(report)
        if report.skipped:
            due = engine.pending_step if engine.pending_step is not None else step
            reason = report.skip_reason or "unusable sparse gradients"
            if self._postponement_said[0] != due:
                self._postponement_said = (due, set())
            said = self._postponement_said[1]
            if reason not in said:  # once per due step and reason
                said.add(reason)
                rank_zero_warn(
                    f"step {step}: {reason}: the rewiring due at step {due} is postponed to "
                    "the next step with usable gradients (further postponements of it for "
                    "this reason are counted in the fit-end account, not repeated)"
                )
            metrics = {self.key("rewiring", "skipped"): float(engine.skipped_rewirings)}
        else:
            metrics = {
                self.key("rewiring", "count"): float(engine.rewirings),
                self.key("rewiring", "drop_fraction"): report.drop_fraction,
                self.key("rewiring", "removed"): float(report.total_removed),
                self.key("rewiring", "grown"): float(report.total_grown),
                self.key("rewiring", "moved"): float(report.total_moved),
            }
            if report.threshold is not None:
                metrics[self.key("rewiring", "dsr_threshold")] = report.threshold
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if not report.skipped:
            self.log_densities(trainer, engine, trainer.global_step)
            # At the step where the last epoch ended: these views replace the epoch's.
            self._epoch_views_pending = False
            self.log_views(trainer, engine, moved=report.moved)
        else:
            self.weights_about_to_change(trainer, engine)

    def batch_ended(self, pl_module: pl.LightningModule) -> None:
        """Show the global density on the progress bar, only when it changed: Lightning
        keeps the last value shown. A CPU tensor, because ``log`` copies a float to the
        module's device (a host-to-device copy every step on a GPU) and the progress bar then
        reads it back."""
        if self.global_density == self._shown_density:
            return
        self._shown_density = self.global_density
        pl_module.log(f"density{self.tag}", torch.tensor(self.global_density), prog_bar=True,
                      logger=False, on_step=True, on_epoch=False)

    def epoch_ended(self, trainer: pl.Trainer, engine: SparseEngine) -> None:
        """The epoch's views are drawn just before the next optimizer step changes the
        weights (:meth:`weights_about_to_change`), or at train end: a rewiring at that step,
        logged at the same global step (the first step of the next epoch), draws them
        instead, once, with its changes. Drawing both put two images at one step."""
        self._epoch_views_pending = True

    def weights_about_to_change(self, trainer: pl.Trainer, engine: SparseEngine) -> None:
        """Draw the views an epoch end left pending (the weights are still the epoch's)."""
        if self._epoch_views_pending:
            self._epoch_views_pending = False
            self.log_views(trainer, engine)

    # ------------------------------------------------------------------------ pieces
    def log_densities(self, trainer: pl.Trainer, engine: SparseEngine, step: int) -> None:
        """``density/<param>`` and ``density/global`` to every logger."""
        self.global_density = engine.global_density()
        metrics = {self.key("density", name): d for name, d in engine.layer_densities().items()}
        metrics[self.key("density", "global")] = self.global_density
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def log_views(self, trainer: pl.Trainer, engine: SparseEngine,
                  moved: Mapping[str, int] | None = None) -> None:
        """The TensorBoard pictures (rank 0, TensorBoard loggers only, if enabled).

        Sharded: every rank takes part (call it on all): the masks drawn as images are
        gathered to rank 0 alone, and the weight histograms are reduced across the shards
        (fixed bins), so no rank holds a layer it does not draw."""
        if not self.log_figures or not any(isinstance(lg, TensorBoardLogger)
                                           for lg in trainer.loggers):
            return
        from lightning_ggr.callbacks.plots import log_sparsity_views, resolve_mask_layers

        images = histograms = None
        if engine.layout is not None:
            chosen = resolve_mask_layers(engine.masks, self.mask_layers)
            images = {name: gather_to_rank_zero(engine.masks[name]) for name in chosen}
            values = []
            for name, param in engine.params.items():
                shard = engine.layout.layers[name]
                weight = owned(param.detach(), shard)
                values.append(weight[owned(engine.masks[name], shard).to(weight.device)].abs())
            histograms = dict(zip(engine.params, histogram_across_shards(values, engine.layout),
                                  strict=True))
        if not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                log_sparsity_views(logger.experiment, engine.params, engine.masks,
                                   engine.initial_counts, trainer.global_step,
                                   mask_layers=self.mask_layers, moved=moved, tag=self.tag,
                                   active=engine.active_counts(), images=images,
                                   histograms=histograms)

    def write_summary(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                      engine: SparseEngine, config: Mapping[str, Any],
                      steps: int | None = None) -> None:
        """Write ``lightning_ggr_summary<tag>.json`` into the logger's folder (rank 0).

        A run without a logger leaves no file behind. Testing after fitting in the same run
        keeps the fit's metrics (``val/*``) and adds the new ones. The ``rewiring`` section is
        the account of the run (:func:`~lightning_ggr.callbacks.account.account_figures`
        less its ``layers``, which the ``layers`` section holds); ``steps``: optimizer steps
        trained. Every rank must call it: ``trainer.log_dir`` is a broadcast, and a sharded
        run's analysis is computed from every rank's shards; FLOPs are not counted under
        sharding (a forward pass on rank 0 alone would wait for the other ranks' shards).
        """
        if not trainer.loggers:
            return
        log_dir = trainer.log_dir  # a collective: rank 0 alone would wait forever
        analysis = None
        if engine.layout is not None:
            analysis = analyze_across_shards(engine.masks, engine.params, engine.layout,
                                             pl_module)
        if not trainer.is_global_zero or log_dir is None:
            return
        from lightning_ggr.callbacks.summary import (
            SUMMARY_FILENAME,
            build_run_summary,
            read_run_summary,
            write_run_summary,
        )

        config = {**config, "model": model_name(pl_module),
                  "dataset": dataset_name(trainer, pl_module)}
        summary = build_run_summary(
            masks=engine.masks, params=engine.params, initial_counts=engine.initial_counts,
            config=config, metrics=scalar_metrics(trainer.callback_metrics), module=pl_module,
            analysis=analysis,
        )
        flops = None if analysis is not None else self._count_flops(trainer, pl_module, engine)
        if flops is not None:  # where build_run_summary puts it: before the metrics
            metrics = summary.pop("metrics")
            summary["flops"] = {"sparse": flops[0], "dense": flops[1]}
            summary["metrics"] = metrics
        if self.selection_record is not None:
            summary["selection"] = self.selection_record
        figures = account_figures(engine, self.account, self.planned, steps)
        summary["rewiring"] = {k: v for k, v in figures.items() if k != "layers"}
        stem, suffix = SUMMARY_FILENAME.rsplit(".", 1)
        path = Path(log_dir) / f"{stem}{self.tag}.{suffix}"
        if path == self._summary_path and path.exists():
            previous = read_run_summary(path).get("metrics") or {}
            summary["metrics"] = {**previous, **summary["metrics"]}
        write_run_summary(path, summary)
        self._summary_path = path

    def _count_flops(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     engine: SparseEngine) -> tuple[int, int] | None:
        """Sparse and dense FLOPs of one example, run as Lightning's ModelSummary runs it
        (batch-transfer hooks, the precision plugin's input conversion and forward context).
        A report-only figure: an example the module cannot run is skipped with a warning,
        never a crash of a finished fit."""
        example = getattr(pl_module, "example_input_array", None)
        if not isinstance(example, Tensor):
            return None
        try:
            batch = pl_module._on_before_batch_transfer(example[:1])
            batch = pl_module._apply_batch_transfer_handler(batch)
            batch = trainer.precision_plugin.convert_input(batch)
            if not isinstance(batch, Tensor):
                return None
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                return sparse_flops(pl_module, engine.masks, batch)
        except Exception as error:  # any failure only drops a reported figure
            if not self._flops_warned:
                self._flops_warned = True
                rank_zero_warn(
                    f"the run summary has no FLOP count: running example_input_array through "
                    f"the module failed ({type(error).__name__}: {error}). Set an "
                    "example_input_array the module accepts after its batch-transfer hooks"
                )
            return None
