"""Trainer features and other callbacks that change what a sparse run means.

Each check runs before the first training step and says what to change: a refusal
(``ValueError``) where the result would silently break the contract (masked weights exactly
0 in the model the user keeps), a warning where it only changes what is measured.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import lightning.pytorch as pl
import lightning.pytorch.callbacks as pl_callbacks
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_ggr.callbacks.training_length import steps_before_epoch
from lightning_ggr.sparse.sharded import check_torch_for_sharding

# WeightAveraging (and EMAWeightAveraging) appeared in Lightning 2.6.
_WEIGHT_AVERAGING: type | None = getattr(pl_callbacks, "WeightAveraging", None)


#: How to train sharded with the callback, said by every refusal of a sharded strategy.
SHARDED_WAY = (
    "use Lightning's ModelParallelStrategy(data_parallel_size=<processes>, "
    "tensor_parallel_size=1) and apply torch.distributed.fsdp.fully_shard in the "
    "LightningModule's configure_model (FSDP2: parameters stay separate tensors, sharded "
    "along dim 0), or 'ddp' / a single device"
)


def check_strategy(trainer: pl.Trainer) -> bool:
    """Refuse the strategies the masks cannot follow, before any step; ``True`` when the
    run is sharded (``ModelParallelStrategy`` with data parallelism only).

    FSDP1 (``FSDPStrategy``) flattens the parameters into one buffer per wrapped module and
    DeepSpeed's ZeRO-3 partitions them (``param.grad`` is ``None``): a mask per parameter
    tensor, its gradient and its optimizer state have no place to apply. FSDP2 keeps each
    parameter a DTensor sharded along dim 0, which the engine masks shard by shard. Tensor
    parallelism shards along other dimensions and is refused until supported. Strategies
    are recognised by class name along the MRO (subclasses too, without importing optional
    packages).
    """
    strategy = trainer.strategy
    name = type(strategy).__name__
    lineage = [cls.__name__ for cls in type(strategy).__mro__]
    if any("ModelParallel" in cls for cls in lineage):
        check_torch_for_sharding()
        mesh = getattr(strategy, "device_mesh", None)
        names = tuple(getattr(mesh, "mesh_dim_names", None) or ())
        if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                f"DynamicSparsityCallback does not support tensor parallelism ({name} with "
                f"tensor_parallel_size={mesh['tensor_parallel'].size()}): its DTensors are "
                "sharded along other dimensions than the rows the sparse engine splits its "
                f"selections by. For sharded sparse training, {SHARDED_WAY}. Note that "
                "ModelParallelStrategy's default tensor_parallel_size='auto' takes every "
                "process of a node")
        return True
    if any(key in cls for cls in lineage for key in ("FSDP", "DeepSpeed")):
        why = ("flattens the parameters of each wrapped module into one buffer"
               if any("FSDP" in cls for cls in lineage) else
               "partitions the parameters and exposes no per-parameter gradient "
               "(ZeRO-3: param.grad is None)")
        raise ValueError(
            f"DynamicSparsityCallback does not support {name}: it {why}, so a mask per "
            f"parameter has nothing to apply to. For sharded sparse training, {SHARDED_WAY}")
    return False


def refuse_closure_optimizers(optimizer: torch.optim.Optimizer) -> None:
    """Refuse LBFGS: its line search evaluates the network several times per step.

    LBFGS keeps its history as flat vectors over all parameters (state of its first one) and
    calls its closure up to ``max_iter`` times per step; Lightning runs
    ``on_before_optimizer_step`` (where the callback rewires and masks gradients) in every
    call. Masked weights then move inside the line search, and the schedule's one-hook-per-step
    clock breaks. Clearing its history at every rewiring would defeat LBFGS.
    """
    inner = getattr(optimizer, "optimizer", optimizer)  # a LightningOptimizer wraps it
    if isinstance(inner, torch.optim.LBFGS):
        raise ValueError(
            "DynamicSparsityCallback does not support torch.optim.LBFGS (the optimizer holding "
            "the sparse weights): it keeps a flat history over all parameters and evaluates "
            "its closure several times per step, so masked weights would move inside its line "
            "search; use a first-order optimizer (SGD, Adam, ...)"
        )


def refuse_lottery_ticket_pruning(trainer: pl.Trainer) -> None:
    """Refuse ``ModelPruning`` that rewinds weights (``use_lottery_ticket_hypothesis``, its
    default): after each pruning it copies weights saved before the masks existed back into the
    model, dense values at masked positions included, so masked weights train and are
    evaluated until the end of fit. Both callbacks would own the weights' zeros."""
    for callback in trainer.callbacks:
        if (isinstance(callback, pl_callbacks.ModelPruning)
                and getattr(callback, "_use_lottery_ticket_hypothesis", False)):
            raise ValueError(
                "DynamicSparsityCallback cannot run next to ModelPruning(use_lottery_ticket_"
                "hypothesis=True) (its default): the rewind writes weights saved before the "
                "masks existed into masked positions. Pass use_lottery_ticket_hypothesis=False, "
                "or use one of the two callbacks"
            )


def check_weight_averaging(trainer: pl.Trainer, stop_step: int,
                           batches: float | None = None) -> None:
    """Refuse weight averaging that starts while rewiring still changes the topology.

    ``StochasticWeightAveraging`` and ``WeightAveraging`` (``EMAWeightAveraging``) average
    copies of the weights that the masks never reach, and copy the average into the model at
    the end: averaged snapshots taken before the last rewiring put non-zero values at masked
    positions. Averaging that starts at or after ``stop_step`` keeps exact zeros (the average
    of zeros), so it is allowed. Uses their public settings only (``should_update``,
    ``swa_start``). ``batches``: training batches per epoch (default: this process's).
    """
    if stop_step <= 0:
        return

    def steps_before(epoch: int) -> float:
        return steps_before_epoch(trainer, epoch, batches)
    for callback in trainer.callbacks:
        name = type(callback).__name__
        if _WEIGHT_AVERAGING is not None and isinstance(callback, _WEIGHT_AVERAGING):
            first = _first_update_before(callback.should_update, stop_step, steps_before)
            if first is not None:
                raise ValueError(
                    f"{name} updates its average {first}, while DynamicSparsityCallback still "
                    f"rewires until stop_step={stop_step}: the averaged model would keep weights "
                    "at masked positions. Start averaging at or after the stop, e.g. "
                    f"EMAWeightAveraging(update_starting_at_step={stop_step}), or lower "
                    "stop_step/stop_fraction"
                )
        elif isinstance(callback, pl_callbacks.StochasticWeightAveraging):
            start = callback.swa_start  # 0-based epoch of the first average (resolved by now)
            # Its average is taken when epoch `start` begins: after steps_before(start) steps.
            if steps_before(start) < stop_step:
                known = math.isfinite(steps_before(1))
                first_epoch = start + 1
                while known and steps_before(first_epoch) < stop_step:
                    first_epoch += 1
                hint = (f"StochasticWeightAveraging(swa_epoch_start={first_epoch + 1})"
                        if known else "a known epoch length")
                raise ValueError(
                    f"{name} averages from epoch {start} on, while DynamicSparsityCallback "
                    f"still rewires until stop_step={stop_step}: the averaged model would keep "
                    "weights at masked positions. Start averaging after the stop, with "
                    f"{hint}, or lower stop_step/stop_fraction"
                )


def _first_update_before(should_update: Callable[..., bool], stop_step: int,
                         steps_before: Callable[[int], float]) -> str | None:
    """Where ``should_update`` first averages weights older than the last rewiring, in words.

    An update after step index ``s`` (Lightning's ``step_idx = global_step - 1``) averages
    the weights left by steps ``0..s``; the last scheduled rewiring runs in step
    ``stop_step - 1``. An update after epoch ``e`` averages the weights left by the
    ``steps_before(e + 1)`` steps of epochs ``0..e``.
    """
    for step_idx in range(stop_step - 1):
        if should_update(step_idx=step_idx):
            return f"after step {step_idx}"
    if math.isfinite(steps_before(1)) and steps_before(1) > 0:
        epoch = 0
        while steps_before(epoch + 1) < stop_step:
            if should_update(epoch_idx=epoch):
                return f"after epoch {epoch}"
            epoch += 1
    return None


def warn_if_learning_rate_finder(trainer: pl.Trainer) -> None:
    """Warn that a learning-rate search tunes the dense network.

    ``Tuner.lr_find`` (and a ``LearningRateFinder`` callback) run the search with the
    Trainer's callbacks replaced: none of this callback's hooks run. From ``Tuner.lr_find``
    it even runs before this callback draws its masks (tuner callbacks go first).
    """
    if any(isinstance(cb, pl_callbacks.LearningRateFinder) for cb in trainer.callbacks):
        rank_zero_warn(
            "a learning-rate search (Tuner.lr_find or LearningRateFinder) runs without "
            "DynamicSparsityCallback's hooks, and from Tuner.lr_find before the masks are "
            "drawn: it tunes the learning rate of the dense network, not of the sparse one. "
            "Search with the sparse model by hand (a short fit per rate), or accept the "
            "dense network's rate"
        )
