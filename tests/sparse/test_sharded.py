"""Selections across shards and the sharded engine equal their single-process results.

The selections are compared with a reference that breaks ties canonically (by vector, then
position): the sharded selection is exact with ties and does not depend on how the vectors
are split. The engine on a model sharded with FSDP2's ``fully_shard`` (rows not divisible
by the world size, one layer left replicated) is compared with a single-process engine fed
the same full weights and gradients: the EQUIVALENCE test of issue 19.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_ggr import SparseEngine, select_sparse_parameters
from lightning_ggr.sparse.analysis import analyze_masks
from lightning_ggr.sparse.methods import METHODS
from lightning_ggr.sparse.sharded import (
    ShardLayout,
    _score_of,
    _signed_,
    all_sum,
    analyze_across_shards,
    gather_to_rank_zero,
    histogram_across_shards,
    local_tensor,
    select_across_shards,
)
from tests.helpers.distributed import one_process_group, spawn
from tests.helpers.sharded import full

LAYOUT = ShardLayout(None, {})  # the default group; the selection reads only the group


def canonical(vectors, selections, ks, largest):
    """Per selection, the set of (vector, position) of its ``k`` best scores, ties broken
    by vector then position."""
    chosen = []
    for s, k in enumerate(ks):
        items = sorted(((-x if largest else x), i, p) for i, v in enumerate(vectors)
                       if selections[i] == s for p, x in enumerate(v.tolist()))
        chosen.append({(i, p) for _, i, p in items[:k]})
    return chosen


def random_vectors(generator, dtype, sizes):
    vectors = []
    for size in sizes:
        if dtype.is_floating_point:  # few distinct values (ties), infinities, both signs
            v = torch.randint(-4, 5, (size,), generator=generator).to(dtype) * 0.5
            v[torch.rand(size, generator=generator) < 0.1] = math.inf
            v[torch.rand(size, generator=generator) < 0.1] = -math.inf
        else:
            high = 2**31 - 1 if dtype == torch.int32 else 2**62
            v = torch.randint(-high, high, (size,), generator=generator, dtype=torch.int64)
            v = v.to(dtype)
            v[torch.rand(size, generator=generator) < 0.3] = -1
        vectors.append(v)
    return vectors


CASES = [(dtype, largest, shared) for dtype in (torch.float32, torch.float64, torch.int32,
                                                torch.int64)
         for largest in (True, False) for shared in (False, True)]


def check_selections(rank: int, world: int, trials: int) -> int:
    """Every case on ``world`` processes, each holding an uneven slice of every vector;
    returns the number of selections checked."""
    checked = 0
    generator = torch.Generator().manual_seed(0)  # the same draws on every rank
    for dtype, largest, shared in CASES:
        for _ in range(trials):
            sizes = [int(torch.randint(0, 40, (1,), generator=generator)) for _ in range(3)]
            vectors = random_vectors(generator, dtype, sizes)
            selections = [0, 0, 0] if shared else [0, 1, 2]
            totals = [sum(sizes[i] for i in range(3) if selections[i] == s)
                      for s in range(max(selections) + 1)]
            ks = [int(torch.randint(0, total + 1, (1,), generator=generator))
                  for total in totals]
            cuts = [sorted(torch.randint(0, size + 1, (world - 1,), generator=generator)
                           .tolist()) for size in sizes]
            bounds = [[0, *cut, size] for cut, size in zip(cuts, sizes, strict=True)]
            starts = [b[rank] for b in bounds]
            local = [v[b[rank]:b[rank + 1]] for v, b in zip(vectors, bounds, strict=True)]
            result = select_across_shards(
                [v.numel() for v in local], selections, ks,
                lambda i, out, local=local: out.copy_(local[i]), dtype=dtype,
                largest=largest, device="cpu", layout=LAYOUT)
            mine = [(i, int(p) + starts[i]) for i, index in enumerate(result.indices)
                    for p in index]
            everyone: list = [None] * world
            dist.all_gather_object(everyone, mine)
            got = {item for part in everyone for item in part}
            expected = canonical(vectors, selections, ks, largest)
            for s, k in enumerate(ks):
                assert {(i, p) for i, p in got if selections[i] == s} == expected[s], (
                    dtype, largest, shared, ks, s)
                if k:
                    ranked = sorted((x for i, v in enumerate(vectors) if selections[i] == s
                                     for x in v.tolist()), reverse=largest)
                    assert result.values[s] == ranked[k - 1]
                else:
                    assert result.values[s] is None
                checked += 1
    return checked


def test_selections_match_the_canonical_top_k_in_one_process():
    with one_process_group():
        assert check_selections(0, 1, trials=3) == sum(
            1 if shared else 3 for _, _, shared in CASES) * 3


def test_a_k_beyond_the_scores_is_refused():
    with one_process_group():
        with pytest.raises(ValueError, match=r"k=5 of selection 1 is outside \[0, 3\]"):
            select_across_shards([2, 3], [0, 1], [1, 5], lambda i, out: out.zero_(),
                                 dtype=torch.float32, largest=True, device="cpu",
                                 layout=LAYOUT)


def test_signed_keys_order_scores_and_invert():
    values = torch.tensor([-math.inf, -2.5, -0.0, 0.0, 1e-30, 3.0, math.inf])
    for dtype in (torch.float32, torch.float64):
        for largest in (True, False):
            keys = _signed_(values.to(dtype).clone(), largest)  # in place; larger: preferred
            order = keys.argsort(stable=True).tolist()
            assert order == (list(range(len(values))) if largest
                             else list(reversed(range(len(values)))))
            for key, value in zip(keys.tolist(), values.tolist(), strict=True):
                assert _score_of(key, dtype, largest) == value


# ------------------------------------------------------------------------ 2 processes
class Net(nn.Module):
    """Rows not divisible by 2 (33, 5, 9, 3, 5), convolutions (plain, grouped, transposed),
    and a head left unsharded."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(17, 33)
        self.conv = nn.Conv2d(3, 5, 3)
        self.grouped = nn.Conv2d(4, 6, 3, groups=2)
        self.transposed = nn.ConvTranspose2d(5, 4, 2)
        self.second = nn.Linear(33, 9)
        self.third = nn.Linear(9, 3)
        self.head = nn.Linear(3, 2)  # replicated: rank 0 decides, then broadcasts


def sharded_net(world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    net = Net()
    mesh = init_device_mesh("cpu", (world,))
    for module in (net.first, net.conv, net.grouped, net.transposed, net.second, net.third):
        fully_shard(module, mesh=mesh)
    return net


def set_full_(param, values) -> None:
    """Give ``param`` (sharded or not) the whole-layer ``values``."""
    with torch.no_grad():
        if hasattr(param, "to_local"):
            from torch.distributed.tensor import distribute_tensor

            param.to_local().copy_(distribute_tensor(values, param.device_mesh,
                                                     param.placements).to_local())
        else:
            param.copy_(values)


def set_gradients(params, generator, ties: bool) -> None:
    from torch.distributed.tensor import distribute_tensor

    for param in params.values():
        values = torch.randn(param.shape, generator=generator)
        if ties:
            values = values.sign() * torch.randint(1, 3, param.shape, generator=generator)
        if hasattr(param, "device_mesh"):
            param.grad = distribute_tensor(values, param.device_mesh, param.placements)
        else:
            param.grad = values


def _close(a, b) -> bool:
    """Nested dicts equal, floats up to rounding (|w| summed in float64 across shards)."""
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, float):
        return math.isclose(a, b, rel_tol=1e-6)
    return a == b


def check_equivalence(rank: int, world: int) -> dict:
    from lightning_ggr.sparse.schedules import RewiringSchedule

    results = {"exact": 0, "ties": 0}
    cases = [(m, d) for m in sorted(METHODS) for d in ("erk", "uniform")]
    for case, (method, distribution) in enumerate(cases):
        settings = {"sparsity": 0.6, "distribution": distribution, "method": method,
                    "seed": 3, "dsr_initial_threshold": None,
                    "schedule": RewiringSchedule("step", 1, 100, 0.3)}
        torch.manual_seed(0)
        single_net = Net()
        single = SparseEngine(select_sparse_parameters(single_net), **settings)
        net = sharded_net(world)
        sharded = SparseEngine(select_sparse_parameters(net), **settings)
        assert sharded.layout is not None
        for name, mask in single.masks.items():
            assert torch.equal(full(sharded.masks[name]), mask), (method, name)
        for ties in (False, True):
            generator = torch.Generator().manual_seed(7 + ties)
            pairs = []
            for engine in (single, sharded):
                params = engine.params
                # Adagrad starts a fresh weight's state at 0.1, Adam at 0: grown
                # positions get the optimizer's own start on shards too
                optimizer = (torch.optim.Adam(params.values(), lr=0.01) if case % 2 else
                             torch.optim.Adagrad(params.values(), lr=0.01,
                                                 initial_accumulator_value=0.1))
                set_gradients(params, torch.Generator().manual_seed(1), ties)
                engine.mask_gradients()
                optimizer.step()  # Adam state everywhere active
                reports = []
                # with ties, one rewiring: tied positions may differ, and so would the
                # next rewiring's inputs
                for seed in (2,) if ties else (2, 3):
                    # Fresh whole weights at the active positions (the same on both, no
                    # ties unless wanted: grown weights all sit at init_value) and
                    # fresh gradients, then a rewiring.
                    for name, param in params.items():
                        values = torch.randn(param.shape, generator=torch.Generator()
                                             .manual_seed(seed * 100 + len(name)))
                        if ties:
                            values = values.sign() * torch.randint(
                                1, 4, param.shape, generator=generator)
                        set_full_(param, values * full(engine.masks[name]))
                    set_gradients(params, torch.Generator().manual_seed(seed), ties)
                    reports.append(engine.rewire(0.3, [optimizer]))
                pairs.append((engine, optimizer, reports))
                generator = torch.Generator().manual_seed(7 + ties)
            (one, one_opt, one_reports), (many, many_opt, many_reports) = pairs
            for a, b in zip(one_reports, many_reports, strict=True):
                assert (a.removed, a.grown, a.active) == (b.removed, b.grown, b.active), (
                    method, ties)
            for name, param in many.params.items():
                mask = full(many.masks[name])
                assert int(mask.sum()) == many.active_counts()[name]
                assert (full(param.detach())[~mask] == 0).all()
                for value in many_opt.state[param].values():
                    if value.shape == param.shape:
                        assert (full(value)[~mask] == 0).all()
            assert many.threshold == one.threshold
            if ties:  # the same per-layer counts (GGR: its tied gradients split in layer
                results["ties"] += 1  # order on both); tied positions may differ
                continue
            for name, param in one.params.items():
                assert torch.equal(full(many.masks[name]), one.masks[name]), (method, name)
                other = many.params[name]
                assert torch.equal(full(other.detach()), param.detach()), (method, name)
                for key, value in one_opt.state[param].items():
                    if value.shape == param.shape:
                        assert torch.equal(full(many_opt.state[other][key]), value)
            analysis = analyze_across_shards(many.masks, many.params, many.layout, net)
            reference = analyze_masks(one.masks, one.params, module=single_net).to_dict()
            assert json.dumps(analysis.to_dict(), sort_keys=True) == json.dumps(
                reference, sort_keys=True) or _close(analysis.to_dict(), reference)
            results["exact"] += 1
    results["counts"] = all_sum([1, rank], ShardLayout(None, {}))
    # The whole of a sharded tensor reaches rank 0 alone; histograms across shards.
    expected = full(sharded.masks["first.weight"])
    gathered = gather_to_rank_zero(sharded.masks["first.weight"])
    if rank == 0:
        assert torch.equal(gathered, expected)
    else:
        assert gathered is None
    weight = sharded.params["first.weight"]
    values = [local_tensor(weight).detach().abs().flatten()]
    whole = full(weight.detach()).abs().flatten().double()
    (histogram,) = histogram_across_shards(values, sharded.layout, bins=8)
    assert histogram["num"] == whole.numel() and math.isclose(histogram["max"], whole.max())
    assert histogram["bucket_counts"] == torch.histc(whole, 8, 0, float(whole.max())).tolist()
    return results


@pytest.mark.ddp
@pytest.mark.slow
def test_selections_across_two_uneven_shards_match_one_process(tmp_path):
    assert spawn(check_selections, 4, folder=tmp_path) == sum(
        1 if shared else 3 for _, _, shared in CASES) * 4


@pytest.mark.ddp
@pytest.mark.slow
def test_sharded_rewiring_equals_the_single_process_rewiring(tmp_path):
    """EQUIVALENCE (issue 19): FSDP2 shards on 2 ranks, rows not divisible by 2, a replicated
    head. For every method and both distributions: the initial masks equal the
    single-process ones; given the same whole weights, optimizer state (Adam, or Adagrad
    whose fresh state is 0.1) and gradients, two rewirings give exactly the single-process
    masks, weights, optimizer state, per-layer counts and DSR threshold; with few distinct
    values (ties at the cuts), a rewiring gives the same per-layer counts (GGR's tied
    gradients go to the layers in order on one process as across shards)."""
    result = spawn(check_equivalence, folder=tmp_path)
    assert result == {"exact": 2 * len(METHODS), "ties": 2 * len(METHODS), "counts": [2, 1]}


# ------------------------------------------------------------------ one process, sharded
def _one_rank_model():
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 3))
    mesh = init_device_mesh("cpu", (1,))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, mesh


def test_the_per_step_pass_on_shards_is_one_operation_without_collectives(monkeypatch):
    """Issue 19, item 3: masking the gradients of sharded parameters is one
    ``_foreach_mul_`` over the local shards: no collective, no host read."""
    from torch.profiler import ProfilerActivity, profile

    from lightning_ggr.sparse.syncs import top_level_operations

    with one_process_group():
        model, _ = _one_rank_model()
        engine = SparseEngine(select_sparse_parameters(model), sparsity=0.7)
        model(torch.randn(4, 7)).square().sum().backward()
        engine.mask_gradients()  # warm-up
        collectives = []
        for name in ("all_reduce", "all_gather", "broadcast", "reduce_scatter_tensor",
                     "all_gather_into_tensor"):
            original = getattr(dist, name)
            monkeypatch.setattr(dist, name, lambda *a, _o=original, _n=name, **k: (
                collectives.append(_n), _o(*a, **k))[1])
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.mask_gradients()
        # views of the gradients' bits are metadata, not work
        assert [name for name in top_level_operations(prof.events())
                if name != "aten::view"] == ["aten::_foreach_mul_"]
        assert collectives == []
        for name, param in engine.params.items():
            assert (param.grad.to_local()[~engine.masks[name].to_local()] == 0).all()


def test_writes_into_sharded_weights_are_collected_before_the_step():
    """An in-place write into a DTensor parameter moves the DTensor's version counter but
    not its local shard's (and one into ``to_local()`` the reverse): both are watched, so
    a write either way is counted before the step of an optimizer whose steps are followed
    by a zeroing pass (Adamax). Watching the shard's alone missed every write made through
    the parameter under FSDP2."""
    with one_process_group():
        model, _ = _one_rank_model()
        engine = SparseEngine(select_sparse_parameters(model), sparsity=0.7)
        optimizer = torch.optim.Adamax(model.parameters(), lr=0.01)
        weight = model[0].weight
        masked = int((~engine.masks["0.weight"].to_local()).sum())

        def step() -> None:
            model(torch.randn(4, 7)).square().sum().backward()
            engine.mask_gradients()
            engine.collect_stray_weights()
            optimizer.step()
            engine.after_optimizer_step([optimizer])
            optimizer.zero_grad()

        step()
        assert engine.zero_stray_weights([optimizer]) == {}
        with torch.no_grad():
            weight.add_(0.5)  # through the DTensor
        step()
        with torch.no_grad():
            weight.to_local().add_(0.5)  # through its local shard
        step()
        assert engine.zero_stray_weights([optimizer]) == {"0.weight": 2 * masked}
        assert (weight.to_local()[~engine.masks["0.weight"].to_local()] == 0).all()


def test_sharded_masks_checkpoint_with_the_model_and_consolidate(tmp_path):
    """The plain-loop recipe: masks held as buffers of the model go into its distributed
    checkpoint, load back in place, and consolidate into one file of whole masks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from lightning_ggr.sparse.sharded import consolidate_masks, hold_masks_in_model

    with one_process_group():
        model, _ = _one_rank_model()
        engine = SparseEngine(select_sparse_parameters(model), sparsity=0.7, seed=1)
        hold_masks_in_model(model, engine.masks)
        assert "0.weight_sparse_mask" in model.state_dict()
        saved = {name: full(mask).clone() for name, mask in engine.masks.items()}
        dcp.save({"model": get_model_state_dict(model), "sparse": engine.state_dict()},
                 checkpoint_id=tmp_path / "checkpoint")
        for mask in engine.masks.values():
            mask.to_local().zero_()
        state = {"model": get_model_state_dict(model), "sparse": engine.state_dict()}
        dcp.load(state, checkpoint_id=tmp_path / "checkpoint")
        engine.load_state_dict(state["sparse"])
        for name, mask in saved.items():
            assert torch.equal(full(engine.masks[name]), mask)
        assert engine.active_counts() == {n: int(m.sum()) for n, m in saved.items()}
        # a single-device state (whole masks) resumes on shards: each process takes its rows
        whole = {**engine.state_dict(), "masks": saved}
        adopted = SparseEngine.from_state_dict(engine.params, whole, sparsity=0.7, seed=1)
        for name, mask in saved.items():
            assert torch.equal(full(adopted.masks[name]), mask)
    masks = consolidate_masks(tmp_path / "checkpoint", tmp_path / "masks.pt", prefix="model.")
    assert set(masks) == set(saved)  # the buffers and the engine's state name the same
    for name, mask in saved.items():
        assert torch.equal(masks[name], mask)
        assert torch.equal(torch.load(tmp_path / "masks.pt")["masks"][name], mask)
    with pytest.raises(ValueError, match="holds no sparse masks"):
        dcp.save({"weights": torch.ones(3)}, checkpoint_id=tmp_path / "dense", no_dist=True)
        consolidate_masks(tmp_path / "dense")


def test_tensor_parallel_offloaded_and_old_torch_shards_are_refused(monkeypatch):
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_ggr.sparse import sharded

    with one_process_group():
        model, mesh = _one_rank_model()
        column = nn.Parameter(distribute_tensor(torch.ones(4, 6), mesh, [Shard(1)]))
        with pytest.raises(ValueError, match=r"'w' is a DTensor placed \(Shard\(dim=1\),\).*"
                                             "tensor parallelism"):
            sharded.layout_of({"w": column})
        params = select_sparse_parameters(model)
        # a CUDA mesh whose shards sit on the CPU: FSDP2's CPU offload
        monkeypatch.setattr(type(mesh), "device_type", property(lambda self: "cuda"))
        with pytest.raises(ValueError, match=r"CPU offload .* not supported"):
            sharded.layout_of(params)
        monkeypatch.setattr(sharded, "SHARDING_TORCH", (99, 0))
        with pytest.raises(RuntimeError, match=r"needs torch >= 99.0 .* found torch"):
            sharded.layout_of(params)


def test_a_model_sharded_over_lightnings_whole_2d_mesh_is_refused_with_the_way():
    """``fully_shard(module, mesh=self.device_mesh)`` under ModelParallelStrategy (its mesh
    is 2-D even with ``tensor_parallel_size=1``) gives HSDP placements: refused, naming the
    data-parallel dimension to shard over."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lightning_ggr.sparse.sharded import check_sharding

    with one_process_group():
        mesh = init_device_mesh("cpu", (1, 1), mesh_dim_names=("data_parallel",
                                                               "tensor_parallel"))
        model = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 3))
        fully_shard(model, mesh=mesh)
        with pytest.raises(ValueError, match=r"'0.weight' is a DTensor placed \(Replicate\(\), "
                                             r"Shard\(dim=0\)\) on a 2-D .*"
                                             r"mesh=self.device_mesh\['data_parallel'\]"):
            check_sharding(select_sparse_parameters(model))
        assert check_sharding({"w": torch.ones(3)}) is None  # nothing sharded


def test_held_masks_are_read_from_a_single_file_checkpoint(tmp_path):
    """A full state dict saved in one file (ModelParallelStrategy with
    ``save_distributed_checkpoint=False``) gives the whole masks of its mask buffers; a
    checkpoint without one of them is refused, naming it."""
    from lightning_ggr.sparse.sharded import load_held_masks

    mask = torch.rand(5, 3) > 0.5
    torch.save({"state_dict": {"net.0.weight": torch.ones(5, 3),
                               "net.0.weight_sparse_mask": mask}}, tmp_path / "full.ckpt")
    found = load_held_masks({"net.0.weight": torch.zeros(5, 3, dtype=torch.bool)},
                            tmp_path / "full.ckpt")
    assert list(found) == ["net.0.weight"] and torch.equal(found["net.0.weight"], mask)
    with pytest.raises(ValueError, match=r"holds no saved mask named \['state_dict.net.2"):
        load_held_masks({"net.2.weight": mask}, tmp_path / "full.ckpt")


def check_replicas_warning(rank: int, world: int) -> dict:
    """A partly sharded model trained on each rank's own data: the replicated head drifts."""
    import warnings

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    fully_shard(model[0], mesh=init_device_mesh("cpu", (world,)))  # model[2] stays plain
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = SparseEngine(select_sparse_parameters(model, trained=[optimizer]), sparsity=0.5,
                          method="rigl")
    assert not engine.layout.layers["2.weight"].sharded
    found = []
    for step in range(3):  # the same data everywhere, then each rank its own
        generator = torch.Generator().manual_seed(step * (1 + rank))
        model(torch.randn(4, 6, generator=generator)).square().sum().backward()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine.rewire(0.3, [optimizer])
        found.append([str(w.message) for w in caught if "plain tensors" in str(w.message)])
        engine.mask_gradients()
        optimizer.step()
        optimizer.zero_grad()
    return {"warned": [bool(messages) for messages in found], "message": found[-1]}


@pytest.mark.ddp
@pytest.mark.slow
def test_replicated_layers_whose_copies_drift_apart_are_named_at_a_rewiring(tmp_path):
    """Regression: FSDP2 reduces only the gradients of parameters fully_shard manages, so a
    partly sharded model's plain sparse layers trained apart on each process, silently reset
    to rank 0's at every rewiring. A rewiring now warns (rank 0, once) naming them; equal
    copies (before any step on different data) raise nothing."""
    result = spawn(check_replicas_warning, folder=tmp_path)
    assert result["warned"] == [False, False, True]  # the copies differ after step 1
    assert "['2.weight'] are plain tensors" in result["message"][0]


def test_an_engine_built_before_fully_shard_is_refused_at_the_first_step():
    """Regression: ``fully_shard`` replaces the module's parameters, so an engine built
    before it masked and rewired the old tensors, which nothing trains, while the model
    trained dense, silently. The first step with the optimizer now refuses it; an engine
    built after sharding passes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    with one_process_group():
        model = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 3))
        early = SparseEngine(select_sparse_parameters(model), sparsity=0.5)
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model(torch.randn(2, 7)).sum().backward()
        with pytest.raises(ValueError, match=r"engine was built before fully_shard.*"
                                             r"Build the SparseEngine .* after fully_shard"):
            early.before_optimizer_step(0, 0, [optimizer])
        engine = SparseEngine(select_sparse_parameters(model), sparsity=0.5)
        engine.before_optimizer_step(0, 0, [optimizer])
        assert engine.layout is not None


def test_a_shard_placement_other_than_the_rows_is_refused_naming_the_placement_function():
    """FSDP2's ``shard_placement_fn`` may shard a parameter along another dimension."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    with one_process_group():
        model = nn.Sequential(nn.Linear(7, 9), nn.Tanh(), nn.Linear(9, 3))
        fully_shard(model, mesh=init_device_mesh("cpu", (1,)),
                    shard_placement_fn=lambda param: Shard(1) if param.dim() == 2 else None)
        with pytest.raises(ValueError, match=r"placed \(Shard\(dim=1\),\) on a 1-D .*"
                                             r"shard_placement_fn=.*Shard\(0\)"):
            SparseEngine(select_sparse_parameters(model), sparsity=0.5)
