"""Training dynamics nobody here wrote (issue 17): optimizer state beyond momentum, layers
frozen mid-fit, code that writes into masked weights, a step the grad scaler skips, manual
optimization that clips."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ggr import DynamicSparsityCallback

pytestmark = pytest.mark.usefixtures("single_thread")


def loader(samples: int = 32, batch: int = 4) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(samples, 8, generator=g),
                         torch.randint(0, 4, (samples,), generator=g))
    return DataLoader(data, batch_size=batch, shuffle=False)  # 8 batches per epoch


class MLP(pl.LightningModule):
    """``Linear(8, 16) -> ReLU -> Linear(16, 4)``, with a chosen torch optimizer."""

    def __init__(self, optimizer: str = "sgd", **settings) -> None:
        super().__init__()
        self.optimizer_name = optimizer
        self.settings = settings
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return getattr(torch.optim, self.optimizer_name)(self.parameters(), **self.settings)


def trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    kwargs.setdefault("max_epochs", 2)
    return pl.Trainer(default_root_dir=tmp_path, callbacks=callbacks, accelerator="cpu",
                      devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


def sparse(**kwargs) -> DynamicSparsityCallback:
    settings = {"method": "set", "sparsity": 0.75, "interval": "step", "update_interval": 3,
                "stop_step": 12, "drop_fraction": 0.5, "log_figures": False,
                "selection_summary": False}
    return DynamicSparsityCallback(**{**settings, **kwargs})


# ------------------------------------------------------------- 1. fresh optimizer state
class GrownState(pl.Callback):
    """After each rewiring (placed after the sparse callback): the state of ``key`` at the
    positions that became active."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.previous: dict[str, torch.Tensor] = {}
        self.grown_values: list[torch.Tensor] = []

    def on_train_start(self, trainer, pl_module):
        self.previous = {n: m.clone() for n, m in trainer.callbacks[0].masks.items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        callback = trainer.callbacks[0]
        params = callback.engine.params
        for name, mask in callback.masks.items():
            grown = mask & ~self.previous[name]
            if grown.any():
                self.grown_values.append(optimizer.state[params[name]][self.key][grown].clone())
            self.previous[name] = mask.clone()


@pytest.mark.parametrize(("optimizer", "settings", "key", "start"), [
    ("Rprop", {"lr": 0.01}, "step_size", 0.01),  # was 1e-6 after 50 steps: barely moved
    ("Adagrad", {"lr": 0.05, "initial_accumulator_value": 0.5}, "sum", 0.5),  # was 0
])
def test_grown_weights_start_their_optimizer_state_where_a_fresh_parameter_does(
        tmp_path, optimizer, settings, key, start):
    recorder = GrownState(key)
    trainer(tmp_path, [sparse(), recorder]).fit(MLP(optimizer, **settings), loader())
    assert len(recorder.grown_values) == 2 * 3  # two layers, steps 3, 6, 9
    for values in recorder.grown_values:
        assert torch.equal(values, torch.full_like(values, start))


class FlatMomentum(torch.optim.SGD):
    """SGD that also keeps a flattened copy of its momentum: one value per weight in another
    layout than the weight's."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["flat"] = torch.zeros(p.numel())
        return loss


class FlatMLP(MLP):
    def configure_optimizers(self):
        return FlatMomentum(self.parameters(), lr=0.1, momentum=0.9)


def test_optimizer_state_in_another_layout_is_refused_before_training(tmp_path):
    model = FlatMLP()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"FlatMomentum keeps 'flat' of shape \(6,\)"):
        trainer(tmp_path, [sparse()]).fit(model, loader())
    # Refused before any optimizer step: only the masks touched the weights.
    assert all(torch.equal(p.detach()[p.detach() != 0], b[p.detach() != 0])
               for p, b in zip(model.parameters(), before, strict=True))
