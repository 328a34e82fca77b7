"""Add dynamic sparse training to an existing Lightning project: one callback, nothing else.

Below is an ordinary LightningModule with its own small network and dataloaders (the 8x8
digits that ship with lightning-ggr, so nothing is downloaded). The only line about sparsity is the
``DynamicSparsityCallback`` given to the Trainer: it keeps 90% of the Conv/Linear weights at
zero and lets GGR move the remaining 10% as training goes.

    python examples/add_to_your_trainer.py    # about 12 s on a busy 2-core CPU (5 s of CPU time)

At fit start the callback prints what is sparse and the schedule in one line; at fit end,
the account of the run (rewirings, weights moved, each layer's density then and now).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ggr import DynamicSparsityCallback
from lightning_ggr.zoo.data import load_digits


class DigitsNet(pl.LightningModule):
    """Your model: nothing in it knows about sparsity."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.Flatten(),
            nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self(x).argmax(1) == y).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def digits_loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    pixels, y = load_digits()  # (1797, 8, 8) pixels 0..16, labels 0..9
    x = pixels.float().unsqueeze(1) / 16.0
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(y), generator=generator)
    train, val = order[:1400], order[1400:]
    return (DataLoader(TensorDataset(x[train], y[train]), batch_size, shuffle=True),
            DataLoader(TensorDataset(x[val], y[val]), batch_size))


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--root-dir", default="runs/add_to_your_trainer",
                        help="where the Trainer writes logs")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of torch (default 1: this small network trains "
                        "fastest on one, and on a busy CPU several fight each other)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    pl.seed_everything(0)

    # The one addition: rewire every 10 optimizer steps for the first half of training.
    sparse = DynamicSparsityCallback(method="ggr", sparsity=0.9, distribution="erk",
                                     interval="step", update_interval=10, log_figures=False)

    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", devices=1,
                         default_root_dir=args.root_dir, enable_checkpointing=False,
                         enable_progress_bar=False, log_every_n_steps=5, callbacks=[sparse])
    train_loader, val_loader = digits_loaders()
    trainer.fit(DigitsNet(), train_loader, val_loader)

    # The fit-end account printed each layer's density; they are also here:
    print(f"val_acc {float(trainer.callback_metrics['val_acc']):.3f}, rewirings "
          f"{int(trainer.callback_metrics['rewiring/count'])} of "
          f"{int(trainer.callback_metrics['rewiring/planned'])} planned")
    return sparse.layer_densities()


if __name__ == "__main__":
    main()
