"""Cost of the collectives DynamicSparsityCallback adds under DDP to agree across ranks.

Two processes over gloo (CPU), one torch thread each. Measures the per-step agreement used
when the ranks' epochs differ and ``interval="epoch"`` (rank 0's epoch, one int64
broadcast per step until the stop point) and the one all-gather at train start. With equal
epochs, no collective is added per step at all.

    python benchmarks/rank_agreement.py --calls 3000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lightning_ggr.callbacks.ranks import gather_ints, rank_zero_int


def _worker(rank: int, calls: int, store: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    trainer = SimpleNamespace(world_size=2,
                              strategy=SimpleNamespace(root_device=torch.device("cpu")))
    try:
        for _ in range(50):  # warm-up
            rank_zero_int(trainer, rank)
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            rank_zero_int(trainer, rank)
        broadcast = (time.perf_counter() - start) / calls
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls // 10):
            gather_ints(trainer, [rank, 5])
        gather = (time.perf_counter() - start) / (calls // 10)
        if rank == 0:
            print(f"per-step epoch agreement (broadcast of one int64): {broadcast * 1e6:.0f} us")
            print(f"train-start agreement (all-gather of two int64):   {gather * 1e6:.0f} us")
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(args.calls, str(Path(folder) / "store")), nprocs=2, join=True)


if __name__ == "__main__":
    main()
