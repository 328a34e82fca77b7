"""Where the engine synchronises with the GPU: every CUDA synchronisation of the per-step pass,
the gradient check of a due step and one rewiring per method, with the Python line that
caused it.

    python benchmarks/sync_sites.py [--model resnet18] [--methods ggr rigl set dsr]

Runs under ``torch.cuda.set_sync_debug_mode("warn")``; each warning is attributed to the
innermost frame of ``lightning_ggr`` on the Python stack at that moment (or, outside the
package, to its message). Needs a CUDA GPU. Expected by design: 0 for the pass, 1 for the
check, 1 for GGR's allocation and DSR's removal counts, 0 for SET and RigL.
"""

from __future__ import annotations

import argparse
import collections
import traceback
import warnings

import torch
from torch import nn

from lightning_ggr import SparseEngine, select_sparse_parameters
from lightning_ggr.sparse.syncs import is_sync_warning
from lightning_ggr.zoo import build_model

SITES: collections.Counter[str] = collections.Counter()


def _record(message, *args, **kwargs) -> None:
    if not is_sync_warning(message):  # e.g. the mode's one-time "prototype feature" notice
        return
    frames = [f for f in traceback.extract_stack() if "lightning_ggr" in f.filename]
    if frames:
        frame = frames[-1]
        SITES[f"{frame.filename.split('lightning_ggr')[-1]}:{frame.lineno}  {frame.line}"] += 1
    else:
        SITES[str(message)[:100]] += 1


def watch(fn) -> int:
    """CUDA synchronisations made by ``fn`` (the sites land in ``SITES``)."""
    torch.cuda.synchronize()
    SITES.clear()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum(SITES.values())


def report(label: str, count: int) -> None:
    print(f"{label}: {count}")
    for site, n in SITES.most_common(20):
        print(f"    {n:4d}  {site}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--methods", nargs="+", default=["ggr", "rigl", "set", "dsr"])
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    warnings.showwarning = _record
    warnings.simplefilter("always")
    model = build_model(args.model).cuda()
    x = torch.randn(args.batch_size, 3, 32, 32, device="cuda")
    y = torch.randint(0, 100, (args.batch_size,), device="cuda")

    def backward() -> None:
        nn.functional.cross_entropy(model(x), y).backward()

    for method in args.methods:
        engine = SparseEngine(select_sparse_parameters(model), sparsity=0.9, method=method)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        backward()
        optimizer.step()
        engine.rewire(0.1, [optimizer])  # warm-up (DSR's first threshold)
        backward()
        report(f"{method}: per-step pass", watch(engine.mask_gradients))
        report(f"{method}: gradient check of a due step", watch(engine.gradients_usable))
        report(f"{method}: one rewiring", watch(lambda e=engine, o=optimizer: e.rewire(0.1, [o])))
        optimizer.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
