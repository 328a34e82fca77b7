"""Sparse models for inference: file sizes, and dense against converted speed side by side.

    python benchmarks/inference.py                  # the CPU tables (tens of minutes)
    python benchmarks/inference.py --quick          # tiny models, every section, seconds
    python benchmarks/inference.py --device cuda    # CSR through torch.sparse on a GPU
    python benchmarks/inference.py --models mlp --threads 1 --layers

For each model (a Linear-heavy MLP of three 4096 x 4096 layers, a transformer block:
``nn.TransformerEncoderLayer`` with attention and a 4x MLP, the zoo's VGG16 and ResNet-18 for
CIFAR), each mask source (``random``: uniform density per layer, positions drawn at random;
``ggr``: a short GGR run from uniform densities on synthetic data, so GGR has moved weights
between layers) and each sparsity:

1. the sparse model file (``save_sparse_model``) against the dense ``state_dict`` file;
2. for each thread count and batch size, ``to_inference`` at that example input, then the
   masked dense model and the converted one timed alternately in one process
   (``time_interleaved``): median and (min-max) in ms, the speed-up of the medians, and how
   many masked layers became CSR;
3. with ``--layers``, every conversion's per-layer report (dense and CSR times per layer).

Then the goals of issue 18, met or missed, on the 1-thread rows with random masks. A
converted model counts as slower than dense when its median exceeds the dense median by
more than ``--tolerance`` (default 5%).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import lightning_ggr
from lightning_ggr import RewiringSchedule, SparseEngine, save_sparse_model, to_inference
from lightning_ggr.sparse import inference
from lightning_ggr.sparse.inference import time_interleaved
from lightning_ggr.sparse.selection import select_sparse_parameters
from lightning_ggr.zoo import build_model

MODELS = ("mlp", "transformer", "vgg16", "resnet18")
MASK_SOURCES = ("random", "ggr")


@dataclass
class Spec:
    """A model of the benchmark and the example input of one batch size."""

    name: str
    build: Callable[[], nn.Module]
    example: Callable[[int], torch.Tensor]
    described: str


def specs(quick: bool) -> dict[str, Spec]:
    width = 1024 if quick else 4096
    model_width, heads, length = (32, 4, 8) if quick else (512, 8, 64)
    image = 8 if quick else 32

    def mlp() -> nn.Module:
        return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width),
                             nn.ReLU(), nn.Linear(width, width))

    def transformer() -> nn.Module:
        return nn.TransformerEncoderLayer(model_width, heads, 4 * model_width, dropout=0.0,
                                          batch_first=True)

    def zoo(name: str) -> Callable[[], nn.Module]:
        if quick:
            return lambda: build_model("small_cnn", 10, image, 3)
        return lambda: build_model(name, 100, image, 3)

    def images(batch: int) -> torch.Tensor:
        return torch.randn(batch, 3, image, image)

    zoo_described = "zoo small_cnn, 8x8 (quick)" if quick else "zoo {}, CIFAR 32x32, 100 classes"
    return {
        "mlp": Spec("mlp", mlp, lambda batch: torch.randn(batch, width),
                    f"3 x Linear({width}, {width}), ReLU between"),
        "transformer": Spec(
            "transformer", transformer, lambda batch: torch.randn(batch, length, model_width),
            f"nn.TransformerEncoderLayer(d={model_width}, heads={heads}, "
            f"ff={4 * model_width}), sequence {length}"),
        "vgg16": Spec("vgg16", zoo("vgg16"), images, zoo_described.format("VGG16")),
        "resnet18": Spec("resnet18", zoo("resnet18"), images, zoo_described.format("ResNet-18")),
    }


# ----------------------------------------------------------------------------------- masks


def random_masks(model: nn.Module, sparsity: float, seed: int) -> dict[str, torch.Tensor]:
    """Uniform density per sparse layer, positions drawn at random (exact counts)."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name, param in select_sparse_parameters(model).items():
        active = max(1, round((1 - sparsity) * param.numel()))
        flat = torch.zeros(param.numel(), dtype=torch.bool)
        flat[torch.randperm(param.numel(), generator=generator)[:active]] = True
        masks[name] = flat.reshape(param.shape)
    return masks


def ggr_masks(model: nn.Module, spec: Spec, sparsity: float, steps: int, seed: int
              ) -> dict[str, torch.Tensor]:
    """Masks after ``steps`` SGD steps of GGR (uniform start, a rewiring every 5 steps, drop
    fraction 0.3) on random inputs and random targets; trains ``model`` in place."""
    torch.manual_seed(seed)
    engine = SparseEngine(select_sparse_parameters(model), sparsity=sparsity, method="ggr",
                          distribution="uniform", seed=seed,
                          schedule=RewiringSchedule("step", 5, steps, 0.3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for step in range(steps):
        output = model(spec.example(16))
        loss = nn.functional.mse_loss(output, torch.randn_like(output))
        loss.backward()
        engine.before_optimizer_step(step, 0, [optimizer])
        optimizer.step()
        optimizer.zero_grad()
    return {name: mask.detach().cpu().clone() for name, mask in engine.masks.items()}


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask.to(params[name].device))
    return model.eval()


# ------------------------------------------------------------------------------ measuring


def file_sizes(model: nn.Module, masks: dict[str, torch.Tensor]) -> tuple[int, int, str]:
    """Bytes of the dense state_dict file and of the sparse model file, and the encodings."""
    dense = io.BytesIO()
    torch.save(model.state_dict(), dense)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "sparse.pt"
        save_sparse_model(model, masks, path)
        size = path.stat().st_size
        raw = torch.load(path, weights_only=True)
    encodings: dict[str, int] = {}
    for entry in raw["sparse"].values():
        key = entry["encoding"] + (f" {str(entry['positions'].dtype).removeprefix('torch.')}"
                                   if entry["encoding"] == "gaps" else "")
        encodings[key] = encodings.get(key, 0) + 1
    return len(dense.getvalue()), size, ", ".join(f"{k} x{v}" for k, v in encodings.items())


@dataclass
class Row:
    model: str
    masks: str
    sparsity: float
    threads: int
    batch: int
    dense: list[float]
    converted: list[float]
    csr_layers: int
    masked_layers: int
    kept: bool
    report: str

    @property
    def speedup(self) -> float:
        return statistics.median(self.dense) / statistics.median(self.converted)


def spread(times: list[float]) -> str:
    return f"{statistics.median(times):.3f} ({min(times):.3f}-{max(times):.3f})"


def measure(spec: Spec, model: nn.Module, masks: dict[str, torch.Tensor], source: str,
            sparsity: float, threads: int, batch: int, device: torch.device,
            dtype: torch.dtype, budget_s: float, min_repetitions: int) -> Row:
    example = spec.example(batch).to(device=device, dtype=dtype)
    converted = to_inference(model, masks, example, threads=threads)
    report = converted.inference_report
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            dense_times, converted_times = time_interleaved(
                lambda: model(example), lambda: converted(example), device, budget_s,
                min_repetitions)
    finally:
        torch.set_num_threads(previous)
    return Row(spec.name, source, sparsity, threads, batch, dense_times, converted_times,
               len(report.converted), len(report.layers), report.kept_sparse, str(report))


# ------------------------------------------------------------------------------- printing


def environment(device: torch.device, threads: list[int]) -> str:
    if device.type == "cuda":
        where = f"GPU {torch.cuda.get_device_name(device)}"
    else:
        where = f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"Device: {where}; torch {torch.__version__}, lightning-ggr "
            f"{lightning_ggr.__version__}, Python {platform.python_version()}; threads timed: "
            f"{', '.join(map(str, threads))}; load average at start {load} (other processes "
            "share this machine: the spreads say how much)")


def print_sizes(rows: list[tuple[str, str, float, int, int, str]]) -> None:
    print("\n## Sparse model file against the dense state_dict file\n")
    print("| model | masks | sparsity | dense state_dict (MB) | sparse file (MB) | ratio | "
          "encodings |")
    print("|---|---|---:|---:|---:|---:|---|")
    for model, source, sparsity, dense, sparse, encodings in rows:
        print(f"| {model} | {source} | {sparsity:g} | {dense / 1e6:.2f} | {sparse / 1e6:.3f} | "
              f"{100 * sparse / dense:.2f}% | {encodings} |")


def print_speed(rows: list[Row], tolerance: float) -> None:
    print("\n## End to end: masked dense model against to_inference's model\n")
    print("Median and (min-max) of interleaved repetitions, ms per forward pass; speed-up = "
          "dense median / converted median; CSR layers = masked layers computed sparse (the "
          "others stayed dense: not measured faster, or not convertible).\n")
    print("| model | masks | sparsity | threads | batch | dense ms | converted ms | speed-up | "
          "CSR layers | reps |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for row in rows:
        slower = " (slower)" if row.speedup < 1 / (1 + tolerance) else ""
        layers = f"{row.csr_layers}/{row.masked_layers}"
        if not row.kept and row.csr_layers == 0 and "whole model" in row.report:
            layers += " (whole model not faster)"
        print(f"| {row.model} | {row.masks} | {row.sparsity:g} | {row.threads} | {row.batch} | "
              f"{spread(row.dense)} | {spread(row.converted)} | {row.speedup:.2f}x{slower} | "
              f"{layers} | {len(row.dense)} |")


def print_goals(rows: list[Row], tolerance: float) -> None:
    print("\n## Goals (issue 18; CPU, 1 thread, random uniform masks, end to end)\n")

    def find(sparsity: float, batch: int) -> Row | None:
        return next((r for r in rows if r.model == "mlp" and r.masks == "random"
                     and r.threads == 1 and r.sparsity == sparsity and r.batch == batch), None)

    for sparsity, batch, goal in ((0.99, 1, 10.0), (0.99, 64, 5.0), (0.95, 1, 3.0)):
        row = find(sparsity, batch)
        if row is None:
            print(f"- MLP {sparsity:g} batch {batch} >= {goal:g}x: not measured in this run")
            continue
        verdict = "met" if row.speedup >= goal else "MISSED"
        print(f"- MLP {sparsity:g} batch {batch} >= {goal:g}x: {row.speedup:.1f}x, {verdict}")
    converted = [r for r in rows if r.csr_layers]
    slower = [r for r in converted if r.speedup < 1 / (1 + tolerance)]
    print(f"- no model slower than dense beyond {tolerance:.0%} (every row with CSR layers: "
          f"{len(converted)} of {len(rows)}, all threads, both mask sources): "
          f"{'met' if not slower else 'MISSED'}" + ("" if not slower else " (slower: " + "; ".join(
              f"{r.model} {r.masks} {r.sparsity:g} t{r.threads} b{r.batch} {r.speedup:.2f}x"
              for r in slower) + ")"))
    same = [r for r in rows if not r.csr_layers]
    if same:
        worst = max(same, key=lambda r: abs(r.speedup - 1))
        low, high = min(r.speedup for r in same), max(r.speedup for r in same)
        print(f"- the {len(same)} rows without CSR layers time the same computation twice (the "
              f"conversion kept every layer dense): their ratios, {low:.2f}x to {high:.2f}x "
              f"(worst: {worst.model} {worst.masks} {worst.sparsity:g} t{worst.threads} "
              f"b{worst.batch}), are this machine's noise")


# ----------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny models and timings: every section in seconds")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--masks", nargs="+", choices=MASK_SOURCES, default=list(MASK_SOURCES))
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.95, 0.99])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--threads", nargs="+", default=["1", "all"],
                        help="thread counts to time with; 'all': torch's default count")
    parser.add_argument("--ggr-steps", type=int, default=20,
                        help="training steps of the GGR run that makes the trained masks")
    parser.add_argument("--budget", type=float, default=3.0,
                        help="seconds of interleaved end-to-end timing per row")
    parser.add_argument("--min-repetitions", type=int, default=7)
    parser.add_argument("--tolerance", type=float, default=0.05,
                        help="a converted model slower than dense by more than this fraction "
                        "of the dense median counts as slower (default 0.05)")
    parser.add_argument("--layers", action="store_true",
                        help="print every conversion's per-layer report")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda needs a CUDA device", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    if args.quick:  # a smoke run of every section: the timings mean nothing
        args.ggr_steps, args.budget, args.min_repetitions = 4, 0.02, 2
        args.batches, args.sparsities, args.threads = [1, 4], [0.99], ["1"]
        inference.TIMING_BUDGET_S = 0.002
    all_threads = torch.get_num_threads()
    threads = sorted({all_threads if t == "all" else int(t) for t in args.threads})
    print(environment(device, threads))
    print(f"dtype {args.dtype}; models: " + "; ".join(
        f"{name}: {specs(args.quick)[name].described}" for name in args.models))
    started = time.perf_counter()
    size_rows, speed_rows = [], []
    models = specs(args.quick)
    for name in args.models:
        spec = models[name]
        for source in args.masks:
            for index, sparsity in enumerate(args.sparsities):
                torch.manual_seed(index)
                model = spec.build()
                if source == "random":
                    masks = random_masks(model, sparsity, seed=index)
                else:
                    masks = ggr_masks(model, spec, sparsity, args.ggr_steps, seed=index)
                model = apply_masks(model, masks)
                dense_bytes, sparse_bytes, encodings = file_sizes(model, masks)
                size_rows.append((name, source, sparsity, dense_bytes, sparse_bytes, encodings))
                model = model.to(device=device, dtype=dtype)
                for thread_count in threads:
                    for batch in args.batches:
                        row = measure(spec, model, masks, source, sparsity, thread_count,
                                      batch, device, dtype, args.budget, args.min_repetitions)
                        speed_rows.append(row)
                        print(f"  {name} {source} {sparsity:g} t{thread_count} b{batch}: "
                              f"dense {spread(row.dense)} converted {spread(row.converted)} "
                              f"{row.speedup:.2f}x, CSR {row.csr_layers}/{row.masked_layers}",
                              file=sys.stderr, flush=True)
                        if args.layers:
                            print(f"\n### {name}, {source} masks, sparsity {sparsity:g}, "
                                  f"{thread_count} thread(s), batch {batch}\n\n```\n"
                                  f"{row.report}\n```")
                del model
    print_sizes(size_rows)
    print_speed(speed_rows, args.tolerance)
    print_goals(speed_rows, args.tolerance)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    print(f"\nTotal time {time.perf_counter() - started:.0f} s; load average at the end {load}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
