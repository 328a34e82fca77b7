"""Where one run of the ResNet-18 study spends its time outside its training steps, and what
Lightning adds to each step (issue 20, item 1).

    python benchmarks/study_profile.py                   # CPU: fake images, tiny setting
    python benchmarks/study_profile.py --device cuda --data data/cifar100_subset.npz

Three measurements, each printed as a table:

1. **start-up**: importing torch, Lightning and the package in a fresh process;
2. **one run, by phase** (the study's ``train_one``, its recipe at ``--epochs`` epochs of
   ``--limit-batches`` batches of ``--batch-size``): data and network set-up, the Trainer, the
   fit's start (engine, FLOPs count), the training steps, what Lightning does between steps
   (fetching the next batch, its loop and logging), epoch ends (rewirings), validation, test;
3. **per step, Lightning against a plain loop** on a one-layer network, so that the network's
   own arithmetic is negligible and what remains is host work: the study's Trainer settings
   with ``ImageClassifier`` and the callback, against the same forward, loss, backward, masked
   SGD step and schedule step written as a loop; and how many times a step reads a tensor
   back to Python (``aten::_local_scalar_dense``: on a GPU each one waits for the device).
   With ``--device cuda`` it also counts every synchronising CUDA call per step, with where
   it came from (``torch.cuda.set_sync_debug_mode``).
"""

from __future__ import annotations

import argparse
import collections
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def startup_seconds() -> dict[str, float]:
    """Import times in a fresh interpreter (median of 3)."""
    code = ("import time; t = time.perf_counter(); import torch; a = time.perf_counter(); "
            "import lightning.pytorch; b = time.perf_counter(); import lightning_ggr; "
            "c = time.perf_counter(); print(a - t, b - a, c - b)")
    times = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, cwd=HERE.parent).stdout.split()
        times.append([float(x) for x in out])
    return {name: statistics.median(t[i] for t in times)
            for i, name in enumerate(("import torch", "import lightning", "import lightning_ggr"))}


class PhaseClock(pl.Callback):
    """Timestamps of the hooks that delimit a run's phases."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []

    def _mark(self, name: str) -> None:
        if self.marks and self.marks[-1][0] == "batch_end" and name == "batch_start":
            self.marks.append(("between", time.perf_counter()))
        self.marks.append((name, time.perf_counter()))

    def setup(self, trainer, pl_module, stage):
        self._mark(f"setup_{getattr(stage, 'value', stage)}")  # TrainerFn or str

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._mark("batch_start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._mark("batch_end")

    def on_train_epoch_end(self, trainer, pl_module):
        self._mark("epoch_end")

    def on_validation_start(self, trainer, pl_module):
        self._mark("validation_start")

    def on_validation_end(self, trainer, pl_module):
        self._mark("validation_end")

    def on_test_start(self, trainer, pl_module):
        self._mark("test_start")

    def on_test_end(self, trainer, pl_module):
        self._mark("test_end")


def run_phases(study, data: Path, device: str, epochs: int, batches: int,
               batch_size: int) -> tuple[dict[str, float], int]:
    """One study run (GGR, 99% uniform, seed 0) with its phases timed."""
    clock = PhaseClock()
    original = pl.Trainer.__init__

    def patched(self, *args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), clock]
        original(self, *args, **kwargs)

    recipe = study._recipe(argparse.Namespace(
        network="resnet18", epochs=epochs, lr=None, batch_size=batch_size,
        limit_batches=batches, precision=None))
    spec = study.RunSpec("ggr", 0.99, "uniform", 0)
    pl.Trainer.__init__ = patched
    try:
        with tempfile.TemporaryDirectory() as out:
            start = time.perf_counter()
            study.train_one(spec, recipe, data, Path(out), device=device, workers=0)
            end = time.perf_counter()
    finally:
        pl.Trainer.__init__ = original
    marks = clock.marks
    phases = collections.Counter()
    phases["set-up before fit (data, network, callback, Trainer)"] = marks[0][1] - start
    steps = 0
    previous_name, previous = marks[0]
    for name, moment in marks[1:]:
        span = moment - previous
        if previous_name == "batch_start" and name == "batch_end":
            phases["training steps (forward, backward, optimizer, hooks)"] += span
            steps += 1
        elif previous_name == "between":
            pass
        elif previous_name == "batch_end" and name == "between":
            phases["between steps (next batch, Lightning's loop, logging)"] += span
        elif previous_name == "setup_fit" and name == "batch_start":
            phases["fit start (engine, FLOPs count, loaders)"] += span
        elif previous_name == "validation_start":
            phases["validation"] += span
        elif previous_name == "test_start":
            phases["test"] += span
        elif previous_name == "setup_test":
            phases["test start"] += span
        else:
            phases["epoch ends and starts (rewirings, schedule)"] += span
        previous_name, previous = name, moment
    phases["after the test (result written)"] = end - marks[-1][1]
    phases["whole run"] = end - start
    return dict(phases), steps


class Tiny(nn.Module):
    """A network whose arithmetic costs next to nothing: what a step costs is host work."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(3 * 32 * 32, 100)

    def forward(self, x):
        return self.linear(self.flatten(x))


class StepClock(pl.Callback):
    """Per-step wall time from one batch start to the next, after ``skip`` steps; and the
    host reads (``aten::_local_scalar_dense``) and CUDA syncs of ``window`` steps."""

    def __init__(self, skip: int, window: int, cuda: bool) -> None:
        self.skip, self.window, self.cuda = skip, window, cuda
        self.times: list[float] = []
        self.reads = 0
        self.syncs: collections.Counter[str] = collections.Counter()
        self._last = None
        self._profile = None
        self._caught = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        now = time.perf_counter()
        if self._last is not None and batch_idx > self.skip:
            self.times.append(now - self._last)
        self._last = now
        if batch_idx == self.skip:
            self._profile = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU])
            self._profile.__enter__()
        elif batch_idx == self.skip + self.window:
            self._profile.__exit__(None, None, None)
            self.reads = sum(e.name == "aten::_local_scalar_dense"
                             for e in self._profile.events())
        if self.cuda and batch_idx == self.skip + self.window + 1:
            torch.cuda.synchronize()
            self._caught = warnings.catch_warnings(record=True)
            self._log = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        elif self.cuda and batch_idx == self.skip + 2 * self.window + 1:
            torch.cuda.set_sync_debug_mode("default")
            self._caught.__exit__(None, None, None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        pass


def _sync_sites(log) -> collections.Counter[str]:
    from lightning_ggr.sparse.syncs import is_sync_warning

    sites: collections.Counter[str] = collections.Counter()
    for w in log:
        if is_sync_warning(w.message):
            sites[f"{Path(w.filename).name}:{w.lineno}"] += 1
    return sites


def lightning_step(data_module, device: str, steps: int, skip: int, window: int):
    from lightning_ggr import DynamicSparsityCallback
    from lightning_ggr.zoo.module import ImageClassifier

    pl.seed_everything(0, verbose=False)
    module = ImageClassifier(Tiny(), num_classes=100, input_size=32, milestones=(10**6,))
    clock = StepClock(skip, window, device == "cuda")
    callback = DynamicSparsityCallback(method="ggr", sparsity=0.99, distribution="uniform",
                                       interval="epoch", stop_fraction=0.5, seed=0)
    trainer = pl.Trainer(max_epochs=1, max_steps=steps, accelerator=device, devices=1,
                         logger=False, callbacks=[callback, clock], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False,
                         num_sanity_val_steps=0, limit_val_batches=0, precision="bf16-mixed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=data_module)
    syncs = _sync_sites(clock._log) if clock._caught is not None else None
    return statistics.median(clock.times), clock.reads / window, syncs


def plain_step(data_module, device: str, steps: int, skip: int) -> float:
    """The same work as a loop: forward, loss, backward, masked SGD step, schedule step."""
    from lightning_ggr import SparseEngine, select_sparse_parameters

    torch.manual_seed(0)
    model = Tiny().to(device)
    engine = SparseEngine(select_sparse_parameters(model), sparsity=0.99,
                          distribution="uniform", seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    data_module.seed = 0
    times, last = [], None
    for i, (x, y) in enumerate(data_module.train_dataloader()):
        if i >= steps:
            break
        now = time.perf_counter()
        if last is not None and i > skip:
            times.append(now - last)
        last = now
        x, y = x.to(device), y.to(device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        engine.mask_gradients()
        optimizer.step()
        schedule.step()
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--data", type=Path, default=None, help="default: fake images")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--limit-batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60, help="steps of the per-step section")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-startup", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import study
    from study_data import CifarSubsetDataModule
    from study_pairing import fake_cifar

    with tempfile.TemporaryDirectory() as folder:
        data = args.data or fake_cifar(Path(folder) / "fake.npz", per_class=40)
        print(f"device {args.device}; torch {torch.__version__}, lightning {pl.__version__}; "
              f"{args.threads} thread(s); data {data.name}\n")
        if not args.skip_startup:
            print("| start-up (fresh process) | s |\n|---|---|")
            for name, seconds in startup_seconds().items():
                print(f"| {name} | {seconds:.2f} |")
            print()
        phases, steps = run_phases(study, data, args.device, args.epochs, args.limit_batches,
                                   args.batch_size)
        whole = phases["whole run"]
        print(f"| one run, ResNet-18 recipe at {args.epochs} epochs x {args.limit_batches} "
              f"batches of {args.batch_size} ({steps} steps) | s | share |\n|---|---|---|")
        for name, seconds in phases.items():
            print(f"| {name} | {seconds:.3f} | {100 * seconds / whole:.1f}% |")
        print()
        module = CifarSubsetDataModule(data, val_size=1000 if args.data else 400,
                                       batch_size=128, device=args.device)
        module.setup()
        skip, window = 10, 10
        steps = max(args.steps, skip + 2 * window + 2)
        lightning_s, reads, syncs = lightning_step(module, args.device, steps, skip, window)
        plain_s = plain_step(module, args.device, steps, skip)
        print(f"| per step, one-layer network, batch 128 | ms |\n|---|---|\n"
              f"| Lightning Trainer + ImageClassifier + DynamicSparsityCallback | "
              f"{1000 * lightning_s:.2f} |\n| the same as a plain loop | {1000 * plain_s:.2f} |\n"
              f"| Lightning's own work per step | {1000 * (lightning_s - plain_s):.2f} |\n"
              f"| tensors read back to Python per step (Lightning; a CPU tensor's read, "
              f"e.g. the callback's density on the progress bar, waits for nothing) | "
              f"{reads:.1f} |")
        if syncs is not None:
            print(f"| CUDA synchronisations per step (Lightning) | "
                  f"{sum(syncs.values()) / window:.1f} |")
            for site, count in syncs.most_common():
                print(f"|   {site} | {count / window:.1f} per step |")


if __name__ == "__main__":
    try:
        main()
    except Exception:
        traceback.print_exc()
        sys.exit(1)
