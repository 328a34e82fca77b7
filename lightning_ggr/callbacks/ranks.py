"""Agreement across DDP processes for decisions that lead to a collective.

A rank that decides to rewire enters collectives (the gradient check, the topology broadcast)
that every other rank must join, or the job deadlocks. These helpers are the only collectives
the callback adds on its own; each is a no-op in a single process.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch


def distributed(trainer: pl.Trainer) -> bool:
    """Whether this fit runs in several processes joined by ``torch.distributed``."""
    return (trainer.world_size > 1 and torch.distributed.is_available()
            and torch.distributed.is_initialized())


def _device(trainer: pl.Trainer) -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return trainer.strategy.root_device
    return torch.device("cpu")


def gather_ints(trainer: pl.Trainer, values: list[int]) -> list[list[int]]:
    """``values`` of every rank, in rank order (one all-gather); ``[values]`` in one process."""
    if not distributed(trainer):
        return [list(values)]
    local = torch.tensor(values, dtype=torch.int64, device=_device(trainer))
    gathered = [torch.empty_like(local) for _ in range(trainer.world_size)]
    torch.distributed.all_gather(gathered, local)
    return [[int(v) for v in tensor.tolist()] for tensor in gathered]


def rank_zero_int(trainer: pl.Trainer, value: int) -> int:
    """Rank 0's ``value`` on every rank (one broadcast); ``value`` in one process."""
    if not distributed(trainer):
        return value
    buffer = torch.tensor([value], dtype=torch.int64, device=_device(trainer))
    torch.distributed.broadcast(buffer, src=0)
    return int(buffer.item())
