"""Bad arguments fail before training with a message naming them; extreme sparsity is safe."""

from __future__ import annotations

import re
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn

from lightning_ggr import DynamicSparsityCallback, SparseEngine, select_sparse_parameters
from lightning_ggr.callbacks.compatibility import check_strategy
from tests.helpers import SPARSE_NAMES, TinyModule, make_trainer, tiny_dataloader

# (argument, bad value, exception, what the message must say besides the name and the value)
BAD_ARGUMENTS = [
    ("sparsity", 1.0, ValueError, r"real number in \[0, 1\)"),
    ("sparsity", -0.1, ValueError, r"\[0, 1\)"),
    ("sparsity", float("nan"), ValueError, r"\[0, 1\)"),
    ("sparsity", 90, ValueError, r"\[0, 1\).*did you mean 0\.9\?"),
    ("sparsity", "0.9", TypeError, "real number"),
    ("sparsity", True, TypeError, "real number"),
    ("method", "rigl2", ValueError, "'set', 'rigl', 'dsr', 'ggr'"),
    ("method", "GGR", ValueError, "'ggr'"),
    ("distribution", "normal", ValueError, "'erk', 'uniform'"),
    ("drop_fraction", 0.0, ValueError, r"\(0, 1\]"),
    ("drop_fraction", 1.5, ValueError, r"\(0, 1\], got 1\.5$"),
    ("update_interval", 0, ValueError, ">= 1"),
    ("update_interval", -3, ValueError, ">= 1"),
    ("update_interval", 2.0, TypeError, "int"),
    ("interval", "batch", ValueError, "'step', 'epoch'"),
    ("stop_fraction", 0.0, ValueError, r"\(0, 1\]"),
    ("stop_fraction", 1.01, ValueError, r"\(0, 1\]"),
    ("stop_step", 0, ValueError, ">= 1"),
    ("stop_step", 10.5, TypeError, "int"),
    ("gradient_ratio", -0.01, ValueError, r"\[0, 1\]"),
    ("gradient_ratio", 1.01, ValueError, r"\[0, 1\]"),
    ("init_value", float("inf"), ValueError, "finite"),
    ("init_value", "small", TypeError, "finite real number"),
    ("seed", -1, ValueError, r"\[0, 2\*\*64\)"),
    ("seed", 2**64, ValueError, r"\[0, 2\*\*64\)"),
    ("seed", 1.5, TypeError, "int"),
    ("include", "net.0.weight", TypeError, "list of name patterns"),
    ("include", [], ValueError, "non-empty list"),
    ("exclude", [3], TypeError, "list of name patterns"),
    ("dsr_tolerance", 0.0, ValueError, r"\(0, 1\)"),
    ("dsr_tolerance", 1.0, ValueError, r"\(0, 1\)"),
    ("log_figures", "yes", TypeError, "bool"),
    ("mask_layers", "net.0.weight", TypeError, "list of name patterns"),
    ("selection_summary", "yes", TypeError, "bool"),
    ("update_grown_weights", "no", TypeError, "bool"),
    ("reinit_regrown", 1, TypeError, "bool"),
    ("enforce_masks_every_step", "yes", TypeError, "bool"),
    ("dsr_initial_threshold", 0.0, ValueError, r"finite real number > 0, or None"),
    ("dsr_initial_threshold", -1e-3, ValueError, r"> 0"),
    ("dsr_initial_threshold", float("nan"), ValueError, r"finite"),
    ("dsr_initial_threshold", float("inf"), ValueError, r"finite"),
    ("dsr_initial_threshold", "1e-3", TypeError, r"finite real number > 0, or None"),
]


@pytest.mark.parametrize(("argument", "value", "error", "allowed"), BAD_ARGUMENTS,
                         ids=[f"{a}={v!r}" for a, v, _, _ in BAD_ARGUMENTS])
def test_bad_constructor_argument_is_refused_by_name(argument, value, error, allowed):
    with pytest.raises(error) as caught:
        DynamicSparsityCallback(**{argument: value})
    message = str(caught.value)
    assert message.startswith(argument), message
    assert repr(value) in message, message
    assert re.search(allowed, message), message


# ----------------------------------------------------------- refused before the first step
class NoSparseLayer(TinyModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.LayerNorm(108), nn.Flatten())
        self.head = nn.Parameter(torch.zeros(108, 4))

    def forward(self, x):
        return self.net(x) @ self.head


def refused_before_training(tmp_path, model, error, match, **callback_kwargs):
    callback_kwargs = {"log_figures": False, "interval": "step", "update_interval": 2,
                       **callback_kwargs}
    sparse = DynamicSparsityCallback(**callback_kwargs)
    trainer = make_trainer(tmp_path, [sparse], max_epochs=2)
    with pytest.raises(error, match=match):
        trainer.fit(model, tiny_dataloader())
    assert model.seen_batches == [], "training started before the error"


@pytest.mark.parametrize(
    ("model", "kwargs", "match"),
    [
        (TinyModule, {"include": ["net.*.bias", "head.*"]}, r"include pattern 'head\.\*' "
                                                           "matches no parameter"),
        (TinyModule, {"exclude": ["classifier.*"]}, r"exclude pattern 'classifier\.\*' matches "
                                                   "no selected sparse parameter"),
        (NoSparseLayer, {}, "the model has no sparse parameter"),
        # 312 weights in 3 layers: sparsity 0.995 leaves 2 active weights, fewer than 3 layers.
        (TinyModule, {"sparsity": 0.995, "distribution": "erk"},
         r"sparsity=0\.995 leaves 2 active weights for the 3 sparse layers.*at most 0\.990385"),
        (TinyModule, {"sparsity": 0.999, "distribution": "uniform"},
         r"sparsity=0\.999 leaves 0 active weights"),
        (TinyModule, {"stop_step": 2}, r"stop point \(stop_step=2\) comes at or before the "
                                       "first rewiring at step 2"),
        # stop_fraction of a 16-step run: stop at step 1, before the first rewiring at step 2.
        (TinyModule, {"stop_fraction": 0.1}, r"stop_fraction=0\.1 of 16 steps = step 1"),
    ],
    ids=["include", "exclude", "no-sparse-layer", "erk-infeasible",
         "uniform-infeasible", "stop-step-before-start", "stop-fraction-before-start"],
)
def test_what_only_the_model_tells_is_refused_before_the_first_step(tmp_path, model, kwargs,
                                                                    match):
    refused_before_training(tmp_path, model(), ValueError, match, **kwargs)


def test_epoch_interval_that_never_rewires_warns(tmp_path):
    sparse = DynamicSparsityCallback(interval="epoch", stop_fraction=0.5, log_figures=False)
    with pytest.warns(UserWarning, match=r"start of epoch 1, step 8\): no rewiring will run"):
        make_trainer(tmp_path, [sparse], max_epochs=2).fit(TinyModule(), tiny_dataloader())
    assert sparse.engine.rewirings == 0


class MySharded(FSDPStrategy):
    """A user's strategy built on FSDP under another name."""


class FakeMesh:
    """Lightning's 2-D device mesh of ModelParallelStrategy, by dimension sizes."""

    mesh_dim_names = ("data_parallel", "tensor_parallel")

    def __init__(self, data: int, tensor: int) -> None:
        self.sizes = {"data_parallel": data, "tensor_parallel": tensor}

    def __getitem__(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(size=lambda: self.sizes[name])


def model_parallel(data: int, tensor: int) -> ModelParallelStrategy:
    strategy = ModelParallelStrategy(data_parallel_size=data, tensor_parallel_size=tensor)
    strategy._device_mesh = FakeMesh(data, tensor)  # as after setup_environment
    return strategy


@pytest.mark.parametrize(
    ("strategy", "why"),
    [(FSDPStrategy(), "flattens the parameters"),
     (DeepSpeedStrategy.__new__(DeepSpeedStrategy), r"ZeRO-3: param.grad is None"),
     (MySharded(), "flattens the parameters"),
     (model_parallel(1, 2), r"tensor parallelism \(ModelParallelStrategy with "
                            r"tensor_parallel_size=2\)")],
    ids=["fsdp", "deepspeed", "fsdp-subclass", "tensor-parallel"],
)
def test_unsupported_sharded_strategies_are_refused_in_setup(strategy, why):
    # FSDP and DeepSpeed need a GPU or an extra package to build a Trainer; setup only reads
    # the trainer's strategy (and, after the check, its model and checkpoint callbacks).
    trainer = SimpleNamespace(strategy=strategy, checkpoint_callbacks=[])
    sparse = DynamicSparsityCallback(log_figures=False)
    with pytest.raises(ValueError, match=rf"does not support .*{why}.*ModelParallelStrategy\("
                                         r"data_parallel_size=<processes>, "
                                         r"tensor_parallel_size=1\)"):
        sparse.setup(trainer, TinyModule(), "fit")


def test_model_parallel_with_data_parallelism_only_is_sharded():
    assert check_strategy(SimpleNamespace(strategy=model_parallel(2, 1)))
    assert not check_strategy(SimpleNamespace(strategy=SimpleNamespace()))


def test_ddp_and_single_device_strategies_pass_setup(tmp_path):
    for strategy in ("ddp", "ddp_spawn", "auto"):
        trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=strategy, logger=False,
                             default_root_dir=tmp_path)
        DynamicSparsityCallback(log_figures=False).setup(trainer, TinyModule(), "fit")


# ------------------------------------------------------------------------- extreme sparsity
class TinyLayers(TinyModule):
    """Two layers with fewer than a dozen weights next to two big ones (1811 weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 1, 1),  # 3 weights
            nn.Conv2d(1, 2, 2),  # 8 weights
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(2, 300),  # 600 weights
            nn.ReLU(),
            nn.Linear(300, 4),  # 1200 weights
        )


class Counts(pl.Callback):
    """Every layer keeps >= 1 active weight at init and after every step; totals conserved."""

    def __init__(self) -> None:
        self.minimum_seen: dict[str, int] = {}
        self.steps = 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        sparse = trainer.callbacks[0]
        params = dict(pl_module.named_parameters())
        for name, mask in sparse.masks.items():
            count = int(mask.sum())
            self.minimum_seen[name] = min(count, self.minimum_seen.get(name, count))
            assert (params[name][~mask] == 0).all()
            assert torch.isfinite(params[name]).all()
        assert sum(int(m.sum()) for m in sparse.masks.values()) == sum(
            sparse.initial_counts.values())
        self.steps += 1


@pytest.mark.parametrize("method", ["ggr", "set", "rigl", "dsr"])
@pytest.mark.parametrize(
    ("model", "sparsity", "distribution"),
    [(TinyModule, 0.99, "uniform"),  # 3 active weights for 3 layers: one each
     (TinyLayers, 0.995, "uniform"),  # 9 active weights; the small layers hold 1 each
     (TinyLayers, 0.99, "erk")],
    ids=["one-per-layer", "tiny-layers-uniform", "tiny-layers-erk"],
)
def test_extreme_sparsity_keeps_one_weight_per_layer_through_every_rewiring(
        tmp_path, method, model, sparsity, distribution):
    # Drop fraction 1: every rewiring tries to take every active weight of every layer.
    sparse = DynamicSparsityCallback(method=method, sparsity=sparsity, distribution=distribution,
                                     interval="step", update_interval=1, stop_step=8,
                                     drop_fraction=1.0, log_figures=False)
    counts = Counts()
    make_trainer(tmp_path, [sparse, counts], max_epochs=1).fit(model(), tiny_dataloader())
    assert counts.steps == 8
    assert sparse.engine.rewirings == 7
    assert set(counts.minimum_seen) == set(sparse.masks)
    assert min(counts.minimum_seen.values()) >= 1
    if distribution == "uniform":  # the edge case is really reached: a layer holds one weight
        assert min(counts.minimum_seen.values()) == 1


def test_budget_of_exactly_one_weight_per_layer_is_accepted():
    # 312 weights, 3 layers: the largest sparsity keeping one weight per layer.
    params = select_sparse_parameters(TinyModule())
    engine = SparseEngine(params, sparsity=1 - 3 / 312, method="ggr")
    assert engine.active_counts() == dict.fromkeys(SPARSE_NAMES, 1)
    with pytest.raises(ValueError, match="leaves 2 active weights for the 3 sparse layers"):
        SparseEngine(params, sparsity=1 - 2 / 312, method="ggr")


def test_model_parallel_without_fully_shard_warns():
    """Nothing sharded under ModelParallelStrategy: the user forgot fully_shard."""
    sparse = DynamicSparsityCallback()
    sparse._sharded = True
    sparse.engine = SimpleNamespace(layout=None)
    run = SimpleNamespace(strategy=SimpleNamespace())
    with pytest.warns(UserWarning, match="no sparse parameter is sharded .* apply "
                                         "torch.distributed.fsdp.fully_shard"):
        sparse._warn_if_not_sharded(run)
    sparse.engine = SimpleNamespace(layout=object())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparse._warn_if_not_sharded(run)
