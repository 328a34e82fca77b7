"""How long training is, in optimizer steps, as far as the Trainer knows it."""

from __future__ import annotations

import math

import lightning.pytorch as pl


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
