"""The account of a sparse run: the schedule line printed when training starts, and what the
rewirings did, printed at fit end and stored in ``trainer.callback_metrics`` and the run
summary.

Everything here reads the engine and the clock and never changes them. The figures that only
a running tally knows (weights grown and removed) live in a :class:`RunAccount`, which the
callback checkpoints so that a resumed run accounts for the whole run; why rewirings were
postponed is the engine's tally (``SparseEngine.skip_reasons``, checkpointed with it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lightning_ggr.sparse.engine import SparseEngine
from lightning_ggr.sparse.rewiring import RewiringReport
from lightning_ggr.sparse.schedules import RewiringSchedule

#: The reason given for postponements a checkpoint counted without saying why (one saved by
#: an earlier version).
UNRECORDED = "reason not recorded (resumed from an older checkpoint)"


@dataclass
class RunAccount:
    """Running totals of a run's rewirings, kept across resumes.

    Attributes:
        rewirings: rewirings counted here (fewer than the engine's after resuming from a
            checkpoint saved without an account).
        grown: weights grown over those rewirings.
        removed: weights removed over those rewirings.
    """

    rewirings: int = 0
    grown: int = 0
    removed: int = 0

    def record(self, report: RewiringReport) -> None:
        """Count one report: a rewiring that ran (a postponed one is the engine's to count,
        with its reason)."""
        if not report.skipped:
            self.rewirings += 1
            self.grown += report.total_grown
            self.removed += report.total_removed

    def state(self) -> dict[str, Any]:
        """Plain Python, for a checkpoint."""
        return {"rewirings": self.rewirings, "grown": self.grown, "removed": self.removed}

    @classmethod
    def from_state(cls, state: Mapping[str, Any] | None) -> RunAccount:
        """The account a checkpoint saved (an empty one for ``None``)."""
        if not state:
            return cls()
        return cls(int(state.get("rewirings", 0)), int(state.get("grown", 0)),
                   int(state.get("removed", 0)))


def format_table(columns: Sequence[str], rows: Sequence[Sequence[str]],
                 right: Sequence[int] = ()) -> list[str]:
    """Text table lines in the manner of Lightning's ``ModelSummary``: the header, a rule,
    the rows (columns ``right`` right-aligned), and a closing rule."""
    widths = [max([len(column)] + [len(row[i]) for row in rows])
              for i, column in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return " | ".join(c.rjust(w) if i in right else c.ljust(w)
                          for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    header = line(columns)
    rule = "-" * len(header)
    return [header, rule, *(line(row) for row in rows), rule]


def _steps(steps: Sequence[int]) -> str:
    """``"5, 10"``, or the first two and the last of a long list."""
    if len(steps) <= 4:
        return ", ".join(map(str, steps))
    return f"{steps[0]}, {steps[1]}, ..., {steps[-1]}"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


# ----------------------------------------------------------------------- at train start
def format_schedule_line(schedule: RewiringSchedule, planned: Sequence[int] | None,
                         stop_source: str, *, done: int = 0, step: int = 0,
                         sparsity: float = 1.0) -> str:
    """The schedule of a fit in one line, e.g. ``rewiring every 5 steps from step 5 until
    the stop at step 15 (stop_fraction=0.5 of 30 steps = step 15): 2 rewirings planned
    (steps 5, 10); drop fraction 0.1, decayed by cosine to 0 at step 15 (0.075 at step 5,
    0.025 at step 10)``.

    Args:
        schedule: the fit's schedule.
        planned: optimizer steps at which a rewiring is due over the whole run (``None``:
            unknown, the epochs' length is).
        stop_source: where the stop point comes from (the clock's ``stop_source``).
        done: rewirings done before this fit (a resumed run).
        step: the optimizer step this fit starts at.
        sparsity: the callback's sparsity (0: the dense baseline, which never rewires).
    """
    if sparsity == 0.0:
        return "no rewiring: sparsity 0 trains the dense baseline"
    every = schedule.update_interval
    if schedule.interval == "step":
        slot = _plural(every, "step") if every > 1 else "step"
        start = f"step {every}"
    else:
        slot = _plural(every, "epoch") if every > 1 else "epoch"
        start = f"epoch {every}"
    text = (f"rewiring every {slot} from {start} until the stop at step {schedule.stop_step} "
            f"({stop_source})")
    if planned is None:
        text += ": the epochs' length is unknown, so the number of rewirings is too"
    else:
        text += f": {_plural(len(planned), 'rewiring')} planned"
        if planned:
            text += f" (step{'s' if len(planned) > 1 else ''} {_steps(planned)})"
    if done or step:
        text += f", {done} done before this fit (resumed at step {step})"
    text += (f"; drop fraction {schedule.drop_fraction:g}, decayed by cosine to 0 at step "
             f"{schedule.stop_step}")
    if planned:
        first, last = planned[0], planned[-1]
        fractions = [f"{schedule.drop_fraction_at(first):.3g} at step {first}"]
        if last != first:
            fractions.append(f"{schedule.drop_fraction_at(last):.3g} at step {last}")
        text += f" ({', '.join(fractions)})"
    return text


# --------------------------------------------------------------------------- at fit end
def account_figures(engine: SparseEngine, account: RunAccount, planned: Sequence[int] | None,
                    steps: int | None) -> dict[str, Any]:
    """The account of a run as plain numbers (what the fit-end text, ``callback_metrics`` and
    the run summary's ``rewiring`` section show).

    Keys: ``planned`` (``None``: unknown), ``done``, ``postponed`` (due steps whose rewiring
    was postponed), ``postponed_reasons`` (reason -> count), ``pending_step`` (a postponed
    rewiring that never ran, else ``None``), ``not_reached`` (planned steps the training did
    not reach), ``steps`` (optimizer steps trained), ``stop_step``, ``grown`` and ``removed``
    (over ``recorded_rewirings`` rewirings), ``moved_net`` (weights that changed layer since
    initialization: the sum of the layers' gains in active weights), ``stray_weights_zeroed``
    (name -> masked weights found written by other code and zeroed again), ``layers`` (name
    -> ``initial_active``, ``active``, ``total``).
    """
    reasons = dict(engine.skip_reasons)
    unrecorded = engine.skipped_rewirings - sum(reasons.values())
    if unrecorded > 0:
        reasons[UNRECORDED] = reasons.get(UNRECORDED, 0) + unrecorded
    active = engine.active_counts()
    layers = {
        name: {"initial_active": int(engine.initial_counts[name]), "active": int(active[name]),
               "total": int(mask.numel())}
        for name, mask in engine.masks.items()
    }
    not_reached = (0 if planned is None or steps is None
                   else sum(1 for step in planned if step >= steps))
    schedule = engine.schedule
    return {
        "planned": None if planned is None else len(planned),
        "done": int(engine.rewirings),
        "postponed": int(engine.skipped_rewirings),
        "postponed_reasons": reasons,
        "pending_step": engine.pending_step,
        "not_reached": not_reached,
        "steps": steps,
        "stop_step": None if schedule is None else schedule.stop_step,
        "grown": account.grown,
        "removed": account.removed,
        "recorded_rewirings": account.rewirings,
        "moved_net": sum(max(0, layer["active"] - layer["initial_active"])
                         for layer in layers.values()),
        "stray_weights_zeroed": {name: int(n) for name, n in engine.stray_weights_zeroed.items()},
        "layers": layers,
    }


def account_metrics(figures: Mapping[str, Any]) -> dict[str, float]:
    """The account's totals as metric name (without the group) -> number, for
    ``trainer.callback_metrics``: ``count``, ``planned`` (when known), ``skipped``,
    ``grown_total``, ``removed_total``, ``moved_net``."""
    metrics = {"count": figures["done"], "skipped": figures["postponed"],
               "grown_total": figures["grown"], "removed_total": figures["removed"],
               "moved_net": figures["moved_net"]}
    if figures["planned"] is not None:
        metrics["planned"] = figures["planned"]
    return {key: float(value) for key, value in metrics.items()}


def format_account(figures: Mapping[str, Any], shapes: Mapping[str, Sequence[int]],
                   title: str = "") -> str:
    """The fit-end account as text: the rewirings done of planned, the postponed ones and
    why, weights grown and moved, then each sparse layer's active weights and density at
    initialization and now.

    Args:
        figures: from :func:`account_figures`.
        shapes: sparse parameter name -> shape.
        title: a first line, if any.
    """
    lines = [title] if title else []
    planned, done = figures["planned"], figures["done"]
    of = "" if planned is None else f" of {planned} planned"
    head = f"rewirings: {done}{of} ran"
    notes = []
    if figures["postponed"]:
        reasons = ", ".join(f"{reason}: {count}"
                            for reason, count in figures["postponed_reasons"].items())
        notes.append(f"{_plural(figures['postponed'], 'due step')} postponed ({reasons})")
    if figures["pending_step"] is not None:
        notes.append(f"the rewiring due at step {figures['pending_step']} was still postponed "
                     "when training ended and did not run")
    if figures["not_reached"]:
        notes.append(f"{figures['not_reached']} planned not reached (training ended at step "
                     f"{figures['steps']})")
    lines.append(head + (f"; {'; '.join(notes)}" if notes else ""))
    grown = f"weights grown {figures['grown']:,}, removed {figures['removed']:,}"
    if figures["recorded_rewirings"] < done:
        grown += (f" (in the last {figures['recorded_rewirings']} rewirings: the checkpoint "
                  "resumed from did not count the earlier ones)")
    lines.append(f"{grown}; net {figures['moved_net']:,} weights moved between layers "
                 "(active weights each layer gained since initialization)")
    stray = figures.get("stray_weights_zeroed") or {}
    if stray:
        lines.append(f"masked weights written by other code and zeroed again: "
                     f"{sum(stray.values()):,} ("
                     + ", ".join(f"{name}: {count:,}" for name, count in stray.items()) + ")")
    rows = []
    initial_sum = active_sum = total_sum = 0
    for index, (name, layer) in enumerate(figures["layers"].items()):
        initial, active, total = layer["initial_active"], layer["active"], layer["total"]
        initial_sum, active_sum, total_sum = (initial_sum + initial, active_sum + active,
                                              total_sum + total)
        rows.append((str(index), name, "x".join(map(str, shapes.get(name, ()))) or "?",
                     f"{initial:,}", f"{active:,}", f"{active - initial:+,}",
                     f"{initial / total:.3f}", f"{active / total:.3f}"))
    rows.append(("", "all sparse layers", "", f"{initial_sum:,}", f"{active_sum:,}",
                 f"{active_sum - initial_sum:+,}", f"{initial_sum / total_sum:.3f}",
                 f"{active_sum / total_sum:.3f}"))
    columns = ("", "Parameter", "Shape", "Initial active", "Final active", "Change",
               "Initial density", "Final density")
    lines += format_table(columns, rows, right=(3, 4, 5, 6, 7))
    return "\n".join(lines)
