"""Masks agree on every rank: seeded generator, broadcast from rank 0, agreed skip decisions.

The multi-process tests run 2 CPU ranks over gloo. State changed in the workers does not
come back to the test process, so the checks run inside hooks (a failed assertion in a
worker fails the test) and rank 0 writes a small JSON record that the test then reads, to
prove the checks really ran.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.plugins import MixedPrecision

from lightning_ggr import DynamicSparsityCallback, SparseEngine, select_sparse_parameters
from lightning_ggr.sparse.engine import SKIP_NONFINITE, SKIP_OPTIMIZER_NONFINITE
from lightning_ggr.sparse.schedules import RewiringSchedule
from tests.helpers import SPARSE_NAMES, TinyModule, make_trainer, tiny_dataloader
from tests.helpers.ddp import SpawnedDDPStrategy, spawned_ddp
from tests.helpers.marks import REWIRES_WITHOUT_OPTIMIZER
from tests.helpers.setups import UnevenRanks

WORLD = 2
#: A failing rank must fail the test fast, not leave the others waiting 30 minutes.
COLLECTIVE_TIMEOUT = timedelta(seconds=60)


def gathered(tensor: torch.Tensor) -> list[torch.Tensor]:
    """``tensor`` from every rank (bool sent as uint8: gloo gathers it everywhere)."""
    tensor = tensor.detach().cpu().contiguous()
    sent = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
    out = [torch.empty_like(sent) for _ in range(dist.get_world_size())]
    dist.all_gather(out, sent)
    return out


def assert_same_on_all_ranks(tensors: dict[str, torch.Tensor], what: str) -> None:
    # Gather everything first: every rank must reach every collective before any assertion.
    copies = {name: gathered(t) for name, t in tensors.items()}
    for name, per_rank in copies.items():
        for rank, copy in enumerate(per_rank[1:], start=1):
            assert torch.equal(copy, per_rank[0]), f"{what} {name!r}: rank {rank} != rank 0"


class RankAgreement(pl.Callback):
    """Runs on every rank, after DynamicSparsityCallback: compares the ranks at every step."""

    def __init__(self, record: str) -> None:
        self.record = record
        self.checks = 0
        self.rewiring_steps: list[int] = []
        self.postponed_steps: list[int] = []
        self.masks_at_start: dict[str, torch.Tensor] = {}

    @staticmethod
    def sparse(trainer: pl.Trainer) -> DynamicSparsityCallback:
        return next(c for c in trainer.callbacks if isinstance(c, DynamicSparsityCallback))

    def topology(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        engine = self.sparse(trainer).engine
        params = dict(pl_module.named_parameters())
        assert_same_on_all_ranks(engine.masks, "mask")
        assert_same_on_all_ranks({n: params[n] for n in engine.masks}, "sparse weight")
        assert_same_on_all_ranks({"generator": engine.generator.get_state()}, "generator")
        for name, mask in engine.masks.items():
            assert int(mask.sum()) >= 1
            assert (params[name][~mask] == 0).all(), f"{name}: masked weight not zero"
            assert torch.isfinite(params[name]).all(), f"{name}: non-finite weight"
        self.checks += 1

    def on_train_start(self, trainer, pl_module) -> None:
        self.topology(trainer, pl_module)  # at init
        self.masks_at_start = {n: m.clone() for n, m in self.sparse(trainer).masks.items()}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        engine = self.sparse(trainer).engine
        step = trainer.global_step
        if engine.rewirings > len(self.rewiring_steps):
            self.rewiring_steps.append(step)
        if engine.skipped_rewirings > len(self.postponed_steps):
            self.postponed_steps.append(step)
        # The decision is the same on every rank (the finite flag is all-reduced).
        decision = torch.tensor([engine.rewirings, engine.skipped_rewirings, engine.last_slot])
        assert_same_on_all_ranks({"decision": decision}, "rewiring decision")
        self.topology(trainer, pl_module)  # after every (possible) rewiring

    def on_train_end(self, trainer, pl_module) -> None:
        assert_same_on_all_ranks(dict(pl_module.named_parameters()), "final weight")
        # The scenario is real: the global random streams of the two ranks did diverge.
        rng_states = gathered(torch.get_rng_state())
        rng_diverged = not torch.equal(rng_states[0], rng_states[1])
        if trainer.global_rank == 0:
            changed = [n for n, m in self.sparse(trainer).masks.items()
                       if not torch.equal(m, self.masks_at_start[n])]
            Path(self.record).write_text(json.dumps({
                "checks": self.checks,
                "rewiring_steps": self.rewiring_steps,
                "postponed_steps": self.postponed_steps,
                "rng_diverged": rng_diverged,
                "changed_layers": changed,
                "scale": trainer.precision_plugin.scaler.get_scale(),
            }))


@pytest.mark.ddp
@pytest.mark.slow
def test_ddp_masks_agree_despite_diverging_rng_and_fp16_inf_on_one_rank(tmp_path):
    """One ``ddp_spawn`` run checks both spec scenarios at every step.

    Rank 1 draws extra numbers from the global RNG every batch and its loss is ``inf`` on the
    due step 6 (fp16, GradScaler). Every rank must postpone that rewiring to step 7, and masks,
    sparse weights and the callback's generator must agree on all ranks at init and after
    every step; the final weights too.
    """
    record = tmp_path / "record.json"
    sparse = DynamicSparsityCallback(method="ggr", sparsity=0.8, interval="step",
                                     update_interval=3, stop_step=14, drop_fraction=0.3,
                                     log_figures=False)
    model = TinyModule(nonfinite_steps=(6,), nonfinite_rank=1, extra_draws_rank=1)
    trainer = make_trainer(
        tmp_path, [sparse, RankAgreement(str(record))], max_epochs=2, devices=WORLD,
        strategy=spawned_ddp(COLLECTIVE_TIMEOUT),
        plugins=[MixedPrecision("16-mixed", "cpu")],
    )
    trainer.fit(model, tiny_dataloader(samples=64))  # 8 steps per epoch and rank
    result = json.loads(record.read_text())
    assert result["checks"] == 1 + 16  # init + every optimizer step
    assert result["postponed_steps"] == [6]
    assert result["rewiring_steps"] == [3, 7, 9, 12]
    assert result["rng_diverged"]
    assert set(result["changed_layers"]) == set(SPARSE_NAMES)
    assert result["scale"] == 65536.0 / 2  # both ranks' GradScaler skipped step 6


# ------------------------------------------------------- engine over torch.distributed
def _engine_worker(rank: int, store: str, record: str) -> None:
    torch.manual_seed(0)  # same model everywhere
    model = TinyModule()
    params = select_sparse_parameters(model)

    def local_masks(seed: int) -> dict[str, torch.Tensor]:  # drawn before joining the group
        copies = {n: p.detach().clone() for n, p in params.items()}
        return SparseEngine(copies, sparsity=0.8, method="set", seed=seed).masks

    rank_0_masks, own_masks = local_masks(100), local_masks(100 + rank)
    if rank == 1:  # the seeds really draw different masks
        assert any(not torch.equal(own_masks[n], m) for n, m in rank_0_masks.items())

    # A file rendezvous: no network port to race for with other processes.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=WORLD, timeout=COLLECTIVE_TIMEOUT)
    try:
        # A different seed on each rank: only the broadcast from rank 0 can make them agree.
        engine = SparseEngine(params, sparsity=0.8, method="set", seed=100 + rank,
                              schedule=RewiringSchedule("step", 1, 10, 0.5))
        assert_same_on_all_ranks(engine.masks, "mask at init")
        for name, mask in engine.masks.items():
            assert torch.equal(mask, rank_0_masks[name]), "init masks are not rank 0's"
        moved = []
        for step in (1, 2):
            for p in params.values():
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(rank + step))
            before = {n: m.clone() for n, m in engine.masks.items()}
            report = engine.before_optimizer_step(step, 0)
            assert report is not None and not report.skipped
            assert_same_on_all_ranks(engine.masks, "mask after rewiring")
            assert_same_on_all_ranks({n: p.data for n, p in params.items()}, "weight")
            moved.append(any(not torch.equal(before[n], m) for n, m in engine.masks.items()))
        # A non-finite gradient on rank 1 only: every rank postpones.
        for p in params.values():
            p.grad = torch.zeros_like(p)
        if rank == 1:
            next(iter(params.values())).grad[0] = float("nan")
        report = engine.before_optimizer_step(3, 0)
        assert report is not None and report.skipped, f"rank {rank} did not postpone"
        assert report.skip_reason == SKIP_NONFINITE
        # A non-finite dense gradient of the optimizer, on rank 1 only: every rank postpones.
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        if rank == 1:
            model.net[0].bias.grad[0] = float("inf")
            # ... and something wrote into two masked weights, on rank 1 only.
            masked = (~engine.masks["net.6.weight"]).reshape(-1).nonzero().squeeze(1)[:2]
            with torch.no_grad():
                params["net.6.weight"].view(-1)[masked] = 0.5
        report = engine.before_optimizer_step(4, 0, [optimizer])
        assert report is not None and report.skip_reason == SKIP_OPTIMIZER_NONFINITE, rank
        # Every rank hears of the most strays any rank had; each zeroed its own.
        assert report.stray_weights == {"net.6.weight": 2}, (rank, report.stray_weights)
        assert (params["net.6.weight"][~engine.masks["net.6.weight"]] == 0).all()
        assert_same_on_all_ranks({"slot": torch.tensor(engine.last_slot)}, "last slot")
        if rank == 0:
            Path(record).write_text(json.dumps({"moved": moved, "last_slot": engine.last_slot,
                                                "skip_reasons": engine.skip_reasons}))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
def test_engine_broadcasts_rank_0_topology_and_agrees_on_skips(tmp_path):
    record = tmp_path / "record.json"
    mp.spawn(_engine_worker, args=(str(tmp_path / "store"), str(record)), nprocs=WORLD,
             join=True)
    result = json.loads(record.read_text())
    assert result == {"moved": [True, True], "last_slot": 2,
                      "skip_reasons": {SKIP_NONFINITE: 1, SKIP_OPTIMIZER_NONFINITE: 1}}


@REWIRES_WITHOUT_OPTIMIZER
def test_masks_and_growth_do_not_depend_on_the_global_rng():
    """The callback's own generator decides: draws from the global RNG change nothing."""

    def run(global_seed: int, extra_draws: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = TinyModule()
        torch.manual_seed(global_seed)
        params = select_sparse_parameters(model)
        engine = SparseEngine(params, sparsity=0.8, method="set", seed=5)
        for _ in range(3):
            torch.rand(extra_draws)
            engine.rewire(0.5)
        return {n: m.clone() for n, m in engine.masks.items()}

    reference = run(0, 0)
    for global_seed, extra in ((1, 3), (2, 1000)):
        other = run(global_seed, extra)
        assert all(torch.equal(other[n], m) for n, m in reference.items())


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ddp_ranks_with_different_epochs_agree_on_epoch_rewirings(tmp_path):
    """Rank 0 has 4 batches per epoch, rank 1 has 6; 12 steps each (max_steps). With
    interval="epoch" rank 0 was due at step 4, entered the gradient check's all-reduce that
    rank 1 never joined, and the job hung until the collective timeout. Rank 0's epochs now
    decide on every rank (stop_fraction=1.0 of max_steps=12: the stop agrees too)."""
    record = tmp_path / "record.json"
    sparse = DynamicSparsityCallback(sparsity=0.75, stop_fraction=1.0, log_figures=False)
    trainer = make_trainer(
        tmp_path, [sparse], devices=WORLD, max_epochs=None, max_steps=12,
        use_distributed_sampler=False,
        # A short collective timeout: a regression fails in seconds instead of hanging.
        strategy=spawned_ddp(timedelta(seconds=20)),
    )
    trainer.fit(UnevenRanks(str(record)))
    result = json.loads(record.read_text())
    assert result == {"rewiring_steps": [4, 8], "steps": 12, "stop_step": 12,
                      "masks_agree": True}


@pytest.mark.parametrize(("ranks", "agree_epochs", "stop"), [
    ([[8, 16], [8, 16]], False, 16),  # equal epochs: no per-step collective at all
    ([[4, 12], [6, 12]], True, 12),  # different epochs: rank 0's decide, every step
    ([[8, 12], [-1, 12]], True, 12),  # one rank streams (unknown length)
    ([[8, 16], [6, 12]], True, 12),  # different stop points: the earliest, with a warning
])
def test_the_ranks_agree_once_at_train_start(monkeypatch, ranks, agree_epochs, stop):
    """The decision logic of the one collective at train start, without spawning."""
    from types import SimpleNamespace

    import lightning_ggr.callbacks.clock as clock

    monkeypatch.setattr(clock, "gather_ints", lambda trainer, values: ranks)
    callback = DynamicSparsityCallback(log_figures=False)
    warned = []
    monkeypatch.setattr(clock, "rank_zero_warn", warned.append)
    rank_0 = SimpleNamespace(num_training_batches=float(ranks[0][0]))
    agreed, batches = callback.clock.agree_on_length(rank_0, ranks[0][1])
    assert (agreed, callback.clock.agree_epochs) == (stop, agree_epochs)
    assert bool(warned) == (len({r[1] for r in ranks}) > 1)
    assert batches == (float("inf") if -1 in [r[0] for r in ranks]
                       else min(r[0] for r in ranks))


def test_spawned_ranks_destroy_their_process_group_at_fit_end(tmp_path):
    """The flaky SIGABRT of spawned ranks: a gloo group left alive into interpreter
    finalization (Lightning destroys only NCCL groups) can abort the rank when its worker
    thread drops the last collective's tensors (see ``tests/helpers/ddp.py``). The tests'
    strategy destroys it at teardown, which joins the group's threads."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        out = [torch.empty(2)]
        dist.all_gather(out, torch.ones(2))  # a collective whose tensors Python saw
        strategy = spawned_ddp(COLLECTIVE_TIMEOUT)
        strategy.accelerator = CPUAccelerator()  # what the Trainer gives it
        strategy.cluster_environment = LightningEnvironment()
        strategy.teardown()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert issubclass(SpawnedDDPStrategy, pl.strategies.DDPStrategy)
