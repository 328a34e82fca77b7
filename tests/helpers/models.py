"""A tiny LightningModule for callback tests: conv + depthwise conv + linear, CPU-fast.

Every option is a plain constructor argument, so the module pickles for ``ddp_spawn``.
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

#: Names of the sparse parameters (the default selection: Conv/Linear weights), in order.
SPARSE_NAMES = ("net.0.weight", "net.2.weight", "net.6.weight")

OPTIMIZERS = ("sgd", "adam", "adamw", "adamax", "noisy")


class NoisySGD(torch.optim.SGD):
    """Moves every weight and writes state everywhere, masked or not: the callback's
    post-step hook must re-zero both (it is not one of the zero-preserving optimizers)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for param in group["params"]:
                param.add_(torch.randn_like(param) * 1e-3)
                self.state[param]["noise"] = torch.randn_like(param)
        return loss


class TinyModule(pl.LightningModule):
    """``Conv2d(3, 6, 3) -> ReLU -> depthwise Conv2d(6, 6, 3) -> ReLU -> pool -> Linear(24, 4)``.

    Args:
        optimizer: ``"sgd"`` (momentum 0.9, weight decay 5e-4), ``"adam"``, ``"adamw"``,
            ``"adamax"`` or ``"noisy"`` (:class:`NoisySGD`).
        lr: learning rate.
        nonfinite_steps: optimizer steps (``global_step``) whose loss is made ``inf``.
        nonfinite_rank: only this rank injects the ``inf`` (``None``: every rank).
        extra_draws_rank: this rank draws extra numbers from the global RNG every batch, so
            the ranks' global random streams diverge (``None``: no extra draws).
        manual: use manual optimization (``opt.step()`` once per batch).
    """

    def __init__(
        self,
        optimizer: str = "sgd",
        lr: float = 0.05,
        nonfinite_steps: tuple[int, ...] = (),
        nonfinite_rank: int | None = None,
        extra_draws_rank: int | None = None,
        manual: bool = False,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
        self.optimizer_name = optimizer
        self.lr = lr
        self.nonfinite_steps = tuple(nonfinite_steps)
        self.nonfinite_rank = nonfinite_rank
        self.extra_draws_rank = extra_draws_rank
        self.automatic_optimization = not manual
        self.net = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(6, 6, 3, padding=1, groups=6),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
            nn.Flatten(),
            nn.Linear(24, 4),
        )
        #: Every training batch seen, in order (for tests that recompute gradients).
        self.seen_batches: list[tuple[Tensor, Tensor]] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def loss(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        self.seen_batches.append((batch[0].detach().clone(), batch[1].detach().clone()))
        if self.extra_draws_rank is not None and self.global_rank == self.extra_draws_rank:
            torch.rand(7 + batch_idx)  # diverge the global RNG stream of this rank only
        loss = self.loss(batch)
        if self.global_step in self.nonfinite_steps and (
            self.nonfinite_rank is None or self.global_rank == self.nonfinite_rank
        ):
            loss = loss * torch.inf
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return None

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "noisy":
            return NoisySGD(self.parameters(), lr=self.lr, momentum=0.9)
        if self.optimizer_name == "adamax":
            return torch.optim.Adamax(self.parameters(), lr=1e-2)
        if self.optimizer_name == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=1e-2)
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


def tiny_dataloader(samples: int = 32, batch_size: int = 4, seed: int = 0) -> DataLoader:
    """A fixed random 3x6x6 image / 4-class dataset, unshuffled (deterministic order)."""
    generator = torch.Generator().manual_seed(seed)
    data = TensorDataset(
        torch.randn(samples, 3, 6, 6, generator=generator),
        torch.randint(0, 4, (samples,), generator=generator),
    )
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def make_trainer(root, callbacks, **kwargs) -> pl.Trainer:
    """A quiet CPU Trainer writing only under ``root``."""
    kwargs.setdefault("max_epochs", 2)
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        default_root_dir=root,
        callbacks=callbacks,
        accelerator="cpu",
        devices=kwargs.pop("devices", 1),
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


class Conv1D(nn.Module):
    """A stand-in for Hugging Face transformers' ``Conv1D`` (GPT-2's attention and MLP), so
    tests of its orientation run without transformers installed: ``y = x @ weight + bias``
    with ``weight`` stored ``(in, out)``. Its module name starts with ``transformers`` as the
    real one's does (``test_conv1d_stand_in_is_transformers_conv1d`` compares the two)."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        size_out = (*x.size()[:-1], self.nf)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


Conv1D.__module__ = "transformers.pytorch_utils"


def record_rewiring_gradients(monkeypatch) -> list[dict]:
    """Spy on every rewiring: the list it returns receives, per call, a copy of the
    gradients the rewiring was given (name -> tensor)."""
    from lightning_ggr.sparse.rewiring import Rewiring

    seen: list[dict] = []
    rewire = Rewiring.__call__

    def spy(self, weights, masks, gradients, *args, **kwargs):
        seen.append({n: g.detach().clone() for n, g in gradients.items()})
        return rewire(self, weights, masks, gradients, *args, **kwargs)

    monkeypatch.setattr(Rewiring, "__call__", spy)
    return seen
