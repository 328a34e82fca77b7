"""A small transformer a user would shard with FSDP2, and 2-process Lightning runs of it.

The processes are spawned by the test and joined by Lightning's ``ModelParallelStrategy``
(gloo, CPU) through the environment variables a launcher such as ``torchrun`` sets, so that
Lightning starts no processes of its own. Each run's checks happen inside hooks on every
rank; rank 0 writes a JSON record the test reads.
"""

from __future__ import annotations

import json
import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ggr import DynamicSparsityCallback
from tests.helpers.distributed import exit_spawned_rank

VOCAB, WIDTH, CONTEXT = 23, 10, 6  # 23 rows: shards of 12 and 11 rows on 2 processes


class TinyTransformer(pl.LightningModule):
    """Embedding tied to the output projection, one attention block and an MLP, sharded
    with ``fully_shard`` in ``configure_model`` (as Lightning's FSDP2 guide does).

    Args:
        mixed: FSDP2's mixed precision (bf16 parameters for compute, fp32 reduction).
        partly: shard the attention and the MLP only; the tied embedding stays a plain
            tensor, replicated on every process.
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum).
    """

    def __init__(self, mixed: bool = False, partly: bool = False,
                 optimizer: str = "adamw") -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mixed, self.partly, self.optimizer_name = mixed, partly, optimizer
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.attention = nn.MultiheadAttention(WIDTH, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 17), nn.GELU(), nn.Linear(17, WIDTH))
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embed.weight  # tied: one sparse tensor

    def configure_model(self) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = self.device_mesh["data_parallel"]
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if self.mixed else MixedPrecisionPolicy())
        for module in (self.attention, self.mlp):
            fully_shard(module, mesh=mesh, mp_policy=policy)
        if not self.partly:
            fully_shard(self, mesh=mesh, mp_policy=policy)

    def forward(self, tokens: Tensor) -> Tensor:
        x = self.embed(tokens)
        attended, _ = self.attention(x, x, x, need_weights=False)
        x = x + attended
        x = x + self.mlp(x)
        return self.head(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        tokens, targets = batch
        logits = self(tokens)
        return nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=1e-2)


def token_dataloader(samples: int = 32, batch_size: int = 4) -> DataLoader:
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, VOCAB, (samples, CONTEXT + 1), generator=generator)
    return DataLoader(TensorDataset(tokens[:, :-1], tokens[:, 1:]), batch_size=batch_size)


def full(tensor: Tensor) -> Tensor:
    """The whole tensor (a collective for a DTensor: every rank calls it), waited for: an
    all-gather left pending (a rank that never reads the result) would be finished by the
    process group's thread during interpreter shutdown, which aborts the process."""
    if not hasattr(tensor, "full_tensor"):
        return tensor
    whole = tensor.full_tensor()
    return whole.wait() if hasattr(whole, "wait") else whole


def same_on_all_ranks(tensor: Tensor) -> bool:
    tensor = tensor.detach().cpu().contiguous()
    sent = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
    copies = [torch.empty_like(sent) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, sent)
    return all(torch.equal(copy, copies[0]) for copy in copies)


class ShardedChecks(pl.Callback):
    """After DynamicSparsityCallback, on every rank and step: masked gradients, weights and
    optimizer state are zero over the whole layers, counts match, masks agree on every
    rank; the masks at train start are a single-process engine's. Rank 0 records."""

    def __init__(self, record: str, reference: dict[str, Tensor] | None = None) -> None:
        self.record, self.reference = record, reference
        self.steps = self.checks = 0
        self.start_masks: dict[str, Tensor] = {}

    @staticmethod
    def sparse(trainer: pl.Trainer) -> DynamicSparsityCallback:
        return next(c for c in trainer.callbacks if isinstance(c, DynamicSparsityCallback))

    def masks(self, trainer: pl.Trainer) -> dict[str, Tensor]:
        return {n: full(m) for n, m in self.sparse(trainer).engine.masks.items()}

    def on_train_start(self, trainer, pl_module) -> None:
        engine = self.sparse(trainer).engine
        assert engine.layout is not None, "the engine does not see the shards"
        self.start_masks = self.masks(trainer)
        if self.reference is not None:
            for name, mask in self.reference.items():
                assert torch.equal(self.start_masks[name], mask), f"{name}: initial mask"

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        engine = self.sparse(trainer).engine
        for name, param in engine.params.items():
            if param.grad is not None:
                mask = full(engine.masks[name])
                assert (full(param.grad)[~mask] == 0).all(), f"{name}: masked gradient"

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        engine = self.sparse(trainer).engine
        optimizer = trainer.optimizers[0]
        counts = engine.active_counts()
        for name, param in engine.params.items():
            mask = full(engine.masks[name])
            assert same_on_all_ranks(mask), f"{name}: masks differ across ranks"
            assert int(mask.sum()) == counts[name], f"{name}: count"
            assert (full(param.detach())[~mask] == 0).all(), f"{name}: masked weight"
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, Tensor) and value.shape == param.shape:
                    assert (full(value)[~mask] == 0).all(), f"{name}: masked state"
        self.steps += 1
        self.checks += 1

    def on_train_end(self, trainer, pl_module) -> None:
        engine = self.sparse(trainer).engine
        final = self.masks(trainer)
        if trainer.global_rank == 0:
            Path(self.record).write_text(json.dumps({
                "steps": self.steps, "checks": self.checks, "rewirings": engine.rewirings,
                "layout": sorted(n for n, s in engine.layout.layers.items() if s.sharded),
                "replicated": sorted(n for n, s in engine.layout.layers.items()
                                     if not s.sharded),
                "changed": sorted(n for n, m in final.items()
                                  if not torch.equal(m, self.start_masks[n])),
                "densities": engine.layer_densities(),
            }))


#: Layers whose whole weight Scribbler checks in the forward pass -> their parameter.
CHECKED_LAYERS = {"embed": "embed.weight", "mlp.0": "mlp.0.weight"}


class Scribbler(pl.Callback):
    """Writes 0.5 into the masked positions of every sparse weight's local shard before each
    batch and again before each optimizer step (as code outside the callback might), for
    ``enforce_masks_every_step``; forward pre-hooks on the layers holding a root-owned
    parameter (the tied embedding, gathered by the root's FSDP2 pre-hook) and a child's
    (``mlp.0``, gathered by ``mlp``'s) check that the whole weights the forward pass uses are
    zero where masked. Rank 0 records how many checks ran."""

    def __init__(self, record: str) -> None:
        self.record = record
        self.forward_checks = self.scribbled = 0
        self.whole: dict[str, Tensor] = {}
        self.handles: list[Any] = []

    def on_train_start(self, trainer, pl_module) -> None:
        for module_name, name in CHECKED_LAYERS.items():
            module = pl_module.get_submodule(module_name)
            self.handles.append(module.register_forward_pre_hook(
                lambda module, args, name=name: self._check(module, name)))

    def _check(self, module: nn.Module, name: str) -> None:
        if name not in self.whole:  # a forward outside training (none here)
            return
        weight = module.weight
        assert not hasattr(weight, "to_local"), "the forward pass should see a whole weight"
        assert (weight.detach()[~self.whole[name]] == 0).all(), f"{name}: forward saw masked"
        self.forward_checks += 1

    def _scribble(self, trainer) -> None:
        engine = ShardedChecks.sparse(trainer).engine
        with torch.no_grad():
            for name, param in engine.params.items():
                local = param.to_local() if hasattr(param, "to_local") else param
                mask = engine.masks[name]
                local_mask = mask.to_local() if hasattr(mask, "to_local") else mask
                local.masked_fill_(~local_mask, 0.5)
        self.scribbled += 1

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        engine = ShardedChecks.sparse(trainer).engine
        self.whole = {name: full(engine.masks[name]) for name in CHECKED_LAYERS.values()}
        self._scribble(trainer)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._scribble(trainer)  # after the callback's pass: the step's post-hook re-masks

    def on_train_end(self, trainer, pl_module) -> None:
        for handle in self.handles:
            handle.remove()
        if trainer.global_rank == 0:
            Path(self.record).write_text(json.dumps({
                "forward_checks": self.forward_checks, "scribbled": self.scribbled}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, world: int, port: int, run: Any, args: tuple) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "WORLD_SIZE": str(world), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "NODE_RANK": "0"})
    torch.set_num_threads(1)
    try:
        run(rank, world, *args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    exit_spawned_rank()


def spawn_lightning(run: Any, *args: Any, world: int = 2) -> None:
    """``run(rank, world, *args)`` in ``world`` spawned processes, each of which builds a
    Trainer with :func:`model_parallel` (Lightning joins them, launching nothing)."""
    mp.spawn(_worker, args=(world, free_port(), run, args), nprocs=world, join=True)


def model_parallel(world: int, save_distributed_checkpoint: bool = True):
    from lightning.pytorch.strategies import ModelParallelStrategy

    return ModelParallelStrategy(data_parallel_size=world, tensor_parallel_size=1,
                                 save_distributed_checkpoint=save_distributed_checkpoint,
                                 timeout=timedelta(seconds=60))


def trainer(root: str, callbacks: list, world: int, *,
            save_distributed_checkpoint: bool = True, **kwargs: Any) -> pl.Trainer:
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(default_root_dir=root, callbacks=callbacks, accelerator="cpu",
                      devices=world, strategy=model_parallel(world, save_distributed_checkpoint),
                      enable_progress_bar=False, enable_model_summary=False, **kwargs)


def reference_masks(settings: dict[str, Any], **module: Any) -> dict[str, Tensor]:
    """The masks a single-process engine draws for the unsharded module."""
    from lightning_ggr import SparseEngine, select_sparse_parameters

    model = TinyTransformer(**module)
    keys = ("sparsity", "distribution", "method", "seed")
    engine = SparseEngine(select_sparse_parameters(model),
                          **{k: v for k, v in settings.items() if k in keys})
    return {name: mask.clone() for name, mask in engine.masks.items()}
