"""Runs per GPU-hour of the ResNet-18 study: today's way against the new way, in one window.

    # today's way: one run of another checkout's code (the code before issue 20), alone
    python benchmarks/study_throughput.py baseline --root data/baseline --device cuda \\
        --data data/cifar100_subset.npz --append $OUT/throughput_baselines.json
    # the new way, from a short probe (run --epochs 3 --max-runs N --workers N): each run's
    # time extrapolated to the recipe's 40 epochs (time outside the epochs + 40 x its
    # slowest epoch after the first), N at a time
    python benchmarks/study_throughput.py extrapolate /tmp/probe.json

``baseline`` loads ``--root``'s ``benchmarks/study.py`` and ``lightning_ggr`` (a ``git
archive`` of the older commit; ``PYTHONPATH`` must name ``--root`` first) and trains one run
(``--key``, default ``dense-seed0``) with the ResNet-18 recipe as that code did, one run in
its process; it appends the run's time to ``--append`` (``{"baselines": [...]}``, written
atomically). The study's ``report --network resnet18 --plan paper`` reads that file from
``--results`` and prints its rows beside the sessions' measured runs per hour.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _study(root: Path):
    sys.path.insert(0, str(root / "benchmarks"))
    spec = importlib.util.spec_from_file_location("study", root / "benchmarks" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["study"] = module
    spec.loader.exec_module(module)
    return module


def baseline(args: argparse.Namespace) -> dict:
    """One run of ``--root``'s study code, alone in this process; its time, appended."""
    process_start = time.time()
    import torch

    study = _study(args.root.resolve())
    spec = next(s for s in study.resnet18_grid(5, [(0.99, "uniform"), (0.99, "erk"),
                                                   (0.97, "uniform"), (0.9, "erk"),
                                                   (0.9, "uniform")]) if s.key == args.key)
    recipe = study.resnet18_recipe()
    if args.epochs:  # the tiny CPU test only
        recipe = study._recipe(argparse.Namespace(network="resnet18", epochs=args.epochs,
                                                  lr=None, batch_size=args.batch_size,
                                                  limit_batches=args.limit_batches,
                                                  precision=None))
    torch.set_num_threads(1)
    result = study.train_one(spec, recipe, args.data, args.out, device=args.device, workers=0)
    entry = {"what": "code before issue 20, one run alone", "key": spec.key,
             "commit": os.environ.get("BASELINE_COMMIT") or None,
             "device": result.get("device"), "wall_s": result["wall_s"],
             "process_s": round(time.time() - process_start, 2),
             "test_acc": result.get("test_acc"), "epochs": recipe.epochs,
             "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    if args.append is not None:
        sys.path.insert(0, str(HERE.parent))
        from lightning_ggr.callbacks.summary import write_json

        old = json.loads(args.append.read_text())["baselines"] if args.append.is_file() else []
        write_json(args.append, {"baselines": [*old, entry]})
    print(json.dumps(entry))
    return entry


def extrapolate(paths: list[Path], epochs: int) -> list[dict]:
    """Per probe session: runs at a time, each run's time at ``epochs`` epochs (from its
    ``epoch_s``), and the runs per hour that gives."""
    sys.path.insert(0, str(HERE))
    from study_plan import read_records, run_seconds

    sessions: dict[str, list[dict]] = {}
    for path in paths:
        for record in read_records(path).values():
            if record.get("status") == "ok" and record.get("epoch_s"):
                sessions.setdefault(record["session"]["id"], []).append(record)
    rows = []
    print("| probe session | device | runs at a time | runs | run time at "
          f"{epochs} epochs (s, mean, max) | runs per GPU-hour |")
    print("|---|---|---|---|---|---|")
    for session, records in sessions.items():
        info = records[0]["session"]
        seconds = [run_seconds(r, epochs) for r in records]
        parallel = max(1, int(info["workers"] or 1))
        per_hour = 3600 * parallel / (sum(seconds) / len(seconds))
        mps = " + MPS" if info.get("mps") else ""
        print(f"| {session} | {records[0].get('device')} | {parallel}{mps} | {len(records)} | "
              f"{sum(seconds) / len(seconds):.1f}, {max(seconds):.1f} | {per_hour:.0f} |")
        rows.append({"session": session, "workers": parallel, "mps": bool(info.get("mps")),
                     "run_s": seconds, "runs_per_hour": per_hour})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    base = sub.add_parser("baseline")
    base.add_argument("--root", type=Path, required=True)
    base.add_argument("--data", type=Path, required=True)
    base.add_argument("--out", type=Path, default=Path("/tmp/study_baseline_runs"))
    base.add_argument("--device", default="cuda")
    base.add_argument("--key", default="dense-seed0")
    base.add_argument("--append", type=Path, default=None)
    base.add_argument("--epochs", type=int, default=None, help="tiny CPU test only")
    base.add_argument("--batch-size", type=int, default=None, help="tiny CPU test only")
    base.add_argument("--limit-batches", type=int, default=None, help="tiny CPU test only")
    extra = sub.add_parser("extrapolate")
    extra.add_argument("records", type=Path, nargs="+")
    extra.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args(argv)
    if args.command == "baseline":
        baseline(args)
    else:
        extrapolate(args.records, args.epochs)


if __name__ == "__main__":
    main()
