"""What makes the engine fast on an accelerator, checked on a CPU (issue 13).

Kernels cannot be timed here, so the tests count what the GPU would pay for: the operations
one per-step pass issues (top-level ``aten::`` operations in ``torch.profiler``; views are
metadata and launch nothing), the bytes it allocates, and the calls that read a tensor back
to the host (each one a ``cudaStreamSynchronize`` on a GPU). ``benchmarks/overhead.py``
times the same on a GPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.profiler import ProfilerActivity, profile

from lightning_ggr.sparse import METHODS, SparseEngine, select_sparse_parameters
from lightning_ggr.sparse.masks import MaskPass
from lightning_ggr.sparse.syncs import top_level_operations

HOST_READS = {"aten::item", "aten::_local_scalar_dense", "aten::is_nonzero", "aten::equal"}
METADATA = {"aten::view", "aten::as_strided", "aten::alias", "aten::detach", "aten::empty"}


def conv_net(layers: int, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    modules: list[nn.Module] = [nn.Conv2d(3, 8, 3, padding=1)]
    for _ in range(layers - 2):
        modules += [nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)]
    modules += [nn.Flatten(), nn.Linear(8 * 6 * 6, 10)]
    return nn.Sequential(*modules).to(dtype)


def engine_with_gradients(layers: int, dtype: torch.dtype = torch.float32,
                          channels_last: bool = False, method: str = "ggr"):
    model = conv_net(layers, dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    params = select_sparse_parameters(model)
    engine = SparseEngine(params, sparsity=0.8, method=method, seed=0)
    x = torch.randn(2, 3, 6, 6, dtype=dtype)
    model(x).float().square().sum().backward()
    return model, params, engine


def profiled(fn) -> dict:
    """Top-level operations, host reads and allocated bytes of one call of ``fn``."""
    fn()  # warm-up
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.events()

    names = top_level_operations(events)
    return {
        "operations": [n for n in names if n not in METADATA],
        "host_reads": [e.name for e in events if e.name in HOST_READS],
        "allocated": sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages()),
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_step_pass_is_one_operation_whatever_the_number_of_layers(single_thread, dtype):
    for layers in (3, 30):
        _, params, engine = engine_with_gradients(layers, dtype)
        assert len(params) == layers
        got = profiled(engine.mask_gradients)
        assert got["operations"] == ["aten::_foreach_mul_"], (layers, got)
        assert got["host_reads"] == []
        assert got["allocated"] == 0


def test_weights_and_optimizer_state_are_masked_by_one_operation_each(single_thread):
    model, _, engine = engine_with_gradients(12)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    engine.mask_gradients()
    optimizer.step()
    got = profiled(engine.apply_masks)
    assert got["operations"] == ["aten::_foreach_mul_"] and got["allocated"] == 0
    got = profiled(lambda: engine.enforce_masks([optimizer]))
    # weights, then Adam's two moments in one call
    assert got["operations"] == ["aten::_foreach_mul_"] * 2, got
    assert got["host_reads"] == [] and got["allocated"] == 0


def test_one_operation_per_dtype_group(single_thread):
    _, params, _ = engine_with_gradients(4)
    param = params["2.weight"]
    param.data = param.data.double()
    param.grad = param.grad.double()
    engine = SparseEngine(params, sparsity=0.8, seed=0)
    got = profiled(engine.mask_gradients)
    assert got["operations"] == ["aten::_foreach_mul_"] * 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_masked_gradients_become_exact_zeros_over_nan_and_inf(single_thread, dtype,
                                                               channels_last):
    _, params, engine = engine_with_gradients(3, dtype, channels_last)
    for index, param in enumerate(params.values()):
        param.grad.fill_(float("nan") if index % 2 else float("inf"))
    before = {name: p.grad.clone() for name, p in params.items()}
    engine.mask_gradients()
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    for name, param in params.items():
        mask = engine.masks[name]
        assert (param.grad[~mask] == 0).all() and not torch.signbit(param.grad[~mask]).any()
        assert torch.equal(param.grad[mask].view(bits), before[name][mask].view(bits))


def test_mask_pass_follows_new_masks_and_skips_missing_gradients():
    params = [torch.randn(4, 3), torch.randn(5)]
    masks = [torch.rand(4, 3) < 0.5, torch.ones(5, dtype=torch.bool)]
    mask_pass = MaskPass(params, masks)
    assert mask_pass.nbytes == (12 + 5) * 4  # one int32 per float32 weight
    masks[1][:2] = False
    mask_pass.refresh()
    grads = [None, torch.ones(5)]
    mask_pass.apply_(enumerate(grads))
    assert grads[1].tolist() == [0, 0, 1, 1, 1]
    other_dtype = torch.full((5,), float("nan"), dtype=torch.float16)  # exact where() instead
    mask_pass.apply_([(1, other_dtype)])
    assert other_dtype[:2].tolist() == [0, 0] and other_dtype[2:].isnan().all()


class SyncHazards(TorchFunctionMode):
    """Records the calls that synchronise with a GPU when their tensors live on one: reading
    a value back (``item``, ``tolist``, ``bool()``, ``.cpu()``...), an output whose size
    depends on the data (``nonzero``, boolean indexing, ``masked_select``, ``unique``,
    ``bincount``), and item assignment of a Python number (CUDA builds the number on the CPU
    and copies it over, synchronously). On a CPU none of them waits, so counting the calls
    is how a CPU test sees what a GPU would pay."""

    READS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu",
                       "numpy"})
    DATA_SIZED = frozenset({"nonzero", "argwhere", "masked_select", "unique",
                            "unique_consecutive", "bincount", "repeat_interleave"})
    #: Copy host data to the device when given ``device=`` (``unravel_index`` always does,
    #: for the shape).
    FROM_HOST = frozenset({"tensor", "as_tensor", "unravel_index"})

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    @staticmethod
    def _bool_index(index) -> bool:
        items = index if isinstance(index, tuple) else (index,)
        return any(torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in items)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS or name in self.DATA_SIZED:
            self.calls.append(name)
        elif name in ("__getitem__", "__setitem__") and self._bool_index(args[1]):
            self.calls.append(f"{name} with a bool index")
        elif name == "__setitem__" and not torch.is_tensor(args[2]):
            self.calls.append("__setitem__ of a Python number")
        elif name in self.FROM_HOST and not (args and torch.is_tensor(args[0])
                                             and name != "unravel_index") and (
                name == "unravel_index" or (kwargs or {}).get("device") is not None):
            # built on the device straight from host data: a synchronous copy on CUDA
            self.calls.append(f"{name} from host data")
        elif name == "to" and args and torch.is_tensor(args[0]) and args[0].device.type == (
                "cpu") and ("device" in (kwargs or {}) or any(
                    isinstance(a, (torch.device, str)) for a in args[1:])) and not (
                kwargs or {}).get("non_blocking", False):
            # a host tensor sent to a device without non_blocking (pinned memory) waits
            self.calls.append("to() from the host")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_due_rewiring_synchronises_a_fixed_number_of_times(single_thread, method,
                                                            channels_last):
    """Not per layer: the gradient check is one read, GGR's allocation and DSR's removal
    counts one more; SET and RigL need none (their counts are known on the host). Random
    growth draws one key from the engine's CPU generator (a read of host memory, never a
    wait for the device). Nothing else that would wait for a GPU (the former code assigned
    Python numbers by index: about five synchronisations per layer on an H100)."""
    calls = {}
    for layers in (3, 24):
        model, _, engine = engine_with_gradients(layers, method=method,
                                                 channels_last=channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        optimizer.step()
        engine.rewire(0.3, [optimizer])  # DSR's first threshold set
        x = torch.randn(2, 3, 6, 6)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        model(x).square().sum().backward()
        hazards = SyncHazards()
        with hazards:
            assert engine.gradients_usable([optimizer]) and engine.gradients_finite([optimizer])
            engine.rewire(0.3, [optimizer])
            engine.mask_gradients()
            engine.layer_densities()
            engine.global_density()
        calls[layers] = hazards.calls
    data_dependent = (METHODS[method].allocation == "gradient"
                      or METHODS[method].removal == "threshold")
    expected = ["tolist", "tolist"] + (["tolist"] if data_dependent else [])  # check, check
    if METHODS[method].insertion != "gradient":
        expected.append("__int__")  # the random key, from the CPU generator
    assert calls == {3: expected, 24: expected}
