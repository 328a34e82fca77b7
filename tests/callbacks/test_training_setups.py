"""The callback in real training set-ups: the schedule's clock and length, odd optimizers,
weight averaging, tuners, smoke runs (issue 10).

Each test is a set-up where the callback once trained something other than what was asked
without a word; it now does what is asked, or says clearly why it cannot, before training.
"""

from __future__ import annotations

import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import (
    EMAWeightAveraging,
    LearningRateFinder,
    StochasticWeightAveraging,
)
from torch import nn
from torch.utils.data import DataLoader

from tests.helpers.models import make_trainer
from tests.helpers.setups import (
    BATCH,
    MLP,
    CleanGradient,
    PoisonGradient,
    RewiringLog,
    Stream,
    TwoOptimizers,
    ggr_warnings,
    loader,
    masked_nonzero,
    sparse,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def messages(records) -> list[str]:
    return [str(w.message) for w in records]


# ------------------------------------------------------------- the training length
@pytest.mark.parametrize(("interval", "update_interval"), [("epoch", 1), ("step", 2)])
def test_stop_fraction_over_a_stream_without_length_is_refused_naming_the_fix(
        tmp_path, interval, update_interval):
    """An IterableDataset without __len__: Lightning's length is max_steps (-1 here). It once
    gave stop step 0: no rewiring without a word (epoch), or an error about "-1 steps"."""
    model = MLP()
    cb = sparse(interval=interval, update_interval=update_interval)
    trainer = make_trainer(tmp_path, [cb], max_epochs=3)
    with pytest.raises(ValueError, match=r"needs the training length.*no length.*stop_step.*"
                                         r"max_steps") as error:
        trainer.fit(model, DataLoader(Stream(), batch_size=BATCH))
    assert "-1" not in str(error.value)
    assert model.seen == [], "training started before the error"


def test_a_stream_with_max_steps_or_stop_step_rewires(tmp_path):
    # max_steps gives the length: stop_fraction 0.5 of 12 steps = 6; rewires at 2 and 4.
    cb = sparse(interval="step", update_interval=2)
    make_trainer(tmp_path, [cb], max_steps=12).fit(MLP(), DataLoader(Stream(), batch_size=BATCH))
    assert cb.engine.schedule.stop_step == 6 and cb.engine.rewirings == 2
    # interval="epoch": epochs end when the stream does (8 batches); stop_step=20 given.
    cb = sparse(stop_step=20)
    log = RewiringLog(cb)
    make_trainer(tmp_path, [cb, log], max_epochs=3).fit(MLP(),
                                                        DataLoader(Stream(), batch_size=BATCH))
    assert log.steps == [8, 16]


def test_schedule_arguments_set_after_construction_count(tmp_path):
    """The clock reads the schedule's arguments when the fit is set up, not at construction
    (as the callback did before its clock was extracted; review finding)."""
    cb = sparse(interval="step", update_interval=5)
    cb.update_interval, cb.stop_step = 2, 7
    make_trainer(tmp_path, [cb], max_steps=12).fit(MLP(), DataLoader(Stream(), batch_size=BATCH))
    assert cb.engine.schedule.stop_step == 7 and cb.engine.schedule.update_interval == 2
    assert cb.engine.rewirings == 3  # steps 2, 4, 6
    assert cb.run_config()["stop_step"] == 7


def test_no_epoch_limit_with_stop_fraction_is_refused(tmp_path):
    cb = sparse()
    trainer = make_trainer(tmp_path, [cb], max_epochs=-1, max_time="00:00:00:05")
    with pytest.raises(ValueError, match=r"no max_epochs and no max_steps; set stop_step"):
        trainer.fit(MLP(), loader())


def test_max_steps_with_epoch_interval_warns_when_no_rewiring_can_run(tmp_path):
    """max_steps=16 (2 epochs of 8 steps): stop at 8, the first epoch rewiring would be at 8.
    The same run limited by max_epochs=2 always warned; this one did not."""
    for limits in ({"max_epochs": 2}, {"max_epochs": None, "max_steps": 16}):
        cb = sparse()
        with pytest.warns(UserWarning, match=r"start of epoch 1, step 8\): no rewiring will run"):
            make_trainer(tmp_path, [cb], **limits).fit(MLP(), loader())
        assert cb.engine.schedule.stop_step == 8 and cb.engine.rewirings == 0


@pytest.mark.parametrize(("limits", "stop", "rewirings"), [
    ({"limit_train_batches": 0.5}, 8, [4]),  # 4 batches per epoch
    ({"limit_train_batches": 3}, 6, [3]),
    ({"overfit_batches": 2}, 4, [2]),
    ({"accumulate_grad_batches": 3}, 6, [3]),  # ceil(8 / 3) = 3 steps per epoch
    ({"max_epochs": -1, "max_steps": 40}, 20, [8, 16]),
    ({"min_epochs": 6}, 16, [8]),  # max_epochs=4 decides
    ({"gradient_clip_val": 0.1}, 16, [8]),
    ({"reload_dataloaders_every_n_epochs": 1}, 16, [8]),
    ({"barebones": True}, 16, [8]),
], ids=["limit-fraction", "limit-count", "overfit", "accumulate", "max-steps-only",
        "min-epochs", "clipping", "reload", "barebones"])
def test_the_stop_point_follows_the_trainers_limits(tmp_path, limits, stop, rewirings):
    """stop_fraction=0.5 of the steps the Trainer will take; interval="epoch" rewires at the
    first step of every epoch before the stop (8 batches per epoch, 4 epochs)."""
    cb = sparse()
    log = RewiringLog(cb)
    make_trainer(tmp_path, [cb, log], **{"max_epochs": 4, **limits}).fit(MLP(), loader())
    assert cb.engine.schedule.stop_step == stop
    assert log.steps == rewirings


def test_a_changing_accumulation_counts_in_the_stop_point(tmp_path):
    """GradientAccumulationScheduler({0: 1, 1: 4}): 8 + 2 + 2 + 2 = 14 steps, stop at 7.
    The length counted 4 x 8 = 32 steps (stop 16): rewiring ran almost to the end."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    cb = sparse(interval="step", update_interval=2)
    log = RewiringLog(cb)
    make_trainer(tmp_path, [GradientAccumulationScheduler({0: 1, 1: 4}), cb, log],
                 max_epochs=4).fit(MLP(), loader())
    assert cb.engine.schedule.stop_step == 7
    assert log.steps == [2, 4, 6]


def test_fast_dev_run_with_step_interval_warns_instead_of_refusing(tmp_path):
    cb = sparse(interval="step", update_interval=2)
    with pytest.warns(UserWarning, match=r"fast_dev_run: the stop point"):
        pl.Trainer(fast_dev_run=3, callbacks=[cb], accelerator="cpu", logger=False,
                   enable_progress_bar=False, enable_model_summary=False,
                   default_root_dir=tmp_path).fit(MLP(), loader())
    assert cb.engine.rewirings == 0 and cb.masks  # the smoke run ran, sparse


class WithBatchNorm(MLP):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(),
                                 nn.Linear(16, 4))


@pytest.mark.parametrize("order", ["swa-first", "sparse-first"])
def test_swa_batchnorm_epoch_does_not_move_the_stop(tmp_path, order):
    """With BatchNorm, StochasticWeightAveraging adds one epoch to fit_loop.max_epochs in its
    on_fit_start (a BatchNorm pass, not training): stop_fraction must not count it, whatever
    the callback order (the stop was 44 with SWA listed first)."""
    cb = sparse()
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=0.8)
    callbacks = [swa, cb] if order == "swa-first" else [cb, swa]
    make_trainer(tmp_path, callbacks, max_epochs=10).fit(WithBatchNorm(), loader())
    assert cb.engine.schedule.stop_step == 40  # 0.5 of 10 epochs x 8 steps


# ------------------------------------------------------------------ the clock
def test_manual_optimization_with_two_optimizers_counts_the_sparse_optimizers_steps(tmp_path):
    """A GAN: global_step advances on both optimizers' steps (two per batch). Rewirings came
    twice as often and stopped at a quarter of training."""
    cb = sparse(include=["gen.weight"], interval="step", update_interval=4)  # stop_fraction 0.5
    log = RewiringLog(cb, "gen.weight")
    trainer = make_trainer(tmp_path, [cb, log], max_epochs=4)
    trainer.fit(TwoOptimizers(), loader())
    # 4 epochs x 8 batches: the sparse optimizer steps 32 times, stop at 16 of its steps.
    assert log.own_count == 32 and trainer.global_step == 64
    assert cb.engine.schedule.stop_step == 16
    assert log.own_steps == [4, 8, 12]
    assert cb.state_dict()["optimizer_steps"] == 32


class GeneratorEverySecondBatch(TwoOptimizers):
    """The generator steps every second batch (a critic trained more often)."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_gen, opt_disc = self.optimizers()
        opt_gen.zero_grad()
        opt_disc.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self.disc(torch.relu(self.gen(x))), y))
        opt_disc.step()
        if batch_idx % 2 == 0:
            opt_gen.step()


def test_manual_stop_fraction_warns_when_the_optimizer_does_not_step_once_per_batch(tmp_path):
    cb = sparse(include=["gen.weight"], interval="step", update_interval=2)
    with pytest.warns(UserWarning, match=r"stepped 4 times in 8 batches.*set stop_step"):
        make_trainer(tmp_path, [cb], max_epochs=2).fit(GeneratorEverySecondBatch(), loader())


def test_manual_optimization_with_two_optimizers_under_max_steps_stops_half_way(tmp_path):
    """max_steps bounds global_step, which counts both optimizers' steps: max_steps=64 is 32
    batches and 32 steps of the sparse optimizer. The stop point was taken as 0.5 of 64, step
    32: rewiring ran to the end of training (15 of "15 planned"), the schedule line said
    "stop_fraction=0.5 of 64 steps", and nothing warned."""
    cb = sparse(include=["gen.weight"], interval="step", update_interval=4)  # stop_fraction 0.5
    log = RewiringLog(cb, "gen.weight")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, [cb, log], max_epochs=None, max_steps=64)
        trainer.fit(TwoOptimizers(), loader())
    assert log.own_count == 32 and trainer.global_step == 64
    assert cb.engine.schedule.stop_step == 16
    assert log.own_steps == [4, 8, 12]
    assert cb.clock.stop_source == ("stop_fraction=0.5 of 32 steps = step 16; max_steps=64 "
                                    "counts the steps of all 2 optimizers")
    assert cb.clock.planned == [4, 8, 12]
    assert not [w for w in caught if "set stop_step" in str(w.message)]


def test_manual_max_steps_warns_when_the_optimizers_do_not_each_step_once_per_batch(tmp_path):
    """The stop point under max_steps assumes each optimizer steps once per batch: a critic
    trained on every batch and a generator on every second one break it; said once."""
    cb = sparse(include=["disc.weight"], interval="step", update_interval=2)
    with pytest.warns(UserWarning, match=r"the optimizers stepped 12 times in 8 batches "
                                         r"\(epoch 0\), not 2 times each: max_steps=24 counts"):
        make_trainer(tmp_path, [cb], max_epochs=None, max_steps=24).fit(
            GeneratorEverySecondBatch(), loader())


def test_lbfgs_is_refused_before_training(tmp_path):
    """LBFGS evaluates its closure (and Lightning our hook) several times per step, over a
    flat history the masks never reach: masked weights reached 2.2 inside its line search."""
    model = MLP(optimizer="lbfgs", lr=1.0)
    cb = sparse(interval="step", update_interval=2, stop_step=8)
    with pytest.raises(ValueError, match=r"does not support torch\.optim\.LBFGS.*closure"):
        make_trainer(tmp_path, [cb], max_steps=8).fit(model, loader())
    assert model.seen == []


class TwiceEvaluatingSGD(torch.optim.SGD):
    """Evaluates its closure twice per step (a SAM-like optimizer)."""

    def step(self, closure=None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        return super().step(closure)


class SamLike(MLP):
    def configure_optimizers(self):
        return TwiceEvaluatingSGD(self.parameters(), lr=0.1)


def test_an_optimizer_evaluating_its_closure_twice_is_refused_at_its_first_step(tmp_path):
    model = SamLike()
    cb = sparse(interval="step", update_interval=2, stop_step=8)
    with pytest.raises(RuntimeError, match=r"ran twice in one step of TwiceEvaluatingSGD"):
        make_trainer(tmp_path, [cb], max_steps=8).fit(model, loader())
    assert len(model.seen) == 2  # the two evaluations of the first step, nothing more


# -------------------------------------------------------- postponed rewirings
def test_a_rewiring_postponed_at_the_last_due_step_runs_after_the_stop(tmp_path):
    cb = sparse(interval="step", update_interval=4, stop_step=9)  # due at 4 and 8
    log = RewiringLog(cb)
    make_trainer(tmp_path, [PoisonGradient(cb, [8]), cb, log, CleanGradient()],
                 max_steps=12).fit(MLP(), loader())
    assert cb.engine.skipped_rewirings == 1
    assert log.steps == [4, 9]  # it was abandoned: [4]
    assert cb.engine.pending_step is None
    assert cb.last_report.drop_fraction > 0  # the fraction of step 8, not 0 past the stop


def test_a_postponed_rewiring_that_never_finds_usable_gradients_is_reported(tmp_path):
    cb = sparse(interval="step", update_interval=4, stop_step=9)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [PoisonGradient(cb, [8, 9, 10, 11]), cb, CleanGradient()],
                     max_steps=12).fit(MLP(), loader())
    assert cb.engine.rewirings == 1 and cb.engine.pending_step == 8
    assert any("due at step 8 was postponed" in m and "did not run" in m
               for m in messages(records))


@pytest.mark.parametrize("method", ["rigl", "ggr"])
def test_a_step_without_gradients_postpones_a_rewiring_that_grows_by_gradient(tmp_path, method):
    """training_step returning None: Lightning still steps the optimizer, with no gradient
    at all; growth by gradient then scored every position 0 and grew arbitrarily."""
    cb = sparse(method=method)  # interval="epoch": due at step 8 (stop 16)
    log = RewiringLog(cb)
    with pytest.warns(UserWarning, match=r"step 8: no sparse gradients \(the method grows by "
                                         r"gradient\): the rewiring due at step 8 is postponed"):
        make_trainer(tmp_path, [cb, log], max_epochs=4).fit(MLP(none_at_step=8), loader())
    assert log.steps == [9]
    # Magnitude-only methods need no gradient: SET rewires on time.
    cb = sparse(method="set")
    log = RewiringLog(cb)
    make_trainer(tmp_path, [cb, log], max_epochs=3).fit(MLP(none_at_step=8), loader())
    assert log.steps == [8]


# ------------------------------------------------------------- weight averaging
@pytest.mark.parametrize("averaging", ["swa", "ema"])
def test_weight_averaging_while_rewiring_is_refused_before_training(tmp_path, averaging):
    """The averaged copy never sees the masks: the kept model had weights up to 0.11 at masked
    positions."""
    if averaging == "swa":
        averager, match = (StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=1),
                           r"averages from epoch 0.*swa_epoch_start=4\)")
    else:
        averager, match = EMAWeightAveraging(decay=0.9), r"after step 0.*update_starting_at_step=24"
    model = MLP()
    cb = sparse(interval="step", update_interval=2, stop_step=24)
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, [cb, averager], max_epochs=4).fit(model, loader())
    assert model.seen == []


@pytest.mark.parametrize("averaging", ["swa", "ema"])
def test_weight_averaging_after_the_stop_keeps_exact_zeros(tmp_path, averaging):
    if averaging == "swa":  # swa_start = epoch 3 = step 24: the stop
        averager = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=4)
    else:
        averager = EMAWeightAveraging(decay=0.9, update_starting_at_step=24)
    model = MLP()
    cb = sparse(interval="step", update_interval=2, stop_step=24)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [cb, averager], max_epochs=5).fit(model, loader())
    assert cb.engine.rewirings == 11
    assert set(masked_nonzero(model, cb.masks).values()) == {0.0}
    assert not [m for m in ggr_warnings(records) if "masked positions" in m]


class LateAverage(pl.Callback):
    """An averaging scheme the callback does not know: writes into masked positions at the
    end of training."""

    def on_train_end(self, trainer, pl_module) -> None:
        with torch.no_grad():
            pl_module.net[0].weight.add_(0.01)


def test_the_kept_model_respects_the_final_masks_whatever_wrote_last(tmp_path):
    model = MLP()
    cb = sparse(interval="step", update_interval=2, stop_step=8)
    with pytest.warns(UserWarning, match=r"weights at masked positions were non-zero at the end "
                                         r"of fit.*zeroed again"):
        make_trainer(tmp_path, [cb, LateAverage()], max_steps=8).fit(model, loader())
    assert set(masked_nonzero(model, cb.masks).values()) == {0.0}


# ----------------------------------------------------------------- tuners
def test_tuner_lr_find_warns_that_it_tunes_the_dense_network(tmp_path):
    """Tuner.lr_find searches in LearningRateFinder.on_fit_start, before the masks exist and
    with the Trainer's callbacks replaced: the search trained the dense network, silently."""
    from lightning.pytorch.tuner import Tuner

    model = MLP()
    trainer = make_trainer(tmp_path, [sparse()], max_epochs=4)
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        Tuner(trainer).lr_find(model, train_dataloaders=loader(), num_training=6,
                               min_lr=1e-4, max_lr=0.1)
    assert max(model.zero_fractions[:6]) == 0.0  # the search ran dense: the warning is true
    assert [m for m in ggr_warnings(records) if "tunes the learning rate of the dense" in m]


class FindLRAtEpoch1(LearningRateFinder):
    """A learning-rate search in the middle of a fit (Lightning's documented pattern)."""

    def on_fit_start(self, *args, **kwargs) -> None:
        return

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == 1:
            self.lr_find(trainer, pl_module)


def test_a_learning_rate_search_mid_fit_leaves_no_state_for_a_later_fit(tmp_path):
    """The search reloads its own checkpoint, which calls load_state_dict: that state must not
    be adopted by the next fit of the same callback as if it were a resume."""
    cb = sparse(interval="step", update_interval=2, stop_step=20)
    finder = FindLRAtEpoch1(num_training_steps=4, min_lr=1e-3, max_lr=0.1)
    with pytest.warns(UserWarning, match="tunes the learning rate of the dense network"):
        make_trainer(tmp_path, [cb, finder], max_epochs=3).fit(MLP(), loader())
    with pytest.warns(UserWarning, match="already trained a model"):
        make_trainer(tmp_path, [cb], max_steps=4).fit(MLP(), loader())
    assert cb.engine.rewirings == 1  # a new run of its own: step 2 (stop 20)
