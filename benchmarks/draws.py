"""Cost of drawing the initial random masks: time and peak memory per layer, one CPU thread.

Each measurement runs in a fresh process, so that its peak resident memory (``ru_maxrss``)
over the level before the draw is the draw's own: torch's CPU allocations and a CPU
``topk``'s internal work vector alike. Layers: VGG16's fc1 (25088 x 4096, ImageNet input,
the largest layer of the zoo) at three densities, and every sparse layer of the zoo's
ResNet-18 (CIFAR) at its ERK density for sparsity 0.9.

    python benchmarks/draws.py            # the table
    python benchmarks/draws.py --quick    # fc1 at density 0.08 and ResNet-18 only
    python benchmarks/draws.py --tiny     # a 64x128 layer instead: checks that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

import torch

VGG16_FC1 = (4096, 25088)


def _one(shape: tuple[int, ...], active: int, reps: int) -> dict:
    from lightning_ggr.sparse.masks import random_mask

    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    random_mask((4, 4), 3, generator)  # imports and first-call set-up before the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        mask = random_mask(shape, active, generator)
        times.append(time.perf_counter() - start)
        assert int(mask.count_nonzero()) == active
        del mask
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before  # KiB on Linux
    return {"seconds": min(times), "peak_mib": peak / 1024}


def measure(shape: tuple[int, ...], active: int, reps: int) -> dict:
    """One draw in a fresh process: its best time of ``reps`` and its peak extra memory."""
    code = ("import json, sys; from benchmarks.draws import _one; "
            f"print(json.dumps(_one({tuple(shape)!r}, {active}, {reps})))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def resnet18_layers() -> list[tuple[str, tuple[int, ...], int]]:
    from lightning_ggr.sparse.densities import active_counts, initial_densities, layer_budget
    from lightning_ggr.sparse.selection import select_sparse_parameters
    from lightning_ggr.zoo import build_model

    model = build_model("resnet18", num_classes=100, input_size=32)
    shapes = {n: tuple(p.shape) for n, p in select_sparse_parameters(model).items()}
    density = initial_densities(shapes, 0.9, "erk")
    counts = active_counts(shapes, density, total=layer_budget(shapes, 0.9))
    return [(name, shapes[name], counts[name]) for name in shapes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    import lightning_ggr

    print(f"CPU ({platform.processor() or platform.machine()}), 1 thread, torch "
          f"{torch.__version__}, lightning_ggr {lightning_ggr.__version__}")
    densities = (0.08,) if args.quick else (0.01, 0.08, 0.5)
    shape, label = ((64, 128), "a 64x128 layer") if args.tiny else (VGG16_FC1, "VGG16 fc1")
    numel = shape[0] * shape[1]
    print("| layer | shape | active | time (s) | peak extra memory (MiB) |")
    print("|---|---|---:|---:|---:|")
    for density in densities:
        active = round(density * numel)
        row = measure(shape, active, args.reps)
        print(f"| {label}, density {density:g} | {shape[0]}x{shape[1]} | {active:,} | "
              f"{row['seconds']:.3f} | {row['peak_mib']:.0f} |", flush=True)
    if args.tiny:
        return
    total_time = 0.0
    peak = 0.0
    for _name, shape, active in resnet18_layers():
        row = measure(shape, active, args.reps)
        total_time += row["seconds"]
        peak = max(peak, row["peak_mib"])
    shown = f"{peak:.1f} (largest)" if peak >= 1 else "< 1 (below what ru_maxrss resolves)"
    print(f"| ResNet-18 (CIFAR), all 21 layers, ERK 0.9 | - | - | {total_time:.3f} (sum) | "
          f"{shown} |")


if __name__ == "__main__":
    main()
