"""`DynamicSparsityCallback`: Lightning hooks mapped onto the sparse engine."""

from __future__ import annotations

import ast
import functools
import math
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from lightning_ggr.callbacks.account import RunAccount
from lightning_ggr.callbacks.clock import ClockSettings, RewiringClock
from lightning_ggr.callbacks.compatibility import (
    check_strategy,
    refuse_closure_optimizers,
    refuse_lottery_ticket_pruning,
    warn_if_learning_rate_finder,
)
from lightning_ggr.callbacks.reporting import SparsityReporter
from lightning_ggr.sparse.checks import (
    check_bool,
    check_choice,
    check_finite,
    check_fraction,
    check_int,
    check_patterns,
    check_positive_or_none,
    check_sparsity,
)
from lightning_ggr.sparse.densities import DISTRIBUTIONS
from lightning_ggr.sparse.engine import SparseEngine
from lightning_ggr.sparse.masks import preserves_zeros, vanishing_eps
from lightning_ggr.sparse.methods import METHODS, MethodName
from lightning_ggr.sparse.rewiring import RewiringReport
from lightning_ggr.sparse.schedules import INTERVALS
from lightning_ggr.sparse.selection import (
    FROZEN,
    NOT_IN_OPTIMIZER,
    Selection,
    check_selection_patterns,
    plan_selection,
    selection_from_names,
)
from lightning_ggr.sparse.sharded import (
    check_sharding,
    hold_masks_in_model,
    is_fully_sharded_module,
    load_held_masks,
    zero_count,
)


class DynamicSparsityCallback(Callback):
    """Train the model's linear maps sparse from scratch, rewiring them as it trains.

    At fit start every sparse layer gets a random mask with its initial density (ERK or
    uniform); masked weights, gradients and optimizer state stay exactly zero. On a
    schedule, each rewiring drops the weakest active weights and grows as many new ones
    where the chosen method says (paper: Parger et al., ICML 2022, sections 3.2-3.3).

    Sparse by default: the ``weight`` of every ``Linear`` and (transposed) ``Conv`` layer, of
    transformers' ``Conv1D`` (GPT-2) and MultiheadAttention's projections, when they require
    grad and the optimizer holds them; a tied weight is one sparse tensor. Everything else
    stays dense, and the selection summary printed at fit start says why for each tensor
    (:mod:`lightning_ggr.sparse.selection`).

    Args:
        method: ``"ggr"`` (global gradient allocation, 50:50 gradient/random insertion),
            ``"set"``, ``"rigl"``, ``"dsr"``, or the ablations ``"set_rigl"``, ``"ggr_set"``,
            ``"ggr_rigl"``.
        sparsity: fraction of zero weights over all sparse layers, in ``[0, 1)``; ``0`` trains
            dense through the same code path (a baseline that never rewires).
        distribution: initial layer densities, ``"erk"`` (Erdos-Renyi-Kernel) or ``"uniform"``.
        drop_fraction: initial fraction of each layer's active weights to rewire, in
            ``(0, 1]``; decays by cosine to 0 at the stop point.
        update_interval: rewire every this many ``interval`` units (``>= 1``).
        interval: ``"epoch"`` (rewire at the start of every ``update_interval``-th epoch but
            the first, as the paper) or ``"step"`` (every ``update_interval`` optimizer steps).
        stop_fraction: stop rewiring after this fraction of all optimizer steps, in ``(0, 1]``
            (paper: 0.5). Resolved when training starts, from ``max_epochs`` x steps per epoch
            capped by ``max_steps``; a resumed run keeps the checkpoint's stop point.
        stop_step: stop rewiring at this optimizer step instead (overrides ``stop_fraction``).
            Steps are those of the optimizer holding the sparse weights (``global_step`` with
            one optimizer and automatic optimization).
        gradient_ratio: share of each layer's new weights grown by gradient in mixed
            insertion (GGR, SET+RigL), in ``[0, 1]``; the rest are random.
        init_value: value of newly grown weights (paper: ``1e-10``, so they are not pruned
            as zeros right away).
        seed: seed of the callback's own random generator (masks, random growth): every
            process draws the same masks whatever else consumes randomness.
        include: shell-style patterns of parameter names to make sparse, replacing the
            default (every Linear/Conv/attention weight), e.g. ``["features.*.weight"]``; a
            1-D parameter (bias, norm scale) only when named exactly.
        exclude: patterns of parameter names to keep dense, e.g. ``["fc.weight"]``.
        dsr_tolerance: DSR's tolerance around its target removal count, in ``(0, 1)``.
        log_figures: log the density chart, mask images and weight histograms to
            TensorBoard at rewirings and epoch ends (rank 0 only).
        mask_layers: parameter names or shell-style patterns whose masks are drawn as
            images (default: the first three sparse convolutions that are not depthwise).
        selection_summary: at fit start, print (rank 0) and log as TensorBoard text the table
            of every parameter tensor: sparse or dense, shape, initial density, active
            count, and why each dense one is dense; when training starts, the schedule in one
            line (every how many steps or epochs, the stop point and where it comes from, the
            rewirings planned, the drop fraction and its decay).
        fit_end_summary: at fit end, print (rank 0) and log as TensorBoard text the account
            of the run: rewirings done of planned, postponed ones and why, weights grown and
            moved between layers, each layer's density at initialization and now. Its totals
            go to ``trainer.callback_metrics`` (``rewiring/count``, ``rewiring/planned``,
            ``rewiring/skipped``, ``rewiring/grown_total``, ``rewiring/removed_total``,
            ``rewiring/moved_net``) and the run summary's ``rewiring`` section either way.
        update_grown_weights: let the optimizer step of a rewiring step also update the
            weights it grew (``-lr * g``). Default ``False``: their gradient is zeroed, so they
            start the next step at ``init_value`` (RigL's reference applies no gradient on
            mask-update steps; weight decay, if any, still applies).
        reinit_regrown: restart a weight dropped and regrown in the same rewiring at
            ``init_value`` with fresh optimizer state. Default ``False``: it keeps its value
            and state (RigL's reference, ``reinit_when_same=False``).
        enforce_masks_every_step: keep masked weights at exactly 0 at every step, whatever
            writes into them (weight noise, a re-initialisation, an EMA copy written back):
            the masks are applied to the weights right before the training forward pass
            (a forward pre-hook on the sparse layers, armed in ``on_train_batch_start``) and
            to weights and optimizer state after every optimizer step. Default ``False``:
            such writes are found and zeroed again, with a warning, at each rewiring and each
            epoch end (the per-step cost is measured in docs/benchmarks.md).
        dsr_initial_threshold: DSR's first threshold ``H``, finite and > 0 (default
            ``1e-3``, DSR's reference), or ``None`` to start at the ``K``-th smallest active
            magnitude of the first rewiring.

    Several callbacks may share a Trainer, each over its own parameters (disjoint
    ``include``) held by its own optimizer, e.g. one per network of a GAN.
    """

    def __init__(
        self,
        method: MethodName = "ggr",
        sparsity: float = 0.9,
        distribution: Literal["erk", "uniform"] = "erk",
        drop_fraction: float = 0.1,
        update_interval: int = 1,
        interval: Literal["step", "epoch"] = "epoch",
        stop_fraction: float = 0.5,
        stop_step: int | None = None,
        gradient_ratio: float = 0.5,
        init_value: float = 1e-10,
        seed: int = 0,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        dsr_tolerance: float = 0.1,
        log_figures: bool = True,
        mask_layers: list[str] | None = None,
        selection_summary: bool = True,
        update_grown_weights: bool = False,
        reinit_regrown: bool = False,
        dsr_initial_threshold: float | None = 1e-3,
        enforce_masks_every_step: bool = False,
        fit_end_summary: bool = True,
    ) -> None:
        super().__init__()
        # The same checks the engine and the schedule run, here so that a bad argument fails
        # when the callback is built, before any training.
        self.method = check_choice("method", method, tuple(METHODS))
        self.sparsity = check_sparsity(sparsity)
        self.distribution = check_choice("distribution", distribution, DISTRIBUTIONS)
        self.drop_fraction = check_fraction("drop_fraction", drop_fraction, closed_low=False)
        self.update_interval = check_int("update_interval", update_interval, 1)
        self.interval = check_choice("interval", interval, INTERVALS)
        self.stop_fraction = check_fraction("stop_fraction", stop_fraction, closed_low=False)
        self.stop_step = None if stop_step is None else check_int("stop_step", stop_step, 1)
        self.gradient_ratio = check_fraction("gradient_ratio", gradient_ratio)
        self.init_value = check_finite("init_value", init_value)
        # torch.Generator.manual_seed's range.
        self.seed = check_int("seed", seed, 0, 2**64, "2**64")
        self.include = check_patterns("include", include)
        self.exclude = check_patterns("exclude", exclude)
        self.dsr_tolerance = check_fraction("dsr_tolerance", dsr_tolerance, closed_low=False,
                                            closed_high=False)
        self.log_figures = check_bool("log_figures", log_figures)
        self.mask_layers = check_patterns("mask_layers", mask_layers)
        self.update_grown_weights = check_bool("update_grown_weights", update_grown_weights)
        self.reinit_regrown = check_bool("reinit_regrown", reinit_regrown)
        self.dsr_initial_threshold = check_positive_or_none("dsr_initial_threshold",
                                                            dsr_initial_threshold)
        self.selection_summary = check_bool("selection_summary", selection_summary)
        self.enforce_masks_every_step = check_bool("enforce_masks_every_step",
                                                   enforce_masks_every_step)
        self.fit_end_summary = check_bool("fit_end_summary", fit_end_summary)
        self.reporter = SparsityReporter(self.log_figures, self.mask_layers,
                                         self.selection_summary, self.fit_end_summary)
        #: Every parameter tensor, sparse or dense with its reason (from ``on_fit_start``).
        self.selection: Selection | None = None
        self.reporter.global_density = 1.0 - self.sparsity
        self.engine: SparseEngine | None = None
        self.last_report: RewiringReport | None = None
        self._loaded_state: dict | None = None
        self._step_hook: Any = None
        self._optimizer: torch.optim.Optimizer | None = None
        self._warned: set[str] = set()
        self._sharded = False  # ModelParallelStrategy (set in setup)
        #: Sparse tensors left out of the last rewiring (frozen), and dense layer weights
        #: that were frozen or held by no optimizer at fit start.
        self._frozen_now: set[str] = set()
        self._untrained_at_start: dict[str, str] = {}
        self._look_for_unfrozen = False
        #: enforce_masks_every_step: forward pre-hooks on the sparse layers, and whether
        #: they still have to apply the masks before this batch's forward pass.
        self._forward_hooks: list[Any] = []
        self._mask_before_forward = False
        #: enforce_masks_every_step: each sparse layer's version counters when its masks were
        #: last applied before a forward pass.
        self._versions_masked: dict[str, tuple[int, int]] = {}
        #: enforce_masks_every_step: between on_train_batch_start and on_train_batch_end
        #: (the training forward passes; not validation's), and the id of the callback's
        #: pre-hook on each module holding sparse parameters.
        self._in_training_batch = False
        self._own_hook_ids: dict[int, int] = {}
        #: The modules whose pre-hook of the callback's runs after all others (not FSDP2's,
        #: where it runs first): moved back to the end at each batch start.
        self._hooks_to_keep_last: list[torch.nn.Module] = []
        #: Manual optimization: whether the last backward gave a sparse weight a gradient
        #: (post-accumulate-grad hooks), and backward passes that did since the last step.
        self._grad_hooks: list[Any] = []
        self._backward_touched = False
        self._backwards_this_step = 0
        #: The schedule's clock: steps of the optimizer holding the sparse weights
        #: (checkpointed), the stop point, whose epochs count under DDP.
        self.clock = RewiringClock(self._clock_settings(), self._warn_once)
        # Names one run across its resumes (checkpointed): the report counts it once.
        self._run_id: str | None = None

    # ------------------------------------------------------------------ public view
    @property
    def masks(self) -> dict[str, Tensor]:
        """Parameter name -> boolean mask (True = active), available from ``on_fit_start``."""
        return {} if self.engine is None else self.engine.masks

    def layer_densities(self) -> dict[str, float]:
        """Parameter name -> fraction of active weights."""
        return {} if self.engine is None else self.engine.layer_densities()

    @property
    def initial_counts(self) -> dict[str, int]:
        """Parameter name -> number of active weights drawn at initialization."""
        return {} if self.engine is None else dict(self.engine.initial_counts)

    @property
    def state_key(self) -> str:
        """Key of this callback's state in a checkpoint.

        The class name for a callback over the default selection (checkpoints of earlier
        versions resume); with ``include``/``exclude`` the key names them too, so several
        callbacks, each owning its own parameters (one per network of a GAN), coexist and
        resume.
        """
        if self.include is None and self.exclude is None:
            return type(self).__qualname__
        return self._generate_state_key(include=self.include, exclude=self.exclude)

    # ------------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._sharded = check_strategy(trainer)
        refuse_lottery_ticket_pruning(trainer)
        # Fails early, with a clear message, when a pattern cannot work. What depends on the
        # optimizers, on frozen flags and on lazy shapes is only known in on_fit_start. A
        # module that builds its layers in its own setup or configure_model (both run after
        # this hook) has no parameters yet: on_fit_start checks the patterns then.
        # A pattern that matches nothing yet may name a layer the module builds in its own
        # setup: on_fit_start (still before the first step) decides then.
        if next(pl_module.parameters(), None) is not None:
            try:
                check_selection_patterns(pl_module, self.include, self.exclude)
            except ValueError:
                pass  # plan_selection in on_fit_start raises the same error if it still holds
        self._take_position(trainer)
        for checkpoint in trainer.checkpoint_callbacks:
            if isinstance(checkpoint, ModelCheckpoint) and checkpoint.save_weights_only:
                rank_zero_warn(
                    "ModelCheckpoint(save_weights_only=True) stores no callback state: a run "
                    "resumed from such a checkpoint loses the sparse topology (masks, schedule "
                    "position). Use save_weights_only=False to resume sparse training."
                )
        warn_if_learning_rate_finder(trainer)
        # Read before on_fit_start, where StochasticWeightAveraging adds an epoch of its own
        # (a BatchNorm pass) that is not training.
        self.clock.max_epochs = trainer.max_epochs
        # The schedule's arguments as they are now (an attribute set after construction
        # counts, as it did when the callback read them at train start).
        self.clock.settings = self._clock_settings()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Masks and the optimizer hook only: the training length (and so the schedule) is
        # resolved in on_train_start, once Lightning has restored the loops and set up the
        # train dataloader (reading it here would break a mid-epoch resume).
        if not pl_module.automatic_optimization:
            rank_zero_info("DynamicSparsityCallback: manual optimization; every optimizer step "
                           "of the optimizer holding the sparse weights counts as a step.")
        params = self._select_parameters(trainer, pl_module)
        # Before anything reads the shards across processes (a DTensor placed otherwise
        # fails inside torch, naming no way out).
        check_sharding(params)
        self._check_sole_owner(trainer, pl_module, params)
        loaded = self._loaded_state
        # ModelParallelStrategy restores the checkpoint after this hook: its state arrives
        # in on_train_start (see _adopt_restored_state).
        restored_later = (trainer.ckpt_path is not None
                          and trainer.strategy.restore_checkpoint_after_setup)
        if loaded is None and self.engine is not None:
            rank_zero_warn(
                "this DynamicSparsityCallback already trained a model: fitting again draws new "
                "masks over the current weights. Resume with `ckpt_path` to keep the topology."
            )
        if loaded is None and trainer.ckpt_path is not None and not restored_later:
            rank_zero_warn(
                f"resuming from {trainer.ckpt_path}, which holds no DynamicSparsityCallback "
                "state: new random masks are drawn and applied to the loaded weights."
            )
        elif loaded is not None:
            self._warn_if_settings_changed(loaded)
        settings = {
            "sparsity": self.sparsity, "distribution": self.distribution, "method": self.method,
            "schedule": None, "gradient_ratio": self.gradient_ratio,
            "init_value": self.init_value, "seed": self.seed, "dsr_tolerance": self.dsr_tolerance,
            "update_grown_weights": self.update_grown_weights,
            "reinit_regrown": self.reinit_regrown,
            "dsr_initial_threshold": self.dsr_initial_threshold,
        }
        if loaded is None:
            if not restored_later:
                self._warn_if_already_sparse(params)
            self.engine = SparseEngine(params, **settings)
        else:
            self.engine = SparseEngine.from_state_dict(params, loaded, **settings)
            self._loaded_state = None
        self.clock.restore(loaded)
        self.reporter.account = RunAccount.from_state((loaded or {}).get("account"))
        self._warned = set()
        self._run_id = str((loaded or {}).get("run_id") or uuid.uuid4().hex)
        self._attach_step_hook(trainer, params)
        refuse_closure_optimizers(self._optimizer)
        self._check_optimizer()
        self._frozen_now = set()
        self._untrained_at_start = self._dense_untrained_weights()
        self._attach_forward_hooks(pl_module)
        self._attach_gradient_hooks(pl_module)
        self.reporter.global_density = self.engine.global_density()
        self._warn_if_init_value_underflows(params)
        self._warn_if_eps_vanishes()
        self._warn_if_not_sharded(trainer)
        self.reporter.selection_chosen(trainer, self.selection, self.engine, self._title())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loaded_state is not None:  # restored after on_fit_start
            self._adopt_restored_state(trainer)
        elif trainer.ckpt_path is not None and trainer.strategy.restore_checkpoint_after_setup:
            rank_zero_warn(
                f"resuming from {trainer.ckpt_path}, which holds no DynamicSparsityCallback "
                "state: new random masks are drawn and applied to the loaded weights."
            )
            self.engine.apply_masks()
        if self.engine.layout is not None:
            # Sharded: the masks become buffers of the model, so that Lightning's
            # distributed checkpoint saves them shard by shard with it (no rank holds a
            # whole mask). Only now, after the restore: a checkpoint without them (a dense
            # run's, a single-device run's) loads strictly into the model, and a sharded
            # one's masks were read by _adopt_restored_state.
            hold_masks_in_model(pl_module, self.engine.masks)
        # Lightning restores optimizer state after on_fit_start: state from a checkpoint
        # without our masks (or an optimizer reused across fits) must be masked once here,
        # and a restored state's layout checked.
        self._check_optimizer()
        self.engine.enforce_masks([self._optimizer])
        # FitLoop.run has just set up the train dataloader (restoring a resumable one's
        # position) and Lightning restored global_step: the length and the clock are known.
        self.engine.schedule = self.clock.start(trainer, pl_module.automatic_optimization,
                                                self.engine)
        self.reporter.schedule_started(trainer, self.engine, self.clock.planned,
                                       self.clock.stop_source, self.clock.steps or 0)
        self.reporter.training_started(trainer, self.engine)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.clock.epoch_started(trainer, self.engine)
        # BaseFinetuning unfreezes layers in its own on_train_epoch_start (maybe after this
        # one): look at the epoch's first step.
        self._look_for_unfrozen = True

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Manual optimization: Lightning's documented pattern is manual_backward ->
        # clip_gradients -> opt.step(), and this hook runs at the end of manual_backward, before
        # the clipping: growth must read the gradient here (not yet clipped) and the masked
        # gradients go now (so they are not in the clipping norm). Automatic optimization
        # does both in on_before_optimizer_step, which runs before its clipping.
        if pl_module.automatic_optimization or self.engine is None or self.clock.steps is None:
            return
        touched, self._backward_touched = self._backward_touched, False
        if not touched:  # a backward that gave the sparse weights no gradient (a GAN's other net)
            return
        self._backwards_this_step += 1
        if self._backwards_this_step > 1:  # accumulation by hand: the step was handled
            self._warn_once(
                "manual accumulation",
                "manual optimization with several backward passes before a step of the "
                "optimizer holding the sparse weights: each pass's masked gradients are zeroed "
                "right after it (so gradient clipping never counts them), and a rewiring due "
                "at that step grew from the first pass's gradient")
            self.engine.mask_gradients()
            return
        self._optimizer_step_work(trainer, self._optimizer)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Gradients here are final: accumulated, all-reduced, unscaled, not yet clipped.
        if self.engine is None:
            return
        if optimizer is not self._optimizer and not self._follow_optimizer(trainer, optimizer):
            return
        if self.clock.steps is None:  # no schedule yet (a step outside the fit loop): mask only
            self.reporter.weights_about_to_change(trainer, self.engine)
            self.engine.mask_gradients()
            return
        if self._backwards_this_step:  # manual optimization: done after its backward
            self.engine.mask_gradients()
        else:
            self._optimizer_step_work(trainer, optimizer)
        if self._step_hook is not None:
            # Masked weights are zeroed again right after this step: writes into them by
            # other code since the last step must be counted now, or nothing would see them.
            self.engine.collect_stray_weights()
        self._backwards_this_step = 0
        self.clock.advance()

    def _optimizer_step_work(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer
                             ) -> None:
        """A step of the optimizer holding the sparse weights: rewire if due, mask the
        gradients, report."""
        if self._look_for_unfrozen:
            self._look_for_unfrozen = False
            self._warn_if_dense_tensors_unfrozen()
        step, epoch = self.clock.position(trainer, self.engine, type(self._optimizer).__name__)
        report = self.engine.before_optimizer_step(step, epoch, [optimizer])
        if report is not None:
            self.last_report = report
            self._warn_stray(report.stray_weights, f"at step {step}")
            if not report.skipped:
                self._say_frozen(report)
            self._warn_if_nothing_removed(report)
            self.reporter.rewired(trainer, self.engine, report, step)
        else:
            self.reporter.weights_about_to_change(trainer, self.engine)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                             batch: Any, batch_idx: int) -> None:
        # Armed here, applied by the first sparse layer's forward: after every other
        # on_train_batch_start (the module's runs after the callbacks').
        self._mask_before_forward = self.enforce_masks_every_step and self.engine is not None
        self._in_training_batch = self._mask_before_forward
        for module in self._hooks_to_keep_last:  # behind pre-hooks registered since
            hooks, own = module._forward_pre_hooks, self._own_hook_ids[id(module)]
            if own in hooks and next(reversed(hooks)) != own:
                hooks.move_to_end(own)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        self._in_training_batch = False
        self.clock.batch_ended()
        self.reporter.batch_ended(pl_module)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.engine is not None:  # after the stop point too: nothing else would look
            self._warn_stray(self.engine.zero_stray_weights([self._optimizer]),
                             f"at the end of epoch {trainer.current_epoch}")
        if not pl_module.automatic_optimization:
            self.clock.check_one_step_per_batch(trainer)
        self.reporter.epoch_ended(trainer, self.engine)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        engine = self.engine
        self.reporter.weights_about_to_change(trainer, engine)  # the last epoch's views
        if engine.pending_step is not None:
            rank_zero_warn(
                f"the rewiring due at step {engine.pending_step} was postponed (non-finite or "
                "missing gradients) and training ended before a step with usable "
                "gradients: it did not run"
            )
        elif (engine.rewirings == 0 and engine.schedule is not None
              and engine.schedule.stop_step > 0 and "no rewiring" not in self._warned):
            rank_zero_warn(
                f"no rewiring ran: training ended at step {self.clock.steps} and none was due "
                f"before (interval={self.interval!r}, update_interval={self.update_interval}, "
                f"stop_step={engine.schedule.stop_step}); the masks are the initial random "
                "ones. Train longer, or lower update_interval"
            )

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.engine is not None:
            self._remask_kept_model(trainer)
            self.reporter.fit_ended(trainer, self.engine, self.clock.steps,
                                    self._title("at fit end") + f", step {self.clock.steps}:")
            self.reporter.write_summary(trainer, pl_module, self.engine, self.run_config(),
                                        self.clock.steps)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.engine is not None:
            self.reporter.write_summary(trainer, pl_module, self.engine, self.run_config(),
                                        self.clock.steps)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        if stage == "fit":
            self._remove_forward_hooks()
            self._remove_gradient_hooks()
        # A state loaded but not adopted is not a run to resume and must not leak into a later
        # fit: one restored for test/validate/predict, or one a learning-rate search restored
        # in the middle of a fit (LearningRateFinder reloads its own checkpoint).
        self._loaded_state = None

    # --------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        if self.engine is None:
            # A checkpoint written between restore and on_fit_start keeps the loaded state.
            return dict(self._loaded_state) if self._loaded_state else {}
        state = self.engine.state_dict()
        if self.engine.layout is not None:
            # Sharded: the masks are buffers of the model (hold_masks_in_model), saved
            # shard by shard with it; this state keeps their names only.
            state["masks"] = {}
            state["mask_names"] = list(self.engine.masks)
        if state["schedule"] is None and self.clock.saved_schedule is not None:
            # restored, training never started
            state["schedule"] = dict(self.clock.saved_schedule)
        state.update(self.clock.state())
        state["account"] = self.reporter.account.state()
        if self._run_id is not None:
            state["run_id"] = self._run_id
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Deferred: the model (and its parameters) are only known in on_fit_start.
        self._loaded_state = dict(state_dict) if state_dict else None

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # Checkpoints of earlier versions store the state under the class name whatever the
        # selection; a single callback with include/exclude adopts it.
        # A single callback whose include/exclude changed since (so its key did) adopts the
        # checkpoint's only DynamicSparsityCallback state: the saved masks are the selection
        # (_select_parameters warns that it differs). Several callbacks find theirs by their
        # patterns, whatever their order.
        states = checkpoint.get("callbacks") or {}
        if self.state_key in states:
            return  # Lightning passes it to load_state_dict
        ours = {key: state for key, state in states.items()
                if _patterns_of_key(key) is not None and state}
        single = sum(isinstance(cb, DynamicSparsityCallback) for cb in trainer.callbacks) == 1
        if single and len(ours) == 1:
            self.load_state_dict(next(iter(ours.values())))
            return
        mine = _normalized(self.include, self.exclude)
        matches = [state for key, state in ours.items() if _patterns_of_key(key) == mine]
        if len(matches) == 1:
            self.load_state_dict(matches[0])
        elif single and states.get(type(self).__qualname__):  # an earlier version's key
            self.load_state_dict(states[type(self).__qualname__])

    def run_config(self) -> dict[str, Any]:
        """The callback's settings, as stored in the run summary."""
        schedule = None if self.engine is None else self.engine.schedule
        stop_step = (schedule.stop_step if schedule is not None
                     else self.clock.saved_stop_step())
        return {
            "method": self.method if self.sparsity > 0 else "dense",
            "sparsity": self.sparsity,
            "distribution": self.distribution,
            "drop_fraction": self.drop_fraction,
            "update_interval": self.update_interval,
            "interval": self.interval,
            "stop_step": stop_step,
            "gradient_ratio": self.gradient_ratio,
            "init_value": self.init_value,
            "seed": self.seed,
            "update_grown_weights": self.update_grown_weights,
            "reinit_regrown": self.reinit_regrown,
            "dsr_initial_threshold": self.dsr_initial_threshold,
            "enforce_masks_every_step": self.enforce_masks_every_step,
            "run_id": self._run_id,
        }

    # ------------------------------------------------------------------- internals
    def _warn_if_not_sharded(self, trainer: pl.Trainer) -> None:
        """ModelParallelStrategy without ``fully_shard``: nothing is sharded, and nothing
        synchronises the processes' gradients either."""
        if self._sharded and self.engine.layout is None:
            rank_zero_warn(
                f"{type(trainer.strategy).__name__} runs, but no sparse parameter is sharded "
                "(no DTensor): apply torch.distributed.fsdp.fully_shard in the "
                "LightningModule's configure_model. Without it nothing synchronises the "
                "processes' gradients, and their weights drift apart")

    def _adopt_restored_state(self, trainer: pl.Trainer) -> None:
        """The checkpoint's state, restored after on_fit_start (ModelParallelStrategy loads
        the model after on_fit_start): the engine adopts the saved masks (those of a sharded
        run read from the checkpoint's mask buffers, each process its rows) and the
        bookkeeping, the clock its position."""
        loaded, self._loaded_state = self._loaded_state, None
        self._warn_if_settings_changed(loaded)
        saved = loaded.get("masks") or {}
        names = loaded.get("mask_names") or list(saved)
        if set(names) != set(self.engine.masks):
            raise ValueError(
                f"the checkpoint's masks cover {sorted(names)}, this callback selected "
                f"{sorted(self.engine.masks)}: resume with the include/exclude of the run "
                "that wrote it")
        if not saved:  # a sharded run's: the masks are the model's buffers in the checkpoint
            saved = load_held_masks(self.engine.masks, trainer.ckpt_path)
        self.engine.load_state_dict({**loaded, "masks": saved})
        self.clock.restore(loaded)
        self.reporter.account = RunAccount.from_state(loaded.get("account"))
        self._run_id = str(loaded.get("run_id") or self._run_id)
        self.reporter.global_density = self.engine.global_density()

    def _select_parameters(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> dict[str, Tensor]:
        """The sparse parameters, and ``self.selection`` (the account of every tensor).

        Runs in ``on_fit_start``, where the optimizers exist: only tensors they hold are
        selected. Lazy modules are materialized first. On resume the saved masks' names are
        the selection (the optimizer may not hold everything yet, e.g. BaseFinetuning).
        """
        _materialize_lazy_modules(trainer, pl_module)
        saved = None if self._loaded_state is None else self._loaded_state.get("masks")
        if saved:
            self.selection = selection_from_names(pl_module, list(saved))
            try:
                today = plan_selection(pl_module, self.include, self.exclude,
                                       trained=trainer.optimizers).params
            except ValueError:
                today = {}
            if set(today) != set(self.selection.params):
                rank_zero_warn(
                    "the checkpoint's masks cover other parameters than this callback would "
                    f"select now (only saved: {sorted(set(self.selection.params) - set(today))}"
                    f", only now: {sorted(set(today) - set(self.selection.params))}): the "
                    "saved selection is kept"
                )
        else:
            self.selection = plan_selection(pl_module, self.include, self.exclude,
                                            trained=trainer.optimizers)
        params = self.selection.params
        self.reporter.check(params)
        return params

    def _clock_settings(self) -> ClockSettings:
        return ClockSettings(self.sparsity, self.interval, self.update_interval, self.stop_step,
                             self.stop_fraction, self.drop_fraction)

    def _title(self, when: str = "") -> str:
        """``DynamicSparsityCallback: ggr, sparsity 0.9, erk; what is sparse:``, or with
        ``when``: ``DynamicSparsityCallback at fit end: ggr, sparsity 0.9, erk``."""
        method = self.method if self.sparsity > 0 else "dense"
        settings = f"{method}, sparsity {self.sparsity:g}, {self.distribution}"
        if when:
            return f"DynamicSparsityCallback{self.reporter.tag} {when}: {settings}"
        return f"DynamicSparsityCallback: {settings}; what is sparse:"

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _take_position(self, trainer: pl.Trainer) -> None:
        """Several callbacks in one Trainer report apart: the k-th one's metrics get ``_k``."""
        instances = [cb for cb in trainer.callbacks if isinstance(cb, DynamicSparsityCallback)]
        position = next((i for i, cb in enumerate(instances) if cb is self), 0)
        self.reporter.tag = f"_{position}" if position else ""

    def _check_sole_owner(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                          params: Mapping[str, Tensor]) -> None:
        """Several callbacks in one Trainer: each parameter has one owner."""
        for other in trainer.callbacks:
            if other is self or not isinstance(other, DynamicSparsityCallback):
                continue
            try:
                theirs = plan_selection(pl_module, other.include, other.exclude,
                                        trained=trainer.optimizers).params
            except ValueError:
                continue  # the other callback reports its own selection error
            shared = sorted(set(params) & set(theirs))
            if shared:
                raise ValueError(
                    f"{shared} are selected by two DynamicSparsityCallbacks (include="
                    f"{self.include!r}, exclude={self.exclude!r} and include={other.include!r}, "
                    f"exclude={other.exclude!r}): give each parameter one owner with "
                    "include/exclude"
                )

    def _remask_kept_model(self, trainer: pl.Trainer) -> None:
        """The model the user keeps respects the final masks, whatever wrote into it last."""
        stray = self.engine.zero_stray_weights()
        if not stray:
            return
        writers = [type(cb).__name__ for cb in trainer.callbacks
                   if "Averag" in type(cb).__name__] or ["another callback or the module"]
        rank_zero_warn(
            f"{sum(stray.values())} weights at masked positions were non-zero at the end of fit "
            f"({_per_layer(stray)}; written by {', '.join(writers)}): they are zeroed again, so "
            "the model respects the final masks. With weight averaging, start averaging at or "
            "after the stop point"
        )

    def _warn_stray(self, stray: Mapping[str, int], when: str) -> None:
        """Masked weights something else wrote into (found and zeroed by the engine): say
        so once per layer, with the counts (not with enforce_masks_every_step, which zeroes
        them before every forward pass anyway)."""
        if self.enforce_masks_every_step:
            return
        new = {name: count for name, count in stray.items()
               if f"stray {name}" not in self._warned}
        if not new:
            return
        self._warned.update(f"stray {name}" for name in new)
        rank_zero_warn(
            f"{sum(new.values())} masked weights were not 0 {when} ({_per_layer(new)}): "
            "something else writes into them (weight noise, a re-initialisation, an EMA copy "
            "written back), so they took part in the forward pass since they were last "
            "zeroed; zeroed again now (and at each rewiring and epoch end). To keep them 0 at "
            "every step, pass enforce_masks_every_step=True"
        )

    def _attach_forward_hooks(self, pl_module: pl.LightningModule) -> None:
        """enforce_masks_every_step: a forward pre-hook on the module and on every module
        holding a sparse parameter (directly or through a parametrization). The first to run
        after ``on_train_batch_start`` applies all masks, right before the forward pass;
        each layer's own then re-masks its weights if something wrote into them since (its
        version counter moved: a weight-noise pre-hook of that layer, registered before the
        callback's, runs first), and always when other pre-hooks ran before it on that layer
        or globally (a write through ``.data`` moves no counter). In every training forward
        pass, whatever the layer's own ``training`` mode; not in validation's. A pre-hook
        registered after the callback's (another callback's ``on_fit_start``) would run after
        it: ``on_train_batch_start`` moves the callback's back to the end.

        On FSDP2's modules (``fully_shard``) the hook is prepended: FSDP2 gathers a module's
        shards into whole parameters in its own pre-hook, and masks applied to the shards
        after that would miss this forward pass (and a write into the gathered parameters
        by a pre-hook of that module is masked after the step, not before this forward)."""
        self._remove_forward_hooks()
        if not self.enforce_masks_every_step or self.engine is None:
            return
        owned: dict[int, list[str]] = {}
        sparse = {id(p): name for name, p in self.engine.params.items()}
        owners = {id(pl_module): pl_module}
        for module in pl_module.modules():
            direct = list(module.parameters(recurse=False))
            if isinstance(getattr(module, "parametrizations", None), torch.nn.Module):
                direct += list(module.parametrizations.parameters())
            names = [sparse[id(p)] for p in direct if id(p) in sparse]
            if names:
                owners[id(module)] = module
                owned[id(module)] = list(dict.fromkeys(names))
        self._forward_hooks = [
            module.register_forward_pre_hook(
                functools.partial(self._before_forward, names=owned.get(key, [])),
                prepend=is_fully_sharded_module(module))
            for key, module in owners.items()]
        self._own_hook_ids = {key: handle.id for key, handle
                              in zip(owners, self._forward_hooks, strict=True)}
        self._hooks_to_keep_last = [module for module in owners.values()
                                    if not is_fully_sharded_module(module)]

    def _attach_gradient_hooks(self, pl_module: pl.LightningModule) -> None:
        """Manual optimization: know which backward passes give the sparse weights a
        gradient (``on_after_backward`` runs after every one, a GAN's other network's too)."""
        self._remove_gradient_hooks()
        if pl_module.automatic_optimization or self.engine is None:
            return
        self._grad_hooks = [param.register_post_accumulate_grad_hook(self._gradient_arrived)
                            for param in self.engine.params.values()]

    def _gradient_arrived(self, param: Tensor) -> None:
        self._backward_touched = True

    def _remove_gradient_hooks(self) -> None:
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = []
        self._backward_touched = False
        self._backwards_this_step = 0

    def _remove_forward_hooks(self) -> None:
        for handle in self._forward_hooks:
            handle.remove()
        self._forward_hooks = []
        self._own_hook_ids = {}
        self._hooks_to_keep_last = []
        self._mask_before_forward = False
        self._in_training_batch = False

    def _before_forward(self, module: torch.nn.Module, args: Any, names: list[str]) -> None:
        engine = self.engine
        if self._mask_before_forward:
            self._mask_before_forward = False
            engine.apply_masks()
            self._versions_masked = {name: engine.weight_version(name)
                                     for name in engine.params}
        if not names or not self._in_training_batch:  # whatever the layer's mode
            return
        # Hooks that ran before this one on this layer (its own, global ones) may have
        # written it through .data, which moves no version counter: re-masked regardless.
        hooked_before = (next(iter(module._forward_pre_hooks), None)
                         != self._own_hook_ids.get(id(module))
                         or bool(getattr(torch.nn.modules.module,
                                         "_global_forward_pre_hooks", None)))
        for name in names:  # written since the masks were applied
            if hooked_before or engine.weight_version(name) != self._versions_masked.get(name):
                engine.apply_mask(name)
                self._versions_masked[name] = engine.weight_version(name)

    def _warn_if_already_sparse(self, params: Mapping[str, Tensor]) -> None:
        """New masks over a model that already is sparse (a trained sparse run, fine-tuned
        with a fresh callback) throw most of its trained weights away."""
        if self.sparsity == 0.0:
            return
        total = sum(p.numel() for p in params.values())
        zeros = zero_count(params)
        if zeros >= 0.5 * self.sparsity * total:
            rank_zero_warn(
                f"the sparse parameters are already {zeros / total:.0%} exact zeros (a trained "
                "sparse model?): new random masks are drawn over them, discarding most of its "
                "trained weights. To continue its topology, resume from its checkpoint "
                "(ckpt_path), which holds the DynamicSparsityCallback state"
            )

    def _warn_if_settings_changed(self, loaded: Mapping[str, Any]) -> None:
        current = {"method": self.method, "sparsity": self.sparsity,
                   "distribution": self.distribution}
        saved = {key: loaded.get(key) for key in current}
        if all(saved[key] is None or saved[key] == value for key, value in current.items()):
            return
        rank_zero_warn(
            "the checkpoint's DynamicSparsityCallback state was saved with "
            + ", ".join(f"{key}={value!r}" for key, value in saved.items())
            + "; this callback has "
            + ", ".join(f"{key}={value!r}" for key, value in current.items())
            + ": the saved masks are kept as they are (with the checkpoint's density); "
            "resume with the checkpoint's settings to avoid surprises"
        )

    def _warn_if_eps_vanishes(self) -> None:
        vanishing = vanishing_eps(self._optimizer)
        if vanishing is not None:
            eps, dtype = vanishing
            rank_zero_warn(
                f"the optimizer's eps={eps} is 0 in {dtype}: its step divides 0 by 0 wherever "
                "a gradient and its state are 0, which is NaN. Masked weights are zeroed again "
                "after every step, but an active weight whose gradient is exactly 0 becomes "
                f"NaN; use eps >= {torch.finfo(dtype).smallest_normal} (or bf16)")

    def _warn_if_init_value_underflows(self, params: Mapping[str, Tensor]) -> None:
        dtypes = {p.dtype for p in params.values() if p.is_floating_point()}
        lost = [d for d in dtypes if self.init_value != 0 and float(
            torch.tensor(self.init_value, dtype=d)) == 0.0]
        if lost:
            rank_zero_warn(
                f"init_value={self.init_value} is 0 in {lost[0]}: new weights start at exactly 0 "
                f"(the paper avoids that); use an init_value >= {torch.finfo(lost[0]).tiny}"
            )

    def _attach_step_hook(self, trainer: pl.Trainer, params: Mapping[str, Tensor]) -> None:
        wanted = {id(p) for p in params.values()}
        owners = [
            optimizer
            for optimizer in trainer.optimizers
            if any(id(p) in wanted for group in optimizer.param_groups for p in group["params"])
        ]
        if len(owners) != 1:
            raise ValueError(
                f"the sparse parameters must all belong to exactly one optimizer, found "
                f"{len(owners)}; use include/exclude to select the parameters of one optimizer"
            )
        self._optimizer = owners[0]
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        if self.enforce_masks_every_step or not preserves_zeros(self._optimizer):
            # Fires only when a step really ran (GradScaler may skip it). Standard optimizers
            # keep masked weights at 0 on their own, which saves one pass per step, unless
            # something else writes into them (enforce_masks_every_step).
            self._step_hook = self._optimizer.register_step_post_hook(self._after_step)

    def _dense_untrained_weights(self) -> dict[str, str]:
        """Dense layer weights (a Linear's, a Conv's) that no optimizer step would update
        now, name -> why: frozen, or held by no optimizer."""
        held = {id(p) for group in self._optimizer.param_groups for p in group["params"]}
        return {entry.name: FROZEN if not entry.tensor.requires_grad else NOT_IN_OPTIMIZER
                for entry in self.selection.entries
                if not entry.sparse and entry.role is not None
                and (not entry.tensor.requires_grad or id(entry.tensor) not in held)}

    def _warn_if_dense_tensors_unfrozen(self) -> None:
        """A layer weight dense because frozen at fit start and trained now (BaseFinetuning
        unfroze it and added it to the optimizer) stays dense: say so once."""
        if not self._untrained_at_start:
            return
        now = self._dense_untrained_weights()
        for name, why in self._untrained_at_start.items():
            if name not in now:
                self._warn_once(
                    f"unfrozen {name}",
                    f"{name} was {why} at fit start, so it was left dense; it is trained now "
                    "(unfrozen, e.g. by BaseFinetuning) and stays dense: the masks cover the "
                    "tensors chosen at fit start. To train it sparse, have it trainable and in "
                    "the optimizer when fit starts (freeze it by zeroing its learning rate)")

    def _say_frozen(self, report: RewiringReport) -> None:
        """Say once per tensor that a sparse tensor frozen mid-fit is left out of rewiring,
        and when it takes part again."""
        frozen = set(report.frozen)
        for name in report.frozen:
            self._warn_once(
                f"frozen {name}",
                f"{name} is frozen (requires_grad=False) or held by no optimizer since the "
                "fit started: its mask and weights are kept as they are and it takes no part "
                "in rewiring (nor in GGR's global budget) while it stays so")
        back = sorted(self._frozen_now - frozen)
        if back:
            rank_zero_info(f"DynamicSparsityCallback: {', '.join(back)} trained again: "
                           "rewired again from this rewiring on")
        self._frozen_now = frozen

    def _check_optimizer(self) -> None:
        """Refuse an optimizer whose state cannot follow each weight; say once when where
        it starts a fresh parameter could not be found (grown weights then start at 0)."""
        for warning in self.engine.check_optimizers([self._optimizer]):
            self._warn_once(f"fresh state {type(self._optimizer).__name__}", warning)

    def _follow_optimizer(self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> bool:
        """Whether ``optimizer`` is now the one holding the sparse weights: the trainer's
        optimizers were replaced mid-fit (``strategy.setup_optimizers``, e.g. a switch from
        Adam to SGD). Then the hook moves to it and its state is masked; otherwise (another
        optimizer of a multi-optimizer module) it is not ours."""
        if any(o is self._optimizer for o in trainer.optimizers):
            return False
        self._attach_step_hook(trainer, self.engine.params)  # raises if no single owner
        refuse_closure_optimizers(self._optimizer)
        self._check_optimizer()
        self.engine.enforce_masks([self._optimizer])
        rank_zero_info(
            f"DynamicSparsityCallback: the optimizers were replaced; now following "
            f"{type(self._optimizer).__name__}, which holds the sparse weights"
        )
        return optimizer is self._optimizer

    def _warn_if_nothing_removed(self, report: RewiringReport) -> None:
        """A drop fraction that rounds to 0 removals in every layer makes rewiring a no-op."""
        if report.skipped or report.total_removed or report.threshold is not None:
            return
        largest = max(report.active.values(), default=0)
        if largest and math.floor(self.drop_fraction * largest + 0.5) == 0:
            self._warn_once(
                "nothing removed",
                f"drop_fraction={self.drop_fraction:g} removes round(drop_fraction * active) = 0 "
                f"weights in every layer (the largest has {largest} active weights): the "
                "rewirings move nothing and the masks stay the initial random ones. Raise "
                f"drop_fraction to at least {0.5 / largest:.3g}",
            )

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.engine is not None:
            self.engine.after_optimizer_step([optimizer])


def _per_layer(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{name}: {count}" for name, count in counts.items())


def _normalized(include: Sequence[str] | None,
                exclude: Sequence[str] | None) -> tuple[tuple[str, ...] | None, ...]:
    """The patterns, order-free (the selection does not depend on their order)."""
    return tuple(None if p is None else tuple(sorted(p)) for p in (include, exclude))


def _patterns_of_key(key: str) -> tuple[tuple[str, ...] | None, ...] | None:
    """The normalized patterns of a DynamicSparsityCallback state key (the class name alone:
    the default selection), or None for another callback's key."""
    name = DynamicSparsityCallback.__qualname__
    if key == name:
        return _normalized(None, None)
    if not key.startswith(name + "{"):
        return None
    try:
        fields = ast.literal_eval(key[len(name):])
        return _normalized(fields.get("include"), fields.get("exclude"))
    except (ValueError, SyntaxError, AttributeError, TypeError):
        return None


def _materialize_lazy_modules(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Run ``example_input_array`` once through a module with lazy parameters, so they have
    their shapes before masks are drawn (no gradient, eval mode, modes restored after).

    The parameters keep their identity when materialized, so the optimizer built over them
    in ``configure_optimizers`` holds the real ones. (On resume the checkpoint's state has
    already materialized them.)
    """
    lazy = [name for name, p in pl_module.named_parameters()
            if isinstance(p, torch.nn.parameter.UninitializedParameter)]
    if not lazy:
        return
    example = pl_module.example_input_array
    if example is None:
        raise ValueError(
            f"parameters {lazy} are not materialized at fit start (lazy modules): set "
            "`example_input_array` on the LightningModule (DynamicSparsityCallback runs it once "
            "to give them their shapes) or run one forward pass before trainer.fit"
        )
    batch = trainer.strategy.batch_to_device(example)
    modes = {module: module.training for module in pl_module.modules()}
    pl_module.eval()
    try:
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            if isinstance(batch, list | tuple):
                pl_module(*batch)
            elif isinstance(batch, dict):
                pl_module(**batch)
            else:
                pl_module(batch)
    finally:
        for module, training in modes.items():
            module.training = training
