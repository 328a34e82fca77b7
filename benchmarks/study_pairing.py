"""Do new seeds pair with the committed ones? The ResNet-18 study's per-step training losses,
final accuracies and layer densities, run by the code of another checkout (the baseline, e.g.
the code that produced the committed records) and by this one, in this process's way
(``--workers 0``) and in a pool worker (``--workers 1``: every run but the first is that
worker's second or later run), at a tiny CPU setting. Identical losses step for step mean
the recipe, the data order, the augmentation and the seeding are unchanged.

    git archive bf36ea5 lightning_ggr benchmarks | tar -x -C /tmp/base
    python benchmarks/study_pairing.py --baseline-root /tmp/base

Prints one line per run and exits with status 1 if any run differs. Fake images unless
``--data``; each way runs in its own process (``--threads`` threads, default 1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def fake_cifar(path: Path, per_class: int = 12) -> Path:
    """Random images in ``cifar100_subset.npz``'s layout (never the real data)."""
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (100 * per_class, 32, 32, 3), dtype=np.uint8),
             y_train=np.repeat(np.arange(100), per_class),
             x_test=rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8),
             y_test=np.arange(100))
    return path


def _trace(root: Path, study_argv: list[str], output: Path) -> None:
    """In this process: ``root``'s study ``run`` with a loss recorder added to every Trainer
    (the code under test is not changed), then every run's losses and result to ``output``."""
    import importlib.util

    import lightning.pytorch as pl

    losses: dict[str, list[float]] = {}

    class Recorder(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.setdefault(trainer.logger.name, []).append(float(outputs["loss"]))

    original = pl.Trainer.__init__

    def patched(self, *args, **kwargs):
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), Recorder()]
        original(self, *args, **kwargs)

    pl.Trainer.__init__ = patched
    sys.path.insert(0, str(root / "benchmarks"))
    spec = importlib.util.spec_from_file_location("study", root / "benchmarks" / "study.py")
    study = importlib.util.module_from_spec(spec)
    sys.modules["study"] = study
    spec.loader.exec_module(study)
    study.main(study_argv)
    out = Path(study_argv[study_argv.index("--out") + 1])
    output.write_text(json.dumps({"losses": losses, "results": _results(out)}))


def _results(out: Path) -> dict[str, dict]:
    results = {}
    for path in sorted(out.glob("*/result.json")):
        result = json.loads(path.read_text())
        results[result["key"]] = {k: result.get(k) for k in (
            "test_acc", "val_acc", "layer_densities", "rewirings", "train_losses")}
    return results


def run_way(name: str, root: Path, study_argv: list[str], work: Path, threads: int) -> dict:
    """One way of running the study, in a fresh process with ``root``'s package first."""
    output = work / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, str(Path(__file__).resolve()), "_trace", str(root),
               str(output), "--", *study_argv]
    subprocess.run(command, check=True, env=env, cwd=work)
    return json.loads(output.read_text())


def compare(baseline_root: Path, data: Path | None, work: Path, epochs: int, batches: int,
            batch_size: int, seeds: int, threads: int) -> bool:
    data = data or fake_cifar(work / "fake.npz")
    common = ["--network", "resnet18", "--data", str(data), "--seeds", str(seeds),
              "--epochs", str(epochs), "--batch-size", str(batch_size), "--limit-batches",
              str(batches), "--precision", "bf16-mixed", "--device", "cpu"]
    ways = {
        "baseline": run_way("baseline", baseline_root,
                            ["run", "--workers", "0", "--out", str(work / "base"), *common],
                            work, threads),
        "this, in process": run_way("here", REPO, ["run", "--workers", "0", "--trace-losses",
                                                   "--out", str(work / "here"), *common],
                                    work, threads),
        "this, pool worker": run_way("pool", REPO, ["run", "--workers", "1", "--trace-losses",
                                                    "--out", str(work / "pool"), *common],
                                     work, threads),
    }
    base = ways["baseline"]
    same = True
    for key in sorted(base["results"]):
        reference = base["losses"][key]
        line = [f"{key}: {len(reference)} steps"]
        for name, way in ways.items():
            if name == "baseline":
                continue
            result = way["results"].get(key) or {}
            traced = way["losses"].get(key) or result.get("train_losses")
            equal = (traced == reference and result.get("train_losses") in (None, reference)
                     and all(result.get(k) == base["results"][key][k]
                             for k in ("test_acc", "layer_densities", "rewirings")))
            same &= equal
            line.append(f"{name}: {'identical' if equal else 'DIFFERENT'}")
        print("; ".join(line) + f"; losses {reference[0]:.6f} ... {reference[-1]:.6f}")
    return same


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_trace":
        root, output, study_argv = Path(argv[1]), Path(argv[2]), argv[4:]
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        _trace(root, study_argv, output)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline-root", type=Path, required=True,
                        help="a checkout (or git archive) of the baseline's lightning_ggr "
                             "and benchmarks")
    parser.add_argument("--data", type=Path, default=None, help="default: fake images")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--limit-batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        same = compare(args.baseline_root.resolve(), args.data, Path(folder), args.epochs,
                       args.limit_batches, args.batch_size, args.seeds, args.threads)
    print("every run identical to the baseline's" if same else "RUNS DIFFER from the baseline")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
