"""The ``lightning-ggr`` command line: LightningCLI over any LightningModule and DataModule.

::

    lightning-ggr fit --config examples/configs/cifar100_resnet18.yaml \\
        --config examples/configs/methods/ggr.yaml \\
        --trainer.callbacks.init_args.sparsity 0.97
    lightning-ggr {fit,validate,test,predict} --help
    lightning-ggr fit --config ... --print_config
    lightning-ggr report RUN_DIRS...          # tables of finished runs (lightning_ggr.zoo.report)

Short ``class_path`` names resolve for the package's classes (``ImageClassifier``,
``CIFAR100DataModule``, ``TinyImageNetDataModule``, ``DigitsDataModule``,
``DynamicSparsityCallback``) and for Lightning's own. After ``fit`` the command prints the
final metrics, each sparse layer's density (unless the callback's fit-end account, printed
just before, already gave it) and where the logs are; with
``--test_after_fit true`` it first tests the final weights (so the run summary holds
``test/acc``). ``--num_threads N`` calls ``torch.set_num_threads(N)`` before anything is
built.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only
from torch import nn

# Imported so that jsonargparse finds these subclasses by their short class names.
from lightning_ggr.callbacks.reporting import scalar_metrics
from lightning_ggr.callbacks.sparsity import DynamicSparsityCallback
from lightning_ggr.sparse.selection import select_sparse_parameters
from lightning_ggr.zoo import (  # noqa: F401
    CIFAR100DataModule,
    DigitsDataModule,
    ImageClassifier,
    TinyImageNetDataModule,
)


class LightningGGRCLI(LightningCLI):
    """LightningCLI for any LightningModule / LightningDataModule given by ``class_path``.

    Adds ``--test_after_fit`` (test the final weights right after ``fit``, in the same
    process) and ``--num_threads``, and prints a summary after ``fit``.

    Args:
        args: command-line arguments (default: ``sys.argv[1:]``), a list or a dict.
        run: run the subcommand; ``False`` only instantiates (then use ``cli.trainer``).
        **kwargs: further ``LightningCLI`` arguments.
    """

    def __init__(self, args: ArgsType = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", LightningModule)
        # None (any LightningDataModule, by class_path) keeps ``--data`` optional: a module
        # with its own dataloaders runs without one.
        kwargs.setdefault("datamodule_class", None)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        # A re-run into the same fixed log folder (the Table-1 grid names its versions)
        # replaces the saved config.yaml instead of refusing to start.
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("parser_kwargs", {
            "prog": "lightning-ggr",
            "description": "Dynamic sparse training (GGR, SET, RigL, DSR) with Lightning. "
                           "Tables of finished runs: lightning-ggr report RUN_DIRS...",
        })
        #: Scalar metrics at the end of ``fit`` (and of the test, with ``test_after_fit``).
        self.final_metrics: dict[str, float] = {}
        super().__init__(args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit", type=bool, default=False,
            help="fit only: test the final weights on the test split right after training.",
        )
        parser.add_argument(
            "--num_threads", type=int | None, default=None,
            help="CPU threads of torch (torch.set_num_threads), set before anything is built; "
                 "default: torch's choice. Small models on CPU run fastest with 1.",
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        threads = config.get("num_threads")
        if threads is not None:
            if threads < 1:
                raise ValueError(f"num_threads must be >= 1, got {threads!r}")
            torch.set_num_threads(threads)

    def after_fit(self) -> None:
        """Optionally test, then print metrics, layer densities and the log folder."""
        trainer = self.trainer
        metrics = scalar_metrics(trainer.callback_metrics)
        if self.config.get(f"{self.subcommand}.test_after_fit", False) and not trainer.interrupted:
            trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            metrics.update(scalar_metrics(trainer.callback_metrics))
        self.final_metrics = metrics
        _print_summary(trainer, self.model, metrics)


def _printed_densities(trainer: Trainer, module: nn.Module) -> dict[str, float]:
    """Density of each sparse layer: the ``DynamicSparsityCallback``'s, or else the fraction of
    non-zeros of each weight the callback would make sparse by default.

    Args:
        trainer: the trainer that ran (its callbacks are searched).
        module: the trained LightningModule.
    """
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, DynamicSparsityCallback) and callback.masks:
            return callback.layer_densities()
    try:
        params = select_sparse_parameters(module)
    except ValueError:  # no layer the callback would make sparse
        return {}
    return {name: float((param != 0).float().mean()) for name, param in params.items()}


def format_density_table(densities: Mapping[str, float], module: nn.Module) -> str:
    """A text table: parameter, shape, active / total weights, density, and the global row.

    Args:
        densities: parameter name -> density.
        module: the module owning the parameters (for their shapes).
    """
    params = dict(module.named_parameters())
    width = max([len(name) for name in densities] + [len("parameter")])
    lines = [f"{'parameter':<{width}}  {'shape':<18} {'active':>11} {'total':>11}  density"]
    active_sum = total_sum = 0
    for name, density in densities.items():
        param = params.get(name)
        total = param.numel() if param is not None else 0
        active = round(density * total)
        active_sum += active
        total_sum += total
        shape = "x".join(map(str, param.shape)) if param is not None else "?"
        lines.append(f"{name:<{width}}  {shape:<18} {active:>11,} {total:>11,}  {density:7.4f}")
    overall = active_sum / total_sum if total_sum else float("nan")
    lines.append(
        f"{'global':<{width}}  {'':<18} {active_sum:>11,} {total_sum:>11,}  {overall:7.4f}"
    )
    return "\n".join(lines)


def format_metrics(metrics: Mapping[str, float]) -> str:
    """Every scalar metric, sorted by name (``(none logged)`` when there is none).

    Args:
        metrics: name -> value (``scalar_metrics(trainer.callback_metrics)``).
    """
    if not metrics:
        return "(none logged)"
    return ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items()))


def _account_printed(trainer: Trainer) -> bool:
    """Whether a ``DynamicSparsityCallback`` printed its fit-end account (which holds every
    sparse layer's final density)."""
    return any(isinstance(callback, DynamicSparsityCallback) and callback.fit_end_summary
               and callback.engine is not None
               for callback in trainer.callbacks)  # type: ignore[attr-defined]


@rank_zero_only
def _print_summary(trainer: Trainer, module: LightningModule, metrics: Mapping[str, float]) -> None:
    account = _account_printed(trainer)
    if account:  # the rewiring counts were just printed in the account
        metrics = {k: v for k, v in metrics.items() if not k.startswith("rewiring")}
    print("\nFinal metrics: " + format_metrics(metrics))
    densities = {} if account else _printed_densities(trainer, module)
    if densities:
        print("Per-layer density (active weights / all weights of each sparse layer):")
        print(format_density_table(densities, module))
    logger = trainer.logger
    if isinstance(logger, TensorBoardLogger):
        print(f"TensorBoard logs: {logger.log_dir}  (view: tensorboard --logdir "
              f"{logger.save_dir})")


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning-ggr`` console script.

    Args:
        args: arguments instead of ``sys.argv[1:]``.
    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv[:1] == ["report"]:
        from lightning_ggr.zoo.report import main as report_main

        sys.exit(report_main(argv[1:]))
    LightningGGRCLI(args=args)


if __name__ == "__main__":
    main()
