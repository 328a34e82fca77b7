"""Pieces for trying the callback in real training set-ups (issue 10): a tiny MLP that
records the batches it trains on, a resumable and a streaming data source, a rewiring log.

Every class is defined at module level with plain arguments, so it pickles for ``ddp_spawn``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from lightning_ggr import DynamicSparsityCallback

SAMPLES, BATCH = 32, 4  # 8 batches per epoch


def data(samples: int = SAMPLES, seed: int = 0) -> tuple[Tensor, Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(samples, 8, generator=generator),
            torch.randint(0, 4, (samples,), generator=generator))


def loader(samples: int = SAMPLES, seed: int = 0) -> DataLoader:
    """Unshuffled, so batch ``i`` of every epoch is the same: runs are comparable."""
    return DataLoader(TensorDataset(*data(samples, seed)), batch_size=BATCH, shuffle=False)


class MLP(pl.LightningModule):
    """``Linear(8, 16) -> ReLU -> Linear(16, 4)``; both weights are sparse by default.

    Args:
        optimizer: ``"sgd"`` (momentum 0.9) or ``"lbfgs"``.
        lr: learning rate.
        none_at_step: ``training_step`` returns ``None`` at this ``global_step`` (no backward,
            yet Lightning still steps the optimizer).
    """

    def __init__(self, optimizer: str = "sgd", lr: float = 0.1,
                 none_at_step: int | None = None) -> None:
        super().__init__()
        self.optimizer_name = optimizer
        self.lr = lr
        self.none_at_step = none_at_step
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        #: A fingerprint of every training batch, in order.
        self.seen: list[float] = []
        #: Fraction of exact zeros in ``net.0.weight`` at every training step.
        self.zero_fractions: list[float] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        x, y = batch
        self.seen.append(round(float(x.sum()), 4))
        self.zero_fractions.append(float((self.net[0].weight == 0).float().mean()))
        loss = nn.functional.cross_entropy(self(x), y)
        return None if self.global_step == self.none_at_step else loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "lbfgs":
            return torch.optim.LBFGS(self.parameters(), lr=self.lr, max_iter=4, history_size=4)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class TwoOptimizers(pl.LightningModule):
    """Manual optimization, one optimizer per network, both stepped once per batch (a GAN's
    generator and discriminator): ``gen`` (``Linear(8, 16)``) and ``disc`` (``Linear(16, 4)``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.gen = nn.Linear(8, 16)
        self.disc = nn.Linear(16, 4)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        opt_gen, opt_disc = self.optimizers()
        opt_gen.zero_grad()
        opt_disc.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self.disc(torch.relu(self.gen(x))), y))
        opt_gen.step()
        opt_disc.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.SGD(self.gen.parameters(), lr=0.1),
                torch.optim.SGD(self.disc.parameters(), lr=0.1)]


class ResumableLoader:
    """A sized loader Lightning resumes mid-epoch: it has ``state_dict``/``load_state_dict``
    (Lightning's ``_Stateful`` protocol, like torchdata's ``StatefulDataLoader``). Its state is
    the number of batches of the epoch consumed."""

    def __init__(self, samples: int = SAMPLES, batch_size: int = BATCH,
                 tensors: tuple[Tensor, Tensor] | None = None) -> None:
        self.x, self.y = data(samples) if tensors is None else tensors
        self.batch_size = batch_size
        self.position = 0
        self._resume_at = 0

    def __len__(self) -> int:
        return math.ceil(len(self.x) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        start = self._resume_at if self._resume_at < len(self) else 0
        self._resume_at = 0
        self.position = start
        return self._batches(start)

    def _batches(self, start: int) -> Iterator[tuple[Tensor, Tensor]]:
        for index in range(start, len(self)):
            self.position = index + 1
            rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
            yield self.x[rows], self.y[rows]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self._resume_at = int(state["position"])


class Stream(IterableDataset):
    """A streaming dataset: no ``__len__``."""

    def __init__(self, samples: int = SAMPLES) -> None:
        self.x, self.y = data(samples)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        yield from zip(self.x, self.y, strict=True)


def sparse(**kwargs) -> DynamicSparsityCallback:
    kwargs.setdefault("log_figures", False)
    kwargs.setdefault("sparsity", 0.75)
    return DynamicSparsityCallback(**kwargs)


class RewiringLog(pl.Callback):
    """Listed after the sparse callback: when its rewirings ran.

    ``steps``: ``trainer.global_step`` at each rewiring of this fit; ``own_steps``: the step
    count of the optimizer holding ``param_name`` then (for multi-optimizer runs).
    """

    def __init__(self, cb: DynamicSparsityCallback, param_name: str | None = None) -> None:
        self.cb = cb
        self.param_name = param_name
        self.steps: list[int] = []
        self.own_steps: list[int] = []
        self.own_count = 0
        self.seen = 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.seen = self.cb.engine.rewirings  # restored by a resume: count only new ones

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        ours = True
        if self.param_name is not None:
            param = dict(pl_module.named_parameters())[self.param_name]
            ours = any(p is param for g in optimizer.param_groups for p in g["params"])
        engine = self.cb.engine
        if engine is not None and engine.rewirings > self.seen:
            self.seen = engine.rewirings
            self.steps.append(trainer.global_step)
            self.own_steps.append(self.own_count)
        if ours:
            self.own_count += 1


class PoisonGradient(pl.Callback):
    """Listed before the sparse callback: a NaN in one sparse gradient at the given steps."""

    def __init__(self, cb: DynamicSparsityCallback, steps) -> None:
        self.cb, self.steps = cb, set(steps)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step in self.steps:
            name, mask = next(iter(self.cb.masks.items()))
            grad = dict(pl_module.named_parameters())[name].grad
            grad[mask.nonzero()[0].unbind()] = float("nan")


class CleanGradient(pl.Callback):
    """Listed after the sparse callback: NaN gradients -> 0, as GradScaler's skip would."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        for p in pl_module.parameters():
            if p.grad is not None:
                torch.nan_to_num_(p.grad, nan=0.0)


def masked_nonzero(model: nn.Module, masks: dict[str, Tensor]) -> dict[str, float]:
    """Largest |weight| at masked positions, per sparse parameter (0 when the masks hold)."""
    params = dict(model.named_parameters())
    return {name: float(params[name].detach()[~mask].abs().max()) if (~mask).any() else 0.0
            for name, mask in masks.items()}


def ggr_warnings(records: list[warnings.WarningMessage]) -> list[str]:
    """The warnings raised from lightning_ggr code (its own messages, not Lightning's)."""
    return [str(w.message) for w in records if "lightning_ggr" in (w.filename or "")]


class UnevenRanks(MLP):
    """DDP ranks with different epochs (``use_distributed_sampler=False``): rank 0 sees 4
    batches per epoch, rank 1 sees 6. Rank 0 writes what its callback did to ``record``."""

    def __init__(self, record: str) -> None:
        super().__init__()
        self.record = record
        self.rewiring_steps: list[int] = []

    def train_dataloader(self) -> DataLoader:
        return loader(16 if self.global_rank == 0 else 24, seed=self.global_rank)

    def _sparse(self) -> DynamicSparsityCallback:
        return next(c for c in self.trainer.callbacks if isinstance(c, DynamicSparsityCallback))

    def on_before_optimizer_step(self, optimizer) -> None:  # after every callback's
        if self._sparse().engine.rewirings > len(self.rewiring_steps):
            self.rewiring_steps.append(self.trainer.global_step)

    def on_train_end(self) -> None:
        engine = self._sparse().engine
        masks = torch.cat([m.flatten() for m in engine.masks.values()]).to(torch.uint8)
        gathered = [torch.empty_like(masks) for _ in range(self.trainer.world_size)]
        torch.distributed.all_gather(gathered, masks)
        if self.global_rank == 0:
            import json
            from pathlib import Path

            Path(self.record).write_text(json.dumps({
                "rewiring_steps": self.rewiring_steps, "steps": self.trainer.global_step,
                "stop_step": engine.schedule.stop_step,
                "masks_agree": all(torch.equal(g, gathered[0]) for g in gathered),
            }))
