"""CPU-scale reproduction study of the GGR paper's Tables 1, 3, 4 and Figure 2 (issue #6).

Every method (dense, SET, RigL, DSR, GGR, SET+RigL, GGR-SET, GGR-RigL) at sparsity
0.9 / 0.97 / 0.99 with ERK and uniform initial densities, on the 12k-image real CIFAR-100
subset (``shared/data/cifar100_subset.npz``), with a narrow VGG-style CNN that one CPU
thread trains in about a minute. Same hyper-parameters for every method, tuned only on the
dense network's validation accuracy. Built from the package's public pieces only:
``lightning.Trainer`` + ``lightning_ggr.zoo.module.ImageClassifier`` +
``lightning_ggr.DynamicSparsityCallback`` (which writes the run summary JSON).

Subcommands (see ``docs/study.md``)::

    python benchmarks/study.py tune   --lrs 0.05 0.1 0.2   # dense only, validation accuracy
    python benchmarks/study.py run    --workers 3          # the grid; resumable
    python benchmarks/study.py report                      # docs/results/*.md + figure
    python benchmarks/study.py status                      # finished / missing runs

Supplementary grid (``--network wide``, run directories ``runs/study_wide``): the same conv
stack with an oversized classifier (1024 -> 2048 -> 100, 2.3M weights, VGG16-like waste);
dense + SET, RigL, DSR, GGR at 0.99 x {ERK, uniform} x 3 seeds, same recipe::

    python benchmarks/study.py run    --network wide --workers 2
    python benchmarks/study.py report --network wide   # docs/results/wide_table.md + figure

The paper's own model (``--network resnet18``, on a GPU): the zoo's ResNet-18 on the same
images, bf16-mixed, 40 epochs with the paper's schedule compressed (warm-up 1 epoch, x0.2
at epochs 12/24/32, rewiring at the start of every epoch until half of training), images
held and augmented on the GPU; dense + SET, RigL, DSR, GGR x 2 seeds at 99% uniform (add
``--settings 0.99:erk 0.97:uniform`` when there is time)::

    python benchmarks/study.py run    --network resnet18 --device cuda
    python benchmarks/study.py report --network resnet18   # docs/results/resnet18_table.md

Every ``report`` also writes the raw records (``docs/results/runs.json``,
``runs_wide.json``, ``runs_resnet18.json``: each run's accuracies, environment and final
layer densities, per layer its total, initial and final active count, the Table-4
structure numbers) and reads them back when ``--out`` holds no run directory (or with
``--records FILE``), so every table can be regenerated from committed data alone.

Resuming: each finished run leaves ``<out>/<key>/result.json`` (written last, atomically,
next to the package's ``lightning_ggr_summary.json``); ``run`` skips every key that has
one and restarts unfinished ones from scratch. A run that raises is recorded with
``"status": "failed"`` (and reported as such, never dropped); ``--retry-failed`` reruns it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import lightning.pytorch as pl

from lightning_ggr.callbacks.summary import write_json
from lightning_ggr.sparse.methods import METHODS as PACKAGE_METHODS

sys.path.insert(0, str(Path(__file__).resolve().parent))  # study_data, study_plan
from study_plan import (
    DIST_LABELS,
    LABELS,
    MAIN_NETWORK,
    PAPER_RESNET18,
    PLAN_GROUPS,
    RunSpec,
    cells_table,
    claims_section,
    code_commit,
    data_identity,
    expected_seconds,
    merge_record,
    network_of,
    paper_plan,
    parse_deadline,
    read_records,
    throughput_rows,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "cifar100_subset.npz"
DEFAULT_OUT = REPO / "runs" / "study"
DEFAULT_RESULTS = REPO / "docs" / "results"
#: Supplementary ``--network wide`` grid (see ``wide_grid``): run directories.
DEFAULT_WIDE_OUT = REPO / "runs" / "study_wide"
#: Hidden width of the wide variant's classifier: flatten 1024 -> 2048 -> 100.
WIDE_HIDDEN = 2048
#: ``--network resnet18`` (the paper's model, on a GPU): run directories.
DEFAULT_RESNET_OUT = REPO / "runs" / "study_resnet18"
METHODS = tuple(PACKAGE_METHODS)  # the package's preset table: one list of method names
MAIN_METHODS = ("set", "rigl", "dsr", "ggr")
ABLATIONS = ("set", "rigl", "set_rigl", "ggr_set", "ggr_rigl", "ggr")
SPARSITIES = (0.9, 0.97, 0.99)
DISTRIBUTIONS = ("erk", "uniform")
FIGURE_RUN = "ggr-uniform-s0.99-seed0"


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Recipe:
    """The hyper-parameters every run shares (frozen after tuning the dense network)."""

    epochs: int = 6
    batch_size: int = 128
    #: Tuned on the dense network's validation accuracy (0.05 / 0.1 / 0.2, see docs).
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 1
    #: The paper's CIFAR-100 milestones 30/60/80 of 100 epochs, scaled to ``epochs``.
    milestones: tuple[int, ...] = (2, 4, 5)
    lr_decay: float = 0.2
    #: Rewire every this many optimizer steps until ``stop_fraction`` of training (see docs).
    update_interval: int = 6
    stop_fraction: float = 0.5
    drop_fraction: float = 0.1
    widths: tuple[int, int, int] = (16, 32, 64)
    hidden: int = 256
    val_size: int = 1000
    #: ``"tiny_vgg"`` (``widths``, ``hidden``) or ``"resnet18"`` (the zoo's, 32x32 stem).
    network: str = "tiny_vgg"
    #: Rewire every ``update_interval`` optimizer steps (``"step"``) or epochs (``"epoch"``).
    interval: str = "step"
    precision: str = "32-true"
    #: Validate every this many epochs (the ResNet-18 study only at the end).
    val_every: int = 1
    #: Train/validation/test batches per epoch (``None``: all): the tiny CPU test only.
    limit_batches: int | None = None


def resnet18_recipe() -> Recipe:
    """The paper's CIFAR-100 recipe compressed to 40 epochs (issue 12, item 7): warm-up 1
    epoch, x0.2 at 30/60/80% of training, rewiring at the start of every epoch but the first
    until half of training, drop fraction 0.1 (cosine), bf16-mixed."""
    return Recipe(epochs=40, milestones=(12, 24, 32), update_interval=1, interval="epoch",
                  network="resnet18", precision="bf16-mixed", val_every=40)


def grid(seeds_099: int = 3, dense_seeds: int = 3, seeds_other: int = 1) -> list[RunSpec]:
    """The study's runs, most important first (so a cut-off study still answers the claims).

    Order: 0.99 (uniform, then ERK) seed 0 and dense seed 0; 0.99 seed 1; 0.97 seed 0;
    0.99 seed 2; 0.9 seed 0; further seeds of the other sparsities; remaining dense seeds.
    """
    def block(sparsity: float, seed: int) -> list[RunSpec]:
        return [RunSpec(m, sparsity, d, seed) for d in ("uniform", "erk") for m in METHODS]

    runs = [*block(0.99, 0), RunSpec("dense", 0.0, "erk", 0)]
    if seeds_099 > 1:
        runs += block(0.99, 1)
    runs += block(0.97, 0)
    for seed in range(2, seeds_099):
        runs += block(0.99, seed)
    runs += block(0.9, 0)
    for seed in range(1, seeds_other):
        runs += block(0.97, seed) + block(0.9, seed)
    runs += [RunSpec("dense", 0.0, "erk", s) for s in range(1, dense_seeds)]
    return runs


def wide_grid(seeds: int = 3, sparsity: float = 0.99) -> list[RunSpec]:
    """The supplementary ``--network wide`` grid: dense + SET, RigL, DSR, GGR at ``sparsity``
    x {uniform, ERK} x ``seeds`` seeds (27 runs by default), seed by seed, so that seed 0
    of every setting finishes first."""
    runs = []
    for seed in range(seeds):
        runs.append(RunSpec("dense", 0.0, "erk", seed))
        runs += [RunSpec(m, sparsity, d, seed) for d in ("uniform", "erk") for m in MAIN_METHODS]
    return runs


def resnet18_grid(seeds: int = 2, settings: Iterable[tuple[float, str]] = ((0.99, "uniform"),)
                  ) -> list[RunSpec]:
    """``--network resnet18``: dense + SET, RigL, DSR, GGR per setting x ``seeds`` seeds
    (10 runs for the default 0.99 uniform), seed 0 of a setting before seed 1, GGR first,
    so that a study cut short still compares GGR with something."""
    runs = []
    for i, (sparsity, distribution) in enumerate(settings):
        for seed in range(seeds):
            if i == 0:
                runs.append(RunSpec("dense", 0.0, "erk", seed))
            runs += [RunSpec(m, sparsity, distribution, seed)
                     for m in ("ggr", "dsr", "rigl", "set")]
    return runs


# ---------------------------------------------------------------------------- network
def tiny_vgg(widths: tuple[int, int, int] = (16, 32, 64), hidden: int = 256,
             num_classes: int = 100):
    """A narrow VGG-style CNN for 32x32 inputs, with VGG's oversized dense classifier.

    conv3x3(c1) - pool - conv3x3(c2) - pool - conv3x3(c3) - pool - flatten (c3 x 4 x 4) -
    linear(hidden) - linear(classes); batch-norm + ReLU after every conv. With the default
    widths the first conv has only 432 weights (4 at 99% uniform sparsity) while the first
    linear layer holds 262k of the 311k sparse weights: the imbalance the paper's VGG16
    shows, at CPU scale. Uniform Kaiming initialization (the
    package's ``kaiming_uniform_init_``, as the paper).
    """
    from torch import nn

    from lightning_ggr.zoo.models import kaiming_uniform_init_

    c1, c2, c3 = widths

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True)]

    model = nn.Sequential(
        *block(3, c1), nn.MaxPool2d(2),
        *block(c1, c2), nn.MaxPool2d(2),
        *block(c2, c3), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c3 * 16, hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, num_classes),
    )
    return kaiming_uniform_init_(model)


# ------------------------------------------------------------------------ one run
_DATAMODULES: dict[tuple, object] = {}


def _datamodule(data: Path, recipe: Recipe, seed: int, device: str = "cpu"):
    from study_data import CifarSubsetDataModule

    # One in-memory copy of the images per process (on ``device``), re-seeded per run.
    # The tiny test setting evaluates ``limit_batches`` training-size batches, not 500s.
    eval_batch = recipe.batch_size if recipe.limit_batches else 500
    key = (str(data), recipe.val_size, recipe.batch_size, device, eval_batch)
    dm = _DATAMODULES.get(key)
    if dm is None:
        dm = CifarSubsetDataModule(data, val_size=recipe.val_size, batch_size=recipe.batch_size,
                                   device=device, eval_batch_size=eval_batch)
        dm.setup()
        _DATAMODULES[key] = dm
    dm.seed = seed
    return dm


#: Networks of the zoo a recipe may name (built by ``ImageClassifier`` from the name).
ZOO_NETWORKS = ("resnet18", "mobilenet_v2")


class _LossTrace(pl.Callback):
    """``--trace-losses``: each training step's loss, as a Python float (one host read per
    step: for the pairing check, never in a timed run)."""

    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


class _EpochClock(pl.Callback):
    """Wall time of each training epoch, as the host sees it (no synchronisation): what
    ``run --deadline`` extrapolates a run's length from."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._start = time.time()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds.append(round(time.time() - self._start, 3))


def train_one(spec: RunSpec, recipe: Recipe, data: Path, out: Path, *, test: bool = True,
              log_figures: bool = False, threads: int = 1, workers: int | None = None,
              device: str = "cpu", context: dict | None = None,
              trace_losses: bool = False) -> dict:
    """Train (and test) one configuration; returns the result dict (also written to disk).

    ``context`` (the commit, the data file's identity, the ``run`` session) is copied into
    the result; ``trace_losses`` adds every training step's loss (``train_losses``).
    """
    import torch
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from lightning_ggr import DynamicSparsityCallback
    from lightning_ggr.zoo.module import ImageClassifier

    torch.set_num_threads(threads)
    if spec.network:  # a run of another network than the grid's: same recipe otherwise
        recipe = replace(recipe, network=spec.network)
    run_dir = out / spec.key
    if run_dir.exists():  # an unfinished earlier attempt: start it over
        shutil.rmtree(run_dir)
    start = time.time()
    pl.seed_everything(spec.seed, workers=True, verbose=False)
    dm = _datamodule(data, recipe, spec.seed, device)
    network = (recipe.network if recipe.network in ZOO_NETWORKS  # the zoo's, by name
               else tiny_vgg(recipe.widths, recipe.hidden))
    module = ImageClassifier(
        network, num_classes=100, input_size=32, lr=recipe.lr,
        momentum=recipe.momentum, weight_decay=recipe.weight_decay,
        warmup_epochs=recipe.warmup_epochs, milestones=recipe.milestones,
        lr_decay=recipe.lr_decay,
    )
    module.example_input_array = torch.zeros(1, 3, 32, 32)  # lets the summary count FLOPs
    callback = DynamicSparsityCallback(
        method="ggr" if spec.method == "dense" else spec.method,
        sparsity=spec.sparsity, distribution=spec.distribution,
        drop_fraction=recipe.drop_fraction, interval=recipe.interval,
        update_interval=recipe.update_interval, stop_fraction=recipe.stop_fraction,
        seed=spec.seed, log_figures=log_figures,
    )
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        logger = TensorBoardLogger(save_dir=str(out), name=spec.key, version=0,
                                   default_hp_metric=False)
    else:  # e.g. a GPU machine without TensorBoard: the run summary only needs a log folder
        logger = CSVLogger(save_dir=str(out), name=spec.key, version=0)
    limits = ({} if recipe.limit_batches is None else
              {f"limit_{s}_batches": recipe.limit_batches for s in ("train", "val", "test")})
    trace, clock = (_LossTrace() if trace_losses else None), _EpochClock()
    trainer = pl.Trainer(
        max_epochs=recipe.epochs, accelerator=device, devices=1, logger=logger,
        callbacks=[callback, clock] + ([trace] if trace else []), enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, deterministic=False,
        precision=recipe.precision, check_val_every_n_epoch=recipe.val_every, **limits,
    )
    trainer.fit(module, datamodule=dm)
    fit_s = time.time() - start
    val_acc = float(trainer.callback_metrics.get("val/acc", float("nan")))
    test_acc = None
    if test:
        trainer.test(module, datamodule=dm, verbose=False)  # rewrites the summary with test/acc
        test_acc = float(trainer.callback_metrics["test/acc"])
    result = {
        "status": "ok", **asdict(spec), "key": spec.key,
        "val_acc": val_acc if math.isfinite(val_acc) else None, "test_acc": test_acc,
        "wall_s": round(time.time() - start, 2), "fit_s": round(fit_s, 2),
        "rewirings": None if callback.engine is None else callback.engine.rewirings,
        "layer_densities": callback.layer_densities(),
        "recipe": asdict(recipe), "torch_threads": threads, "workers": workers,
        **environment(device), "network": recipe.network,
        "started_at": round(start, 2), "finished_at": round(time.time(), 2),
        "epoch_s": clock.seconds,
        **(context or {}),
        "summary": str(Path(trainer.log_dir) / "lightning_ggr_summary.json"),
    }
    if trace is not None:
        result["train_losses"] = trace.losses
    write_json(run_dir / "result.json", result)
    return result


@dataclass(frozen=True)
class Job:
    """One run as ``run`` hands it to a worker."""

    spec: RunSpec
    recipe: Recipe
    data: Path
    out: Path
    threads: int = 1
    #: ``None``: TensorBoard figures for the main study's Figure-2 run only.
    log_figures: bool | None = None
    workers: int | None = None
    device: str = "cpu"
    #: Copied into the result: the commit, the data file's identity, the session.
    context: dict | None = None
    trace_losses: bool = False
    #: The records file each finished run is merged into (``--records-out``), if any.
    records: Path | None = None


def _worker(job: Job) -> dict:
    spec, out = job.spec, job.out
    log_figures = spec.key == FIGURE_RUN if job.log_figures is None else job.log_figures
    if (out / "STOP").exists():  # graceful stop: runs already started finish, no new ones
        return {"status": "not started (STOP file)", "key": spec.key}
    try:
        result = train_one(spec, job.recipe, job.data, out, log_figures=log_figures,
                           threads=job.threads, workers=job.workers, device=job.device,
                           context=job.context, trace_losses=job.trace_losses)
    except Exception as error:  # recorded, never dropped
        result = {"status": "failed", **asdict(spec), "key": spec.key, "test_acc": None,
                  "error": f"{type(error).__name__}: {error}",
                  "traceback": traceback.format_exc(), **(job.context or {})}
        write_json(out / spec.key / "result.json", result)
    if job.records is not None:  # at once, by this worker: a killed parent loses nothing
        merge_record(job.records, record_of(result), lock=out / ".records.lock")
    return result


def _init_worker(device: str = "cpu", memory_fraction: float | None = None) -> None:
    """A worker process of ``run --workers N``: one thread, quiet, and on a GPU its own CUDA
    context made now (the parent never makes one: workers are spawned, not forked) and
    capped at ``memory_fraction`` of the device's memory, so that one run cannot starve
    the others of memory."""
    import logging
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    if device == "cuda":
        torch.cuda.init()
        if memory_fraction is not None:
            torch.cuda.set_per_process_memory_fraction(memory_fraction)


# --------------------------------------------------------------------------- results
def load_results(out: Path) -> dict[str, dict]:
    results = {}
    for path in sorted(out.glob("*/result.json")):
        with open(path) as file:
            result = json.load(file)
        results[result["key"]] = result
    return results


def pending(runs: Iterable[RunSpec], done: dict[str, dict],
            retry_failed: bool) -> list[RunSpec]:
    """The runs without a finished record in ``done`` (a failed one counts as finished
    unless ``retry_failed``), in the grid's order."""
    todo = []
    for spec in runs:
        result = done.get(spec.key)
        if result is None or (retry_failed and result.get("status") != "ok"):
            todo.append(spec)
    return todo


def _history(args: argparse.Namespace) -> list[dict]:
    """Finished runs whose times estimate how long a run takes: the run directories, the
    records file and every ``--history`` file (e.g. a short probe's records)."""
    runs = {**read_records(args.records_out), **load_results(args.out)}
    history = list(runs.values())
    for path in args.history:
        history += read_records(path).values()
    return history


def cmd_run(args: argparse.Namespace) -> None:
    """``run``: the grid's pending runs, ``--workers`` at a time, in the grid's order; with
    ``--deadline`` only those expected to finish before it (start-up and the safety margin
    included); each finished run's record merged into ``--records-out`` by its worker."""
    import multiprocessing as mp
    import queue
    import socket

    recipe = _recipe(args)
    runs = _runs(args)
    done = {**read_records(args.records_out), **load_results(args.out)}
    todo = pending(runs, done, args.retry_failed)
    start = time.time()
    session = {"id": f"{socket.gethostname()}-{os.getpid()}-{int(start)}",
               "started_at": round(start, 2), "workers": args.workers, "device": args.device,
               "mps": os.environ.get("STUDY_MPS") == "1"}
    context = {"commit": code_commit(), "data": data_identity(args.data), "session": session}
    parallel = max(1, args.workers)
    deadline = args.deadline
    print(f"{len(runs)} runs in the grid, {len(runs) - len(todo)} finished, "
          f"{len(todo)} to go; {args.workers} worker(s); commit {context['commit']}; data "
          f"{context['data']['name']} ({context['data']['sha256'][:12]}); recipe "
          f"{asdict(recipe)}"
          + ("" if deadline is None else
             f"; deadline {time.strftime('%H:%M:%S', time.localtime(deadline))} "
             f"(in {deadline - start:.0f} s)"), flush=True)
    figures = None if getattr(args, "network", "tiny") == "tiny" else False
    history = _history(args)
    fresh = parallel  # workers that have not run yet pay their start-up in their first run

    def expected(spec: RunSpec) -> float:
        network = spec.network or recipe.network
        seconds = expected_seconds(network, history, parallel, recipe.epochs, args.margin)
        return seconds + (args.startup_s if fresh > 0 else 0.0)

    late: dict[str, float] = {}  # runs left out for the deadline: their expected seconds

    def next_run(queue_: list[RunSpec]) -> RunSpec | None:
        for i, spec in enumerate(queue_):
            if deadline is None:
                return queue_.pop(i)
            seconds = expected(spec)
            if time.time() + seconds <= deadline:
                late.pop(spec.key, None)
                return queue_.pop(i)
            late[spec.key] = seconds
        return None

    def job(spec: RunSpec) -> Job:
        return Job(spec, recipe, args.data, args.out, 1, figures, args.workers, args.device,
                   context, args.trace_losses, args.records_out)

    todo = list(todo)
    finished: list[dict] = []
    started = 0

    def report(result: dict) -> None:
        finished.append(result)
        if result.get("status") == "ok":
            history.append(result)
        acc = result.get("test_acc")
        print(f"[{time.time() - start:7.0f}s] {len(finished)}/{started} {result['key']}: "
              f"{result['status']} test_acc={acc if acc is None else round(100 * acc, 2)} "
              f"wall={result.get('wall_s')}s {result.get('error', '')}", flush=True)

    def may_start() -> bool:
        return args.max_runs is None or started < args.max_runs

    if args.workers == 0:  # in this process, one run after the other (tests, debugging)
        while may_start() and (spec := next_run(todo)) is not None:
            started += 1
            fresh = 0
            report(_worker(job(spec)))
    else:
        fraction = args.gpu_memory_fraction
        if fraction is None and args.device == "cuda" and args.workers > 1:
            fraction = 0.95 / args.workers
        results: queue.Queue = queue.Queue()
        context_mp = mp.get_context("spawn")  # never fork a process that may hold CUDA
        with context_mp.Pool(args.workers, initializer=_init_worker,
                             initargs=(args.device, fraction)) as pool:
            running = 0
            while True:
                while running < args.workers and may_start():
                    spec = next_run(todo)
                    if spec is None:
                        break
                    pool.apply_async(_worker, (job(spec),), callback=results.put,
                                     error_callback=lambda e, key=spec.key: results.put(
                                         {"status": "failed", "key": key,
                                          "error": f"{type(e).__name__}: {e}"}))
                    running += 1
                    started += 1
                    fresh -= 1
                if running == 0:
                    break
                try:
                    report(results.get(timeout=5))
                    running -= 1
                except queue.Empty:
                    if deadline is not None and time.time() > deadline + args.grace_s:
                        # A run far past its expected end (a worker killed by the system
                        # never reports): stop; every finished run's record is written.
                        print(f"[{time.time() - start:7.0f}s] {running} run(s) still going "
                              f"{args.grace_s:.0f} s after the deadline: stopped, not "
                              "recorded", flush=True)
                        pool.terminate()
                        break
    elapsed = time.time() - start
    if late:
        first, seconds = next(iter(late.items()))
        print(f"not started, expected to end after the deadline: {len(late)} run(s), the "
              f"first {first} (expected {seconds:.0f} s)", flush=True)
    ok = [r for r in finished if r.get("status") == "ok"]
    print(f"done in {elapsed:.0f}s: {len(ok)} of {len(finished)} started runs finished ok, "
          f"{len(todo)} of the grid not started"
          + (f"; {3600 * len(ok) / elapsed:.0f} runs per hour with {parallel} at a time"
             if ok else ""), flush=True)


def cmd_tune(args: argparse.Namespace) -> None:
    """Dense network only, validation accuracy (never test), a few learning rates."""
    import multiprocessing as mp

    base = _recipe(args)
    tune_out = args.out.parent / (args.out.name + "_tune")
    jobs = []
    for lr in args.lrs:
        recipe = Recipe(**{**asdict(base), "lr": lr})
        jobs.append((RunSpec("dense", 0.0, "erk", 0), recipe, args.data, tune_out / f"lr{lr}"))
    context = mp.get_context("spawn")
    with context.Pool(args.workers, initializer=_init_worker) as pool:
        results = pool.map(_tune_job, jobs, chunksize=1)
    for lr, result in zip(args.lrs, results, strict=True):
        print(f"lr={lr}: val/acc={result['val_acc']:.4f} wall={result['wall_s']}s", flush=True)
    write_json(tune_out / "tuning.json", {"lrs": list(args.lrs), "results": results})


def _tune_job(job: tuple) -> dict:
    spec, recipe, data, out = job
    return train_one(spec, recipe, data, out, test=False)


def _recipe(args: argparse.Namespace) -> Recipe:
    network = getattr(args, "network", "tiny")
    recipe = resnet18_recipe() if network == "resnet18" else Recipe()
    changes = {k: getattr(args, k) for k in ("epochs", "lr", "batch_size", "limit_batches",
                                             "precision") if getattr(args, k, None)}
    if network == "wide":
        changes["hidden"] = WIDE_HIDDEN  # same conv stack, classifier 1024 -> 2048 -> 100
    if network == "resnet18" and "epochs" in changes:  # the tiny setting: same shape, scaled
        epochs = changes["epochs"]
        changes.update(milestones=tuple(sorted({max(1, round(epochs * f))
                                                for f in (0.3, 0.6, 0.8)})),
                       val_every=epochs)
    return Recipe(**{**asdict(recipe), **changes})


def _runs(args: argparse.Namespace) -> list[RunSpec]:
    if getattr(args, "network", "tiny") == "wide":
        return wide_grid(args.dense_seeds)
    if getattr(args, "network", "tiny") == "resnet18":
        if getattr(args, "plan", "default") == "paper":
            return [spec for _, spec in paper_plan()]
        return resnet18_grid(args.seeds, args.settings)
    return grid(args.seeds_099, args.dense_seeds, args.seeds_other)


# --------------------------------------------------------------------------- reporting
def _stats(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _cell(results: list[dict]) -> str:
    if not results:
        return "missing"
    accs = [100 * r["test_acc"] for r in results if r.get("status") == "ok"]
    failed = len(results) - len(accs)
    if not accs:
        return f"failed (n={failed})"
    mean, std = _stats(accs)
    text = f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "") + f" (n={len(accs)})"
    return text + (f", {failed} failed" if failed else "")


def _group(results: dict[str, dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in results.values():
        key = ("dense",) if r["method"] == "dense" else (r["method"], r["sparsity"],
                                                          r["distribution"])
        groups.setdefault(key, []).append(r)
    return groups


def table1(results: dict[str, dict], methods: tuple[str, ...] = METHODS) -> str:
    groups = _group(results)
    head = ["Method", "dense (s=0)"] + [f"s={s} {DIST_LABELS[d]}" for s in SPARSITIES
                                          for d in DISTRIBUTIONS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    dense = _cell(groups.get(("dense",), []))
    lines.append("| Dense | " + dense + " |" + " |" * (len(head) - 2))
    for m in methods:
        cells = [_cell(groups.get((m, s, d), [])) for s in SPARSITIES for d in DISTRIBUTIONS]
        lines.append(f"| {LABELS[m]} | | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_table(results: dict[str, dict], sparsity: float = 0.99,
                 reference: str = "ggr") -> str:
    """GGR minus each method, paired by seed (same seed = same initial mask draw, model
    initialization and batch order), mean ± std of the per-seed differences."""
    head = ["GGR minus", *[f"s={sparsity} {DIST_LABELS[d]}{x}" for d in DISTRIBUTIONS
                           for x in ("", " per seed")]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in METHODS:
        if m == reference:
            continue
        cells = []
        for d in DISTRIBUTIONS:
            diffs, wins = [], 0
            for seed in range(10):
                ref = results.get(RunSpec(reference, sparsity, d, seed).key)
                other = results.get(RunSpec(m, sparsity, d, seed).key)
                if ref and other and ref.get("status") == other.get("status") == "ok":
                    diffs.append(100 * (ref["test_acc"] - other["test_acc"]))
                    wins += diffs[-1] > 0
            cells.append(f"{_mean_text(diffs)} (GGR ahead {wins}/{len(diffs)})"
                         if diffs else "-")
            cells.append(" / ".join(f"{x:+.2f}" for x in diffs) or "-")
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def final_density_table(results: dict[str, dict], sparsity: float, distribution: str) -> str:
    """Mean final density per layer and method (over seeds), with the initial density."""
    ok = [r for r in results.values() if r.get("status") == "ok" and r["method"] != "dense"
          and r["sparsity"] == sparsity and r["distribution"] == distribution
          and r.get("layer_densities")]
    if not ok:
        return "(no runs)"
    layers = list(ok[0]["layer_densities"])
    sizes, initial = {}, {}
    summary = next((x for x in map(_summary, ok) if x is not None), None)
    if summary is not None:
        sizes = {n: v["total"] for n, v in summary["layers"].items()}
        initial = {n: v["initial_active"] / v["total"] for n, v in summary["layers"].items()}
    head = ["Layer (weights)", "initial", *[LABELS[m] for m in METHODS]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in layers:
        row = [f"`{name}` ({sizes.get(name, '?')})", f"{initial.get(name, float('nan')):.4f}"]
        for m in METHODS:
            values = [r["layer_densities"][name] for r in ok if r["method"] == m]
            row.append(f"{statistics.fmean(values):.4f}" if values else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


#: Fields of ``result.json`` copied into the committed raw records (``runs*.json``).
RECORD_FIELDS = ("key", "method", "sparsity", "distribution", "seed", "status", "test_acc",
                 "val_acc", "wall_s", "fit_s", "rewirings", "workers", "torch_threads",
                 "device", "versions", "recipe", "error", "layer_densities", "network",
                 "commit", "data", "session", "started_at", "finished_at", "epoch_s")
#: Top-level fields of the run summary copied into each record: the package report's keys,
#: and what says which engine ran (its version and the defaults that changed results).
SUMMARY_FIELDS = ("dataset", "model", "flops", "lightning_ggr_version", "update_grown_weights",
                  "reinit_regrown", "dsr_initial_threshold")
#: The raw-records file each grid's ``report`` writes into ``--results``, and reads the
#: tables back from when there are no run directories (or with ``--records``).
RECORDS_FILES = {"tiny": "runs.json", "wide": "runs_wide.json",
                 "resnet18": "runs_resnet18.json"}
#: Same-window runs of the code before issue 20 (``study_throughput.py baseline``), in
#: ``--results``: the "today's way" rows of the runs-per-GPU-hour table.
THROUGHPUT_BASELINES = "throughput_baselines.json"
#: The results page's generated claims section lies between these two lines.
CLAIMS_BEGIN = "<!-- claims: generated by study.py report --network resnet18 --plan paper -->"
CLAIMS_END = "<!-- claims: end -->"


def _run_summary(result: dict) -> dict | None:
    """The package's run summary (``lightning_ggr_summary.json``) a run left, if any."""
    path = Path(result.get("summary") or "")
    if not path.is_file():
        return None
    with open(path) as file:
        return json.load(file)


def record_of(result: dict) -> dict:
    """A run's raw record: what ``result.json`` holds (final layer densities, environment)
    plus, from the run summary, each layer's total, initial and final active count
    (``layers``), the structure numbers of Table 4 (``structure``: the summary's
    ``analysis.overall``), the data set, model and FLOPs. Every table reads only this."""
    record = {k: result.get(k) for k in RECORD_FIELDS}
    summary = _run_summary(result) if result.get("status") == "ok" else None
    for key in SUMMARY_FIELDS:
        record[key] = None if summary is None else summary.get(key)
    record["layers"] = None if summary is None else {
        n: {"total": v["total"], "initial_active": v["initial_active"], "active": v["active"]}
        for n, v in summary["layers"].items()}
    record["structure"] = None if summary is None else summary["analysis"]["overall"]
    return record


def raw_records(records: dict[str, dict], timing: dict) -> dict:
    """The ``runs*.json`` payload: ``timing`` and every record, sorted by key."""
    return {"timing": timing, "runs": [records[k] for k in sorted(records)]}


def load_records(args: argparse.Namespace) -> dict[str, dict]:
    """Every run's record: from the run directories under ``--out`` when there are any,
    else (or with ``--records FILE``) from the committed raw records, so that ``report``
    regenerates every table from ``docs/results/runs*.json`` alone."""
    results = {} if args.records is not None else load_results(args.out)
    if results:
        return {key: record_of(result) for key, result in results.items()}
    path = args.records or args.results / RECORDS_FILES[args.network]
    if not path.is_file():
        raise SystemExit(f"error: no finished run under {args.out} and no raw records at "
                         f"{path}: run the study first, or pass --records FILE")
    with open(path) as file:
        records = {r["key"]: r for r in json.load(file)["runs"]}
    print(f"note: tables from the raw records {path} ({len(records)} runs)"
          + ("" if args.records is not None else f"; no run directories under {args.out}"),
          file=sys.stderr)
    bare = [k for k, r in records.items() if r.get("status") == "ok" and not r.get("layers")]
    if bare:
        print(f"note: {len(bare)} records hold no per-layer data (written before the records "
              "had it): the tables that need it (final densities, Table 4, the density "
              "chart) are left as they are, and the package cross-check is left out",
              file=sys.stderr)
    return records


def _timing(records: dict[str, dict], missing: list[str]) -> dict:
    ok = [r for r in records.values() if r.get("status") == "ok"]
    walls = [r["wall_s"] for r in ok if r.get("wall_s") is not None]
    return {"runs_ok": len(ok),
            "failed": sorted(k for k, r in records.items() if r.get("status") != "ok"),
            "missing": missing,
            "wall_s_mean": statistics.fmean(walls) if walls else None,
            "wall_s_min": min(walls) if walls else None,
            "wall_s_max": max(walls) if walls else None}


def _summary(record: dict) -> dict | None:
    """The parts of a run summary the tables read, rebuilt from a raw record (``None`` when
    the record holds no per-layer data)."""
    if not record.get("layers"):
        return None
    return {"layers": {n: {**v, "density": v["active"] / v["total"]}
                       for n, v in record["layers"].items()},
            "analysis": {"overall": record.get("structure") or {}}}


def _package_runs(records: dict[str, dict]) -> list[dict]:
    """The records as the package's report reads run summaries (its cross-check tables)."""
    runs = []
    for record in records.values():
        if record.get("status") != "ok" or record.get("dataset") is None:
            continue
        runs.append({"dataset": record["dataset"], "model": record["model"],
                     "method": record["method"], "sparsity": record["sparsity"],
                     "distribution": record["distribution"], "seed": record["seed"],
                     "metrics": {"test/acc": record["test_acc"], "val/acc": record["val_acc"]},
                     "analysis": {"overall": record.get("structure") or {}},
                     "flops": record.get("flops") or {}, "_path": record["key"]})
    return runs


def environment(device: str) -> dict:
    """Where a run trained (results are bit-reproducible only with the same libraries and
    processor): the device (GPU name, or the CPU model) and the library versions."""
    import platform

    import lightning
    import torch

    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = platform.processor() or platform.machine()
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        name = f"cpu ({name})"
    return {"device": name, "versions": {"torch": torch.__version__,
                                         "lightning": lightning.__version__,
                                         "python": platform.python_version()}}


def save_density_chart(summary: dict, path: Path) -> None:
    """The Figure-2-style chart (initial vs final density per layer) of one run's summary."""
    from lightning_ggr.callbacks.plots import density_figure

    layers = summary["layers"]
    figure = density_figure({n: v["initial_active"] for n, v in layers.items()},
                            {n: v["active"] for n, v in layers.items()},
                            {n: v["total"] for n, v in layers.items()})
    figure.savefig(path, dpi=120, bbox_inches="tight")


def table4(results: dict[str, dict], sparsity: float = 0.97) -> str:
    head = ["Method", "Top-1 ERK", "Top-1 uni", "Empty neurons ERK %", "Empty neurons uni %",
            "Empty inputs ERK %", "Empty inputs uni %", "Params* ERK [k]", "Params* uni [k]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups = _group(results)
    for m in METHODS:
        acc, neurons, inputs, params = [], [], [], []
        for d in DISTRIBUTIONS:
            runs = [r for r in groups.get((m, sparsity, d), []) if r.get("status") == "ok"]
            summaries = [s for s in map(_summary, runs) if s is not None]
            acc.append(_mean_text([100 * r["test_acc"] for r in runs]))
            overall = [s["analysis"]["overall"] for s in summaries]
            neurons.append(_mean_text([o["empty_neurons_pct"] for o in overall], 1))
            inputs.append(_mean_text([o["empty_inputs_pct"] for o in overall], 1))
            params.append(_mean_text([o["params_star"] / 1e3 for o in overall], 1))
        lines.append(f"| {LABELS[m]} | " + " | ".join(acc + neurons + inputs + params) + " |")
    return "\n".join(lines)


def _mean_text(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    mean, std = _stats(values)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def density_table(summary: dict) -> str:
    lines = ["| Layer | Size | Initial active | Final active | Initial density | "
             "Final density |", "|---|---|---|---|---|---|"]
    for name, layer in summary["layers"].items():
        lines.append(f"| `{name}` | {layer['total']} | {layer['initial_active']} | "
                     f"{layer['active']} | {layer['initial_active'] / layer['total']:.4f} | "
                     f"{layer['density']:.4f} |")
    return "\n".join(lines)


def cmd_report(args: argparse.Namespace) -> None:
    """``report``: ``docs/results/table1.md``, ``paired_099.md``, ``final_densities.md``,
    ``table4.md``, the Figure-2 chart and ``runs.json``, from the run directories or, when
    there are none, from ``runs.json`` itself."""
    results = load_records(args)
    runs = grid(args.seeds_099, args.dense_seeds, args.seeds_other)
    missing = [s.key for s in runs if s.key not in results]
    timing = _timing(results, missing)
    failed = timing["failed"]
    layered = any(_summary(r) is not None for r in results.values())
    args.results.mkdir(parents=True, exist_ok=True)
    footer = (f"\n\n{timing['runs_ok']} finished runs, {len(failed)} failed "
              f"({', '.join(failed) or 'none'}), {len(missing)} missing "
              f"({', '.join(missing) or 'none'}).\n")
    intro1 = ("Top-1 test accuracy (%) on the 2,000 test images of the CIFAR-100 subset, "
              "mean ± sample std over seeds (n = number of seeds). Every run of the grid is "
              "included; none is dropped.\n\n")
    from lightning_ggr.zoo import report as package_report

    summaries = _package_runs(results)
    cross1 = ("\n## Cross-check: `lightning_ggr.zoo.report.table1` on the same runs\n\n"
              "The package's own report (as `lightning-ggr report runs/study` prints it), "
              "which applies the paper's rule: a setting whose mean accuracy is below 5% "
              "counts as failed and is printed `-`. (`model` reads `Sequential`: "
              "`ImageClassifier` names a network passed as an `nn.Module` by its class, "
              "its `model_name`.)\n\n"
              + package_report.to_markdown(package_report.table1(summaries)))
    (args.results / "table1.md").write_text(
        "# Table 1 / Table 3 style: accuracy by method, sparsity and initial distribution\n\n"
        + intro1 + table1(results) + footer + (cross1 if summaries else ""))
    (args.results / "paired_099.md").write_text(
        "# GGR against each method at 99% sparsity, paired by seed\n\n"
        "Test accuracy of GGR minus that of the method, in percentage points, per seed "
        "(runs with the same seed share the initial mask draw, the weight initialization "
        "and the batch order); mean ± std over seeds, how many seeds GGR is ahead, and "
        "beside it each seed's difference (seeds 0, 1, 2, ...).\n\n"
        + paired_table(results) + footer)
    if layered:
        intro4 = ("Sparsity 0.97, after training (mean ± std over seeds where there are "
                  "several). Empty neuron: output channel/row with no active weight; empty "
                  "input: input channel/column no neuron uses; Params*: dense parameters left "
                  "after removing every empty neuron and input (thousands; the dense network "
                  f"has {_dense_params(results)} sparse-layer weights).\n\n")
        (args.results / "final_densities.md").write_text(
            "# Final layer densities by method (mean over seeds)\n\n"
            "Methods with `keep` allocation (SET, RigL, SET+RigL) keep the initial densities; "
            "DSR, GGR and the GGR ablations move weights between layers.\n\n"
            + "\n\n".join(f"## Sparsity {s}, {DIST_LABELS[d]}\n\n"
                           + final_density_table(results, s, d)
                           for s in (0.99, 0.97, 0.9) for d in ("uniform", "erk"))
            + "\n")
        at_097 = [r for r in summaries if r.get("sparsity") == 0.97]
        cross4 = ("\n## Cross-check: `lightning_ggr.zoo.report.table4` (0.97 runs; Params* in "
                  "millions)\n\n"
                  + package_report.to_markdown(package_report.table4(at_097), digits=4))
        (args.results / "table4.md").write_text(
            "# Table 4 style: empty neurons and inputs at 97% sparsity\n\n" + intro4
            + table4(results) + footer + cross4)
    figure_run = results.get(FIGURE_RUN)
    summary = None if figure_run is None or figure_run.get("status") != "ok" else _summary(
        figure_run)
    if summary is not None:
        save_density_chart(summary, args.results / "figure2_ggr_uniform_099.png")
        (args.results / "figure2_ggr_uniform_099.md").write_text(
            "# Figure 2 style: layer densities of the 99% uniform GGR run (seed 0)\n\n"
            "Drawn by `lightning_ggr.callbacks.plots.density_figure` from the run's record "
            "in `runs.json`; the density axis is zoomed to the range of the densities.\n\n"
            "![densities](figure2_ggr_uniform_099.png)\n\n" + density_table(summary) + "\n")
    write_json(args.results / RECORDS_FILES["tiny"], raw_records(results, timing))
    print(table1(results))
    print()
    print(paired_table(results))
    if layered:
        print()
        print(table4(results))
    print(json.dumps(timing, indent=1))


def cmd_wide_report(args: argparse.Namespace) -> None:
    """``report --network wide``: ``docs/results/wide_table.md``, the chart and
    ``runs_wide.json``, from the run directories or, when there are none, from
    ``runs_wide.json`` itself."""
    results = load_records(args)
    runs = _runs(args)
    sparsity = runs[-1].sparsity
    seeds = sorted({s.seed for s in runs})
    missing = [s.key for s in runs if s.key not in results]
    failed = sorted(k for k, r in results.items() if r.get("status") != "ok")
    ok = {k: r for k, r in results.items() if r.get("status") == "ok"}
    walls = [r["wall_s"] for r in ok.values()]

    def acc(method: str, dist: str, seed: int) -> float | None:
        spec = RunSpec(method, 0.0 if method == "dense" else sparsity, dist, seed)
        r = ok.get(spec.key)
        return None if r is None else 100 * r["test_acc"]

    def per_seed(method: str, dist: str) -> tuple[list[float], str]:
        values = [acc(method, dist, s) for s in seeds]
        text = " / ".join("missing" if v is None else f"{v:.2f}" for v in values)
        return [v for v in values if v is not None], text

    dense, dense_seeds = per_seed("dense", "erk")
    lines = ["| Method | s=0.99 ERK | per seed (0/1/2) | s=0.99 uni | per seed (0/1/2) |",
             "|---|---|---|---|---|",
             f"| Dense | {_mean_text(dense)} (n={len(dense)}) | {dense_seeds} | | |"]
    failed_cells = []
    for m in MAIN_METHODS:
        row = [LABELS[m]]
        for d in ("erk", "uniform"):
            values, text = per_seed(m, d)
            mark = ""
            if values and statistics.fmean(values) < 5.0:
                mark = " (<5%: failed)"
                failed_cells.append(f"{LABELS[m]} {DIST_LABELS[d]}")
            row += [f"{_mean_text(values)} (n={len(values)}){mark}", text]
        lines.append("| " + " | ".join(row) + " |")
    accuracy = "\n".join(lines)

    lines = ["| GGR minus | s=0.99 ERK | per seed (0/1/2) | s=0.99 uni | per seed (0/1/2) |",
             "|---|---|---|---|---|"]
    for m in MAIN_METHODS:
        if m == "ggr":
            continue
        row = [LABELS[m]]
        for d in ("erk", "uniform"):
            diffs = []
            for s in seeds:
                a, b = acc("ggr", d, s), acc(m, d, s)
                diffs.append(None if a is None or b is None else a - b)
            got = [x for x in diffs if x is not None]
            wins = sum(x > 0 for x in got)
            row += [f"{_mean_text(got)} (GGR ahead {wins}/{len(got)})" if got else "-",
                    " / ".join("-" if x is None else f"{x:+.2f}" for x in diffs)]
        lines.append("| " + " | ".join(row) + " |")
    paired = "\n".join(lines)

    def densities(dist: str) -> str:
        runs_d = [r for r in ok.values() if r["method"] != "dense" and r["distribution"] == dist
                  and r.get("layer_densities")]
        if not runs_d:
            return "(no runs)"
        summary = next((x for x in map(_summary, runs_d) if x is not None), None)
        layers = list(runs_d[0]["layer_densities"])
        sizes = {n: v["total"] for n, v in summary["layers"].items()} if summary else {}
        initial = ({n: v["initial_active"] / v["total"] for n, v in summary["layers"].items()}
                   if summary else {})
        methods = ("ggr", "dsr", "rigl", "set")
        head = ["Layer (weights)", "initial density (active)",
                *[f"{LABELS[m]} final density (active)" for m in methods]]
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name in layers:
            size = sizes.get(name)
            init = initial.get(name, float("nan"))
            row = [f"`{name}` ({size:,})" if size else f"`{name}`",
                   f"{init:.4f} ({round(init * size):,})" if size else f"{init:.4f}"]
            for m in methods:
                values = [r["layer_densities"][name] for r in runs_d if r["method"] == m]
                if not values:
                    row.append("-")
                    continue
                mean = statistics.fmean(values)
                row.append(f"{mean:.4f} ({round(mean * size):,})" if size else f"{mean:.4f}")
            out.append("| " + " | ".join(row) + " |")
        return "\n".join(out)

    from lightning_ggr.zoo import report as package_report

    summaries = _package_runs(results)
    cross = package_report.to_markdown(package_report.table1(summaries)) if summaries else "-"
    total = _dense_params(ok)
    workers = sorted({None if r.get("workers") is None else max(1, r["workers"])
                      for r in ok.values()}, key=str)
    parallel = ("workers not recorded" if None in workers else "one run at a time"
                if workers == [1] else " or ".join(map(str, workers)) + " runs in parallel")
    timing = (f"{len(ok)} finished runs, {len(failed)} failed ({', '.join(failed) or 'none'}), "
              f"{len(missing)} missing ({', '.join(missing) or 'none'})."
              + (f" Wall time per run: mean {statistics.fmean(walls):.0f} s, "
                 f"{min(walls):.0f}-{max(walls):.0f} s ({parallel}, 1 thread each, on "
                 f"{_devices(ok)})." if walls else "")
              + " Raw records: [`runs_wide.json`](runs_wide.json).")
    figure_note = ""
    figure_run = ok.get(RunSpec("ggr", sparsity, "uniform", 0).key)
    summary = _summary(figure_run) if figure_run else None
    if summary is not None:
        args.results.mkdir(parents=True, exist_ok=True)
        save_density_chart(summary, args.results / "wide_figure2_ggr_uniform_099.png")
        figure_note = ("\n\n## GGR, 99% uniform, seed 0: initial vs final density per layer\n\n"
                       "![densities](wide_figure2_ggr_uniform_099.png)\n\n"
                       + density_table(summary))
    text = (
        "# Supplementary: the wide-classifier network at 99% sparsity\n\n"
        "`python benchmarks/study.py run --network wide` / `report --network wide`. Same "
        "conv stack as the main study (3->16->32->64, conv1 432 weights), classifier "
        f"1024 -> {WIDE_HIDDEN} -> 100 ({total} sparse-layer weights); same recipe as the "
        "main study (6 epochs, lr 0.1, rewiring every 6 steps until half of training). "
        "Top-1 test accuracy (%) on the 2,000 test images, mean ± sample std over seeds; "
        "every run is included, none dropped. The paper's rule: a setting whose mean is "
        "below 5% failed to fit the data.\n\n"
        "## Accuracy\n\n" + accuracy
        + "\n\nSettings below the 5% line: " + (", ".join(failed_cells) or "none") + ".\n\n"
        "## GGR minus each method, paired by seed (percentage points)\n\n" + paired
        + "\n\n## Final layer densities at 0.99 uniform (mean over seeds; active weights in "
        "brackets)\n\n" + densities("uniform")
        + "\n\n## Final layer densities at 0.99 ERK (mean over seeds)\n\n" + densities("erk")
        + figure_note
        + "\n\n## Cross-check: `lightning_ggr.zoo.report.table1` on the same runs\n\n"
        "(Applies the 5% rule itself: a failed setting is printed `-`.)\n\n" + cross
        + "\n\n" + timing + "\n")
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "wide_table.md").write_text(text)
    write_json(args.results / RECORDS_FILES["wide"], raw_records(results,
                                                                 _timing(results, missing)))
    print(text)


def _count(minimum: int):
    """argparse type: an integer ``>= minimum``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return value
    return parse


def _setting(text: str) -> tuple[float, str]:
    """``"0.99:uniform"`` -> ``(0.99, "uniform")`` (argparse type of ``--settings``)."""
    sparsity, _, distribution = text.partition(":")
    try:
        value = float(sparsity)
    except ValueError:
        value = -1.0
    if not 0 < value < 1 or distribution not in DISTRIBUTIONS:
        raise argparse.ArgumentTypeError(
            f"expected SPARSITY:DIST with 0 < SPARSITY < 1 and DIST in "
            f"{', '.join(DISTRIBUTIONS)}, e.g. 0.99:uniform; got {text!r}")
    return value, distribution


def cmd_resnet18_report(args: argparse.Namespace) -> None:
    """``report --network resnet18``: ``resnet18_table.md``, ``runs_resnet18.json`` and the
    density chart of GGR's first run of the first setting, all in ``--results``; from the
    run directories or, when there are none, from ``runs_resnet18.json`` itself."""
    all_records = load_records(args)
    runs = _runs(args)
    missing = [s.key for s in runs if s.key not in all_records]
    # The tables below are ResNet-18's; other networks' runs (the plan's MobileNetV2) are in
    # the plan's cell table and the claims.
    results = {k: r for k, r in all_records.items() if network_of(r) == MAIN_NETWORK}
    ok = {k: r for k, r in results.items() if r.get("status") == "ok"}
    failed = sorted(k for k, r in all_records.items() if r.get("status") != "ok")
    walls = [r["wall_s"] for r in ok.values() if r.get("wall_s") is not None]
    # The settings and seeds asked for, then any others the records hold.
    found = {(r["sparsity"], r["distribution"]) for r in results.values()
             if r["method"] != "dense"}
    asked = [] if args.plan == "paper" else list(args.settings)
    settings = asked + sorted(found - set(asked), key=lambda x: (-x[0], x[1] != "uniform"))
    seeds = sorted(set(range(args.seeds)) | {r["seed"] for r in results.values()})
    main_methods = ("ggr", "dsr", "rigl", "set")
    ablations = tuple(m for m in ("ggr_set", "ggr_rigl", "set_rigl")
                      if any(r["method"] == m for r in results.values()))
    methods = main_methods + ablations

    def acc(method: str, sparsity: float, dist: str, seed: int) -> float | None:
        r = ok.get(RunSpec(method, sparsity, dist, seed).key)
        return None if r is None else 100 * r["test_acc"]

    def seeds_text(values: list[float | None], sign: str = "") -> str:
        return " / ".join("-" if v is None else f"{v:{sign}.2f}" for v in values)

    dense = [acc("dense", 0.0, "erk", s) for s in seeds]
    lines = ["| Setting | Method | top-1 % (mean ± std) | per seed | paper (full CIFAR-100) "
             "| GGR minus method (mean ± std) | per seed | GGR ahead |",
             "|---|---|---|---|---|---|---|---|",
             f"| dense | Dense | {_mean_text([v for v in dense if v is not None])} | "
             f"{seeds_text(dense)} | {PAPER_RESNET18['dense']:.2f} | | | |"]
    orders = []
    for sparsity, dist in settings:
        paper = PAPER_RESNET18.get((sparsity, dist), {})
        means = {}
        for m in methods:
            values = [acc(m, sparsity, dist, s) for s in seeds]
            got = [v for v in values if v is not None]
            if m in ablations and not got:
                continue
            if got:
                means[m] = statistics.fmean(got)
            mark = " (<5%: failed)" if got and means[m] < 5.0 else ""
            diffs = [None if a is None or b is None else a - b
                     for a, b in zip([acc("ggr", sparsity, dist, s) for s in seeds], values,
                                     strict=True)]
            paired = [d for d in diffs if d is not None]
            margin = ["", "", ""] if m == "ggr" else [
                _mean_text(paired), seeds_text(diffs, "+"),
                f"{sum(d > 0 for d in paired)}/{len(paired)}"]
            lines.append(
                f"| {sparsity} {DIST_LABELS[dist]} | {LABELS[m]} | {_mean_text(got)}{mark} | "
                f"{seeds_text(values)} | "
                + (f"{paper[m]:.2f}" if m in paper else "-") + " | " + " | ".join(margin) + " |")
        if means:
            ours = " > ".join(f"{LABELS[m]} {means[m]:.2f}"
                              for m in sorted(means, key=means.get, reverse=True))
            theirs = " > ".join(f"{LABELS[m]} {paper[m]:.2f}"
                                for m in sorted(paper, key=paper.get, reverse=True))
            orders.append(f"- {sparsity} {DIST_LABELS[dist]}: here {ours}"
                          + (f"; the paper {theirs}" if paper else "") + ".")
    recipe = next((r["recipe"] for r in ok.values() if r.get("recipe")), None)
    recipe = {k: v for k, v in (recipe or asdict(_recipe(args))).items()
              if k not in ("widths", "hidden")}  # the tiny network's, unused here
    parts = ["# The paper's model: ResNet-18 on the CIFAR-100 subset\n\n"
             "`python benchmarks/study.py run --network resnet18 --device cuda`, then "
             "`report --network resnet18`. The zoo's ResNet-18 (32x32 stem, 11.2M weights), "
             "9,000 training images, top-1 test accuracy on the 2,000 test images; "
             f"recipe: {recipe}. Paired by seed: runs with the same seed share "
             "the initial weights, mask draw and batch order. The paper's numbers are for the "
             "full CIFAR-100 and 100 epochs: compare orderings, not levels. The paper's rule: "
             "a setting whose mean is below 5% failed to fit the data.\n\n"
             "## Accuracy\n\n" + "\n".join(lines)
             + ("\n\nOrder of the mean accuracies:\n\n" + "\n".join(orders) if orders else "")]
    for sparsity, dist in settings:
        per_method = {m: [r for r in ok.values() if r["method"] == m
                          and r["sparsity"] == sparsity and r["distribution"] == dist
                          and r.get("layer_densities")] for m in methods}
        per_method = {m: rs for m, rs in per_method.items() if rs or m in main_methods}
        first = next((r for rs in per_method.values() for r in rs), None)
        if first is None:
            continue
        summary = _summary(first)
        sizes = {n: v["total"] for n, v in summary["layers"].items()} if summary else {}
        initial = ({n: v["initial_active"] / v["total"] for n, v in summary["layers"].items()}
                   if summary else {})
        head = ["Layer (weights)", "initial", *[LABELS[m] for m in per_method]]
        rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name in first["layer_densities"]:
            cells = [f"`{name}` ({sizes.get(name, 0):,})", f"{initial.get(name, math.nan):.4f}"]
            for rs in per_method.values():
                values = [r["layer_densities"][name] for r in rs]
                text = f"{statistics.fmean(values):.4f}" if values else "-"
                low, high = f"{min(values, default=0):.4f}", f"{max(values, default=0):.4f}"
                if low != high:
                    text += f" ({low}-{high})"
                cells.append(text)
            rows.append("| " + " | ".join(cells) + " |")
        parts.append(f"## Final layer densities at {sparsity} {DIST_LABELS[dist]} (mean over "
                     "seeds, range over seeds in brackets)\n\n" + "\n".join(rows))
    first_ggr = ok.get(RunSpec("ggr", *settings[0], 0).key) if settings else None
    summary = _summary(first_ggr) if first_ggr else None
    args.results.mkdir(parents=True, exist_ok=True)
    if summary is not None:
        save_density_chart(summary, args.results / "resnet18_figure2_ggr.png")
        parts.append(f"## GGR, {settings[0][0]} {DIST_LABELS[settings[0][1]]}, "
                     "seed 0: initial vs final density per layer\n\n"
                     "![densities](resnet18_figure2_ggr.png)\n\n" + density_table(summary))
    at_a_time = sorted({str(max(1, r.get("workers") or 1)) for r in ok.values()})
    if args.plan == "paper":
        baselines = []
        baseline_file = args.results / THROUGHPUT_BASELINES
        if baseline_file.is_file():
            baselines = json.loads(baseline_file.read_text())["baselines"]
        parts.append("## Every cell of the plan (issue 20), with its n\n\n"
                     + "\n".join(f"- ({g}) {text}" for g, text in PLAN_GROUPS.items())
                     + "\n\n" + cells_table(all_records, paper_plan())
                     + "\n\n*paper*: the paper's Table 1 (full CIFAR-100, 100 epochs); for "
                     "the ablations its Table 3, an average over four models and data sets.")
        parts.append("## Runs per GPU-hour\n\n" + throughput_rows(all_records, baselines)
                     + "\n\n" + (f"Baselines from [`{THROUGHPUT_BASELINES}`]"
                                  f"({THROUGHPUT_BASELINES}): one run of the code before "
                                  "issue 20, alone on the device, 3600 s over its run time. "
                                  if baselines else "No same-window baseline yet. ")
                     + "A session: the runs one `run` started, from its start (workers' "
                     "start-up included) to its last finished run.")
        section = claims_section(all_records)
        readme = args.results / "README.md"
        text = readme.read_text() if readme.is_file() else ""
        if CLAIMS_BEGIN in text and CLAIMS_END in text:
            head, rest = text.split(CLAIMS_BEGIN, 1)
            readme.write_text(head + CLAIMS_BEGIN + "\n" + section + rest[rest.index(
                CLAIMS_END):])
        else:
            (args.results / "resnet18_claims.md").write_text(
                "# The paper's claims on ResNet-18, claim by claim\n\n" + section)
    shown = missing if len(missing) <= 12 else [*missing[:12], f"... {len(missing) - 12} more"]
    parts.append(
        f"{len(ok)} finished runs, {len(failed)} failed ({', '.join(failed) or 'none'}), "
        f"{len(missing)} missing ({', '.join(shown) or 'none'})."
        + (f" Wall time per run: mean {statistics.fmean(walls):.0f} s, "
           f"{min(walls):.0f}-{max(walls):.0f} s ({' or '.join(at_a_time)} run(s) at a time) "
           f"on {_devices(ok)}." if walls else "")
        + " Raw records: [`runs_resnet18.json`](runs_resnet18.json).")
    text = "\n\n".join(parts) + "\n"
    (args.results / "resnet18_table.md").write_text(text)
    write_json(args.results / RECORDS_FILES["resnet18"],
               raw_records(results, _timing(results, missing)))
    print(text)


def _devices(records: dict[str, dict]) -> str:
    """Where the runs trained and with which libraries, as the records say."""
    devices = sorted({str(r.get("device") or "an unrecorded device") for r in records.values()})
    versions = sorted({", ".join(f"{k} {v}" for k, v in r["versions"].items())
                       for r in records.values() if r.get("versions")})
    return " or ".join(devices) + (f"; {' or '.join(versions)}" if versions else "")


def _dense_params(results: dict[str, dict]) -> str:
    for r in results.values():
        summary = _summary(r) if r.get("status") == "ok" else None
        if summary is not None:
            return f"{summary['analysis']['overall']['total']:,}"
    return "?"


def cmd_status(args: argparse.Namespace) -> None:
    results = {**read_records(args.records_out), **load_results(args.out)}
    runs = _runs(args)
    if args.plan == "paper":  # every cell with its n, then what is missing
        print(cells_table(results, paper_plan()))
    done = [s for s in runs if s.key in results]
    print(f"{len(done)}/{len(runs)} finished")
    for spec in runs:
        r = results.get(spec.key)
        if r is None:
            print(f"  missing  {spec.key}")
        elif r.get("status") != "ok":
            print(f"  FAILED   {spec.key}: {r.get('error')}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "tune", "report", "status"):
        p = sub.add_parser(name)
        p.add_argument("--data", type=Path, default=DEFAULT_DATA)
        p.add_argument("--out", type=Path, default=None,
                       help=f"run directories (default {DEFAULT_OUT.relative_to(REPO)}, "
                            f"or {DEFAULT_WIDE_OUT.relative_to(REPO)} with --network wide)")
        p.add_argument("--results", type=Path, default=DEFAULT_RESULTS,
                       help="where report writes the tables and the raw records "
                            f"({', '.join(RECORDS_FILES.values())}; default "
                            f"{DEFAULT_RESULTS.relative_to(REPO)})")
        p.add_argument("--records", type=Path, default=None, metavar="FILE",
                       help="report: read the runs from this raw-records file instead of the "
                            "run directories (without it, report reads the --results file "
                            "when --out holds no finished run)")
        p.add_argument("--workers", type=_count(0), default=None,
                       help="parallel runs, 1 thread each (default 2; resnet18: 1); 0: one "
                            "after the other in this process")
        p.add_argument("--seeds-099", type=int, default=3, help="seeds for sparsity 0.99")
        p.add_argument("--seeds-other", type=int, default=1, help="seeds for 0.9 and 0.97")
        p.add_argument("--dense-seeds", type=int, default=3)
        p.add_argument("--epochs", type=_count(1), default=None,
                       help="override (tuning; resnet18: the tiny test, milestones rescaled "
                            "to 30/60/80%%)")
        p.add_argument("--lr", type=float, default=None, help="override (tuning only)")
        p.add_argument("--retry-failed", action="store_true")
        p.add_argument("--network", choices=("tiny", "wide", "resnet18"), default="tiny",
                       help="tiny: the main study (tiny_vgg, hidden 256, the full grid); "
                            "wide: the supplementary grid (same convs, classifier "
                            f"1024 -> {WIDE_HIDDEN} -> 100; dense + SET/RigL/DSR/GGR at "
                            "0.99 x {ERK, uniform} x --dense-seeds seeds); resnet18: the "
                            "zoo's ResNet-18, 40 epochs, bf16-mixed, dense + SET/RigL/DSR/GGR "
                            "x --settings x --seeds (use --device cuda)")
        p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                       help="where runs train (resnet18: cuda; images stay on the device)")
        p.add_argument("--seeds", type=_count(1), default=2,
                       help="resnet18: seeds per setting")
        p.add_argument("--settings", type=_setting, nargs="+", default=[(0.99, "uniform")],
                       metavar="SPARSITY:DIST",
                       help="resnet18: settings in order, e.g. 0.99:uniform 0.99:erk "
                            "0.97:uniform (default: 0.99:uniform)")
        p.add_argument("--batch-size", type=_count(1), default=None,
                       help="override (tiny test)")
        p.add_argument("--limit-batches", type=_count(1), default=None,
                       help="train/val/test batches per epoch (tiny test)")
        p.add_argument("--precision", default=None,
                       help="override the recipe's (resnet18: bf16-mixed, else 32-true)")
        p.add_argument("--plan", choices=("default", "paper"), default="default",
                       help="resnet18: 'paper' is issue 20's priority plan, (a) 99%% uniform "
                            "dense + 4 methods x 5 seeds, (b) 97%% uniform and 99%% ERK x 3, "
                            "(c) the Table-3 ablations at 99%% uniform x 3, (d) 90%% ERK and "
                            "uniform x 3, (e) MobileNetV2 at 99%% ERK x 3 (--seeds and "
                            "--settings then do not apply)")
        p.add_argument("--records-out", type=Path, default=None, metavar="FILE",
                       help="run: merge each finished run's record into this raw-records "
                            "file at once (atomically, under a lock) and skip the runs it "
                            "holds; report/status with --plan paper: read it")
        if name == "run":
            p.add_argument("--deadline", type=parse_deadline, default=None,
                           help="start no run expected to end after this: seconds from now "
                                "(540, 9m) or a local time (14:30, 2026-12-07T14:30)")
            p.add_argument("--margin", type=float, default=1.25,
                           help="safety factor on the expected run time (default 1.25)")
            p.add_argument("--startup-s", type=float, default=30.0,
                           help="expected start-up of a fresh worker, added to its first "
                                "run (default 30)")
            p.add_argument("--history", type=Path, nargs="*", default=[], metavar="FILE",
                           help="more raw-records files whose run times estimate a run's "
                                "(e.g. a short probe at this --workers)")
            p.add_argument("--grace-s", type=float, default=60.0,
                           help="with --deadline: stop waiting for runs this long after it "
                                "(default 60)")
            p.add_argument("--max-runs", type=_count(1), default=None,
                           help="start at most this many runs")
            p.add_argument("--gpu-memory-fraction", type=float, default=None,
                           help="cuda, --workers N > 1: each worker's cap on the GPU's "
                                "memory (default 0.95 / N)")
            p.add_argument("--trace-losses", action="store_true",
                           help="store every training step's loss in result.json "
                                "(train_losses; the pairing check)")
        if name == "tune":
            p.add_argument("--lrs", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    args = parser.parse_args(argv)
    if args.workers is None:
        args.workers = 1 if args.network == "resnet18" else 2
    if args.out is None:
        args.out = {"wide": DEFAULT_WIDE_OUT, "resnet18": DEFAULT_RESNET_OUT}.get(
            args.network, DEFAULT_OUT)
    if args.network == "wide" and args.command == "report":
        cmd_wide_report(args)
        return
    if args.network == "resnet18" and args.command == "report":
        cmd_resnet18_report(args)
        return
    {"run": cmd_run, "tune": cmd_tune, "report": cmd_report, "status": cmd_status}[
        args.command](args)


if __name__ == "__main__":
    main()
