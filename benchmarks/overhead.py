"""Per-step overhead of DynamicSparsityCallback against dense training, in the same run.

Trains a CIFAR-style ResNet-18 (32x32 inputs, 100 classes, SGD) for a few steps with a
Lightning Trainer, densely and with the callback for every method, and prints a table:
median step time, the ratio to dense, the engine's own per-step work measured in
isolation (masking gradients + re-zeroing weights), and the time of one rewiring.

    python benchmarks/overhead.py                    # CPU, batch 32
    python benchmarks/overhead.py --device cuda --batch-size 128 --steps 50

Step times on a shared machine are noisy: dense runs are interleaved with the sparse
ones and every ratio is taken against the median over all dense runs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ggr import DynamicSparsityCallback, SparseEngine, select_sparse_parameters
from lightning_ggr.sparse import METHODS
from lightning_ggr.sparse.masks import preserves_zeros
from lightning_ggr.zoo.models import resnet18


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.model = resnet18(num_classes=100, input_size=32)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)


class StepTimer(pl.Callback):
    """Wall time of every training step (batch start to batch end), synchronized on GPU."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: list[float] = []

    def _sync(self, module: pl.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._sync(pl_module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._sync(pl_module)
        if batch_idx >= self.warmup:
            self.times.append(time.perf_counter() - self._start)


def data(batch_size: int, steps: int) -> DataLoader:
    x = torch.randn(batch_size * steps, 3, 32, 32)
    y = torch.randint(0, 100, (batch_size * steps,))
    return DataLoader(TensorDataset(x, y), batch_size=batch_size)


def step_time(args, method: str | None) -> float:
    torch.manual_seed(0)
    timer = StepTimer(args.warmup)
    callbacks: list[pl.Callback] = [timer]
    if method is not None:
        # No rewiring inside the timed window: this measures the per-step cost.
        callbacks.append(DynamicSparsityCallback(method=method, sparsity=args.sparsity,
                                                 interval="step", stop_step=10**9,
                                                 update_interval=10**8, log_figures=False))
    trainer = pl.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
                         max_steps=args.warmup + args.steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks)
    trainer.fit(Classifier(), data(args.batch_size, args.warmup + args.steps))
    return statistics.median(timer.times)


def isolated_costs(args, method: str) -> tuple[float, float]:
    """(per-step engine work, one rewiring) in seconds, on a real backward pass of the same
    network, batch size and optimizer as the Trainer runs."""
    device = torch.device(args.device)
    model = resnet18(num_classes=100, input_size=32).to(device)
    engine = SparseEngine(select_sparse_parameters(model), sparsity=args.sparsity, method=method)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 100, (args.batch_size,), device=device)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()

    def timed(fn, repeats: int) -> float:
        samples = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples)

    def per_step() -> None:
        # Exactly the callback's per-step work: the post-step pass only for optimizers
        # that do not keep masked weights at 0 by themselves (SGD does).
        engine.mask_gradients()
        if not preserves_zeros(optimizer):
            engine.after_optimizer_step([optimizer])

    hot = timed(per_step, 30)
    rewiring = timed(lambda: engine.rewire(0.1, [optimizer]), 3)
    return hot, rewiring


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--methods", nargs="+", default=sorted(METHODS), choices=sorted(METHODS))
    args = parser.parse_args()

    dense, rows = [], []
    for method in args.methods:
        dense.append(step_time(args, None))
        sparse = step_time(args, method)
        hot, rewiring = isolated_costs(args, method)
        rows.append((method, sparse, hot, rewiring))
    dense.append(step_time(args, None))
    dense_step = statistics.median(dense)

    print(f"CIFAR ResNet-18, batch {args.batch_size}, sparsity {args.sparsity}, "
          f"device {args.device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    print(f"dense step: median {dense_step * 1e3:.1f} ms over {len(dense)} runs "
          f"(spread {min(dense) * 1e3:.1f}-{max(dense) * 1e3:.1f} ms)\n")
    header = ("| method | step (ms) | ratio to dense | engine per-step (ms) | "
              "isolated ratio | one rewiring (ms) |")
    print(header)
    print("|---|---:|---:|---:|---:|---:|")
    for method, sparse, hot, rewiring in rows:
        print(f"| {method} | {sparse * 1e3:.1f} | {sparse / dense_step:.3f} | {hot * 1e3:.2f} | "
              f"{(dense_step + hot) / dense_step:.4f} | {rewiring * 1e3:.0f} |")


if __name__ == "__main__":
    main()
