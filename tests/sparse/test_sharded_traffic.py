"""Issue 19, items 1 and 4: on FSDP2 shards no process materialises a whole layer, and a
rewiring's collectives are bounded by a fixed histogram size, never by the layer size.

One process in a gloo group of its own: the sharded code path runs (every collective is
issued, over a world of 1), so what it sends can be recorded and compared between two
models that differ only in size.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_ggr import SparseEngine, select_sparse_parameters
from lightning_ggr.sparse.methods import METHODS
from tests.helpers.distributed import one_process_group

#: Every collective of torch.distributed a rewiring could send a layer's worth through.
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object",
               "broadcast", "broadcast_object_list", "reduce_scatter_tensor", "all_to_all",
               "all_to_all_single", "gather", "scatter", "reduce")


def _bytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_bytes(item) for item in value)
    return 0


def _sharded_run(monkeypatch, method: str, width: int) -> tuple[list[tuple[str, int]], int]:
    """(collective, bytes sent) of one rewiring of a sharded ``Linear(width, 2 width) ->
    Linear(2 width, width)``, and the weights it grew. ``DTensor.full_tensor`` and
    ``redistribute`` (the ways to gather a whole layer) fail from the engine's creation on."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    def whole_layer(*args, **kwargs):
        raise AssertionError("a whole layer was gathered on one process")

    with one_process_group(), monkeypatch.context() as patched:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(width, 2 * width), nn.Tanh(),
                              nn.Linear(2 * width, width))
        mesh = init_device_mesh("cpu", (1,))
        for layer in (model[0], model[2]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        patched.setattr(DTensor, "full_tensor", whole_layer)
        patched.setattr(DTensor, "redistribute", whole_layer)
        engine = SparseEngine(select_sparse_parameters(model), sparsity=0.8, method=method,
                              seed=0, dsr_initial_threshold=None)
        assert engine.layout is not None  # the sharded path
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(8, width)).square().sum().backward()
            engine.mask_gradients()
            optimizer.step()
        model(torch.randn(8, width)).square().sum().backward()
        sent: list[tuple[str, int]] = []
        for name in COLLECTIVES:
            if hasattr(dist, name):
                original = getattr(dist, name)
                patched.setattr(dist, name, lambda *a, _o=original, _n=name, **k: (
                    sent.append((_n, _bytes(a[0] if a else None))), _o(*a, **k))[1])
        report = engine.rewire(0.3, [optimizer])
    return sent, sum(report.grown.values())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_sharded_rewiring_sends_the_same_bytes_whatever_the_layer_size(monkeypatch,
                                                                         method):
    small, grown_small = _sharded_run(monkeypatch, method, 16)
    large, grown_large = _sharded_run(monkeypatch, method, 64)  # 16x the weights
    assert grown_small > 0 and grown_large > 8 * grown_small  # both rewired, at scale
    assert small  # the sharded selection communicates (over a world of 1 here)
    assert large == small  # the same collectives, the same sizes
