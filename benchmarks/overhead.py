"""The cost of sparse training against dense training, measured side by side in one process.

    python benchmarks/overhead.py                          # CPU table: every method, batch 32
    python benchmarks/overhead.py --suite gpu              # the whole GPU table, as Markdown
    python benchmarks/overhead.py --device cpu --tiny      # the same sections in seconds
    python benchmarks/overhead.py --device cuda --sections loop pass

Sections (``--sections``):
  methods    (the CPU default) a Lightning Trainer per method, dense runs interleaved, and the
             engine's per-step work timed alone: the *isolated ratio* (dense + engine) / dense,
             in wall time and in CPU time (``process_time``, steadier on a shared machine)
  loop       per-step time in a plain loop, fp32 and bf16 (autocast + channels_last): dense,
             ``SparseEngine.before_optimizer_step``, rigl-torch (when installed), in rounds
  trainer    the same in a Lightning Trainer: dense, ``DynamicSparsityCallback``, rigl-torch
  pass       the per-step masking pass alone: time, operations (CUDA: kernels), allocations
             and host synchronisations per pass, counted with ``torch.profiler``
  rewiring   one rewiring per method (and rigl-torch's) on ResNet-18 and VGG16: time, time in
             dense training steps, peak extra memory, host synchronisations, and what does
             not move with the host's speed: cudaLaunchKernel calls and device time
             (CUDA; on a CPU the operations), topk calls
  build      ``SparseEngine`` construction time (ResNet-18, VGG16)
  every_step the cost of ``enforce_masks_every_step=True`` (masks applied before the forward
             pass and after every step, whatever writes into the weights), and of the pass
             after every step of an optimizer outside the zero-preserving list, with and
             without counting writes by other code before the step: the per-step work
             alone against a dense plain-loop step (isolated ratio, wall and CPU time), and
             Trainer steps dense / default callback / with the setting, interleaved in rounds

``--suite gpu`` runs loop, trainer, pass, rewiring and build on CUDA (ResNet-18 CIFAR, batch
128, sparsity 0.9) and prints the goals of issue 13 met or missed.

Timing: CUDA events on a GPU (no synchronisation inside a timed block; one at its end),
``perf_counter`` otherwise; warm-up steps per block; every ratio is taken against the dense
blocks of the same round and reported as the median and the range over rounds. The
rigl-torch column needs the optional ``bench`` extra (``pip install -e '.[bench]'``, which
pins ``rigl-torch==0.5.2``); without it the column says "not installed".
"""

from __future__ import annotations

import argparse
import datetime
import logging
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from lightning_ggr import DynamicSparsityCallback, SparseEngine, select_sparse_parameters
from lightning_ggr.sparse import METHODS
from lightning_ggr.sparse.masks import preserves_zeros
from lightning_ggr.sparse.syncs import (
    count_cuda_syncs,
    profile_sync_events,
    profiler_own_syncs,
    top_level_operations,
)
from lightning_ggr.zoo import build_model

try:  # the optional peer
    from rigl_torch.RigL import RigLScheduler
except ImportError:  # pragma: no cover - depends on the environment
    RigLScheduler = None

HOST_READ_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal")
METADATA_OPS = ("aten::view", "aten::as_strided", "aten::alias", "aten::detach")
#: Bytes per moved weight allowed beside the largest layer's scores in the memory goal.
BYTES_PER_MOVED_WEIGHT = 128


# --------------------------------------------------------------------------- settings
@dataclass
class Settings:
    device: torch.device
    model: str = "resnet18"  # per-step sections
    big_model: str = "vgg16"  # rewiring/build sections, besides `model`
    num_classes: int = 100
    input_size: int = 32
    batch_size: int = 128
    sparsity: float = 0.9
    rounds: int = 5
    steps: int = 50
    warmup: int = 10
    trainer_steps: int = 40
    trainer_rounds: int = 3
    pass_calls: int = 300
    pass_repeats: int = 5
    rewiring_reps: int = 5
    build_reps: int = 3
    methods: list[str] = field(default_factory=lambda: ["ggr", "rigl", "set", "dsr"])
    precisions: list[str] = field(default_factory=lambda: ["fp32", "bf16"])
    table_methods: list[str] = field(default_factory=lambda: sorted(METHODS))

    @classmethod
    def tiny(cls, device: torch.device) -> Settings:
        return cls(device, model="small_cnn", big_model="small_cnn", num_classes=10,
                   input_size=16, batch_size=8, rounds=2, steps=3, warmup=1, trainer_steps=3,
                   trainer_rounds=1, pass_calls=5, pass_repeats=2, rewiring_reps=1,
                   build_reps=1, methods=["ggr", "set"], table_methods=["ggr"])

    @classmethod
    def cpu_table(cls, device: torch.device) -> Settings:
        """The CPU default: ResNet-18 at batch 32, fewer steps (a step is ~0.7 s)."""
        return cls(device, batch_size=32, steps=12, warmup=3, trainer_steps=12,
                   pass_calls=30, pass_repeats=1, rewiring_reps=3)


def make_model(s: Settings, name: str) -> nn.Module:
    if name == "small_cnn":
        return build_model(name, num_classes=s.num_classes, in_channels=3)
    return build_model(name, num_classes=s.num_classes, input_size=s.input_size)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class BlockTimer:
    """Per-step times of one block: CUDA events (read after one synchronisation at the end)
    or ``perf_counter``; ``process_time`` too off CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list[list] = []

    def start(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append([event, None, 0.0, 0.0])
        else:
            self.marks.append([time.perf_counter(), None, time.process_time(), 0.0])

    def stop(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks[-1][1] = event
        else:
            self.marks[-1][1] = time.perf_counter()
            self.marks[-1][3] = time.process_time()

    def seconds(self) -> list[float]:
        sync(self.device)
        if self.cuda:
            return [a.elapsed_time(b) / 1e3 for a, b, _, _ in self.marks]
        return [b - a for a, b, _, _ in self.marks]

    def cpu_seconds(self) -> list[float]:
        return [d - c for _, _, c, d in self.marks]


def summary(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """(wall, CPU) seconds of one call, synchronised on CUDA."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


# ------------------------------------------------------------------------ rigl-torch peer
def attach_rigl_torch(model: nn.Module, optimizer: torch.optim.Optimizer, s: Settings,
                      delta: int = 10**8):
    """rigl-torch's RigLScheduler; with ``delta`` huge no rewiring runs, and what is left is
    its per-step work (a backward hook per layer, momentum and weight masking after every
    step). Its step wrapper takes no arguments; Lightning calls ``step(closure=...)``, so
    ``optimizer.step`` is wrapped once more to accept (and run) the closure."""
    pruner = RigLScheduler(model, optimizer, dense_allocation=1 - s.sparsity, T_end=10**9,
                           delta=delta, alpha=0.3, ignore_linear_layers=False)
    rigl_step = optimizer.step

    def step(closure=None, **kwargs):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        rigl_step()
        return loss

    optimizer.step = step
    return pruner


def peers() -> list[str]:
    return ["rigl-torch"] if RigLScheduler is not None else []


# ----------------------------------------------------------------------------- plain loop
class LoopRunner:
    """One model + optimizer + sparsity variant for the plain-loop section."""

    def __init__(self, s: Settings, variant: str, precision: str, init_state: dict) -> None:
        self.s, self.variant, self.precision = s, variant, precision
        self.model = make_model(s, s.model).to(s.device)
        self.model.load_state_dict(init_state)
        self.channels_last = precision == "bf16"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.05, momentum=0.9,
                                         weight_decay=5e-4)
        self.engine = self.pruner = None
        if variant == "engine":
            self.engine = SparseEngine(select_sparse_parameters(self.model),
                                       sparsity=s.sparsity, method="ggr", seed=0)
        elif variant == "rigl-torch":
            self.pruner = attach_rigl_torch(self.model, self.optimizer, s)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(s.batch_size, 3, s.input_size, s.input_size, generator=g)
        self.x = x.to(s.device)
        if self.channels_last:
            self.x = self.x.contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, s.num_classes, (s.batch_size,), generator=g).to(s.device)
        self.step_index = 0

    def step(self) -> None:
        with torch.autocast(self.s.device.type, dtype=torch.bfloat16,
                            enabled=self.precision == "bf16"):
            loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        loss.backward()
        if self.engine is not None:
            self.engine.before_optimizer_step(self.step_index, 0, [self.optimizer])
            self.optimizer.step()
            if not preserves_zeros(self.optimizer):
                self.engine.after_optimizer_step([self.optimizer])
        elif self.pruner is not None:
            if self.pruner():
                self.optimizer.step()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_index += 1

    def block(self, steps: int, warmup: int) -> list[float]:
        for _ in range(warmup):
            self.step()
        timer = BlockTimer(self.s.device)
        for _ in range(steps):
            timer.start()
            self.step()
            timer.stop()
        return timer.seconds()


def run_loop(s: Settings) -> list[dict]:
    rows = []
    init_state = make_model(s, s.model).state_dict()
    for precision in s.precisions:
        runners = {v: LoopRunner(s, v, precision, init_state)
                   for v in ["dense", "engine", *peers()]}
        medians: dict[str, list[float]] = {v: [] for v in runners}
        for round_index in range(s.rounds):
            for v, runner in runners.items():
                warm = s.warmup if round_index == 0 else max(1, s.warmup // 5)
                medians[v].append(statistics.median(runner.block(s.steps, warm)))
        rows.append(_ratios(f"plain loop, {precision}", medians))
        del runners
        _free(s.device)
    return rows


def _ratios(setup: str, medians: dict[str, list[float]]) -> dict:
    dense = medians["dense"]
    row = {"setup": setup, "dense": summary(dense)}
    for v, per_round in medians.items():
        if v != "dense":
            row[v] = summary([x / d for x, d in zip(per_round, dense, strict=True)])
    return row


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -------------------------------------------------------------------------------- trainer
def _quiet_lightning() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")


def _classifier(s: Settings, init_state: dict | None, channels_last: bool):
    import lightning.pytorch as pl

    class Classifier(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = make_model(s, s.model)
            if init_state is not None:
                self.model.load_state_dict(init_state)
            if channels_last:
                self.model = self.model.to(memory_format=torch.channels_last)

        def training_step(self, batch, batch_idx):
            x, y = batch
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)

    return Classifier()


def _fit_step_times(s: Settings, variant: str, method: str, precision: str,
                    init_state: dict | None, steps: int,
                    every_step: bool = False) -> tuple[list[float], list[float]]:
    """Step times (wall, CPU) of one Trainer fit: batch start to batch end, after warm-up."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.timer = BlockTimer(s.device)

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx >= s.warmup:
                self.timer.start()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx >= s.warmup:
                self.timer.stop()

    class RigLTorchPeer(pl.Callback):
        def on_fit_start(self, trainer, pl_module):
            self.pruner = attach_rigl_torch(pl_module, trainer.optimizers[0], s)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.pruner()  # counts the step (a due RigL step could not skip the update here)

    total = s.warmup + steps
    g = torch.Generator().manual_seed(1)
    x = torch.randn(s.batch_size * total, 3, s.input_size, s.input_size, generator=g)
    y = torch.randint(0, s.num_classes, (s.batch_size * total,), generator=g)
    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    if variant == "engine":
        # No rewiring inside the timed window: this measures the per-step cost.
        callbacks.append(DynamicSparsityCallback(
            method=method, sparsity=s.sparsity, interval="step", stop_step=10**9,
            update_interval=10**8, log_figures=False, enforce_masks_every_step=every_step))
    elif variant == "rigl-torch":
        callbacks.append(RigLTorchPeer())
    trainer = pl.Trainer(
        accelerator="gpu" if s.device.type == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if precision == "bf16" else "32-true",
        max_steps=total, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
    loader = DataLoader(TensorDataset(x, y), batch_size=s.batch_size,
                        pin_memory=s.device.type == "cuda")
    trainer.fit(_classifier(s, init_state, precision == "bf16"), loader)
    return timer.timer.seconds(), timer.timer.cpu_seconds()


def run_trainer(s: Settings) -> list[dict]:
    _quiet_lightning()
    init_state = make_model(s, s.model).state_dict()
    rows = []
    for precision in s.precisions:
        medians: dict[str, list[float]] = {v: [] for v in ["dense", "engine", *peers()]}
        for _ in range(s.trainer_rounds):
            for v in medians:
                wall, _ = _fit_step_times(s, v, "ggr", precision, init_state, s.trainer_steps)
                medians[v].append(statistics.median(wall))
                _free(s.device)
        label = " (bf16-mixed + channels_last)" if precision == "bf16" else ""
        rows.append(_ratios(f"Lightning Trainer, {precision}{label}", medians))
    return rows


# ------------------------------------------------------------------ the CPU methods table
def _isolated_per_step(s: Settings, method: str) -> tuple[float, float, float, float]:
    """(per-step engine work, one rewiring), each (wall, CPU) seconds, on a real backward
    pass of the same network, batch size and optimizer as the Trainer runs."""
    model = make_model(s, s.model).to(s.device)
    engine = SparseEngine(select_sparse_parameters(model), sparsity=s.sparsity, method=method)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(s.batch_size, 3, s.input_size, s.input_size, device=s.device)
    y = torch.randint(0, s.num_classes, (s.batch_size,), device=s.device)
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()

    def per_step() -> None:
        # Exactly the callback's per-step work: the post-step pass only for optimizers
        # that do not keep masked weights at 0 by themselves (SGD does).
        engine.mask_gradients()
        if not preserves_zeros(optimizer):
            engine.after_optimizer_step([optimizer])

    per_step()
    hot = [timed(per_step, s.device) for _ in range(s.pass_calls)]
    rewiring = [timed(lambda: engine.rewire(0.1, [optimizer]), s.device)
                for _ in range(s.rewiring_reps)]
    return (statistics.median(h[0] for h in hot), statistics.median(h[1] for h in hot),
            statistics.median(r[0] for r in rewiring), statistics.median(r[1] for r in rewiring))


def run_methods(s: Settings) -> list[dict]:
    _quiet_lightning()
    dense_wall, dense_cpu, rows = [], [], []
    for method in s.table_methods:
        wall, cpu = _fit_step_times(s, "dense", method, "fp32", None, s.trainer_steps)
        dense_wall.append(statistics.median(wall))
        dense_cpu.append(statistics.median(cpu))
        wall, cpu = _fit_step_times(s, "engine", method, "fp32", None, s.trainer_steps)
        hot, hot_cpu, rewiring, rewiring_cpu = _isolated_per_step(s, method)
        rows.append({"method": method, "step": statistics.median(wall),
                     "step_cpu": statistics.median(cpu), "hot": hot, "hot_cpu": hot_cpu,
                     "rewiring": rewiring, "rewiring_cpu": rewiring_cpu})
    wall, cpu = _fit_step_times(s, "dense", "ggr", "fp32", None, s.trainer_steps)
    dense_wall.append(statistics.median(wall))
    dense_cpu.append(statistics.median(cpu))
    dense, dense_c = statistics.median(dense_wall), statistics.median(dense_cpu)
    for row in rows:
        row.update(dense=dense, dense_cpu=dense_c, dense_runs=summary(dense_wall),
                   ratio=row["step"] / dense, isolated=(dense + row["hot"]) / dense,
                   isolated_cpu=(dense_c + row["hot_cpu"]) / dense_c)
    return rows


def _plain_loop(s: Settings, *, set_to_none: bool) -> tuple[nn.Module, torch.optim.Optimizer,
                                                          Tensor, Tensor, Callable[[], None]]:
    """The dense plain loop of the isolated sections: the model, SGD with momentum, one
    fixed batch and its step (forward, backward, step, ``zero_grad(set_to_none)``), warmed
    up ``s.warmup`` steps."""
    model = make_model(s, s.model).to(s.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(s.batch_size, 3, s.input_size, s.input_size, generator=g).to(s.device)
    y = torch.randint(0, s.num_classes, (s.batch_size,), generator=g).to(s.device)

    def step() -> None:
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=set_to_none)

    for _ in range(s.warmup):
        step()
    return model, optimizer, x, y, step


def run_isolated(s: Settings) -> list[dict]:
    """The CPU regression check in one process: a dense plain-loop step (forward, backward,
    SGD step) and the engine's per-step pass, each the median of ``steps`` / ``pass_calls``
    calls, in wall and CPU time; the isolated ratio is (dense + pass) / dense."""
    model, _, x, y, step = _plain_loop(s, set_to_none=True)
    dense = [timed(step, s.device) for _ in range(s.steps)]
    engine = SparseEngine(select_sparse_parameters(model), sparsity=s.sparsity, method="ggr")
    nn.functional.cross_entropy(model(x), y).backward()
    engine.mask_gradients()
    hot = [timed(engine.mask_gradients, s.device) for _ in range(s.pass_calls)]
    d_wall, d_cpu = (statistics.median(t[i] for t in dense) for i in (0, 1))
    h_wall, h_cpu = (statistics.median(t[i] for t in hot) for i in (0, 1))
    return [{"dense": d_wall, "dense_cpu": d_cpu, "hot": h_wall, "hot_cpu": h_cpu,
             "isolated": (d_wall + h_wall) / d_wall, "isolated_cpu": (d_cpu + h_cpu) / d_cpu}]


# ------------------------------------------------------------- enforce_masks_every_step
def run_every_step(s: Settings) -> list[dict]:
    """What ``enforce_masks_every_step=True`` costs per step, in one process.

    Isolated: a dense plain-loop step (forward, backward, SGD step with momentum) against the
    callback's per-step work with SGD, by default (the gradient pass) and with the setting
    (the weights masked before the forward pass, the gradient pass, weights and momentum
    masked after the step), in ``rounds`` interleaved rounds (a block of ``steps`` dense
    steps, then ``pass_calls`` calls of each work): per round the ratio (dense + work) /
    dense of the medians, wall and CPU time; the median and range over rounds. Trainer:
    median step of a fit dense, with the default callback and with the setting, interleaved
    over ``trainer_rounds`` rounds; ratios to the dense fit of the same round.
    """
    _quiet_lightning()
    model, optimizer, x, y, step = _plain_loop(s, set_to_none=False)
    engine = SparseEngine(select_sparse_parameters(model), sparsity=s.sparsity, method="ggr")
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()  # momentum everywhere, as in training

    def default() -> None:  # SGD keeps masked weights at 0: the gradient pass only
        engine.mask_gradients()

    def every_step() -> None:
        engine.apply_masks()  # before the forward pass
        engine.mask_gradients()
        engine.enforce_masks([optimizer])  # after the step: weights and momentum

    def zeroing_pass() -> None:  # an optimizer outside the zero-preserving list, before
        engine.mask_gradients()
        engine.enforce_masks([optimizer])  # after the step: weights and its state

    def zeroing_pass_counted() -> None:  # the same now: writes by other code counted first
        engine.mask_gradients()
        engine.collect_stray_weights()  # before the step: nothing else wrote, nothing read
        engine.after_optimizer_step([optimizer])  # the pass, then the version counters

    works = {"default": default, "every_step": every_step, "zeroing_pass": zeroing_pass,
             "zeroing_pass_counted": zeroing_pass_counted}
    for fn in works.values():
        fn()
    per_round: dict[str, list[tuple[float, float]]] = {"dense": [], **{k: [] for k in works}}
    for _ in range(s.rounds):
        dense = [timed(step, s.device) for _ in range(s.steps)]
        per_round["dense"].append(tuple(statistics.median(t[i] for t in dense)
                                        for i in (0, 1)))
        for name, fn in works.items():
            times = [timed(fn, s.device) for _ in range(s.pass_calls)]
            per_round[name].append(tuple(statistics.median(t[i] for t in times)
                                         for i in (0, 1)))
    dense_wall = [d[0] for d in per_round["dense"]]
    dense_cpu = [d[1] for d in per_round["dense"]]
    row: dict = {"dense": summary(dense_wall), "dense_cpu": summary(dense_cpu)}
    for name in works:
        wall = [w[0] for w in per_round[name]]
        cpu = [w[1] for w in per_round[name]]
        row[name] = {
            "wall": summary(wall), "cpu": summary(cpu),
            "isolated": summary([(d + w) / d for d, w in zip(dense_wall, wall, strict=True)]),
            "isolated_cpu": summary([(d + w) / d for d, w in zip(dense_cpu, cpu, strict=True)]),
        }
    medians: dict[str, list[float]] = {"dense": [], "default": [], "every_step": []}
    for _ in range(s.trainer_rounds):
        for variant in medians:
            wall, _ = _fit_step_times(s, "dense" if variant == "dense" else "engine", "ggr",
                                      "fp32", None, s.trainer_steps,
                                      every_step=variant == "every_step")
            medians[variant].append(statistics.median(wall))
    row["trainer"] = {variant: summary(values) for variant, values in medians.items()}
    row["trainer_ratios"] = {variant: summary([v / d for v, d in zip(
        values, medians["dense"], strict=True)]) for variant, values in medians.items()
        if variant != "dense"}
    return [row]


# ------------------------------------------------------------------------ isolated pass
def run_pass(s: Settings) -> list[dict]:
    """``engine.mask_gradients()`` alone on a real backward's gradients: time per call (median
    of ``pass_repeats`` blocks of ``pass_calls`` calls), and from one profiled call the
    top-level aten operations, CUDA kernels, allocations and host synchronisations."""
    from torch.profiler import ProfilerActivity, profile

    rows = []
    for name in dict.fromkeys([s.model, s.big_model]):
        model = make_model(s, name).to(s.device)
        engine = SparseEngine(select_sparse_parameters(model), sparsity=s.sparsity,
                              method="ggr", seed=0)
        x = torch.randn(2, 3, s.input_size, s.input_size, device=s.device)
        nn.functional.cross_entropy(model(x), torch.zeros(2, dtype=torch.long,
                                                          device=s.device)).backward()
        for _ in range(5):
            engine.mask_gradients()
        per_call = []
        for _ in range(s.pass_repeats):
            timer = BlockTimer(s.device)
            timer.start()
            for _ in range(s.pass_calls):
                engine.mask_gradients()
            timer.stop()
            per_call.append(timer.seconds()[0] / s.pass_calls)
        activities = [ProfilerActivity.CPU]
        if s.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        with profile(activities=activities, profile_memory=True) as prof:
            engine.mask_gradients()  # the profiler waits for the device when it stops
        events = prof.events()
        ops = top_level_operations(events)
        kernels = [e for e in events if e.device_type.name == "CUDA"]
        host_syncs = sum(1 for e in events if e.name in HOST_READ_OPS)
        # the profiler's own wait at its stop is not the pass's
        cuda_syncs = profile_sync_events(events) - profiler_own_syncs(s.device)
        grads = [p.grad for p in engine.params.values() if p.grad is not None]
        # read gradient + integer mask, write gradient
        nbytes = sum(g.numel() * g.element_size() * 3 for g in grads)
        rows.append({
            "model": name, "layers": len(engine.params),
            "us_per_pass": summary([t * 1e6 for t in per_call]),
            "ops": [n for n in ops if n not in METADATA_OPS],
            "kernels": len(kernels) if s.device.type == "cuda" else None,
            "allocated": sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages()),
            "host_syncs": host_syncs + max(cuda_syncs, 0),
            "bytes_floor_us": nbytes / 3e12 * 1e6 if s.device.type == "cuda" else None,
        })
        del model, engine
        _free(s.device)
    return rows


# ---------------------------------------------------------------------- rewiring & build
def peak_extra(fn: Callable[[], object], device: torch.device) -> float:
    """Peak extra bytes allocated by ``fn`` over the level before it: CUDA's
    ``max_memory_allocated``; on a CPU the running sum of torch's allocations and frees
    recorded by ``torch.profiler`` (a CPU ``topk``'s internal work vector is not among
    them)."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return float(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage),
                    key=lambda e: e.time_range.start)
    level = peak = 0
    for event in events:
        level += event.self_cpu_memory_usage
        peak = max(peak, level)
    return float(peak)


class _HostReads(torch.overrides.TorchFunctionMode):
    """Counts the calls that bring a tensor's value to the host (``.item()``, ``.tolist()``,
    ``bool()``, ``int()``, ``float()``, ``.cpu()``, ``.numpy()``): each is a synchronisation
    when the tensor lives on a GPU."""

    NAMES = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__",
                       "cpu", "numpy"})

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.count += 1
        return func(*args, **(kwargs or {}))


def host_reads(fn: Callable[[], object]) -> int:
    """How many times ``fn`` reads a tensor's value back to the host (see ``_HostReads``)."""
    counter = _HostReads()
    with counter:
        fn()
    return counter.count


def cuda_syncs(fn: Callable[[], object], device: torch.device) -> int | None:
    """Synchronising CUDA calls made by ``fn`` (``torch.cuda.set_sync_debug_mode``
    warnings, see ``lightning_ggr.sparse.syncs``); ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    return count_cuda_syncs(fn)


def rewiring_work(fn: Callable[[], object], device: torch.device) -> dict:
    """What one call of ``fn`` asks of the machine, from one profile: ``cudaLaunchKernel``
    calls and the summed time of every device activity (kernels, memcpy, memset) on CUDA
    (top-level non-metadata aten operations on a CPU), and ``topk`` calls. These do not
    move with the host's speed, as the timings do: a rewiring with many small layers is
    bound by the host launching kernels."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        fn()
    events = prof.events()
    topk = sum(1 for e in events if e.name == "aten::topk")
    if device.type == "cuda":
        return {"launches": sum(1 for e in events if e.name == "cudaLaunchKernel"),
                "kernel_ms": sum(e.device_time for e in events
                                 if e.device_type.name == "CUDA") / 1e3,
                "topk": topk}
    ops = [name for name in top_level_operations(events) if name not in METADATA_OPS]
    return {"launches": len(ops), "kernel_ms": None, "topk": topk}


def dense_step_time(s: Settings, model: nn.Module) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0, momentum=0.9)
    x = torch.randn(s.batch_size, 3, s.input_size, s.input_size, device=s.device)
    y = torch.randint(0, s.num_classes, (s.batch_size,), device=s.device)

    def step():
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    timer = BlockTimer(s.device)
    for _ in range(max(3, s.rewiring_reps)):
        timer.start()
        step()
        timer.stop()
    return statistics.median(timer.seconds())


def _moved(engine: SparseEngine, drop_fraction: float) -> int:
    return sum(math.floor(drop_fraction * n + 0.5) for n in engine.active_counts().values())


def run_rewiring(s: Settings) -> list[dict]:
    rows = []
    for name in dict.fromkeys([s.model, s.big_model]):
        base = make_model(s, name)
        init_state = {k: v.clone() for k, v in base.state_dict().items()}
        model = base.to(s.device)
        step_s = dense_step_time(s, model)
        g = torch.Generator().manual_seed(2)
        x = torch.randn(s.batch_size, 3, s.input_size, s.input_size, generator=g).to(s.device)
        y = torch.randint(0, s.num_classes, (s.batch_size,), generator=g).to(s.device)
        params = select_sparse_parameters(model)
        largest = max(p.numel() for p in params.values())
        for method in s.methods + peers():
            model.load_state_dict(init_state)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
            moved = None
            if method == "rigl-torch":
                # last on this model: its hooks stay on the weights afterwards
                pruner = attach_rigl_torch(model, optimizer, s)
                syncs = reads = None
                work = {"launches": None, "kernel_ms": None, "topk": None}
                times, peaks = [], []
                for _ in range(s.rewiring_reps + 1):
                    pruner.step = pruner.delta_T - 1  # the next backward accumulates dense_grad
                    nn.functional.cross_entropy(model(x), y).backward()
                    times.append(timed(pruner, s.device)[0])  # one RigL step
                    optimizer.zero_grad(set_to_none=True)
                    pruner.step = pruner.delta_T - 1
                    nn.functional.cross_entropy(model(x), y).backward()
                    peaks.append(peak_extra(pruner, s.device))
                    optimizer.zero_grad(set_to_none=True)
                times, peaks = times[1:], peaks[1:]  # the first one warms up
            else:
                engine = SparseEngine(select_sparse_parameters(model), sparsity=s.sparsity,
                                      method=method, seed=0)
                nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()  # momentum state exists, as in training
                nn.functional.cross_entropy(model(x), y).backward()
                engine.rewire(0.1, [optimizer])  # warm-up (DSR's first threshold, allocator)
                moved = _moved(engine, 0.1)

                def rewire(engine=engine, optimizer=optimizer):
                    engine.gradients_finite()  # what a due step runs besides the rewiring
                    return engine.rewire(0.1, [optimizer])

                syncs = cuda_syncs(rewire, s.device)
                reads = host_reads(rewire)
                work = rewiring_work(rewire, s.device)
                times = [timed(rewire, s.device)[0] for _ in range(s.rewiring_reps)]
                peaks = [peak_extra(rewire, s.device)]
                del engine
            rows.append({"model": name, "method": method,
                         "ms": summary([t * 1e3 for t in times]),
                         "steps": statistics.median(times) / step_s,
                         "dense_step_ms": step_s * 1e3,
                         "peak_extra_mb": max(peaks) / 2**20, "cuda_syncs": syncs,
                         "host_reads": reads, **work,
                         "moved": moved, "largest_scores_mb": largest * 4 / 2**20})
            optimizer.zero_grad(set_to_none=True)
            _free(s.device)
        del model, base
        _free(s.device)
    return rows


def run_build(s: Settings) -> list[dict]:
    rows = []
    for name in dict.fromkeys([s.model, s.big_model]):
        base = make_model(s, name)
        init_state = {k: v.clone() for k, v in base.state_dict().items()}
        model = base.to(s.device)
        walls, cpus = [], []
        for _ in range(s.build_reps):
            model.load_state_dict(init_state)

            def build(model=model):
                return SparseEngine(select_sparse_parameters(model), sparsity=s.sparsity,
                                    method="ggr", seed=0)

            wall, cpu = timed(build, s.device)
            walls.append(wall)
            cpus.append(cpu)
        rows.append({"model": name, "weights": sum(
            p.numel() for p in select_sparse_parameters(model).values()),
            "s": summary(walls), "cpu_s": statistics.median(cpus)})
        del model, base
        _free(s.device)
    return rows


# ------------------------------------------------------------------------------ markdown
def _range(t: tuple[float, float, float], scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    med, lo, hi = (v * scale for v in t)
    return f"{fmt.format(lo)}-{fmt.format(hi)} (median {fmt.format(med)})"


def markdown(s: Settings, results: dict, seconds: float) -> str:
    import lightning

    device_name = (torch.cuda.get_device_name(s.device) if s.device.type == "cuda"
                   else platform.processor() or platform.machine())
    rigl = "rigl-torch 0.5.2" if RigLScheduler is not None else (
        "rigl-torch: not installed (pip install -e '.[bench]')")
    out = [f"Device: {device_name} ({s.device.type}), torch {torch.__version__}, "
           f"lightning {lightning.__version__}, {rigl}, threads {torch.get_num_threads()}, "
           f"{datetime.date.today().isoformat()}; model {s.model}, batch {s.batch_size}, "
           f"sparsity {s.sparsity}; suite time {seconds:.0f} s.", ""]
    if results.get("methods"):
        rows = results["methods"]
        d = rows[0]["dense_runs"]
        out += [f"Trainer, fp32: dense step median {rows[0]['dense'] * 1e3:.1f} ms over "
                f"{len(rows) + 1} runs (spread {d[1] * 1e3:.1f}-{d[2] * 1e3:.1f} ms), CPU time "
                f"{rows[0]['dense_cpu'] * 1e3:.1f} ms.", "",
                "| method | step (ms) | ratio to dense | engine per-step (ms) | isolated ratio "
                "| engine per-step, CPU time (ms) | isolated ratio, CPU time | one rewiring (ms) "
                "|", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            out.append(f"| {r['method']} | {r['step'] * 1e3:.1f} | {r['ratio']:.3f} | "
                       f"{r['hot'] * 1e3:.2f} | {r['isolated']:.4f} | {r['hot_cpu'] * 1e3:.2f} "
                       f"| {r['isolated_cpu']:.4f} | {r['rewiring'] * 1e3:.0f} |")
        out.append("")
    for r in results.get("isolated", []):
        out += ["| dense step (ms) | per-step pass (ms) | isolated ratio | dense step, CPU time "
                "(ms) | per-step pass, CPU time (ms) | isolated ratio, CPU time |",
                "|---:|---:|---:|---:|---:|---:|",
                f"| {r['dense'] * 1e3:.1f} | {r['hot'] * 1e3:.2f} | {r['isolated']:.4f} | "
                f"{r['dense_cpu'] * 1e3:.1f} | {r['hot_cpu'] * 1e3:.2f} | "
                f"{r['isolated_cpu']:.4f} |", ""]
    for r in results.get("every_step", []):
        out += [f"`enforce_masks_every_step`, {s.rounds} interleaved rounds: dense plain-loop "
                f"step {_range(r['dense'], 1e3, '{:.1f}')} ms, CPU time "
                f"{_range(r['dense_cpu'], 1e3, '{:.1f}')} ms.", "",
                "| per-step work (SGD, momentum) | ms | isolated ratio | CPU time (ms) "
                "| isolated ratio, CPU time |", "|---|---:|---:|---:|---:|"]
        for name, label in (("default", "default: gradient pass"),
                            ("every_step", "enforce_masks_every_step=True: weights before "
                                           "the forward, gradients, weights + momentum after"),
                            ("zeroing_pass", "an optimizer outside the zero-preserving list "
                                             "(Adamax, Rprop, ...), before this version: "
                                             "gradients, weights + state after"),
                            ("zeroing_pass_counted", "the same now: layers written in place "
                                                     "since the last pass counted and zeroed "
                                                     "before the step (collect_stray_weights;"
                                                     " here none was)")):
            w = r[name]
            out.append(f"| {label} | {_range(w['wall'], 1e3, '{:.2f}')} | "
                       f"{_range(w['isolated'], fmt='{:.4f}')} | "
                       f"{_range(w['cpu'], 1e3, '{:.2f}')} | "
                       f"{_range(w['isolated_cpu'], fmt='{:.4f}')} |")
        out += ["", f"Trainer, {s.trainer_rounds} round(s) of {s.trainer_steps} steps: dense step "
                f"{_range(r['trainer']['dense'], 1e3, '{:.1f}')} ms; default callback "
                f"{_range(r['trainer_ratios']['default'], fmt='x{:.3f}')}; "
                "enforce_masks_every_step=True "
                f"{_range(r['trainer_ratios']['every_step'], fmt='x{:.3f}')}.", ""]
    steps = results.get("loop", []) + results.get("trainer", [])
    if steps:
        out += [f"{s.rounds} rounds (Trainer: {s.trainer_rounds}) of {s.steps} steps "
                f"(Trainer: {s.trainer_steps}); ratios to the dense blocks of the same round.", "",
                "| set-up | dense step (ms) | with the callback / engine | rigl-torch, same run |",
                "|---|---:|---:|---:|"]
        for r in steps:
            peer = _range(r["rigl-torch"], fmt="x{:.3f}") if "rigl-torch" in r else "-"
            out.append(f"| {r['setup']} | {_range(r['dense'], 1e3, '{:.1f}')} | "
                       f"{_range(r['engine'], fmt='x{:.3f}')} | {peer} |")
        out.append("")
    if results.get("pass"):
        out += ["| model | sparse layers | us per pass | operations | kernels | bytes allocated "
                "| host syncs | bytes floor at 3 TB/s (us) |",
                "|---|---:|---:|---|---:|---:|---:|---:|"]
        for r in results["pass"]:
            floor = "-" if r["bytes_floor_us"] is None else f"{r['bytes_floor_us']:.0f}"
            kernels = "-" if r["kernels"] is None else str(r["kernels"])
            ops = ", ".join(f"{n} x{r['ops'].count(n)}" for n in dict.fromkeys(r["ops"]))
            out.append(f"| {r['model']} | {r['layers']} | {_range(r['us_per_pass'], 1, '{:.0f}')}"
                       f" | {ops} | {kernels} | {r['allocated']} | {r['host_syncs']} | {floor} |")
        out.append("")
    if results.get("rewiring"):
        out += ["| model | method | one rewiring (ms) | in dense steps | peak extra memory (MB) "
                "| largest layer's scores (MB) | weights moved | host reads | CUDA syncs "
                "| cudaLaunchKernel calls (CPU: operations) | device time (ms) | topk calls |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in results["rewiring"]:
            syncs = "-" if r["cuda_syncs"] is None else str(r["cuda_syncs"])
            moved = "-" if r["moved"] is None else str(r["moved"])
            reads = "-" if r["host_reads"] is None else str(r["host_reads"])
            launches = "-" if r.get("launches") is None else str(r["launches"])
            kernel = "-" if r.get("kernel_ms") is None else f"{r['kernel_ms']:.2f}"
            topk = "-" if r.get("topk") is None else str(r["topk"])
            out.append(f"| {r['model']} | {r['method']} | {_range(r['ms'], 1, '{:.1f}')} | "
                       f"{r['steps']:.2f} | {r['peak_extra_mb']:.1f} | "
                       f"{r['largest_scores_mb']:.1f} | {moved} | {reads} | {syncs} | "
                       f"{launches} | {kernel} | {topk} |")
        out.append("")
    if results.get("build"):
        out += ["| model | sparse weights | SparseEngine construction (s) | CPU time (s) |",
                "|---|---:|---:|---:|"]
        for r in results["build"]:
            out.append(f"| {r['model']} | {r['weights']} | {_range(r['s'], 1, '{:.3f}')} | "
                       f"{r['cpu_s']:.3f} |")
        out.append("")
    out += goals(results)
    return "\n".join(out)


def goals(results: dict) -> list[str]:
    lines = ["Goals (issue 13):"]
    for r in results.get("methods", []):
        ok = r["isolated"] <= 1.01 and r["isolated_cpu"] <= 1.01
        lines.append(f"- CPU isolated ratio <= 1.01, {r['method']}: {'met' if ok else 'MISSED'} "
                     f"(wall x{r['isolated']:.4f}, CPU time x{r['isolated_cpu']:.4f})")
    for r in results.get("isolated", []):
        ok = r["isolated"] <= 1.01 and r["isolated_cpu"] <= 1.01
        lines.append(f"- CPU isolated ratio <= 1.01 (plain loop): {'met' if ok else 'MISSED'} "
                     f"(wall x{r['isolated']:.4f}, CPU time x{r['isolated_cpu']:.4f})")
    for r in results.get("loop", []) + results.get("trainer", []):
        ok = r["engine"][0] <= 1.01
        peer = r.get("rigl-torch")
        beats = "" if peer is None else (
            f"; {'below' if r['engine'][0] < peer[0] else 'NOT below'} rigl-torch "
            f"(x{peer[0]:.3f})")
        lines.append(f"- per-step <= 1.01, {r['setup']}: {'met' if ok else 'MISSED'} "
                     f"(x{r['engine'][0]:.3f}){beats}")
    for r in results.get("pass", []):
        ok = r["host_syncs"] == 0 and r["allocated"] == 0 and len(r["ops"]) == 1
        lines.append(f"- per-step pass, {r['model']}: {len(r['ops'])} operation(s) for "
                     f"{r['layers']} layers, {r['host_syncs']} host syncs, {r['allocated']} bytes "
                     f"allocated: {'met' if ok else 'MISSED'}")
    for r in results.get("rewiring", []):
        if r["method"] == "ggr":
            bound = r["largest_scores_mb"] + BYTES_PER_MOVED_WEIGHT * r["moved"] / 2**20
            lines.append(f"- one GGR rewiring <= 1 step, {r['model']}: "
                         f"{'met' if r['steps'] <= 1 else 'MISSED'} ({r['steps']:.2f} steps)")
            lines.append(f"- GGR peak extra memory <= largest scores + "
                         f"{BYTES_PER_MOVED_WEIGHT} B x moved weights ({bound:.1f} MB), "
                         f"{r['model']}: "
                         f"{'met' if r['peak_extra_mb'] <= bound else 'MISSED'} "
                         f"({r['peak_extra_mb']:.1f} MB)")
    for r in results.get("build", []):
        lines.append(f"- construction < 0.5 s, {r['model']}: "
                     f"{'met' if r['s'][0] < 0.5 else 'MISSED'} ({r['s'][0]:.3f} s)")
    return lines


SECTIONS = {"methods": run_methods, "isolated": run_isolated, "loop": run_loop,
            "trainer": run_trainer, "pass": run_pass, "rewiring": run_rewiring,
            "build": run_build, "every_step": run_every_step}
GPU_SUITE = ["loop", "trainer", "pass", "rewiring", "build"]


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["gpu"], help="every GPU section on cuda, Markdown")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--tiny", action="store_true", help="small model and few steps")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS))
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--steps", type=int, help="timed steps per block or run")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--methods", nargs="+", choices=sorted(METHODS),
                        help="methods of the CPU table (section methods)")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"])
    parser.add_argument("--reps", type=int, help="rewirings and constructions timed")
    parser.add_argument("--models", nargs="+", help="the two models of the pass, rewiring "
                        "and build sections (default: resnet18 vgg16)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (CPU runs)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.suite == "gpu" and device.type != "cuda":
        parser.error("--suite gpu needs a CUDA device (use --device cpu --tiny to smoke-test)")
    sections = args.sections or (GPU_SUITE if args.suite or device.type == "cuda"
                                 or args.tiny else ["methods"])
    if args.tiny:
        s = Settings.tiny(device)
    elif sections in (["methods"], ["isolated"], ["every_step"]):
        s = Settings.cpu_table(device)
    else:
        s = Settings(device)
    for key, value in (("batch_size", args.batch_size), ("rounds", args.rounds),
                       ("trainer_rounds", args.rounds), ("steps", args.steps),
                       ("trainer_steps", args.steps), ("warmup", args.warmup),
                       ("table_methods", args.methods), ("precisions", args.precisions),
                       ("rewiring_reps", args.reps), ("build_reps", args.reps)):
        if value is not None:
            setattr(s, key, value)
    if args.models:
        s.model, s.big_model = args.models[0], args.models[-1]
    torch.manual_seed(0)
    start = time.perf_counter()
    results = {}
    for name in sections:
        results[name] = SECTIONS[name](s)
        print(f"[{name} done at {time.perf_counter() - start:.0f} s]", file=sys.stderr,
              flush=True)
    text = markdown(s, results, time.perf_counter() - start)
    print(text)
    return text


if __name__ == "__main__":
    main()
