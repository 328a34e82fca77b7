"""Run the grid of the paper's Table 1 with the ``lightning-ggr`` command line.

The paper's four (model, dataset) pairs (MobileNetV2 and ResNet-18 on CIFAR-100, MobileNetV2
and VGG16 on Tiny-ImageNet) x method (SET, RigL, DSR, GGR) x sparsity (0.9, 0.97, 0.99) x
distribution (ERK, uniform), plus one dense run per pair: 4 x 25 = 100 runs per seed.
``--pairs`` also takes the zoo's two extras, VGG16 on CIFAR-100 and ResNet-18 on
Tiny-ImageNet: the paper never trains them, and ``report`` leaves them out of Table 2.
Each run is one ``lightning-ggr fit`` of a base config and a method overlay; it tests the
final weights (``test_after_fit``) and leaves its summary in
``<save-dir>/table1/<pair>/<method>_<distribution>_s<sparsity>_seed<seed>/``. Then::

    lightning-ggr report runs/table1

Usage::

    python examples/run_table1_grid.py --dry-run                 # print the 100 commands
    python examples/run_table1_grid.py --pairs cifar100_resnet18 --methods ggr rigl \\
        --sparsities 0.9 --seeds 0 1 2 --skip-existing
    python examples/run_table1_grid.py -- --trainer.max_epochs 1  # extra arguments per run
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from lightning_ggr.callbacks.summary import SUMMARY_FILENAME  # each finished run writes it

CONFIGS = Path(__file__).resolve().parent / "configs"
#: The paper's Table 1 (the four scenarios its Tables 2 and 3 average).
PAPER_PAIRS = ("cifar100_mobilenet_v2", "cifar100_resnet18", "tinyimagenet_mobilenet_v2",
               "tinyimagenet_vgg16")
#: Configs the zoo also has; the paper never trains these pairs.
EXTRA_PAIRS = ("cifar100_vgg16", "tinyimagenet_resnet18")
PAIRS = PAPER_PAIRS + EXTRA_PAIRS
METHODS = ("dense", "set", "rigl", "dsr", "ggr")
ABLATIONS = ("set_rigl", "ggr_set", "ggr_rigl")  # Table 3; pass them with --methods
SPARSITIES = (0.9, 0.97, 0.99)
DISTRIBUTIONS = ("erk", "uniform")


def _shown(path: Path) -> str:
    relative = os.path.relpath(path)
    return path.as_posix() if relative.startswith("..") else Path(relative).as_posix()


def grid(pairs: Sequence[str], methods: Sequence[str], sparsities: Sequence[float],
         distributions: Sequence[str], seeds: Sequence[int], configs: Path,
         save_dir: str) -> Iterator[tuple[str, list[str]]]:
    """Yield ``(run directory, lightning-ggr arguments)`` for every run of the grid."""
    for pair in pairs:
        for method in methods:
            # The dense reference does not depend on sparsity or distribution: run it once.
            settings = ([(0.0, "erk")] if method == "dense"
                        else [(s, d) for s in sparsities for d in distributions])
            for sparsity, distribution in settings:
                for seed in seeds:
                    version = ("dense" if method == "dense"
                               else f"{method}_{distribution}_s{sparsity:g}") + f"_seed{seed}"
                    args = ["fit", "--config", _shown(configs / f"{pair}.yaml"),
                            "--config", _shown(configs / "methods" / f"{method}.yaml")]
                    if method != "dense":
                        args += ["--trainer.callbacks.init_args.sparsity", f"{sparsity:g}",
                                 "--trainer.callbacks.init_args.distribution", distribution]
                    args += ["--trainer.callbacks.init_args.seed", str(seed),
                             "--seed_everything", str(seed),
                             "--trainer.logger.init_args.save_dir", save_dir,
                             "--trainer.logger.init_args.name", f"table1/{pair}",
                             "--trainer.logger.init_args.version", version]
                    yield str(Path(save_dir) / "table1" / pair / version), args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Arguments after -- go to every lightning-ggr run.")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument("--pairs", nargs="+", choices=PAIRS, default=list(PAPER_PAIRS),
                        help="default: the paper's four pairs; "
                        f"{' and '.join(EXTRA_PAIRS)} are extras, not in the paper")
    parser.add_argument("--methods", nargs="+", choices=METHODS + ABLATIONS,
                        default=list(METHODS))
    parser.add_argument("--sparsities", nargs="+", type=float, default=list(SPARSITIES))
    parser.add_argument("--distributions", nargs="+", choices=DISTRIBUTIONS,
                        default=list(DISTRIBUTIONS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--save-dir", default="runs", help="TensorBoard root (default: runs)")
    parser.add_argument("--configs", type=Path, default=CONFIGS,
                        help="folder of the base configs and methods/ overlays")
    parser.add_argument("--skip-existing", action="store_true",
                        help=f"skip runs whose folder already holds {SUMMARY_FILENAME}")
    parser.add_argument("--keep-going", action="store_true",
                        help="go on after a failed run (default: stop)")
    args = parser.parse_args(argv)
    for pair in args.pairs:
        if pair in EXTRA_PAIRS:
            print(f"note: {pair} is not in the paper's grid (an extra; report leaves it out "
                  "of Table 2)", file=sys.stderr)
    failed = []
    runs = list(grid(args.pairs, args.methods, args.sparsities, args.distributions, args.seeds,
                     args.configs, args.save_dir))
    for number, (run_dir, run_args) in enumerate(runs, 1):
        command = ["lightning-ggr", *run_args, *extra]
        if args.dry_run:
            print(shlex.join(command))
            continue
        if args.skip_existing and (Path(run_dir) / SUMMARY_FILENAME).exists():
            print(f"[{number}/{len(runs)}] done already: {run_dir}", flush=True)
            continue
        print(f"[{number}/{len(runs)}] {shlex.join(command)}", flush=True)
        code = subprocess.run([sys.executable, "-m", "lightning_ggr.zoo.cli", *run_args, *extra],
                              check=False).returncode
        if code:
            failed.append(run_dir)
            if not args.keep_going:
                print(f"run failed (exit code {code}): {run_dir}", file=sys.stderr)
                return code
    if failed:
        print(f"{len(failed)} run(s) failed:\n  " + "\n  ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
