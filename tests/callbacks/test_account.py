"""The account of a run in any Trainer (issue 17, items 7 and 8): the schedule line when
training starts, and at fit end the rewirings done of planned, the postponed ones and why,
weights grown and moved, each layer's density then and now; the same figures in
``trainer.callback_metrics`` and the run summary.

The model is ``tests.helpers.setups.MLP`` (``Linear(8, 16)``, ``Linear(16, 4)``: 128 and 64
weights) at sparsity 0.75: ERK gives 26 and 22 active weights (48 = 0.25 x 192), 8 batches
an epoch.
"""

from __future__ import annotations

import json
import logging

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_ggr.callbacks.account import (
    UNRECORDED,
    RunAccount,
    account_figures,
    format_account,
)
from lightning_ggr.callbacks.reporting import ACCOUNT_TAG, SCHEDULE_TAG
from lightning_ggr.sparse import RewiringSchedule, SparseEngine
from tests.helpers.models import make_trainer
from tests.helpers.setups import MLP, CleanGradient, PoisonGradient, loader, sparse

pytestmark = pytest.mark.usefixtures("single_thread")

INITIAL = {"net.0.weight": 26, "net.2.weight": 22}
SCHEDULE = "DynamicSparsityCallback schedule: "
ACCOUNT = "DynamicSparsityCallback at fit end"


class ReportLog(pl.Callback):
    """Listed after the sparse callback: every rewiring report it produced."""

    def __init__(self, cb) -> None:
        self.cb, self.reports = cb, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        report = self.cb.last_report
        if report is not None and (not self.reports or report is not self.reports[-1]):
            self.reports.append(report)


def printed(caplog, start: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(start)]


def fit(tmp_path, callbacks, caplog, module=None, **kwargs) -> pl.Trainer:
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, callbacks, **kwargs)
    with caplog.at_level(logging.INFO):
        trainer.fit(module or MLP(), loader())
    return trainer


def table_rows(account: str) -> dict[str, list[str]]:
    return {cells[1]: cells[2:] for line in account.splitlines() if line.count("|") == 7
            for cells in [[c.strip() for c in line.split("|")]] if cells[1] != "Parameter"}


# ---------------------------------------------------------------- the schedule line
def test_the_schedule_line_of_a_step_schedule(tmp_path, caplog):
    """30 steps, stop_fraction 0.5: the stop at step 15, rewirings at 5 and 10, the cosine
    drop fraction 0.1 * (1 + cos(pi * t / 15)) / 2 = 0.075 and 0.025 there."""
    cb = sparse(interval="step", update_interval=5)
    fit(tmp_path, [cb], caplog, max_epochs=4, max_steps=30)
    assert printed(caplog, SCHEDULE) == [
        SCHEDULE + "rewiring every 5 steps from step 5 until the stop at step 15 "
        "(stop_fraction=0.5 of 30 steps = step 15): 2 rewirings planned (steps 5, 10); drop "
        "fraction 0.1, decayed by cosine to 0 at step 15 (0.075 at step 5, 0.025 at step 10)"]


def test_the_schedule_line_of_an_epoch_schedule_and_of_a_resumed_run(tmp_path, caplog):
    """Epochs of 8 steps, stop at step 24: epochs 1 and 2 rewire (steps 8 and 16), epoch 3
    starts at the stop. The resumed fit says how many rewirings ran before it."""
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    first = sparse(stop_step=24)
    fit(tmp_path, [first, checkpoint], caplog, max_epochs=2, enable_checkpointing=True)
    line = ("rewiring every epoch from epoch 1 until the stop at step 24 (stop_step=24): "
            "{} planned (step{}); drop fraction 0.1, decayed by cosine to 0 at step 24 ({})")
    assert printed(caplog, SCHEDULE) == [SCHEDULE + line.format(
        "1 rewiring", " 8", "0.075 at step 8")]  # two epochs: only the first rewiring
    caplog.clear()
    second = sparse(stop_step=24)
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, [second], max_epochs=4)
    with caplog.at_level(logging.INFO):
        trainer.fit(MLP(), loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    resumed = line.format("2 rewirings", "s 8, 16", "0.075 at step 8, 0.025 at step 16")
    resumed = resumed.replace("planned (steps 8, 16)",
                              "planned (steps 8, 16), 1 done before this fit (resumed at step 16)")
    assert printed(caplog, SCHEDULE) == [SCHEDULE + resumed]
    assert second.engine.rewirings == 2
    # The account covers the whole run, the first fit's rewiring too: 2 + 2 weights at step 8
    # (drop fraction 0.075 of 26 and 22), 1 + 1 at step 16 (0.025).
    assert first.reporter.account.grown == 4
    assert second.reporter.account.state() == {"rewirings": 2, "grown": 6, "removed": 6}
    assert float(trainer.callback_metrics["rewiring/grown_total"]) == 6.0


def test_the_schedule_line_and_the_account_can_be_turned_off(tmp_path, caplog):
    cb = sparse(interval="step", update_interval=5, selection_summary=False,
                fit_end_summary=False)
    trainer = fit(tmp_path, [cb], caplog, max_epochs=4, max_steps=30)
    assert not printed(caplog, SCHEDULE) and not printed(caplog, ACCOUNT)
    # the figures are still there
    assert float(trainer.callback_metrics["rewiring/count"]) == 2.0
    assert float(trainer.callback_metrics["rewiring/planned"]) == 2.0


def test_the_dense_baseline_says_it_never_rewires(tmp_path, caplog):
    fit(tmp_path, [sparse(sparsity=0.0, interval="step", update_interval=5)], caplog,
        max_steps=10)
    assert printed(caplog, SCHEDULE) == [
        SCHEDULE + "no rewiring: sparsity 0 trains the dense baseline"]


# ------------------------------------------------------------------- the fit-end account
def test_the_account_of_a_plain_run_in_print_metrics_and_summary(tmp_path, caplog):
    """Rewirings at steps 5 and 10 with drop fractions 0.075 and 0.025: GGR removes
    round_half_up(f * active) per layer and grows as many. At step 5 that is 2 + 2 (of 26 and
    22); at step 10, 1 + 1 (any count from 20 to 59 gives 1)."""
    logger = TensorBoardLogger(tmp_path, name="run")
    texts = []
    logger.experiment.add_text = lambda tag, text, global_step=None: texts.append(tag)
    cb = sparse(interval="step", update_interval=5)
    log = ReportLog(cb)
    trainer = fit(tmp_path, [cb, log], caplog, max_epochs=4, max_steps=30, logger=logger)
    assert [r.total_removed for r in log.reports] == [4, 2]
    assert [r.total_grown for r in log.reports] == [4, 2]
    active = cb.engine.active_counts()
    moved = sum(max(0, active[n] - INITIAL[n]) for n in INITIAL)
    assert cb.initial_counts == INITIAL
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
               if k.startswith("rewiring/")}
    assert metrics == {"rewiring/count": 2.0, "rewiring/planned": 2.0, "rewiring/skipped": 0.0,
                       "rewiring/grown_total": 6.0, "rewiring/removed_total": 6.0,
                       "rewiring/moved_net": float(moved)}
    (account,) = printed(caplog, ACCOUNT)
    lines = account.splitlines()
    assert lines[0] == f"{ACCOUNT}: ggr, sparsity 0.75, erk, step 30:"
    assert lines[1] == "rewirings: 2 of 2 planned ran"
    assert lines[2] == (f"weights grown 6, removed 6; net {moved} weights moved between layers "
                        "(active weights each layer gained since initialization)")
    rows = table_rows(account)
    for name, shape, total in (("net.0.weight", "16x8", 128), ("net.2.weight", "4x16", 64)):
        assert rows[name] == [shape, str(INITIAL[name]), str(active[name]),
                              f"{active[name] - INITIAL[name]:+}",
                              f"{INITIAL[name] / total:.3f}", f"{active[name] / total:.3f}"]
    assert rows["all sparse layers"] == ["", "48", "48", "+0", "0.250", "0.250"]
    assert texts.count(SCHEDULE_TAG) == 1 and texts.count(ACCOUNT_TAG) == 1
    summary = json.loads((tmp_path / "run" / "version_0" / "lightning_ggr_summary.json")
                         .read_text())
    assert summary["rewiring"] == {
        "planned": 2, "done": 2, "postponed": 0, "postponed_reasons": {}, "pending_step": None,
        "not_reached": 0, "steps": 30, "stop_step": 15, "grown": 6, "removed": 6,
        "recorded_rewirings": 2, "moved_net": moved, "stray_weights_zeroed": {}}
    assert summary["metrics"]["rewiring/planned"] == 2.0
    assert {n: layer["initial_active"] for n, layer in summary["layers"].items()} == INITIAL


def test_the_account_says_which_rewirings_were_postponed_and_why(tmp_path, caplog):
    """Due at steps 4 and 8 (stop 9). Step 4 has no gradient (training_step returned None):
    GGR postpones to step 5. From step 8 on a sparse gradient is NaN every step: the
    rewiring due at 8 is postponed at 8, 9, 10 and 11 and never runs."""
    cb = sparse(interval="step", update_interval=4, stop_step=9)
    with pytest.warns(UserWarning) as records:
        trainer = fit(tmp_path, [PoisonGradient(cb, [8, 9, 10, 11]), cb, CleanGradient()],
                      caplog, module=MLP(none_at_step=4), max_steps=12)
    said = [str(r.message) for r in records if "is postponed" in str(r.message)]
    repeats = ("(further postponements of it for this reason are counted in the fit-end "
               "account, not repeated)")
    assert said == [  # once per due step and reason, not at each of 8, 9, 10 and 11
        "step 4: no sparse gradients (the method grows by gradient): the rewiring due at step "
        f"4 is postponed to the next step with usable gradients {repeats}",
        "step 8: non-finite sparse gradients: the rewiring due at step 8 is postponed to the "
        f"next step with usable gradients {repeats}"]
    metrics = trainer.callback_metrics
    assert (float(metrics["rewiring/count"]), float(metrics["rewiring/planned"]),
            float(metrics["rewiring/skipped"])) == (1.0, 2.0, 5.0)
    (account,) = printed(caplog, ACCOUNT)
    assert account.splitlines()[1] == (
        "rewirings: 1 of 2 planned ran; 5 due steps postponed (no sparse gradients (the method "
        "grows by gradient): 1, non-finite sparse gradients: 4); the rewiring due at step 8 "
        "was still postponed when training ended and did not run")


class StopAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def test_the_account_says_when_training_ended_before_a_planned_rewiring(tmp_path, caplog):
    """Planned at steps 5 and 10 (30 steps); an early stop after step 7 (as EarlyStopping
    would) leaves the second unreached."""
    cb = sparse(interval="step", update_interval=5)
    fit(tmp_path, [cb, StopAt(7)], caplog, max_epochs=4, max_steps=30)
    (account,) = printed(caplog, ACCOUNT)
    assert account.splitlines()[:2] == [
        f"{ACCOUNT}: ggr, sparsity 0.75, erk, step 7:",
        "rewirings: 1 of 2 planned ran; 1 planned not reached (training ended at step 7)"]


def test_an_older_checkpoint_without_account_is_said_so():
    """A checkpoint saved before the account existed: its postponements have no recorded
    reason, and weights grown cover only the rewirings seen since."""
    engine = SparseEngine({"w": torch.nn.Parameter(torch.randn(8, 8))}, sparsity=0.5,
                          schedule=RewiringSchedule("step", 2, stop_step=10, drop_fraction=0.5))
    engine.rewirings, engine.skipped_rewirings = 3, 2
    engine.skip_reasons = {"non-finite sparse gradients": 1}
    account = RunAccount(rewirings=1, grown=5, removed=5)
    figures = account_figures(engine, account, [2, 4, 6, 8], steps=10)
    assert figures["postponed_reasons"] == {"non-finite sparse gradients": 1, UNRECORDED: 1}
    assert (figures["planned"], figures["done"], figures["not_reached"]) == (4, 3, 0)
    lines = format_account(figures, {"w": (8, 8)}).splitlines()
    assert lines[0] == (f"rewirings: 3 of 4 planned ran; 2 due steps postponed (non-finite "
                        f"sparse gradients: 1, {UNRECORDED}: 1)")
    assert lines[1].startswith("weights grown 5, removed 5 (in the last 1 rewirings: the "
                               "checkpoint resumed from did not count the earlier ones)")
    assert RunAccount.from_state(account.state()) == account
    assert RunAccount.from_state(None) == RunAccount()


def test_two_callbacks_report_apart(tmp_path, caplog):
    """The second callback's metrics carry its tag, as its other metrics do."""
    first = sparse(include=["net.0.weight"], interval="step", update_interval=5)
    second = sparse(include=["net.2.weight"], interval="step", update_interval=5)
    trainer = fit(tmp_path, [first, second], caplog, max_epochs=4, max_steps=30)
    assert float(trainer.callback_metrics["rewiring/count"]) == 2.0
    assert float(trainer.callback_metrics["rewiring_1/count"]) == 2.0
    assert len(printed(caplog, ACCOUNT)) == 1  # the second one's title carries its tag
    assert len(printed(caplog, "DynamicSparsityCallback_1 at fit end")) == 1


def test_a_postponement_is_said_once_per_due_step_and_reason_when_reasons_alternate():
    """Regression: only the last (due step, reason) said was remembered, so a rewiring
    postponed for two reasons in turn (no gradients, then NaN ones, then none again) was
    warned about at every step."""
    from types import SimpleNamespace

    from lightning_ggr.callbacks.reporting import SparsityReporter
    from lightning_ggr.sparse.rewiring import RewiringReport

    reporter = SparsityReporter(log_figures=False)
    trainer = SimpleNamespace(loggers=[], global_step=0)
    engine = SimpleNamespace(pending_step=8, skipped_rewirings=0)
    reasons = ["no sparse gradients", "non-finite sparse gradients"] * 3
    with pytest.warns(UserWarning) as records:
        for step, reason in enumerate(reasons, start=8):
            engine.skipped_rewirings += 1
            reporter.rewired(trainer, engine, RewiringReport(
                drop_fraction=0.5, removed={}, grown={}, active={}, skipped=True,
                skip_reason=reason), step)
    said = [str(r.message) for r in records if "is postponed" in str(r.message)]
    assert [message.split(":")[:2] for message in said] == [
        ["step 8", " no sparse gradients"], ["step 9", " non-finite sparse gradients"]]
