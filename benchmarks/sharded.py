"""Sharded (FSDP2) against replicated (DDP) sparse training on 2 CPU ranks over gloo.

For the same model (a stack of ``--layers`` linear layers ``width x width``, AdamW) and the
engine in a plain loop, each configuration runs in 2 fresh processes, one torch thread each:

- per-rank memory after ``--steps`` training steps that include one rewiring: the training
  state each process holds (its part of the parameters, gradients and AdamW state, and of
  the engine's masks and their integer copies, counted tensor by tensor), and the growth
  of its peak resident memory from before the model is built (``ru_maxrss``: every
  transient buffer, and what the allocator keeps after freeing it); dense rows (no engine)
  give each strategy's reference;
- per rewiring and method: the payload handed to collectives by one rank (the bytes of
  every tensor passed to ``all_reduce``, ``all_gather``, ``broadcast``, ``gather``), the
  wall time (median of ``--rewirings``) and the peak extra memory of one rewiring (the
  running sum of the allocations and frees ``torch.profiler`` records during it).

    python benchmarks/sharded.py                 # width 1024, 8 layers (8.4M weights)
    python benchmarks/sharded.py --width 256 --layers 2 --steps 3 --rewirings 2  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

METHODS = ("set", "rigl", "dsr", "ggr")
COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "gather", "all_gather_into_tensor",
               "reduce_scatter_tensor")


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build(width: int, layers: int) -> nn.Module:
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*blocks, nn.Linear(width, 10))


class Payload:
    """Counts the bytes of the tensors this process hands to collectives."""

    def __init__(self) -> None:
        self.bytes = 0
        self.calls = 0
        self._originals = {}

    def __enter__(self) -> Payload:
        for name in COLLECTIVES:
            original = getattr(dist, name)
            self._originals[name] = original

            def counted(*args, _original=original, _name=name, **kwargs):
                tensor = args[1] if _name in ("all_gather", "all_gather_into_tensor",
                                              "reduce_scatter_tensor") else args[0]
                if isinstance(tensor, torch.Tensor):
                    self.bytes += tensor.numel() * tensor.element_size()
                    self.calls += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self._originals.items():
            setattr(dist, name, original)


def _worker(rank: int, world: int, store: str, strategy: str, sparse: bool, args: dict,
            record: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    from torch.profiler import ProfilerActivity, profile

    from lightning_ggr import SparseEngine, select_sparse_parameters
    from lightning_ggr.sparse.masks import optimizer_state_tensors
    from lightning_ggr.sparse.schedules import RewiringSchedule
    from lightning_ggr.sparse.sharded import local_tensor

    before = peak_mib()
    model = build(args["width"], args["layers"])
    if strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
        inner = model
    else:
        wrapped = nn.parallel.DistributedDataParallel(model)
        inner = model
    optimizer = torch.optim.AdamW(inner.parameters(), lr=1e-3)
    engine = None
    schedule = RewiringSchedule("step", args["steps"] - 1, 10**9, 0.3)
    if sparse:
        engine = SparseEngine(select_sparse_parameters(inner), sparsity=0.9, method="ggr",
                              schedule=schedule)
    generator = torch.Generator().manual_seed(rank)
    for step in range(args["steps"]):
        x = torch.randn(16, args["width"], generator=generator)
        wrapped(x).square().mean().backward()
        if engine is not None:
            engine.before_optimizer_step(step, 0, [optimizer])
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    state = 0
    for param in inner.parameters():
        held = [param] + ([param.grad] if param.grad is not None else [])
        held += list(optimizer_state_tensors(optimizer, param))
        state += sum(local_tensor(t).numel() * local_tensor(t).element_size() for t in held)
    if engine is not None:
        state += sum(local_tensor(m).numel() for m in engine.masks.values())
        state += engine._pass.nbytes
    peak = {"rss": peak_mib() - before, "state": state / 2**20}
    rewirings = {}
    if sparse:
        for method in METHODS:
            engine = SparseEngine(select_sparse_parameters(inner), sparsity=0.9, method=method,
                                  seed=1)
            times, payloads, calls = [], [], []
            extra = 0
            for repeat in range(args["rewirings"] + 2):
                x = torch.randn(16, args["width"], generator=generator)
                wrapped(x).square().mean().backward()
                dist.barrier()
                with Payload() as payload, profile(activities=[ProfilerActivity.CPU],
                                                   profile_memory=repeat == 1) as prof:
                    start = time.perf_counter()
                    engine.rewire(0.3, [optimizer])
                    seconds = time.perf_counter() - start
                if repeat == 1:  # a profile that records memory runs slower: timed apart
                    level = 0
                    for event in sorted((e for e in prof.events() if e.self_cpu_memory_usage),
                                        key=lambda e: e.time_range.start):
                        level += event.self_cpu_memory_usage
                        extra = max(extra, level)
                optimizer.zero_grad(set_to_none=False)
                if repeat > 1:  # the first one warms up, the second measures memory
                    times.append(seconds)
                    payloads.append(payload.bytes)
                    calls.append(payload.calls)
            rewirings[method] = {"ms": 1e3 * statistics.median(times),
                                 "bytes": statistics.median(payloads),
                                 "collectives": statistics.median(calls),
                                 "extra_mib": extra / 2**20}
    peaks = [None] * world
    dist.all_gather_object(peaks, peak)
    if rank == 0:
        Path(record).write_text(json.dumps({"peaks": peaks, "rewirings": rewirings}))
    dist.destroy_process_group()
    # A gloo rank that used DTensors sometimes aborts while the interpreter finalizes
    # (SIGABRT, after everything above): exit at once, the work is recorded.
    sys.stdout.flush()
    os._exit(0)


def run(strategy: str, sparse: bool, args: dict) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        record = str(Path(folder) / "record.json")
        mp.spawn(_worker, args=(2, str(Path(folder) / "store"), strategy, sparse, args, record),
                 nprocs=2, join=True)
        return json.loads(Path(record).read_text())


def _size(count: float) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count:.0f} B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rewirings", type=int, default=3)
    parser.add_argument("--no-dense", action="store_true",
                        help="skip the dense references (half the runs; no memory ratios)")
    args = vars(parser.parse_args())
    import lightning_ggr

    weights = sum(p.numel() for p in build(args["width"], args["layers"]).parameters())
    print(f"2 CPU ranks (gloo, {platform.machine()}), 1 thread each, torch {torch.__version__}, "
          f"lightning_ggr {lightning_ggr.__version__}; model: {args['layers']} x Linear("
          f"{args['width']}, {args['width']}) + head, {weights / 1e6:.1f}M parameters, AdamW, "
          "sparsity 0.9 (ERK), drop fraction 0.3. No GPU measured here.")
    kinds = (True,) if args.pop("no_dense") else (False, True)
    results = {(s, sparse): run(s, sparse, args) for s in ("ddp", "fsdp2") for sparse in kinds}
    print("\n| strategy | training | training state per rank (MiB, rank 0 / 1) | "
          "ratio to DDP dense | peak RSS growth (MiB, rank 0 / 1) |")
    print("|---|---|---:|---:|---:|")
    dense = results.get(("ddp", False))
    reference = None if dense is None else max(p["state"] for p in dense["peaks"])
    for (strategy, sparse), result in results.items():
        peaks = result["peaks"]
        state = max(p["state"] for p in peaks)
        ratio = "-" if reference is None else f"{state / reference:.2f}"
        print(f"| {strategy.upper()} | {'sparse (GGR)' if sparse else 'dense'} | "
              f"{peaks[0]['state']:.1f} / {peaks[1]['state']:.1f} | "
              f"{ratio} | {peaks[0]['rss']:.0f} / {peaks[1]['rss']:.0f} |")
    print("\n| method | strategy | payload per rank per rewiring | collectives | "
          "rewiring time (ms, median) | peak extra memory of a rewiring (MiB) |")
    print("|---|---|---:|---:|---:|---:|")
    for method in METHODS:
        for strategy in ("ddp", "fsdp2"):
            row = results[(strategy, True)]["rewirings"][method]
            print(f"| {method} | {strategy.upper()} | {_size(row['bytes'])} | "
                  f"{row['collectives']:.0f} | {row['ms']:.1f} | {row['extra_mib']:.1f} |")


if __name__ == "__main__":
    main()
