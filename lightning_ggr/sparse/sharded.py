"""Collectives for parameters sharded across processes (FSDP2's ``fully_shard``: DTensors
split along dim 0), and the exact selections a rewiring needs across shards.

A sharded rewiring runs the single-process code of :mod:`lightning_ggr.sparse.rewiring` on
each process's local rows; the decisions that need a whole layer (or all of them) come
here and move small tensors only, never a layer:

- :func:`select_across_shards`: the exact top-``k`` of score vectors spread over the
  processes, per layer (removal, insertion) or over all layers at once (GGR's allocation),
  by a radix select of the ``k``-th value: per round, one all-reduced histogram of the next
  digit of the scores' bits (11 bits per round for several selections at once, 16 for one),
  then one all-gather of the counts tied with the ``k``-th value. The traffic is fixed by
  the histogram size, whatever ``k`` or the layer size; ties are split in a fixed order
  (layer, then rank, then position), so the result does not depend on the world size.
- :func:`all_sum`: per-layer counts summed over the processes (active counts, DSR's counts
  below its threshold, GGR's per-layer allocation).

Random draws need no collective: every process computes the random keys of its own
positions (:mod:`lightning_ggr.sparse.draws`) from the layer's flat offset in
:class:`ShardLayout`.

The rewiring learns about the layout from :func:`sharded_context`, which the engine enters
around a sharded rewiring; outside it every function of the rewiring runs as in one process.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

try:  # torch built without distributed support has no DTensor: nothing is ever sharded
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover - torch < 2.5, or without torch.distributed
    DTensor = Shard = compute_local_shape_and_global_offset = None

#: The oldest torch whose FSDP2 (``torch.distributed.fsdp.fully_shard``) and DTensor API the
#: sharded engine is written against.
SHARDING_TORCH = (2, 6)
#: The suffix of the module buffer that holds a sharded parameter's mask: the state-dict key
#: of ``net.0.weight``'s mask is ``net.0.weight_sparse_mask``.
MASK_BUFFER_SUFFIX = "_sparse_mask"


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def check_torch_for_sharding() -> None:
    """Refuse sharded training on a torch older than :data:`SHARDING_TORCH`."""
    if DTensor is None or _torch_version() < SHARDING_TORCH:
        raise RuntimeError(
            f"sparse training of sharded parameters (FSDP2) needs torch >= "
            f"{'.'.join(map(str, SHARDING_TORCH))} (torch.distributed.fsdp.fully_shard and "
            f"torch.distributed.tensor), found torch {torch.__version__}; upgrade torch, or "
            "train with DDP or on one device")

#: Elements of a score vector turned into digits at a time (bounds the temporaries).
CHUNK = 1 << 20


@dataclass(frozen=True)
class LayerShard:
    """Where one process's part of a layer lies in the whole layer.

    Attributes:
        numel: elements of the whole layer.
        start: flat (row-major) position in the layer of this process's first element.
        local: elements held here (0 when a process holds no row of a short layer).
        sharded: whether the layer is a DTensor shard (``False``: a replicated tensor whose
            rewiring rank 0 decides and broadcasts).
    """

    numel: int
    start: int
    local: int
    sharded: bool = True


@dataclass(frozen=True)
class ShardLayout:
    """The processes a sharded rewiring spans and each layer's shard on this process.

    Attributes:
        group: the process group of the shards (``None``: the default group).
        layers: parameter name -> :class:`LayerShard`.
    """

    group: Any
    layers: Mapping[str, LayerShard]

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)


def is_sharded(tensor: object) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter, gradient or mask of FSDP2)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def is_fully_sharded_module(module: object) -> bool:
    """Whether ``fully_shard`` (FSDP2) manages ``module``: it then gathers the module's
    shards into whole parameters in a forward pre-hook of its own."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2 (older than 2.6, or no distributed support)
        return False
    return isinstance(module, FSDPModule)


def local_tensor(tensor: Tensor) -> Tensor:
    """This process's part of ``tensor``: a DTensor's local shard (the same memory: writing
    into it writes into the DTensor), any other tensor as it is."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def check_sharding(params: Mapping[str, Tensor]) -> Any:
    """The one device mesh ``params``' DTensors are sharded over (``None``: none is a DTensor).

    Every DTensor must be sharded along dim 0 over one and the same one-dimensional device
    mesh (``fully_shard`` with data parallelism), on the mesh's device (no CPU offload).
    Anything that reads sharded parameters across processes checks this first: a DTensor
    placed otherwise fails inside torch with a message that names no way out.

    Raises:
        ValueError: a DTensor placed otherwise (tensor parallelism, HSDP's 2-D mesh, a
            2-D mesh such as Lightning's ``device_mesh`` passed whole), DTensors on different
            meshes, or offloaded to the CPU.
        RuntimeError: torch too old for sharding (:func:`check_torch_for_sharding`).
    """
    if any(type(p).__name__ == "DTensor" for p in params.values()):
        check_torch_for_sharding()
    sharded = {name: p for name, p in params.items() if is_sharded(p)}
    if not sharded:
        return None
    meshes = []
    for name, param in sharded.items():
        mesh = param.device_mesh
        if mesh.ndim != 1 or tuple(param.placements) != (Shard(0),):
            names = getattr(mesh, "mesh_dim_names", None)
            hint = ""
            if mesh.ndim == 1:
                hint = ("; with fully_shard(shard_placement_fn=...), place the sparse "
                        "parameters Shard(0)")
            elif names and "data_parallel" in names:
                hint = ("; under Lightning's ModelParallelStrategy, shard over its data-parallel "
                        "dimension: fully_shard(module, mesh=self.device_mesh['data_parallel'])")
            raise ValueError(
                f"parameter {name!r} is a DTensor placed {tuple(param.placements)} on a "
                f"{mesh.ndim}-D device mesh{'' if not names else f' {names}'}: sparse "
                "training supports parameters sharded along dim 0 over one mesh dimension "
                "(FSDP2's fully_shard for data parallelism, as Lightning's "
                "ModelParallelStrategy(tensor_parallel_size=1) applies it); tensor "
                f"parallelism and 2-D meshes (HSDP) are not supported{hint}")
        if all(mesh is not seen and mesh != seen for seen in meshes):
            meshes.append(mesh)
        if param.to_local().device.type != mesh.device_type:
            raise ValueError(
                f"parameter {name!r} is sharded over a {mesh.device_type} mesh but held on "
                f"{param.to_local().device.type}: CPU offload (FSDP2's CPUOffloadPolicy) is "
                "not supported by sparse training yet (untested: it needs a GPU); shard "
                "without offloading")
    if len(meshes) > 1:
        raise ValueError(f"the sparse parameters are sharded over {len(meshes)} different "
                         "device meshes; shard them all over one (one fully_shard mesh)")
    return meshes[0]


def layout_of(params: Mapping[str, Tensor]) -> ShardLayout | None:
    """The :class:`ShardLayout` of ``params`` when some are DTensors (``None`` otherwise).

    Every DTensor must be sharded along dim 0 over one and the same one-dimensional device
    mesh (:func:`check_sharding`); a plain tensor among them is replicated on every process
    (a partly sharded model), and rank 0 decides its rewiring.

    Raises:
        ValueError: as :func:`check_sharding`.
    """
    mesh = check_sharding(params)
    if mesh is None:
        return None
    group = mesh.get_group()
    rank = dist.get_rank(group)
    layers = {}
    for name, param in params.items():
        numel = param.numel()
        if is_sharded(param):
            shape, offset = compute_local_shape_and_global_offset(
                param.shape, mesh, param.placements)
            row = math.prod(param.shape[1:])
            layers[name] = LayerShard(numel, offset[0] * row if numel else 0, math.prod(shape))
        else:
            layers[name] = LayerShard(numel, 0, numel if rank == 0 else 0, sharded=False)
    return ShardLayout(group, layers)


def owned(tensor: Tensor, shard: LayerShard) -> Tensor:
    """The part of ``tensor`` whose rewiring this process decides: its local shard, or for
    a replicated layer the whole tensor on rank 0 and none of it elsewhere."""
    if shard.sharded:
        return local_tensor(tensor)
    return tensor if shard.local else tensor[:0]


def like_param(local: Tensor, param: Tensor) -> Tensor:
    """``local`` (this process's rows) as a tensor placed like ``param``: a DTensor with the
    same mesh, placement, shape and stride when ``param`` is one, else ``local`` itself."""
    if not is_sharded(param):
        return local
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride())


_LAYOUT: contextvars.ContextVar[ShardLayout | None] = contextvars.ContextVar(
    "lightning_ggr_shard_layout", default=None)


def current_layout() -> ShardLayout | None:
    """The layout of the sharded rewiring in progress (``None``: one process)."""
    return _LAYOUT.get()


@contextlib.contextmanager
def sharded_context(layout: ShardLayout | None) -> Iterator[None]:
    """Run the rewiring functions inside across the shards of ``layout`` (``None``: as in
    one process)."""
    token = _LAYOUT.set(layout)
    try:
        yield
    finally:
        _LAYOUT.reset(token)


# ------------------------------------------------------------------------- collectives


def _backend_device(group: Any, device: torch.device) -> torch.device:
    """Where a collective of ``group`` can take a tensor of ``device``: the current GPU for
    NCCL, a CPU for gloo."""
    if dist.get_backend(group) == "nccl":
        return device if device.type == "cuda" else torch.device("cuda",
                                                                  torch.cuda.current_device())
    return torch.device("cpu")


def _all_reduce(tensor: Tensor, group: Any) -> Tensor:
    target = _backend_device(group, tensor.device)
    moved = tensor.to(target)
    dist.all_reduce(moved, group=group)
    return moved.to(tensor.device) if moved is not tensor else tensor


def _all_gather(tensor: Tensor, group: Any) -> Tensor:
    """``tensor`` of every process, stacked in rank order."""
    target = _backend_device(group, tensor.device)
    moved = tensor.to(target).contiguous()
    out = [torch.empty_like(moved) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, moved, group=group)
    return torch.stack(out).to(tensor.device)


def all_sum(values: Sequence[int], layout: ShardLayout, device: torch.device | str = "cpu"
            ) -> list[int]:
    """``values`` summed over the processes of ``layout`` (one all-reduce)."""
    if not values:
        return []
    total = torch.tensor(list(values), dtype=torch.int64, device=device)
    return [int(v) for v in _all_reduce(total, layout.group).tolist()]


# ------------------------------------------------------------- ordered integer keys
#
# A score is turned, in place, into an integer of its own width whose signed order is the
# order of the scores (for the smallest: reversed). Its digits are counted as those of the
# unsigned pattern with the sign bit flipped, which orders like the signed value.

_INT_OF = {torch.float32: torch.int32, torch.int32: torch.int32,
           torch.float64: torch.int64, torch.int64: torch.int64}


def _bits(dtype: torch.dtype) -> int:
    return 32 if dtype in (torch.float32, torch.int32) else 64


def _signed_(scores: Tensor, largest: bool) -> Tensor:
    """Scores as integers of their width whose signed order is the scores' order (reversed
    for ``largest=False``), in place over the scores' memory: a float's bits with the
    other bits flipped when negative, an integer as it is."""
    bits = _bits(scores.dtype)
    signed = scores.view(_INT_OF[scores.dtype])
    if scores.is_floating_point():
        signed.bitwise_xor_((signed >> (bits - 1)).bitwise_and_((1 << (bits - 1)) - 1))
    if not largest:
        signed.bitwise_not_()  # -1 - s: reverses the order within the range
    return signed


def _high(signed: Tensor, shift: int, bits: int) -> Tensor:
    """The unsigned pattern of ``signed``'s bits from ``shift`` up (the sign bit flipped, a
    logical shift: the sign extension is masked off)."""
    high = (signed >> shift).bitwise_and_((1 << (bits - shift)) - 1)
    return high.bitwise_xor_(1 << (bits - shift - 1))


def _digit(signed: Tensor, shift: int, width: int, bits: int) -> Tensor:
    """The unsigned pattern's digit of ``width`` bits at ``shift``."""
    digit = (signed >> shift).bitwise_and_((1 << width) - 1)
    if shift + width == bits:  # the top digit holds the flipped sign bit
        digit.bitwise_xor_(1 << (width - 1))
    return digit


def _signed_of_pattern(pattern: int, bits: int) -> int:
    return pattern - (1 << (bits - 1))


def _score_of(signed: int, dtype: torch.dtype, largest: bool) -> float | int:
    """The score whose signed key is ``signed`` (the inverse of :func:`_signed_`)."""
    bits = _bits(dtype)
    if not largest:
        signed = -1 - signed
    if not dtype.is_floating_point:
        return int(signed)
    if signed < 0:
        signed ^= (1 << (bits - 1)) - 1
    return float(torch.tensor(signed, dtype=_INT_OF[dtype]).view(dtype))


def _digits(bits: int, single: bool) -> list[tuple[int, int]]:
    """(shift, width) of each round's digit, from the top: 16-bit digits for a single
    selection, 11-bit ones when several share a round (a smaller histogram each)."""
    width = 16 if single else 11
    rounds, low = [], bits
    while low > 0:
        step = min(width, low)
        low -= step
        rounds.append((low, step))
    return rounds


class ShardedSelection(NamedTuple):
    """The result of :func:`select_across_shards`.

    Attributes:
        indices: per score vector, the local flat indices selected here (ascending).
        values: per selection, its ``k``-th score (``None`` when ``k`` is 0).
    """

    indices: list[Tensor]
    values: list[float | int | None]


def select_across_shards(
    sizes: Sequence[int], selections: Sequence[int], ks: Sequence[int],
    write: Callable[[int, Tensor], object], *, dtype: torch.dtype, largest: bool,
    device: torch.device | str, layout: ShardLayout, indices: bool = True,
) -> ShardedSelection:
    """The exact top-``k`` (``largest``) or bottom-``k`` of score vectors spread over the
    processes of ``layout``.

    Vector ``i`` holds ``sizes[i]`` scores on this process, which ``write(i, out)`` fills
    into a 1-D ``out`` of ``dtype`` on ``device`` (it is called several times: once per
    round and once to select). It belongs to selection ``selections[i]``, which takes the
    ``ks[s]`` best scores over all its vectors on all processes: one selection per layer
    (each vector its own), or one over all layers (GGR's allocation). Every process must
    call it with the same ``selections`` and ``ks`` (its own sizes and scores).

    Radix select of each selection's ``k``-th score: per round one all-reduce of a
    histogram of the next digit of the scores' bits among those still tied with the
    ``k``-th, so the traffic is ``selections x 2**width x 8`` bytes per round (2 rounds of
    16-bit digits for one selection of 32-bit scores: 1 MiB; 3 rounds of 11-bit digits for
    several: 16 KiB per selection and round), then one all-gather of each vector's count
    tied with its selection's ``k``-th score. Exact with ties: every score above the
    ``k``-th is selected, and the tied ones are taken in the order (vector, rank,
    position), whatever the number of processes. Scores ordered by their bits: ``NaN``
    above ``+inf`` (as ``torch.topk``), ``-0.0`` below ``+0.0``.

    Args:
        indices: also return the selected positions (one more ``write`` per vector);
            ``False`` when only the ``k``-th values are wanted.

    Raises:
        ValueError: a ``k`` exceeds its selection's scores over all processes.
    """
    device = torch.device(device)
    bits = _bits(dtype)
    count = len(ks)
    group = layout.group
    wanted = torch.tensor([int(k) for k in ks], dtype=torch.int64)
    totals = torch.zeros(count, dtype=torch.int64)
    for size, selection in zip(sizes, selections, strict=True):
        totals[selection] += int(size)
    totals = _all_reduce(totals, group)
    if bool((wanted > totals).any()) or bool((wanted < 0).any()):
        bad = int(((wanted > totals) | (wanted < 0)).nonzero()[0])
        raise ValueError(f"k={int(wanted[bad])} of selection {bad} is outside [0, "
                         f"{int(totals[bad])}] scores over all processes")
    live = [i for i, size in enumerate(sizes) if size and ks[selections[i]] > 0]
    buffer = torch.empty(max([sizes[i] for i in live], default=0), dtype=dtype, device=device)

    def keys_of(i: int) -> Iterator[tuple[int, Tensor]]:
        """Vector i's signed keys, chunk by chunk (the scores written once, turned into
        keys in place)."""
        scores = buffer[:sizes[i]]
        write(i, scores)
        for start in range(0, sizes[i], CHUNK):
            yield start, _signed_(scores[start:start + CHUNK], largest)

    prefix = [0] * count  # the digits of each k-th key found so far
    above = [0] * count  # scores strictly above the prefix's bucket, over all processes
    rounds = _digits(bits, count == 1)
    last_local: dict[int, Tensor] = {}
    hist = None
    for position, (shift, width) in enumerate(rounds):
        hist = torch.zeros(count, 1 << width, dtype=torch.int64, device=device)
        final = position == len(rounds) - 1
        for i in live:
            s = selections[i]
            local = torch.zeros(1 << width, dtype=torch.int64, device=device)
            for _, keys in keys_of(i):
                if position:  # only the keys still tied with the k-th's digits so far
                    keys = keys[_high(keys, shift + width, bits) == prefix[s]]
                local += torch.bincount(_digit(keys, shift, width, bits), minlength=1 << width)
            hist[s] += local
            if final:
                last_local[i] = local
        hist = _all_reduce(hist, group)
        # Per selection, the bucket of its k-th score: counted from the top.
        from_top = hist.flip(1).cumsum(1)
        need = (wanted - torch.tensor(above, dtype=torch.int64)).to(device).clamp_(min=1)
        bucket_from_top = torch.searchsorted(from_top, need.unsqueeze(1)).squeeze(1)
        buckets = bucket_from_top.tolist()
        before = torch.cat([torch.zeros(count, 1, dtype=torch.int64, device=device),
                            from_top[:, :-1]], dim=1)
        passed = before.gather(1, bucket_from_top.clamp(max=(1 << width) - 1).unsqueeze(1))
        for s, (j, extra) in enumerate(zip(buckets, passed.squeeze(1).tolist(), strict=True)):
            if ks[s] > 0:
                prefix[s] = (prefix[s] << width) | ((1 << width) - 1 - j)
                above[s] += int(extra)
    thresholds = [_signed_of_pattern(pattern, bits) for pattern in prefix]
    values = [None if ks[s] == 0 else _score_of(thresholds[s], dtype, largest)
              for s in range(count)]
    if not indices:
        return ShardedSelection([], values)
    # Ties with the k-th score: taken in the order (vector, rank, position).
    width_last = rounds[-1][1]
    tied = torch.zeros(len(sizes), dtype=torch.int64)
    for i in live:
        tied[i] = last_local[i][prefix[selections[i]] & ((1 << width_last) - 1)]
    tied_all = _all_gather(tied, group)  # (world, vectors)
    rank = layout.rank
    take = [0] * len(sizes)
    remaining = [ks[s] - above[s] for s in range(count)]
    for i in range(len(sizes)):
        s = selections[i]
        for r in range(tied_all.shape[0]):
            got = min(int(tied_all[r, i]), max(remaining[s], 0))
            remaining[s] -= got
            if r == rank:
                take[i] = got
    chosen: list[Tensor] = [torch.zeros(0, dtype=torch.int64, device=device)] * len(sizes)
    for i in live:
        threshold = thresholds[selections[i]]
        parts = []
        for start, keys in keys_of(i):
            better = (keys > threshold).nonzero().squeeze(1)
            if take[i]:
                equal = (keys == threshold).nonzero().squeeze(1)[:take[i]]
                take[i] -= equal.numel()
                better = torch.cat([better, equal]).sort().values
            parts.append(better.add_(start))
        chosen[i] = torch.cat(parts)
    return ShardedSelection(chosen, values)


def differing_replicas(tensors: Mapping[str, Tensor], layout: ShardLayout) -> list[str]:
    """The names of ``tensors`` (plain tensors meant to be replicated on every process of
    ``layout``) whose values differ between processes: a checksum per tensor (the sum and
    the sum of squares, in float64), one all-gather of ``2 x len(tensors)`` numbers. Every
    process must call it with the same names."""
    if not tensors:
        return []
    sums = torch.stack([torch.stack([t.detach().double().sum(), t.detach().double().square()
                                     .sum()]).cpu() for t in tensors.values()])
    gathered = _all_gather(sums, layout.group)  # (world, tensors, 2)
    same = (gathered == gathered[:1]).flatten(2).all(2).all(0)
    return [name for name, agreed in zip(tensors, same.tolist(), strict=True) if not agreed]


# ------------------------------------------------------------------- reports, exports


def sum_over_shards(values: Sequence[int], tensors: Sequence[Tensor]) -> list[int]:
    """``values`` counted over this process's shards of ``tensors``, summed over the
    processes of their mesh when any of them is a DTensor (one all-reduce); as they are
    otherwise. Counts of replicated tensors must be passed as 0 on every rank but one."""
    sharded = next((t for t in tensors if is_sharded(t)), None)
    if sharded is None or not values:
        return list(values)
    total = torch.tensor(list(values), dtype=torch.int64)
    return [int(v) for v in _all_reduce(total, sharded.device_mesh.get_group()).tolist()]


def zero_count(tensors: Mapping[str, Tensor] | Sequence[Tensor]) -> int:
    """Exact zeros over ``tensors``, each counted once: a DTensor's over all its shards (one
    all-reduce), a plain tensor's as this process holds it."""
    tensors = list(tensors.values()) if isinstance(tensors, Mapping) else list(tensors)
    sharded = [t for t in tensors if is_sharded(t)]
    plain = sum(int((t.detach() == 0).sum()) for t in tensors if not is_sharded(t))
    local = sum(int((local_tensor(t).detach() == 0).sum()) for t in sharded)
    return plain + sum_over_shards([local], sharded)[0]


def _rows_per_rank(rows: int, world: int) -> list[int]:
    """Rows of each rank under ``Shard(0)`` (``torch.chunk``'s split: equal chunks of
    ``ceil(rows / world)``, the last ones shorter or empty)."""
    chunk = -(-rows // world) if rows else 0
    return [max(0, min(chunk, rows - r * chunk)) for r in range(world)]


def gather_to_rank_zero(tensor: Tensor) -> Tensor | None:
    """A DTensor's whole value on rank 0 of its mesh (``None`` elsewhere): the shards are
    gathered there alone, so no other process holds the layer. Every process of the mesh
    must call it. A plain tensor is returned as it is on every process."""
    if not is_sharded(tensor):
        return tensor
    group = tensor.device_mesh.get_group()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    rows = _rows_per_rank(int(tensor.shape[0]), world)
    local = tensor.to_local()
    device = _backend_device(group, local.device)
    padded = torch.zeros((max(rows), *tensor.shape[1:]), dtype=local.dtype, device=device)
    padded[:local.shape[0]].copy_(local)
    sent = padded.view(torch.uint8) if padded.dtype == torch.bool else padded
    parts = [torch.empty_like(sent) for _ in range(world)] if rank == 0 else None
    dist.gather(sent, parts, dst=dist.get_global_rank(group, 0), group=group)
    if rank != 0:
        return None
    whole = torch.cat([part[:count] for part, count in zip(parts, rows, strict=True)])
    return (whole.view(torch.bool) if tensor.dtype == torch.bool else whole).to(local.device)


def histogram_across_shards(values: Sequence[Tensor], layout: ShardLayout,
                            bins: int = 64) -> list[dict[str, Any] | None]:
    """Per tensor of values (this process's part of one layer's, e.g. ``|w|`` of its
    active weights), the histogram of all processes' values together: ``bins`` equal bins
    from 0 to the global maximum, with the count, sum and sum of squares
    (TensorBoard's ``add_histogram_raw`` fields); ``None`` for a tensor empty everywhere.
    Two all-reduces of ``len(values) x (bins + 4)`` numbers."""
    stats = torch.zeros(len(values), 4, dtype=torch.float64)  # count, sum, squares, -max
    for i, value in enumerate(values):
        value = value.detach().double().cpu()
        if value.numel():
            stats[i] = torch.stack([torch.tensor(float(value.numel()), dtype=torch.float64),
                                    value.sum(), value.square().sum(), -value.max()])
        else:
            stats[i, 3] = math.inf
    counts, sums, squares = _all_reduce(stats[:, :3].contiguous(), layout.group).unbind(1)
    lowest = stats[:, 3].contiguous()
    dist.all_reduce(lowest, op=dist.ReduceOp.MIN, group=layout.group)
    top = (-lowest).clamp(min=0.0)
    hist = torch.zeros(len(values), bins, dtype=torch.float64)
    for i, value in enumerate(values):
        if value.numel() and top[i] > 0:
            hist[i] = torch.histc(value.detach().double().cpu(), bins, 0.0, float(top[i]))
        elif value.numel():
            hist[i, -1] = value.numel()
    hist = _all_reduce(hist, layout.group)
    out: list[dict[str, Any] | None] = []
    for i in range(len(values)):
        if counts[i] == 0:
            out.append(None)
            continue
        edge = float(top[i]) if top[i] > 0 else 1.0
        out.append({"min": 0.0, "max": float(top[i]), "num": int(counts[i]),
                    "sum": float(sums[i]), "sum_squares": float(squares[i]),
                    "bucket_limits": [edge * (b + 1) / bins for b in range(bins)],
                    "bucket_counts": hist[i].tolist()})
    return out


def analyze_across_shards(masks: Mapping[str, Tensor], params: Mapping[str, Tensor] | None,
                          layout: ShardLayout, module: Any = None) -> Any:
    """:func:`~lightning_ggr.sparse.analysis.analyze_masks` of sharded masks, computed from
    each process's rows: per layer the neurons (or inputs) its rows use, the inputs (or
    neurons) any of its rows use, its active count and ``|w|`` sum, reduced over the
    processes in two all-reduces of ``O(groups x inputs)`` numbers per layer. Every process
    must call it; every one gets the whole analysis."""
    from lightning_ggr.sparse.analysis import LayerAnalysis, SparsityAnalysis, layer_layouts

    layouts = layer_layouts(module) if module is not None else {}
    plans, ints, floats = [], [], []
    for name, mask in masks.items():
        shard = layout.layers[name]
        local = owned(mask, shard).detach().bool()
        shape = tuple(int(d) for d in mask.shape)
        groups, transposed = layouts.get(name, (1, False))
        rows, second = shape[0], (shape[1] if len(shape) > 1 else 1)
        kernel = math.prod(shape[2:])
        per_row = second * kernel
        first = shard.start // per_row if per_row else 0
        count = local.numel() // per_row if per_row else 0
        view = local.reshape(count, second, kernel)
        group_of = torch.arange(first, first + count, device=local.device) // max(
            rows // groups, 1)
        column_hits = view.any(2).to(torch.int64)
        kept_rows = torch.zeros(groups, dtype=torch.int64, device=local.device).index_add_(
            0, group_of, view.any(2).any(1).to(torch.int64))
        columns = torch.zeros(groups, second, dtype=torch.int64, device=local.device)
        columns.index_add_(0, group_of, column_hits)
        active = torch.count_nonzero(local).reshape(1)
        ints.append(torch.cat([active, kept_rows, columns.flatten()]).cpu())
        magnitude = torch.zeros(1, dtype=torch.float64)
        if params is not None and name in params:
            values = owned(params[name], shard).detach()
            magnitude[0] = values[local.to(values.device)].abs().double().sum().cpu()
        floats.append(magnitude)
        plans.append((name, shape, groups, transposed, rows, second, kernel))
    total_ints = _all_reduce(torch.cat(ints), layout.group) if ints else torch.zeros(0)
    total_floats = _all_reduce(torch.cat(floats), layout.group) if floats else torch.zeros(0)
    layers, offset = {}, 0
    for index, (name, shape, groups, transposed, rows, second, kernel) in enumerate(plans):
        active = int(total_ints[offset])
        kept_rows = total_ints[offset + 1:offset + 1 + groups]
        columns = total_ints[offset + 1 + groups:offset + 1 + groups + groups * second].view(
            groups, second) > 0
        offset += 1 + groups + groups * second
        kept_columns = columns.sum(1)
        empty_rows = rows - int(kept_rows.sum())
        empty_columns = groups * second - int(kept_columns.sum())
        mean_abs = None
        if params is not None and name in params:
            mean_abs = float(total_floats[index]) / active if active else 0.0
        row_side, column_side = (rows, empty_rows), (groups * second, empty_columns)
        neurons, inputs = (column_side, row_side) if transposed else (row_side, column_side)
        layers[name] = LayerAnalysis(
            name=name, shape=shape, groups=groups, transposed=transposed, active=active,
            total=math.prod(shape), neurons=neurons[0], empty_neurons=neurons[1],
            inputs=inputs[0], empty_inputs=inputs[1], kernel=kernel,
            params_star=int((kept_rows * kept_columns).sum()) * kernel,
            mean_abs_active=mean_abs)
    return SparsityAnalysis(layers)


def hold_masks_in_model(module: Any, masks: Mapping[str, Tensor]) -> None:
    """Register each mask as a buffer ``<parameter>_sparse_mask`` of the submodule of
    ``module`` that owns its parameter (``masks`` keyed by ``module``'s parameter names), so
    that the model's state dict carries them: ``torch.distributed.checkpoint`` (and
    Lightning's distributed checkpoint) saves each shard from its own process and loads them
    back in place, on any number of processes. A buffer of that name is replaced."""
    for name, mask in masks.items():
        owner, _, leaf = name.rpartition(".")
        (module.get_submodule(owner) if owner else module).register_buffer(
            leaf + MASK_BUFFER_SUFFIX, mask)


def load_held_masks(masks: Mapping[str, Tensor], checkpoint: Any,
                    prefix: str = "state_dict.") -> dict[str, Tensor]:
    """The masks a checkpoint holds as the model's ``<parameter>_sparse_mask`` buffers
    (:func:`hold_masks_in_model`), for ``SparseEngine.load_state_dict``.

    A distributed checkpoint (a folder) is read in place into ``masks`` (DTensors placed like
    their parameters; each process reads its rows, whatever the number of processes that
    wrote it; every process must call it), which are returned. A single-file checkpoint
    (``torch.save`` of a full state dict) gives the whole masks, of which the engine takes
    each process's rows.

    Loading them apart from the model lets the masks stay out of the model's state dict until
    the checkpoint is restored: a checkpoint without them (a dense run's, a single-device
    run's) then loads strictly into the model too.

    Args:
        prefix: the key under which the model's state dict was saved, with its dot
            (Lightning's: ``"state_dict."``).
    """
    keys = {name: f"{prefix}{name}{MASK_BUFFER_SUFFIX}" for name in masks}
    path = Path(checkpoint)
    if path.is_dir():
        import torch.distributed.checkpoint as dcp

        dcp.load({keys[name]: mask for name, mask in masks.items()}, checkpoint_id=str(path))
        return dict(masks)
    state: Any = torch.load(path, mmap=True, map_location="cpu", weights_only=True)
    for part in prefix.rstrip(".").split(".") if prefix else ():
        state = state[part]
    missing = [key for key in keys.values() if key[len(prefix):] not in state]
    if missing:
        raise ValueError(f"{checkpoint} holds no saved mask named {missing}")
    return {name: state[key[len(prefix):]] for name, key in keys.items()}


def consolidate_masks(checkpoint: Any, out: Any = None,
                      prefix: str = "state_dict.") -> dict[str, Tensor]:
    """The whole masks of a distributed checkpoint, in one process: for analysis, export
    and inference (:mod:`lightning_ggr.sparse.export`, :mod:`~lightning_ggr.sparse.analysis`).

    Reads only the masks from the checkpoint folder (each ``.distcp`` shard's part of them),
    never the weights or the optimizer state: the mask buffers of a model
    (``<parameter>_sparse_mask``, as :func:`hold_masks_in_model` and
    ``DynamicSparsityCallback`` under ``ModelParallelStrategy`` save them) and the ``masks``
    of a saved ``SparseEngine.state_dict()``. Returns parameter name -> bool mask, and
    writes ``{"masks": ...}`` to ``out`` with ``torch.save`` when given. No process group
    is needed.

    Args:
        prefix: the key under which the model's state dict was saved, with its dot
            (Lightning's: ``"state_dict."``; ``"model."`` for ``dcp.save({"model": ...})``),
            removed from the buffers' names to give the parameters' names.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(checkpoint))
    metadata = reader.read_metadata().state_dict_metadata
    wanted: dict[str, Tensor] = {}
    names: dict[str, str] = {}
    for key, entry in metadata.items():
        if not isinstance(entry, TensorStorageMetadata) or entry.properties.dtype != torch.bool:
            continue
        if key.endswith(MASK_BUFFER_SUFFIX):
            name = key[:-len(MASK_BUFFER_SUFFIX)]
            name = name[len(prefix):] if prefix and name.startswith(prefix) else name
        elif ".masks." in key or key.startswith("masks."):
            name = key.split("masks.", 1)[1]
        else:
            continue
        wanted[key] = torch.zeros(tuple(entry.size), dtype=torch.bool)
        names[key] = name
    if not wanted:
        raise ValueError(f"{checkpoint} holds no sparse masks (no bool tensor named "
                         f"'*{MASK_BUFFER_SUFFIX}' or '*masks.*')")
    # Keys as the checkpoint flattened them ("state_dict.net.0.weight_sparse_mask"): the
    # loader flattens a nested state dict the same way, so the flat one matches.
    dcp.load(wanted, storage_reader=reader, no_dist=True)
    masks = {names[key]: tensor for key, tensor in wanted.items()}
    if out is not None:
        torch.save({"masks": masks}, out)
    return masks
