"""How long training is, in optimizer steps, as far as the Trainer knows it.

Only read once the fit loop has set up the train dataloader (``on_train_start`` or later).
``trainer.estimated_stepping_batches`` read earlier (``on_fit_start``, ``configure_optimizers``)
sets the dataloader up before Lightning restores a checkpoint's loop state, and a resumable
dataloader then restarts its epoch from the first batch: nothing here ever sets data up.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning.pytorch as pl
from lightning.pytorch.callbacks import GradientAccumulationScheduler


def optimizer_steps_per_epoch(trainer: pl.Trainer) -> float:
    """Optimizer steps in one epoch of this process: ``ceil(batches / accumulate_grad_batches)``.

    ``inf`` while the number of training batches is unknown (the train dataloader is not set
    up yet, or has no length). Reads ``trainer.num_training_batches`` only: it never sets up
    the dataloader itself.
    """
    batches = trainer.num_training_batches
    if not math.isfinite(batches):
        return math.inf
    return float(math.ceil(batches / trainer.accumulate_grad_batches))


def accumulation(trainer: pl.Trainer) -> Callable[[int], int] | None:
    """``accumulate_grad_batches`` as a function of the epoch when a
    ``GradientAccumulationScheduler`` changes it (at each epoch start); ``None`` when the
    Trainer's value holds for every epoch."""
    for callback in trainer.callbacks:
        if isinstance(callback, GradientAccumulationScheduler):
            return callback.get_accumulate_grad_batches
    return None


def steps_before_epoch(trainer: pl.Trainer, epoch: int, batches: float | None = None) -> float:
    """Optimizer steps in epochs ``0 .. epoch - 1``: ``sum ceil(batches / k_e)``.

    ``batches``: training batches per epoch (default: ``trainer.num_training_batches``);
    ``inf`` when unknown.
    """
    batches = trainer.num_training_batches if batches is None else batches
    if not math.isfinite(batches):
        return math.inf
    epochs = max(epoch, 0)
    scheduled = accumulation(trainer)
    if scheduled is None:
        return float(math.ceil(batches / trainer.accumulate_grad_batches) * epochs)
    return float(sum(math.ceil(batches / scheduled(e)) for e in range(epochs)))


def total_optimizer_steps(trainer: pl.Trainer, max_epochs: int | None,
                          global_steps_per_step: int = 1) -> float:
    """Optimizer steps of the whole fit: the steps of ``max_epochs`` epochs, capped by
    ``max_steps``.

    Lightning's ``estimated_stepping_batches`` without its side effect, with ``max_epochs``
    given by the caller (read it in ``setup``, before callbacks such as
    ``StochasticWeightAveraging`` add an epoch of their own in ``on_fit_start``), and with a
    ``GradientAccumulationScheduler``'s changing accumulation. ``inf`` when the length is
    unknown: no ``max_steps`` and either an unsized train dataloader or no epoch limit
    (``max_epochs=-1``). Call it once the train dataloader is set up.

    ``global_steps_per_step``: Lightning's global steps per step counted here. ``max_steps``
    bounds ``global_step``, which under manual optimization counts every optimizer's steps
    (two per batch in a GAN whose two optimizers each step once): the cap is then
    ``ceil(max_steps / global_steps_per_step)`` steps of the one optimizer.
    """
    max_steps = trainer.max_steps
    capped = (math.inf if max_steps is None or max_steps < 0
              else float(math.ceil(max_steps / global_steps_per_step)))
    if max_epochs is None or max_epochs < 0:
        return capped
    return min(steps_before_epoch(trainer, max(max_epochs, 1)), capped)
