"""The engine on its own: a plain PyTorch training loop, no Lightning."""

import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from lightning_ggr.sparse import (
    METHODS,
    RewiringSchedule,
    SparseEngine,
    select_sparse_parameters,
)
from lightning_ggr.sparse.engine import (
    SKIP_NO_GRADIENTS,
    SKIP_NONFINITE,
    SKIP_OPTIMIZER_NONFINITE,
)
from tests.helpers.marks import REWIRES_WITHOUT_OPTIMIZER


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 8 * 8, 10),
    )


def test_engine_module_imports_no_lightning():
    code = ("import sys, lightning_ggr.sparse, lightning_ggr; "
            "roots = {m.split('.')[0] for m in sys.modules}; "
            "assert not roots & {'lightning', 'pytorch_lightning'}, roots")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_plain_pytorch_loop(method, optimizer_name):
    model = tiny_net()
    params = select_sparse_parameters(model)
    assert list(params) == ["0.weight", "2.weight", "5.weight"]  # biases stay dense
    schedule = RewiringSchedule("step", 3, stop_step=15, drop_fraction=0.3)
    engine = SparseEngine(params, sparsity=0.8, method=method, schedule=schedule, seed=1)
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    counts = dict(engine.initial_counts)
    total = sum(counts.values())
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    reports = []
    for step in range(18):
        nn.functional.cross_entropy(model(x), y).backward()
        report = engine.before_optimizer_step(step, epoch=0, optimizers=[optimizer])
        if report is not None:
            reports.append(report)
        optimizer.step()
        engine.after_optimizer_step()
        optimizer.zero_grad()
        assert engine.total_active == total
        for name, param in params.items():
            mask = engine.masks[name]
            assert (param[~mask] == 0).all()
            for value in optimizer.state[param].values():
                if value.shape == param.shape:
                    assert (value[~mask] == 0).all(), f"optimizer state revives {name}"
    assert [len(r.removed) > 0 for r in reports] == [True] * 4  # steps 3, 6, 9, 12
    assert engine.rewirings == 4
    if not METHODS[method].moves_between_layers:
        assert engine.active_counts() == counts


def test_masks_are_exact_and_reproducible():
    a = SparseEngine(select_sparse_parameters(tiny_net()), sparsity=0.9, seed=3)
    b = SparseEngine(select_sparse_parameters(tiny_net()), sparsity=0.9, seed=3)
    c = SparseEngine(select_sparse_parameters(tiny_net()), sparsity=0.9, seed=4)
    assert a.active_counts() == a.initial_counts
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in a.masks)
    assert not all(torch.equal(a.masks[n], c.masks[n]) for n in a.masks)
    assert all(m.dtype == torch.bool for m in a.masks.values())


@REWIRES_WITHOUT_OPTIMIZER
def test_growth_only_at_inactive_positions_and_from_the_dense_gradient():
    model = tiny_net()
    params = select_sparse_parameters(model)
    engine = SparseEngine(params, sparsity=0.9, method="rigl", seed=0)
    before = {n: m.clone() for n, m in engine.masks.items()}
    nn.functional.cross_entropy(model(torch.randn(16, 1, 8, 8)),
                                torch.randint(0, 10, (16,))).backward()
    dense_grads = {n: p.grad.clone() for n, p in params.items()}
    engine.rewire(0.5)
    for name, mask in engine.masks.items():
        new = mask & ~before[name]
        assert not (new & before[name]).any()
        # RigL grows where the dense |gradient| over formerly inactive positions is largest.
        if new.any():
            grown_min = dense_grads[name][new].abs().min()
            others = dense_grads[name][~before[name] & ~mask].abs()
            assert others.numel() == 0 or grown_min >= others.max()


@REWIRES_WITHOUT_OPTIMIZER
def test_nonfinite_gradients_postpone_the_rewiring():
    model = tiny_net()
    params = select_sparse_parameters(model)
    schedule = RewiringSchedule("step", 2, stop_step=100, drop_fraction=0.3)
    engine = SparseEngine(params, sparsity=0.8, method="ggr", schedule=schedule)
    masks = {n: m.clone() for n, m in engine.masks.items()}
    nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)),
                                torch.randint(0, 10, (4,))).backward()
    params["0.weight"].grad[0, 0, 0, 0] = float("nan")
    report = engine.before_optimizer_step(2, 0)
    assert report is not None and report.skipped
    assert report.skip_reason == "non-finite sparse gradients"
    assert all(torch.equal(masks[n], engine.masks[n]) for n in masks)
    params["0.weight"].grad.nan_to_num_(0.0)
    report = engine.before_optimizer_step(3, 0)  # same slot: retried on the next step
    assert report is not None and not report.skipped and report.total_removed > 0
    assert report.skip_reason is None
    assert engine.before_optimizer_step(4, 0) is not None  # next slot
    assert engine.before_optimizer_step(5, 0) is None


@REWIRES_WITHOUT_OPTIMIZER
def test_state_dict_round_trip():
    model = tiny_net()
    params = select_sparse_parameters(model)
    engine = SparseEngine(params, sparsity=0.8, method="dsr", seed=5)
    nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)),
                                torch.randint(0, 10, (4,))).backward()
    engine.rewire(0.2)
    state = engine.state_dict()
    buffer = __import__("io").BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    other = SparseEngine(select_sparse_parameters(tiny_net()), sparsity=0.8, method="dsr",
                         masks=loaded["masks"])
    other.load_state_dict(loaded)
    assert all(torch.equal(other.masks[n], engine.masks[n]) for n in engine.masks)
    assert other.threshold == engine.threshold is not None
    assert torch.equal(other.generator.get_state(), engine.generator.get_state())


def test_per_step_masking_allocates_nothing_and_clears_nan():
    from torch.profiler import ProfilerActivity, profile

    model = tiny_net()
    params = select_sparse_parameters(model)
    engine = SparseEngine(params, sparsity=0.9, seed=0)
    nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)),
                                torch.randint(0, 10, (4,))).backward()
    engine.mask_gradients()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        engine.mask_gradients()
        engine.apply_masks()
    allocated = sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())
    assert allocated == 0
    grad = params["5.weight"].grad
    grad.fill_(float("nan"))
    engine.mask_gradients()
    assert (grad[~engine.masks["5.weight"]] == 0).all()


@REWIRES_WITHOUT_OPTIMIZER
def test_from_state_dict_adopts_the_saved_masks_without_drawing_new_ones(monkeypatch):
    import lightning_ggr.sparse.engine as engine_module

    model = tiny_net()
    engine = SparseEngine(select_sparse_parameters(model), sparsity=0.8, method="dsr", seed=5)
    nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)),
                                torch.randint(0, 10, (4,))).backward()
    engine.rewire(0.2)
    state = engine.state_dict()

    def no_draw(*args, **kwargs):
        raise AssertionError("a resumed engine must not draw masks")

    monkeypatch.setattr(engine_module, "random_mask", no_draw)
    resumed_model = tiny_net()
    resumed = SparseEngine.from_state_dict(select_sparse_parameters(resumed_model), state,
                                           sparsity=0.8, method="dsr", seed=5)
    assert all(torch.equal(resumed.masks[n], engine.masks[n]) for n in engine.masks)
    assert resumed.threshold == engine.threshold is not None
    assert resumed.rewirings == 1 and resumed.last_slot == engine.last_slot
    assert torch.equal(resumed.generator.get_state(), engine.generator.get_state())
    for name, param in select_sparse_parameters(resumed_model).items():
        assert (param[~resumed.masks[name]] == 0).all()


def _backward(model):
    model.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)),
                                torch.randint(0, 10, (4,))).backward()


@REWIRES_WITHOUT_OPTIMIZER
def test_a_postponed_rewiring_stays_pending_past_the_stop_and_survives_a_checkpoint():
    model = tiny_net()
    params = select_sparse_parameters(model)
    schedule = RewiringSchedule("step", 4, stop_step=9, drop_fraction=0.3)
    engine = SparseEngine(params, sparsity=0.8, method="set", schedule=schedule)
    _backward(model)
    params["0.weight"].grad[0, 0, 0, 0] = float("nan")
    assert engine.before_optimizer_step(8, 0).skipped  # the last due step before the stop
    assert engine.pending_step == 8
    state = engine.state_dict()
    assert state["pending_step"] == 8
    resumed = SparseEngine.from_state_dict(select_sparse_parameters(tiny_net()), state,
                                           sparsity=0.8, method="set", schedule=schedule)
    for candidate in (engine, resumed):
        for p in candidate.params.values():
            p.grad = torch.zeros_like(p)
        report = candidate.before_optimizer_step(9, 0)  # at the stop: runs all the same
        assert report is not None and not report.skipped
        assert report.drop_fraction == pytest.approx(schedule.drop_fraction_at(8))
        assert report.drop_fraction > 0
        assert candidate.pending_step is None and candidate.last_rewiring_step == 9
        assert candidate.before_optimizer_step(10, 0) is None


@REWIRES_WITHOUT_OPTIMIZER
@pytest.mark.parametrize(("method", "postponed"), [("rigl", True), ("ggr", True),
                                                   ("set", False), ("dsr", False)])
def test_a_step_without_gradients_postpones_only_methods_that_grow_by_gradient(method,
                                                                              postponed):
    params = select_sparse_parameters(tiny_net())
    engine = SparseEngine(params, sparsity=0.8, method=method,
                          schedule=RewiringSchedule("step", 2, stop_step=10, drop_fraction=0.3))
    report = engine.before_optimizer_step(2, 0)  # every .grad is None
    assert report.skipped is postponed
    assert report.skip_reason == (
        "no sparse gradients (the method grows by gradient)" if postponed else None)
    assert (engine.pending_step == 2) is postponed


@pytest.mark.parametrize(("method", "warns"), [("rigl", True), ("ggr", True),
                                               ("set", False), ("dsr", False)])
def test_gradients_zeroed_and_not_recomputed_make_growth_by_gradient_warn(method, warns):
    """``zero_grad(set_to_none=False)`` and no backward before a due step: every gradient is
    an all-zero tensor, and growth by gradient has no signal (adversarial finding). A dead
    network gives the same zeros, so the rewiring runs (it may revive the network), with one
    warning that says so."""
    model = tiny_net()
    engine = SparseEngine(select_sparse_parameters(model), sparsity=0.8, method=method,
                          schedule=RewiringSchedule("step", 2, stop_step=10, drop_fraction=0.3))
    _backward(model)
    model.zero_grad(set_to_none=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = engine.before_optimizer_step(2, 0)
        _backward(model)
        engine.before_optimizer_step(4, 0)
        model.zero_grad(set_to_none=False)
        engine.before_optimizer_step(6, 0)
    assert report is not None and not report.skipped and engine.rewirings == 3
    silent = [w for w in caught if "every sparse gradient is zero" in str(w.message)]
    assert len(silent) == (1 if warns else 0)  # once per engine


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["sparse weight", "dense bias"])
def test_a_nonfinite_gradient_anywhere_in_the_optimizer_postpones_a_due_rewiring(bad, where):
    """Each non-finite kind, in a sparse gradient or in a dense one of the same optimizer (a
    grad scaler skips that step): postponed, with its reason, masks untouched, masked
    gradients still zeroed; the next usable step runs it."""
    model = tiny_net()
    params = select_sparse_parameters(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = SparseEngine(params, sparsity=0.8, method="ggr",
                          schedule=RewiringSchedule("step", 2, stop_step=10, drop_fraction=0.3))
    _backward(model)
    target = params["0.weight"] if where == "sparse weight" else model[0].bias
    # at an active position (the mask pass zeroes a masked one): which one depends on the draw
    first = int(engine.masks["0.weight"].view(-1).nonzero()[0])
    target.grad.view(-1)[first if where == "sparse weight" else 1] = bad
    masks = {n: m.clone() for n, m in engine.masks.items()}
    report = engine.before_optimizer_step(2, 0, [optimizer])
    reason = SKIP_NONFINITE if where == "sparse weight" else SKIP_OPTIMIZER_NONFINITE
    assert report.skipped and report.skip_reason == reason and report.total_grown == 0
    assert engine.pending_step == 2 and engine.skip_reasons == {reason: 1}
    assert all(torch.equal(engine.masks[n], m) for n, m in masks.items())
    assert all((p.grad[~engine.masks[n]] == 0).all() for n, p in params.items())
    # Without the optimizer the engine sees only the sparse gradients.
    assert engine.gradients_finite() is (where == "dense bias")
    assert engine.gradients_finite([optimizer]) is False
    target.grad.nan_to_num_(0.0, 0.0, 0.0)
    report = engine.before_optimizer_step(3, 0, [optimizer])
    assert not report.skipped and report.skip_reason is None and engine.rewirings == 1
    assert engine.pending_step is None
    restored = SparseEngine.from_state_dict(params, engine.state_dict(), sparsity=0.8)
    assert restored.skip_reasons == {reason: 1} and restored.skipped_rewirings == 1


def test_a_step_without_gradients_says_so():
    model = tiny_net()
    engine = SparseEngine(select_sparse_parameters(model), sparsity=0.8, method="rigl",
                          schedule=RewiringSchedule("step", 2, stop_step=10, drop_fraction=0.3))
    report = engine.before_optimizer_step(2, 0)
    assert report.skipped and report.skip_reason == SKIP_NO_GRADIENTS


def test_one_zero_gradient_layer_among_others_is_usable():
    model = tiny_net()
    engine = SparseEngine(select_sparse_parameters(model), sparsity=0.8, method="ggr")
    _backward(model)
    engine.params["2.weight"].grad.zero_()  # an unused branch: the others carry the signal
    assert engine.gradients_usable()


@REWIRES_WITHOUT_OPTIMIZER
def test_the_schedule_position_survives_a_change_of_interval():
    """The position is the step and epoch of the last rewiring, not a slot of the old unit."""
    model = tiny_net()
    params = select_sparse_parameters(model)
    engine = SparseEngine(params, sparsity=0.8, method="set",
                          schedule=RewiringSchedule("step", 2, stop_step=30, drop_fraction=0.3))
    _backward(model)
    assert engine.before_optimizer_step(14, 1) is not None
    assert engine.last_slot == 7
    engine.schedule = RewiringSchedule("step", 4, stop_step=30, drop_fraction=0.3)
    assert engine.last_slot == 3
    assert engine.before_optimizer_step(15, 1) is None
    assert engine.before_optimizer_step(16, 2) is not None  # slot 4 > 3
    engine.schedule = RewiringSchedule("epoch", 1, stop_step=30, drop_fraction=0.3)
    assert engine.before_optimizer_step(17, 2) is None  # epoch 2 already rewired
    assert engine.before_optimizer_step(24, 3) is not None


def test_rewiring_without_the_optimizers_warns_once():
    """A plain loop that forgets to pass its optimizer would leave momentum at dropped
    positions (it moves masked weights off 0 at the next step): the engine says so, once."""
    model = tiny_net()
    engine = SparseEngine(select_sparse_parameters(model), sparsity=0.8, method="set", seed=0)
    nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)),
                                torch.randint(0, 10, (4,))).backward()
    with pytest.warns(UserWarning, match=r"rewire ran without optimizers.*\[optimizer\]"):
        engine.rewire(0.2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.rewire(0.2)  # said once
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        engine.rewire(0.2, [optimizer])


@pytest.mark.parametrize("how", ["requires_grad_(False)", "not in the optimizer"])
@pytest.mark.parametrize("method", ["ggr", "dsr", "set", "rigl"])
def test_a_frozen_sparse_layer_takes_no_part_in_rewiring(how, method):
    """Its mask and weights stay as they are, it is in no removal or allocation (GGR's and
    DSR's budgets are shared by the other layers alone), and its stale gradient does not
    decide anything."""
    model = tiny_net()
    params = select_sparse_parameters(model)
    frozen = params["2.weight"]
    engine = SparseEngine(params, sparsity=0.5, method=method, seed=3)
    _backward(model)
    frozen.grad.fill_(float("nan"))  # stale and unusable: must not postpone anything
    if how == "requires_grad_(False)":
        frozen.requires_grad_(False)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        optimizer = torch.optim.SGD([p for p in model.parameters() if p is not frozen], lr=0.1)
    assert engine.frozen([optimizer]) == ["2.weight"]
    assert engine.gradients_usable([optimizer])
    mask, weight = engine.masks["2.weight"].clone(), frozen.detach().clone()
    active = engine.active_counts()
    report = engine.rewire(0.5, [optimizer])
    assert report.frozen == ("2.weight",)
    assert report.removed["2.weight"] == report.grown["2.weight"] == 0
    assert report.active["2.weight"] == active["2.weight"]
    assert torch.equal(engine.masks["2.weight"], mask) and torch.equal(frozen.detach(), weight)
    others = [n for n in params if n != "2.weight"]
    assert sum(report.removed[n] for n in others) == sum(report.grown[n] for n in others) > 0
    assert sum(engine.active_counts()[n] for n in others) == sum(active[n] for n in others)


@REWIRES_WITHOUT_OPTIMIZER
def test_every_sparse_layer_frozen_passes_the_slot_moving_nothing():
    """And says nothing about zero gradients: no layer takes part."""
    model = tiny_net()
    engine = SparseEngine(select_sparse_parameters(model), sparsity=0.5, method="rigl",
                          schedule=RewiringSchedule("step", 2, stop_step=10, drop_fraction=0.3))
    masks = {n: m.clone() for n, m in engine.masks.items()}
    for param in model.parameters():
        param.requires_grad_(False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="every sparse gradient is zero")
        report = engine.before_optimizer_step(2, 0)
    assert not report.skipped and report.total_grown == 0 and engine.rewirings == 1
    assert all(torch.equal(engine.masks[n], m) for n, m in masks.items())


def test_masked_weights_written_by_something_else_are_found_counted_and_zeroed():
    """At a due step, within the gradient check's one read: per layer, exactly how many;
    zeroed with the optimizer's state there before the rewiring; ``zero_stray_weights`` does
    the same on demand; the totals are checkpointed."""
    model = tiny_net()
    params = select_sparse_parameters(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    engine = SparseEngine(params, sparsity=0.8, method="set",
                          schedule=RewiringSchedule("step", 2, stop_step=10, drop_fraction=0.3))

    def write(name: str, count: int) -> None:
        positions = (~engine.masks[name]).reshape(-1).nonzero().squeeze(1)[:count]
        with torch.no_grad():
            params[name].view(-1)[positions] = 0.5

    write("0.weight", 5)
    write("5.weight", 2)
    _backward(model)
    assert engine.before_optimizer_step(1, 0, [optimizer]) is None  # not due: not looked at
    optimizer.step()  # weight decay carries the strays into the momentum
    write("0.weight", 5)
    report = engine.before_optimizer_step(2, 0, [optimizer])
    assert report.stray_weights == {"0.weight": 5, "5.weight": 2}
    for name, param in params.items():
        masked = ~engine.masks[name]
        assert (param.detach()[masked] == 0).all()
        assert (optimizer.state[param]["momentum_buffer"][masked] == 0).all()
    assert engine.zero_stray_weights([optimizer]) == {}
    write("2.weight", 3)
    assert engine.zero_stray_weights([optimizer]) == {"2.weight": 3}
    assert engine.stray_weights_zeroed == {"0.weight": 5, "5.weight": 2, "2.weight": 3}
    restored = SparseEngine.from_state_dict(params, engine.state_dict(), sparsity=0.8)
    assert restored.stray_weights_zeroed == engine.stray_weights_zeroed


def test_writes_collected_before_steps_are_counted_once_by_the_next_check():
    """For loops that zero masked weights after every step (optimizers outside the
    zero-preserving list), ``collect_stray_weights`` counts writes right before the step
    (on the device) and zeroes them; the next rewiring or ``zero_stray_weights`` reports
    them with its own, once; a checkpoint taken before that counts them already."""
    model = tiny_net()
    params = select_sparse_parameters(model)
    optimizer = torch.optim.Adamax(model.parameters(), lr=0.1)
    engine = SparseEngine(params, sparsity=0.8, method="set",
                          schedule=RewiringSchedule("step", 3, stop_step=10, drop_fraction=0.3))

    def write(name: str, count: int) -> None:
        positions = (~engine.masks[name]).reshape(-1).nonzero().squeeze(1)[:count]
        with torch.no_grad():
            params[name].view(-1)[positions] = 0.5

    for step, (name, count) in enumerate([("0.weight", 4), ("5.weight", 1)]):
        write(name, count)
        _backward(model)
        assert engine.before_optimizer_step(step, 0, [optimizer]) is None
        engine.collect_stray_weights()
        assert (params[name].detach()[~engine.masks[name]] == 0).all()  # zeroed already
        optimizer.step()
        engine.after_optimizer_step([optimizer])
    saved = engine.state_dict()["stray_weights_zeroed"]
    assert saved == {"0.weight": 4, "5.weight": 1}
    assert engine.stray_weights_zeroed == {}  # saving reads them but changes nothing
    write("2.weight", 2)
    _backward(model)
    report = engine.before_optimizer_step(3, 0, [optimizer])  # due: one read for all
    assert report.stray_weights == {"0.weight": 4, "5.weight": 1, "2.weight": 2}
    assert engine.zero_stray_weights([optimizer]) == {}  # counted once
    engine.collect_stray_weights()
    assert engine.zero_stray_weights([optimizer]) == {}
    write("2.weight", 3)
    engine.collect_stray_weights()
    assert engine.zero_stray_weights([optimizer]) == {"2.weight": 3}
    assert engine.stray_weights_zeroed == {"0.weight": 4, "5.weight": 1, "2.weight": 5}
