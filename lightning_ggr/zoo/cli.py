"""The ``lightning-ggr`` command line: LightningCLI over any LightningModule and DataModule.

::

    lightning-ggr fit --config examples/configs/cifar100_resnet18.yaml \\
        --config examples/configs/methods/ggr.yaml \\
        --trainer.callbacks.init_args.sparsity 0.97
    lightning-ggr {fit,validate,test,predict} --help
    lightning-ggr fit --config ... --print_config
    lightning-ggr report RUN_DIRS...          # tables of finished runs (lightning_ggr.zoo.report)
    lightning-ggr export CHECKPOINT_OR_RUN_DIR [--output FILE]   # the sparse model file

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

import argparse
import io
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
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
from lightning_ggr.sparse.export import save_sparse_model
from lightning_ggr.sparse.selection import select_sparse_parameters
from lightning_ggr.zoo import (  # noqa: F401
    CIFAR100DataModule,
    DigitsDataModule,
    ImageClassifier,
    TinyImageNetDataModule,
)
from lightning_ggr.zoo.models import MODEL_NAMES, build_model


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
                           "Tables of finished runs: lightning-ggr report RUN_DIRS...; a "
                           "run's sparse model file: lightning-ggr export CHECKPOINT",
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


# ---------------------------------------------------------------------------------- export


@dataclass
class ExportResult:
    """What :func:`export_checkpoint` wrote: the file, its size against the dense
    ``state_dict`` file, and how to rebuild the network."""

    checkpoint: Path
    output: Path
    file_bytes: int
    dense_bytes: int
    network: dict[str, Any]
    masks: int

    @property
    def ratio(self) -> float:
        """The sparse file's size over the dense ``state_dict`` file's."""
        return self.file_bytes / self.dense_bytes


def _find_checkpoint(path: Path) -> Path:
    """``path`` itself, or in a run folder its ``last.ckpt``, else its newest ``*.ckpt``."""
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"no checkpoint or run folder at {str(path)!r}")
    found = sorted(path.rglob("*.ckpt"), key=lambda p: (p.name == "last.ckpt",
                                                         p.stat().st_mtime))
    if not found:
        raise FileNotFoundError(f"no *.ckpt under {str(path)!r} (was the run fitted with "
                                "trainer.enable_checkpointing true?)")
    return found[-1]


def _checkpoint_masks(checkpoint: Mapping[str, Any], path: Path) -> dict[str, Any]:
    """The sparsity callback's state in a Lightning checkpoint (the one holding masks)."""
    states = {key: state for key, state in (checkpoint.get("callbacks") or {}).items()
              if isinstance(state, Mapping) and "masks" in state}
    if not states:
        raise ValueError(f"{str(path)!r} holds no DynamicSparsityCallback state with masks "
                         "(was the run trained with the callback?)")
    if len(states) > 1:
        raise ValueError(f"{str(path)!r} holds the states of {len(states)} sparsity callbacks "
                         f"({', '.join(map(repr, states))}); export from Python with "
                         "save_sparse_model(network, callback.masks, path)")
    return dict(next(iter(states.values())))


def export_checkpoint(path: str | Path, output: str | Path | None = None) -> ExportResult:
    """Write the sparse model file of a zoo run's checkpoint (its network, not the
    LightningModule): :func:`~lightning_ggr.sparse.export.save_sparse_model` with the
    callback's masks, the network's settings as metadata.

    Args:
        path: a ``.ckpt`` file, or a run folder (its ``last.ckpt``, else its newest one).
        output: the file to write; default: the checkpoint's name with ``.sparse.pt``.

    Raises:
        FileNotFoundError: no checkpoint.
        ValueError: not an ``ImageClassifier`` checkpoint of a zoo network, or no masks.
    """
    checkpoint_path = _find_checkpoint(Path(path))
    checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    hyper = checkpoint.get("hyper_parameters") or {}
    if hyper.get("model") not in MODEL_NAMES:
        raise ValueError(
            f"{str(checkpoint_path)!r} is not a checkpoint of ImageClassifier with a zoo network "
            f"({', '.join(MODEL_NAMES)}); for another LightningModule call "
            "lightning_ggr.save_sparse_model(module.<network>, callback.masks, path)"
        )
    network = {key: hyper[key] for key in ("model", "num_classes", "input_size",
                                           "in_channels") if key in hyper}
    model = build_model(network["model"], network.get("num_classes", 100),
                        network.get("input_size", 32), network.get("in_channels", 3))
    state = _checkpoint_masks(checkpoint, checkpoint_path)
    prefix = "model."
    try:
        model.load_state_dict({key[len(prefix):]: value
                               for key, value in checkpoint["state_dict"].items()
                               if key.startswith(prefix)})
    except RuntimeError as error:
        raise ValueError(f"the weights in {str(checkpoint_path)!r} do not fit the network its "
                         f"hyper-parameters name ({network}): {error}") from error
    target = Path(output) if output is not None else checkpoint_path.with_suffix(".sparse.pt")
    metadata = {**network, "checkpoint": checkpoint_path.name,
                "global_step": checkpoint.get("global_step"),
                **{key: state[key] for key in ("method", "sparsity", "distribution")
                   if key in state}}
    save_sparse_model(model, state["masks"], target, metadata=metadata)
    dense = io.BytesIO()
    torch.save(model.state_dict(), dense)
    return ExportResult(checkpoint_path, target, target.stat().st_size, len(dense.getvalue()),
                        network, len(state["masks"]))


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.2f} MB"


def export_main(argv: Sequence[str] | None = None) -> int:
    """``lightning-ggr export CHECKPOINT_OR_RUN_DIR [--output FILE]``."""
    parser = argparse.ArgumentParser(
        prog="lightning-ggr export",
        description="Write a zoo run's trained sparse network as a sparse model file (active "
        "weights and their positions; lightning_ggr.load_sparse_model reads it) and print its "
        "size against the dense state_dict file.",
    )
    parser.add_argument("checkpoint", metavar="CHECKPOINT_OR_RUN_DIR",
                        help="a .ckpt file, or a run folder (its last.ckpt, else the newest)")
    parser.add_argument("--output", metavar="FILE", default=None,
                        help="the file to write (default: the checkpoint's name with "
                        ".sparse.pt)")
    args = parser.parse_args(argv)
    try:
        result = export_checkpoint(args.checkpoint, args.output)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    net = result.network
    example = (f"torch.zeros(1, {net.get('in_channels', 3)}, {net.get('input_size', 32)}, "
               f"{net.get('input_size', 32)})")
    print(f"Exported {result.checkpoint} -> {result.output}\n"
          f"  sparse file {_megabytes(result.file_bytes)}, dense state_dict "
          f"{_megabytes(result.dense_bytes)}: {result.ratio:.1%} ({result.masks} sparse "
          "tensors)\n"
          "Rebuild and convert it where it runs:\n"
          f"  model = lightning_ggr.zoo.build_model({net['model']!r}, "
          f"{net.get('num_classes', 100)}, {net.get('input_size', 32)}, "
          f"{net.get('in_channels', 3)})\n"
          f"  masks = lightning_ggr.load_sparse_model(model, {str(result.output)!r})\n"
          f"  fast = lightning_ggr.to_inference(model, masks, {example})")
    return 0


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning-ggr`` console script.

    Args:
        args: arguments instead of ``sys.argv[1:]``.
    """
    argv = sys.argv[1:] if args is None else args
    if isinstance(argv, list) and argv[:1] == ["report"]:
        from lightning_ggr.zoo.report import main as report_main

        sys.exit(report_main(argv[1:]))
    if isinstance(argv, list) and argv[:1] == ["export"]:
        sys.exit(export_main(argv[1:]))
    LightningGGRCLI(args=args)


if __name__ == "__main__":
    main()
