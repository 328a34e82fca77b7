"""Shared test helpers: a tiny LightningModule, its data and a quiet CPU Trainer."""

from tests.helpers.models import (
    SPARSE_NAMES,
    TinyModule,
    make_trainer,
    record_rewiring_gradients,
    tiny_dataloader,
)

__all__ = ["SPARSE_NAMES", "TinyModule", "make_trainer", "record_rewiring_gradients",
           "tiny_dataloader"]
