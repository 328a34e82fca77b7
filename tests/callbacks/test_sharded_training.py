"""DynamicSparsityCallback under Lightning's ModelParallelStrategy (FSDP2), 2 CPU ranks.

Each run trains a small transformer (attention, MLP, an embedding tied to the output
projection) sharded with ``fully_shard`` in ``configure_model``; the checks run inside hooks
on every rank (see ``tests/helpers/sharded.py``) and rank 0 records what ran.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_ggr import DynamicSparsityCallback
from lightning_ggr.sparse.sharded import consolidate_masks
from tests.helpers.sharded import (
    Scribbler,
    ShardedChecks,
    TinyTransformer,
    full,
    reference_masks,
    spawn_lightning,
    token_dataloader,
    trainer,
)

pytestmark = [pytest.mark.ddp, pytest.mark.slow, pytest.mark.timeout(300)]

SPARSE = ["attention.in_proj_weight", "attention.out_proj.weight", "embed.weight",
          "mlp.0.weight", "mlp.2.weight"]


def _fit(rank: int, world: int, root: str, settings: dict, module: dict, fit: dict) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger

    sparse = DynamicSparsityCallback(**settings)
    checks = ShardedChecks(str(Path(root) / "record.json"), reference_masks(settings, **module))
    callbacks = [sparse, checks]
    if fit.pop("tensorboard", False):
        fit["logger"] = TensorBoardLogger(root, name="logs")
    if fit.pop("scribble", False):
        callbacks.append(Scribbler(str(Path(root) / "scribbled.json")))
    run = trainer(root, callbacks, world, max_epochs=2, **fit)
    run.fit(TinyTransformer(**module), token_dataloader())


@pytest.mark.parametrize(("method", "distribution", "module", "fit"), [
    # enforce_masks_every_step against writes into masked weights (before the forward
    # pass and before the optimizer step)
    ("set", "erk", {}, {"scribble": True}),
    ("rigl", "uniform", {"optimizer": "sgd"}, {}),
    # the tied embedding left unsharded (replicated: rank 0 decides its rewiring)
    ("dsr", "uniform", {"partly": True}, {}),
    # FSDP2's mixed precision (bf16 compute, fp32 reduction), clipping of DTensor
    # gradients, TensorBoard views and the run summary computed across shards
    ("ggr", "erk", {"mixed": True}, {"gradient_clip_val": 0.05, "tensorboard": True}),
], ids=["set-enforced-every-step", "rigl-sgd", "dsr-partly-sharded",
        "ggr-mixed-clipped-reported"])
def test_every_method_keeps_the_engine_guarantees_on_fsdp2_shards(tmp_path, method,
                                                                  distribution, module, fit):
    """Masked weights, gradients and optimizer state stay zero over whole layers at every
    step, counts match, masks agree on both ranks, the initial masks are a single-process
    engine's, and the rewirings move weights (the tied embedding is one sparse tensor).
    With ``enforce_masks_every_step`` the masks are applied to the shards before FSDP2
    gathers them for the forward pass (the root's own parameters too) and after every
    step, whatever wrote into the masked weights."""
    settings = {"method": method, "distribution": distribution, "sparsity": 0.7,
                "interval": "step", "update_interval": 2, "drop_fraction": 0.3,
                "stop_fraction": 0.9, "log_figures": "tensorboard" in fit,
                "selection_summary": False, "mask_layers": ["mlp.0.weight"],
                "enforce_masks_every_step": "scribble" in fit}
    spawn_lightning(_fit, str(tmp_path), settings, module, fit)
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["steps"] == record["checks"] == 8  # 32 samples, 2 ranks, batch 4, 2 epochs
    assert record["rewirings"] == 3  # steps 2, 4, 6 (stop at 0.9 * 8)
    replicated = ["embed.weight"] if module.get("partly") else []
    assert record["layout"] == [n for n in SPARSE if n not in replicated]
    assert record["replicated"] == replicated
    assert record["changed"]  # the topology moved
    if "scribble" in fit:
        scribbled = json.loads((tmp_path / "scribbled.json").read_text())
        # 8 steps: two layers checked per forward pass, two writes per step
        assert scribbled == {"forward_checks": 16, "scribbled": 16}
    if "tensorboard" not in fit:
        return
    summary = json.loads(next(tmp_path.glob("logs/*/lightning_ggr_summary.json")).read_text())
    assert summary["method"] == "ggr" and set(summary["layers"]) == set(SPARSE)
    for name, layer in summary["layers"].items():
        assert layer["density"] == pytest.approx(record["densities"][name])
    analysis = summary["analysis"]["layers"]["mlp.0.weight"]
    assert analysis["neurons"] == 17 and analysis["inputs"] == 10
    assert "flops" not in summary  # a forward pass on rank 0 alone would hang
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next(tmp_path.glob("logs/*"))), size_guidance={
        "images": 0, "histograms": 0}).Reload()
    assert "masks/mlp.0.weight" in events.Tags()["images"]
    assert {f"weights/{name}" for name in SPARSE} <= set(events.Tags()["histograms"])


# ------------------------------------------------------------------------------- resume
SETTINGS = {"method": "ggr", "sparsity": 0.7, "interval": "step", "update_interval": 2,
            "stop_step": 7, "drop_fraction": 0.3, "log_figures": False,
            "selection_summary": False}


def _state(run, sparse) -> dict:
    """Whole weights, masks, optimizer state and the callback's bookkeeping."""
    engine = sparse.engine
    optimizer = run.optimizers[0]
    state = {"weights": {n: full(p.detach()).clone() for n, p in run.lightning_module
                         .named_parameters()},
             "masks": {n: full(m).clone() for n, m in engine.masks.items()},
             "optimizer": {n: {k: full(v).clone() for k, v in optimizer.state[p].items()
                               if isinstance(v, torch.Tensor) and v.dim()}
                           for n, p in engine.params.items()},
             "rewirings": engine.rewirings, "steps": sparse.clock.steps,
             "generator": engine.generator.get_state()}
    return state


def _straight_and_saved(rank: int, world: int, root: str, distributed: bool = True) -> None:
    sparse = DynamicSparsityCallback(**SETTINGS)
    saver = ModelCheckpoint(dirpath=root, filename="mid-{epoch}", every_n_epochs=1,
                            save_top_k=-1)
    run = trainer(root, [sparse, saver], world, max_epochs=2, enable_checkpointing=True,
                  save_distributed_checkpoint=distributed)
    run.fit(TinyTransformer(), token_dataloader())
    state = _state(run, sparse)
    if rank == 0:
        torch.save(state, Path(root) / "straight.pt")


def _resumed(rank: int, world: int, checkpoint: str, out: str) -> None:
    sparse = DynamicSparsityCallback(**SETTINGS)
    seen = {}

    class Restored(ShardedChecks):  # masks and bookkeeping right after the restore
        def on_train_start(self, trainer, pl_module) -> None:
            seen["masks"] = {n: full(m).clone() for n, m in sparse.engine.masks.items()}
            seen["rewirings"] = sparse.engine.rewirings
            super().on_train_start(trainer, pl_module)

    checks = Restored(str(Path(out) / "record.json"))
    run = trainer(out, [sparse, checks], world, max_epochs=2)
    run.fit(TinyTransformer(), token_dataloader(), ckpt_path=checkpoint)
    state = _state(run, sparse)
    if rank == 0:
        torch.save({"restored": seen, "final": state}, Path(out) / "resumed.pt")


def test_sharded_checkpoint_resumes_bit_exact_and_on_one_rank(tmp_path):
    """A run of 2 epochs saves a distributed checkpoint after the first: the masks travel
    as shards of the model's buffers (no whole mask in the callback state), a resume on 2
    ranks ends bit-exact with the straight run (weights, masks, AdamW state, schedule,
    generator), and a resume on 1 rank restores the same masks resharded and trains on."""
    straight = tmp_path / "straight"
    spawn_lightning(_straight_and_saved, str(straight))
    checkpoint = straight / "mid-epoch=0.ckpt"  # a folder: one .distcp file per rank
    assert checkpoint.is_dir() and any(checkpoint.glob("*.distcp"))
    meta = torch.load(checkpoint / "meta.pt", weights_only=False)
    callback_state = meta["callbacks"]["DynamicSparsityCallback"]
    assert callback_state["masks"] == {} and sorted(callback_state["mask_names"]) == SPARSE
    expected = torch.load(straight / "straight.pt", weights_only=False)

    two = tmp_path / "two"
    two.mkdir()
    spawn_lightning(_resumed, str(checkpoint), str(two))
    resumed = torch.load(two / "resumed.pt", weights_only=False)["final"]
    for key in ("weights", "masks"):
        for name, value in expected[key].items():
            assert torch.equal(resumed[key][name], value), (key, name)
    for name, state in expected["optimizer"].items():
        for key, value in state.items():
            assert torch.equal(resumed["optimizer"][name][key], value), (name, key)
    assert (resumed["rewirings"], resumed["steps"]) == (expected["rewirings"],
                                                          expected["steps"])
    assert torch.equal(resumed["generator"], expected["generator"])

    one = tmp_path / "one"
    one.mkdir()
    spawn_lightning(_resumed, str(checkpoint), str(one), world=1)
    restored = torch.load(one / "resumed.pt", weights_only=False)
    mid = torch.load(two / "resumed.pt", weights_only=False)["restored"]
    consolidated = consolidate_masks(checkpoint)  # one process, the masks alone
    for name, mask in mid["masks"].items():
        assert torch.equal(restored["restored"]["masks"][name], mask), name
        assert torch.equal(consolidated[name], mask), name
    assert restored["restored"]["rewirings"] == mid["rewirings"] > 0
    record = json.loads((one / "record.json").read_text())
    assert record["steps"] == 8  # the second epoch alone: 32 samples, batch 4, one rank


def test_a_consolidated_checkpoint_holds_whole_masks_and_resumes_bit_exact(tmp_path):
    """``ModelParallelStrategy(save_distributed_checkpoint=False)``: Lightning gathers one
    file on rank 0; the masks travel in it as the model's whole ``<parameter>_sparse_mask``
    buffers (not in the callback's state), and a resume on 2 ranks reshards them and ends
    bit-exact with the straight run."""
    straight = tmp_path / "straight"
    spawn_lightning(_straight_and_saved, str(straight), False)
    checkpoint = straight / "mid-epoch=0.ckpt"
    assert checkpoint.is_file()
    saved = torch.load(checkpoint, weights_only=False)
    assert saved["callbacks"]["DynamicSparsityCallback"]["masks"] == {}
    masks = {name.removesuffix("_sparse_mask"): value
             for name, value in saved["state_dict"].items() if name.endswith("_sparse_mask")}
    assert sorted(masks) == SPARSE
    assert masks["mlp.0.weight"].shape == saved["state_dict"]["mlp.0.weight"].shape
    two = tmp_path / "two"
    two.mkdir()
    spawn_lightning(_resumed, str(checkpoint), str(two))
    resumed = torch.load(two / "resumed.pt", weights_only=False)
    expected = torch.load(straight / "straight.pt", weights_only=False)
    for name, mask in masks.items():
        assert torch.equal(resumed["restored"]["masks"][name], mask), name
    for key in ("weights", "masks"):
        for name, value in expected[key].items():
            assert torch.equal(resumed["final"][key][name], value), (key, name)
    assert resumed["final"]["rewirings"] == expected["rewirings"] > 0


def test_ddp_with_a_logger_writes_the_summary_without_a_rank_0_only_collective(tmp_path):
    """Regression: the run summary read ``trainer.log_dir`` on rank 0 only, and
    ``log_dir`` is a broadcast: under DDP with any logger, rank 0 waited at fit end for the
    other ranks (gloo: "Connection closed by peer" once they exited)."""
    from datetime import timedelta

    from lightning.pytorch.loggers import CSVLogger

    from tests.helpers import TinyModule, make_trainer, tiny_dataloader
    from tests.helpers.ddp import spawned_ddp

    sparse = DynamicSparsityCallback(sparsity=0.8, interval="step", update_interval=1,
                                     log_figures=False, selection_summary=False)
    run = make_trainer(tmp_path, [sparse], max_epochs=1, devices=2,
                       logger=CSVLogger(tmp_path),
                       strategy=spawned_ddp(timedelta(seconds=30)))
    run.fit(TinyModule(), tiny_dataloader(samples=32))
    assert len(list(tmp_path.glob("lightning_logs/*/lightning_ggr_summary.json"))) == 1
    assert not dist.is_initialized()


# ------------------------------------------- resume from checkpoints without sharded masks
def _resume_without_sharded_masks(rank: int, world: int, root: str, checkpoint: str | None,
                                  out: str) -> None:
    """Resume ``checkpoint`` (``None``: first write one with a dense sharded run) sharded
    and sparse; record the masks after the restore, and the warnings of rank 0."""
    import warnings

    if checkpoint is None:
        saver = ModelCheckpoint(dirpath=root, filename="dense")
        dense = trainer(root, [saver], world, max_epochs=1, enable_checkpointing=True)
        dense.fit(TinyTransformer(), token_dataloader())
        checkpoint = str(Path(root) / "dense.ckpt")
    sparse = DynamicSparsityCallback(**SETTINGS)
    seen = {}

    class Restored(ShardedChecks):
        def on_train_start(self, trainer, pl_module) -> None:
            super().on_train_start(trainer, pl_module)
            seen["masks"] = {n: full(m).clone() for n, m in sparse.engine.masks.items()}
            seen["rewirings"] = sparse.engine.rewirings

    checks = Restored(str(Path(out) / "record.json"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = trainer(out, [sparse, checks], world, max_epochs=2)
        run.fit(TinyTransformer(), token_dataloader(), ckpt_path=checkpoint)
    if rank == 0:
        seen["warnings"] = [str(w.message) for w in caught]
        seen["buffers"] = sorted(k for k in run.lightning_module.state_dict()
                                 if k.endswith("_sparse_mask"))
        torch.save(seen, Path(out) / "seen.pt")


def test_a_single_device_sparse_checkpoint_resumes_sharded(tmp_path):
    """Regression: the mask buffers were registered on the model before Lightning restored
    the checkpoint, so a checkpoint without them (here a single-device sparse run's, whose
    masks are whole tensors in the callback state) failed to load: ``KeyError: The model
    contains a key 'embed.weight_sparse_mask' that does not exist in the loaded checkpoint``.
    Its masks now resume on 2 ranks, each taking its rows."""
    import lightning.pytorch as pl

    class Unsharded(TinyTransformer):
        def configure_model(self) -> None:
            pass

    sparse = DynamicSparsityCallback(**SETTINGS)
    single = pl.Trainer(default_root_dir=tmp_path, accelerator="cpu", devices=1, max_epochs=1,
                        callbacks=[sparse, ModelCheckpoint(dirpath=tmp_path, filename="one")],
                        logger=False, enable_progress_bar=False, enable_model_summary=False)
    single.fit(Unsharded(), token_dataloader(samples=16))
    assert sparse.engine.rewirings > 0
    out = tmp_path / "sharded"
    out.mkdir()
    spawn_lightning(_resume_without_sharded_masks, str(tmp_path), str(tmp_path / "one.ckpt"),
                    str(out))
    seen = torch.load(out / "seen.pt", weights_only=False)
    for name, mask in sparse.engine.masks.items():
        assert torch.equal(seen["masks"][name], mask), name
    assert seen["rewirings"] == sparse.engine.rewirings
    assert seen["buffers"] == sorted(f"{name}_sparse_mask" for name in SPARSE)
    assert json.loads((out / "record.json").read_text())["steps"] == 4  # the second epoch


def test_a_dense_sharded_checkpoint_resumes_sparse_with_new_masks(tmp_path):
    """Regression: resuming a dense FSDP2 run's distributed checkpoint with the callback
    failed in torch.distributed.checkpoint (the model's mask buffers are missing from the
    checkpoint). It now warns that new masks are drawn, as without sharding, and trains
    sparse."""
    spawn_lightning(_resume_without_sharded_masks, str(tmp_path), None, str(tmp_path))
    seen = torch.load(tmp_path / "seen.pt", weights_only=False)
    assert any("holds no DynamicSparsityCallback state" in w for w in seen["warnings"])
    assert seen["rewirings"] == 0 and seen["buffers"]
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["steps"] == 4 and record["rewirings"] > 0


class _WholeMeshTransformer(TinyTransformer):
    """Sharded over ModelParallelStrategy's whole (2-D) device mesh: HSDP placements."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        fully_shard(self, mesh=self.device_mesh)


def _fit_whole_mesh(rank: int, world: int, root: str) -> None:
    sparse = DynamicSparsityCallback(**SETTINGS)
    trainer(root, [sparse], world, max_epochs=1).fit(_WholeMeshTransformer(),
                                                     token_dataloader())


def test_a_model_sharded_over_the_whole_device_mesh_is_refused_before_training(tmp_path):
    """Regression: the callback counted the selection's zeros across shards before the
    engine checked the placements, so a model sharded over the strategy's whole 2-D mesh
    failed inside torch ("Found the DeviceMesh have 2 dimensions ... mesh_dim needs to be
    specified"), naming no way out. The refusal now comes first and names the way."""
    with pytest.raises(Exception, match=r"2-D device mesh .*"
                                        r"fully_shard\(module, mesh=self.device_mesh\["):
        spawn_lightning(_fit_whole_mesh, str(tmp_path), world=1)
