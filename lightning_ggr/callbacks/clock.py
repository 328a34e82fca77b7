"""The schedule's clock of a `DynamicSparsityCallback`: which optimizer step it is, when
rewiring stops, and whose epochs count.

The engine's :class:`~lightning_ggr.sparse.schedules.RewiringSchedule` decides from a step
and an epoch whether a rewiring is due. Under Lightning both are less simple than
``trainer.global_step`` and ``trainer.current_epoch``: the clock counts the steps of the
optimizer that holds the sparse weights (manual optimization, several optimizers), resumes
them from a checkpoint, resolves the stop point from the training length once Lightning knows
it (``on_train_start``: after a mid-epoch resume restored the loops and the dataloader), has
every DDP rank agree on it with one collective, and lets rank 0's epochs decide when the
ranks' epochs differ in length.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_ggr.callbacks.compatibility import check_weight_averaging
from lightning_ggr.callbacks.ranks import distributed, gather_ints, rank_zero_int
from lightning_ggr.callbacks.training_length import steps_before_epoch, total_optimizer_steps
from lightning_ggr.sparse.engine import SparseEngine
from lightning_ggr.sparse.schedules import RewiringSchedule


@dataclass(frozen=True)
class ClockSettings:
    """The callback's schedule arguments (validated by the callback)."""

    sparsity: float
    interval: str
    update_interval: int
    stop_step: int | None
    stop_fraction: float
    drop_fraction: float


class RewiringClock:
    """Counts the sparse optimizer's steps and resolves the schedule of one fit.

    Args:
        settings: the callback's schedule arguments.
        warn_once: the callback's warning that is given once per key and fit.
    """

    def __init__(self, settings: ClockSettings, warn_once: Callable[[str, str], None]) -> None:
        self.settings = settings
        self._warn_once = warn_once
        #: Steps of the optimizer holding the sparse weights (checkpointed); None until the
        #: schedule is known.
        self.steps: int | None = None
        #: The checkpoint's schedule, when resuming.
        self.saved_schedule: dict[str, Any] | None = None
        #: ``trainer.max_epochs`` at setup (StochasticWeightAveraging adds one later).
        self.max_epochs: int | None = None
        #: DDP ranks whose epochs differ: rank 0's epochs decide.
        self.agree_epochs = False
        #: Where this fit's stop point comes from (``"stop_fraction=0.5 of 30 steps = step
        #: 15"``), and the optimizer steps at which a rewiring is due over the whole run
        #: (``None``: unknown, the epochs' length is): both set by :meth:`schedule`.
        self.stop_source = ""
        self.planned: list[int] | None = None
        self._hook_global_step: int | None = None  # the closure guard
        self._epoch_batches: int | None = None  # batches in the epoch so far
        self._epoch_start_step = 0
        #: Lightning's global steps per step of the sparse optimizer, as assumed for
        #: ``max_steps`` (manual optimization: one per optimizer of the module, each
        #: stepping once per batch), and whether ``max_steps`` decided the length.
        self.global_steps_per_step = 1
        self._max_steps_decides = False
        self._epoch_start_global_step = 0

    # ------------------------------------------------------------------ life cycle
    def restore(self, loaded: Mapping[str, Any] | None) -> None:
        """The clock and the schedule a checkpoint saved (none for a new run)."""
        steps = None if loaded is None else loaded.get("optimizer_steps")
        self.steps = None if steps is None else int(steps)
        saved = None if loaded is None else loaded.get("schedule")
        self.saved_schedule = None if saved is None else dict(saved)
        self.agree_epochs = False
        self._epoch_batches = None

    def start(self, trainer: pl.Trainer, automatic_optimization: bool,
              engine: SparseEngine) -> RewiringSchedule:
        """At train start (the loops and the train dataloader restored): the clock's first
        value and this fit's schedule, agreed by every rank."""
        if self.steps is None:  # a new schedule, or a checkpoint saved without the clock
            self.steps = (trainer.global_step if automatic_optimization
                          else max(trainer.fit_loop.total_batch_idx + 1, 0))
        self._hook_global_step = None
        # max_steps bounds global_step, which under manual optimization counts the steps of
        # every optimizer (two per batch in a GAN): the stop point assumes each of them
        # steps once per batch (checked at each epoch end).
        self.global_steps_per_step = (1 if automatic_optimization
                                      else max(len(trainer.optimizers), 1))
        schedule = self.schedule(trainer, engine)
        self._epoch_batches, self._epoch_start_step = 0, self.steps
        self._epoch_start_global_step = trainer.global_step
        return schedule

    def epoch_started(self, trainer: pl.Trainer, engine: SparseEngine | None) -> None:
        self._epoch_batches, self._epoch_start_step = 0, self.steps or 0
        self._epoch_start_global_step = trainer.global_step
        if trainer.reload_dataloaders_every_n_epochs > 0 and self.may_rewire(engine):
            # A reloaded dataloader may change length on one rank only. Ranks that agreed
            # so far start this epoch together, so this collective pairs up.
            self.agree_on_epochs(trainer)

    def position(self, trainer: pl.Trainer, engine: SparseEngine, optimizer_name: str
                 ) -> tuple[int, int]:
        """This optimizer step's (step, epoch) for the schedule; :meth:`advance` after it."""
        self._refuse_repeated_evaluation(trainer, optimizer_name)
        epoch = trainer.current_epoch
        if self.agree_epochs and self.may_rewire(engine):
            epoch = rank_zero_int(trainer, epoch)  # ranks' epochs differ: rank 0's decide
        assert self.steps is not None
        return self.steps, epoch

    def advance(self) -> None:
        assert self.steps is not None
        self.steps += 1

    def batch_ended(self) -> None:
        if self._epoch_batches is not None:
            self._epoch_batches += 1

    def may_rewire(self, engine: SparseEngine | None) -> bool:
        """Whether a rewiring can still be due (identical on every rank)."""
        if engine is None or engine.schedule is None or self.steps is None:
            return False
        return self.steps < engine.schedule.stop_step or engine.pending_step is not None

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the clock."""
        return {} if self.steps is None else {"optimizer_steps": int(self.steps)}

    def saved_stop_step(self) -> int | None:
        return (self.saved_schedule or {}).get("stop_step")

    # ---------------------------------------------------------------- the schedule
    def schedule(self, trainer: pl.Trainer, engine: SparseEngine) -> RewiringSchedule:
        """The schedule of this fit, agreed by every rank: needs the train dataloader set up."""
        s = self.settings
        stop_step, source = self.local_stop_step(trainer)
        stop_step, batches = self.agree_on_length(trainer, stop_step)
        self._check_first_rewiring(trainer, stop_step, source, batches)
        schedule = RewiringSchedule(s.interval, s.update_interval, stop_step, s.drop_fraction)
        self.stop_source = source
        self.planned = self.planned_steps(trainer, schedule, batches)
        self._warn_if_schedule_changed(schedule, engine)
        check_weight_averaging(trainer, stop_step, batches)
        return schedule

    def local_stop_step(self, trainer: pl.Trainer) -> tuple[int | None, str]:
        """This rank's stop step (``None``: the training length is unknown) and its source."""
        s = self.settings
        if s.sparsity == 0.0:
            return 0, "dense baseline"  # nothing to rewire
        if s.stop_step is not None:
            return s.stop_step, f"stop_step={s.stop_step}"
        max_epochs = trainer.max_epochs if self.max_epochs is None else self.max_epochs
        per_step = self.global_steps_per_step
        total = total_optimizer_steps(trainer, max_epochs, per_step)
        by_epochs = (math.inf if max_epochs is None or max_epochs < 0
                     else steps_before_epoch(trainer, max(max_epochs, 1)))
        self._max_steps_decides = per_step > 1 and total < by_epochs
        known = math.isfinite(total) and total >= 1
        fresh = int(s.stop_fraction * total) if known else None
        saved = self.saved_stop_step()
        if saved is not None:
            if fresh is not None and fresh != saved:
                rank_zero_warn(
                    f"resuming: the checkpoint's stop point, step {saved}, is kept (stop_fraction="
                    f"{s.stop_fraction} of this fit's {int(total)} steps would be step "
                    f"{fresh}); pass stop_step={fresh} to move the stop point instead"
                )
            return int(saved), f"the checkpoint's stop point, step {saved}"
        if fresh is None:
            return None, "an unknown training length"
        source = f"stop_fraction={s.stop_fraction} of {int(total)} steps = step {fresh}"
        if self._max_steps_decides:
            source += (f"; max_steps={trainer.max_steps} counts the steps of all "
                       f"{per_step} optimizers")
        return fresh, source

    def planned_steps(self, trainer: pl.Trainer, schedule: RewiringSchedule,
                      batches: float) -> list[int] | None:
        """The optimizer steps at which ``schedule`` is due over the whole run (from step 0;
        a resumed run's past rewirings included), within the training length: the first step
        of every slot but the first before the stop point. ``None`` when an epoch's length
        (``batches``, in training batches) is unknown and ``interval="epoch"``."""
        max_epochs = trainer.max_epochs if self.max_epochs is None else self.max_epochs
        end = min(float(schedule.stop_step),
                  total_optimizer_steps(trainer, max_epochs, self.global_steps_per_step))
        every = schedule.update_interval
        if schedule.interval == "step":
            return list(range(every, math.ceil(end), every)) if end > every else []
        if not math.isfinite(batches):
            return None
        if batches < 1:  # no training batch: no epoch has a first step
            return []
        planned = []
        epoch = every
        while max_epochs is None or max_epochs < 0 or epoch < max_epochs:
            first = steps_before_epoch(trainer, epoch, batches)
            if first >= end:
                break
            planned.append(int(first))
            epoch += every
        return planned

    def agree_on_length(self, trainer: pl.Trainer, stop_step: int | None) -> tuple[int, float]:
        """One collective at train start: every rank takes the same stop step and knows
        whether its epochs match the others' (else rank 0's decide, see :meth:`position`).

        Returns the stop step and the training batches per epoch all ranks share (the
        fewest; ``inf`` when a rank's are unknown).
        """
        s = self.settings
        batches = trainer.num_training_batches
        local = [-1 if not math.isfinite(batches) else int(batches),
                 -1 if stop_step is None else stop_step]
        ranks = gather_ints(trainer, local)
        lengths, stops = [r[0] for r in ranks], [r[1] for r in ranks]
        if -1 in stops:
            unknown = ("no max_epochs and no max_steps" if self.max_epochs in (None, -1)
                       else "the train dataloader has no length (an IterableDataset without "
                            "__len__) and max_steps is not set")
            raise ValueError(
                f"stop_fraction={s.stop_fraction} needs the training length, which is "
                f"unknown: {unknown}; set stop_step (the step at which rewiring stops) or "
                "max_steps"
            )
        if min(stops) != max(stops):
            rank_zero_warn(
                f"the ranks derived different stop points {stops} from stop_fraction (their "
                f"epochs have {lengths} batches): all stop at step {min(stops)}; set stop_step "
                "to choose"
            )
        self.agree_epochs = s.interval == "epoch" and (-1 in lengths or len(set(lengths)) > 1)
        if self.agree_epochs:
            rank_zero_info(
                f"DynamicSparsityCallback: the ranks' epochs differ ({lengths} batches; -1: "
                "unknown): rank 0's epochs decide when an interval='epoch' rewiring is due "
                "(one broadcast per step until the stop)"
            )
        shared = math.inf if -1 in lengths else float(min(lengths))
        return min(stops), shared

    def agree_on_epochs(self, trainer: pl.Trainer) -> None:
        if self.settings.interval != "epoch" or self.agree_epochs or not distributed(trainer):
            return
        batches = trainer.num_training_batches
        lengths = [r[0] for r in gather_ints(
            trainer, [-1 if not math.isfinite(batches) else int(batches)])]
        self.agree_epochs = -1 in lengths or len(set(lengths)) > 1

    # ------------------------------------------------------------------- checks
    def _refuse_repeated_evaluation(self, trainer: pl.Trainer, optimizer_name: str) -> None:
        # Lightning runs on_before_optimizer_step in every closure evaluation; global_step
        # moves between two steps of any optimizer (and when GradScaler skips a step).
        if trainer.global_step == self._hook_global_step:
            raise RuntimeError(
                f"on_before_optimizer_step ran twice in one step of {optimizer_name} (global "
                f"step {trainer.global_step}): the optimizer holding the sparse weights "
                "evaluates its closure several times per step (LBFGS-like). "
                "DynamicSparsityCallback rewires and masks gradients once per step; use an "
                "optimizer that evaluates its closure once"
            )
        self._hook_global_step = trainer.global_step

    def _check_first_rewiring(self, trainer: pl.Trainer, stop_step: int, source: str,
                              batches: float) -> None:
        s = self.settings
        if s.sparsity == 0.0:
            return
        if s.interval == "step" and stop_step <= s.update_interval:
            message = (
                f"the stop point ({source}) comes at or before the first rewiring at step "
                f"{s.update_interval}: no rewiring would ever run; lower update_interval "
                "or raise stop_step/stop_fraction"
            )
            if not trainer.fast_dev_run:
                raise ValueError(message)
            # A smoke run (fast_dev_run) is legitimate; it just never reaches a rewiring.
            self._warn_once("no rewiring", f"fast_dev_run: {message}")
        elif s.interval == "epoch" and math.isfinite(batches):
            first = int(steps_before_epoch(trainer, s.update_interval, batches))
            if stop_step <= first:
                # A warning, not an error: short smoke runs (one epoch) are legitimate.
                self._warn_once(
                    "no rewiring",
                    f"the stop point ({source}) comes at or before the first rewiring (the "
                    f"start of epoch {s.update_interval}, step {first}): no rewiring will run "
                    "in this fit",
                )
        elif s.interval == "epoch":
            rank_zero_info(
                "DynamicSparsityCallback: interval='epoch' with a train dataloader of unknown "
                f"length: rewiring runs at the first step of every {s.update_interval}-th "
                f"epoch before step {stop_step}"
            )

    def _warn_if_schedule_changed(self, schedule: RewiringSchedule,
                                  engine: SparseEngine) -> None:
        saved = self.saved_schedule
        if saved is None:
            return
        current = {"interval": schedule.interval, "update_interval": schedule.update_interval,
                   "stop_step": schedule.stop_step, "drop_fraction": schedule.drop_fraction}
        if all(saved.get(key) == value for key, value in current.items()):
            return
        last = ("no rewiring yet" if engine.last_rewiring_step is None
                else f"the last rewiring, step {engine.last_rewiring_step}")
        rank_zero_warn(
            "resuming with another schedule than the checkpoint's ("
            + ", ".join(f"{key}={saved.get(key)!r}" for key in current)
            + " -> " + ", ".join(f"{key}={value!r}" for key, value in current.items())
            + f"): rewiring continues under the new interval, counted from {last}"
        )

    def check_one_step_per_batch(self, trainer: pl.Trainer) -> None:
        """Manual optimization: stop_fraction assumes one sparse-optimizer step per batch."""
        if self.settings.stop_step is not None or not self._epoch_batches or self.steps is None:
            return
        steps = self.steps - self._epoch_start_step
        global_steps = trainer.global_step - self._epoch_start_global_step
        if (self._max_steps_decides and steps == self._epoch_batches
                and global_steps != self.global_steps_per_step * self._epoch_batches):
            self._warn_once(
                "global steps per batch",
                f"the optimizers stepped {global_steps} times in {self._epoch_batches} batches "
                f"(epoch {trainer.current_epoch}), not {self.global_steps_per_step} times "
                f"each: max_steps={trainer.max_steps} counts every optimizer's steps, and the "
                f"stop point assumed each of the {self.global_steps_per_step} optimizers steps "
                "once per batch, so it is not that fraction of this optimizer's steps; set "
                "stop_step",
            )
        if steps != self._epoch_batches:
            self._warn_once(
                "steps per batch",
                f"the optimizer holding the sparse weights stepped {steps} times in "
                f"{self._epoch_batches} batches (epoch {trainer.current_epoch}): under manual "
                "optimization stop_fraction counts one step per batch (Lightning's training "
                "length is in batches), so the stop point is not that fraction of this "
                "optimizer's steps; set stop_step",
            )
