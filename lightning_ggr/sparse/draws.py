"""Random draws that depend on the seed and the model alone, never on devices or sharding.

Every random choice of the engine (a layer's initial mask, its random growth) is a top-k of
*random keys*: a keyed pseudo-random permutation of the layer's flat (row-major) positions,
computed from ``(key, position)`` with integer operations on the layer's device. Nothing is
drawn sequentially, so a process that holds rows ``[a, b)`` of a layer computes exactly the
keys of its own positions, and the keys of one layer are distinct: a top-k has no ties, and
every selection is the same however the layer is split across processes or devices.

The key of a draw is ``layer_key(draw_key(generator), name)``: one 62-bit number from the
engine's seeded generator per draw (so a checkpointed generator state resumes the same
draws), mixed with the parameter's name (so one layer's draws do not depend on the others).

The permutation of ``[0, 2**31)`` is four rounds of ``x ^= k_r; x = (x * m_r) mod 2**31;
x ^= x >> 15`` with odd multipliers ``m_r`` and round keys ``k_r`` (each step is a bijection
of 31-bit integers; the products stay below ``2**62``, so int64 arithmetic never
overflows). A layer of more than ``2**31`` weights uses a 4-round Feistel network over two
31-bit halves with the same rounds inside (a bijection of ``[0, 2**62)``). Keys are int32 for
the first, int64 for the second; ``-1`` marks a position that may not be selected.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import Tensor

from lightning_ggr.sparse.topk import topk

#: Positions of a layer of at most this many weights get 31-bit keys (int32).
NARROW_LIMIT = 1 << 31
_MASK31 = (1 << 31) - 1
_MASK64 = (1 << 64) - 1
#: Odd 31-bit multipliers of the four rounds.
_MULTIPLIERS = (0x5BD1E995 & _MASK31, 0x27D4EB2F & _MASK31, 0x165667B1 & _MASK31,
                0x61C88647 & _MASK31)
#: Elements per chunk of the key computation on a CPU (temporaries stay in cache).
CPU_CHUNK = 1 << 16
#: ... and on an accelerator (fewer launches; 2 int64 temporaries of this size).
DEVICE_CHUNK = 1 << 24


def draw_key(generator: torch.Generator) -> int:
    """One 62-bit key from ``generator`` (a host-side draw for a CPU generator)."""
    return int(torch.randint(0, 1 << 62, (1,), generator=generator, device=generator.device))


def layer_key(key: int, name: str) -> int:
    """The key of layer ``name`` in the draw ``key``: a 62-bit hash of both."""
    digest = hashlib.blake2b(f"{int(key)}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def key_dtype(numel: int) -> torch.dtype:
    """The dtype of the keys of a layer of ``numel`` weights."""
    return torch.int32 if numel <= NARROW_LIMIT else torch.int64


def _round_keys(key: int, count: int) -> list[int]:
    """``count`` 31-bit round keys from ``key`` (splitmix64 on the host)."""
    state = int(key) & _MASK64
    keys = []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & _MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
        keys.append((z ^ (z >> 31)) & _MASK31)
    return keys


def _permute31_(x: Tensor, keys: list[int]) -> Tensor:
    """The keyed bijection of ``[0, 2**31)``, in place on an int64 tensor."""
    for k, multiplier in zip(keys, _MULTIPLIERS, strict=True):
        x.bitwise_xor_(k).mul_(multiplier | 1).bitwise_and_(_MASK31)
        x.bitwise_xor_(x >> 15)
    return x


def _permute62_(x: Tensor, keys: list[int]) -> Tensor:
    """A keyed bijection of ``[0, 2**62)`` (Feistel over two 31-bit halves), in place."""
    left, right = x >> 31, x.bitwise_and(_MASK31)
    for r in range(4):
        mixed = _permute31_(right.clone(), keys[4 * r:4 * r + 4])
        left, right = right, left.bitwise_xor_(mixed)
    return x.copy_(left.bitwise_left_shift_(31).bitwise_or_(right))


def random_keys(key: int, start: int, count: int, numel: int, device: torch.device | str,
                out: Tensor | None = None) -> Tensor:
    """The random keys of flat positions ``[start, start + count)`` of a layer of ``numel``
    weights, for the draw ``key`` (from :func:`layer_key`): distinct within the layer, the
    same for a position whichever process or device computes it.

    Written into ``out`` (1-D, ``count`` elements, :func:`key_dtype`) when given.
    """
    if not 0 <= start <= start + count <= numel:
        raise ValueError(f"positions [{start}, {start + count}) are outside a layer of "
                         f"{numel} weights")
    device = torch.device(device)
    dtype = key_dtype(numel)
    if out is None:
        out = torch.empty(count, dtype=dtype, device=device)
    narrow = dtype == torch.int32
    keys = _round_keys(key, 4 if narrow else 16)
    chunk = CPU_CHUNK if device.type == "cpu" else DEVICE_CHUNK
    for offset in range(0, count, chunk):
        stop = min(count, offset + chunk)
        x = torch.arange(start + offset, start + stop, dtype=torch.int64, device=device)
        x = _permute31_(x, keys) if narrow else _permute62_(x, keys)
        out[offset:stop].copy_(x)
    return out


def _band(numel: int, active: int, space: int) -> tuple[int, int]:
    """Bounds ``lo <= hi`` of keys around the ``active``-th largest of ``numel`` distinct
    keys spread uniformly over ``[0, space)``, 8 standard deviations each side: the keys at
    or above ``hi`` are almost surely selected, those below ``lo`` almost surely not (the
    caller checks, and selects exactly over all keys when the band missed)."""
    share = active / numel
    spread = 8 * math.sqrt(numel * share * (1 - share)) + 16
    hi = min(space, max(0, math.ceil(space - space * (active - spread) / numel)))
    lo = min(hi, max(0, math.floor(space - space * (active + spread) / numel)))
    return lo, hi


def top_keys_mask(key: int, numel: int, active: int, device: torch.device | str) -> Tensor:
    """The flat bool mask of the ``active`` positions of largest random key among all
    ``numel`` positions of a layer (:func:`random_keys`), in one pass over the layer and
    1 byte per position.

    The keys of a layer are a pseudo-random subset of ``[0, 2**31)``: positions whose key
    lies above a band around the expected threshold are selected as they are computed,
    those inside the band are kept as candidates, and the exact top among them completes
    the count (a band that misses widens to everything, exactly, rarely).
    """
    device = torch.device(device)
    mask = torch.zeros(numel, dtype=torch.bool, device=device)
    if active == 0:
        return mask
    if active == numel:
        return mask.fill_(True)
    narrow = key_dtype(numel) == torch.int32
    lo, hi = _band(numel, active, NARROW_LIMIT if narrow else 1 << 62)
    keys = _round_keys(key, 4 if narrow else 16)
    chunk = CPU_CHUNK if device.type == "cpu" else DEVICE_CHUNK
    # The band's candidates go into buffers allocated once, before the loop: small tensors
    # kept from every chunk would pin the freed chunks' memory (glibc's heap then grew by
    # 1 GiB over VGG16's fc1).
    capacity = min(numel, 2 * (hi - lo) * numel // (NARROW_LIMIT if narrow else 1 << 62) + 4096)
    band_keys = torch.empty(capacity, dtype=torch.int64, device=device)
    band_positions = torch.empty(capacity, dtype=torch.int64, device=device)
    selected = found = 0
    for offset in range(0, numel, chunk):
        stop = min(numel, offset + chunk)
        x = torch.arange(offset, stop, dtype=torch.int64, device=device)
        x = _permute31_(x, keys) if narrow else _permute62_(x, keys)
        torch.ge(x, hi, out=mask[offset:stop])
        selected += int(torch.count_nonzero(mask[offset:stop]))
        inside = (x >= lo).logical_and_(x < hi).nonzero().squeeze(1)
        if found + inside.numel() > capacity:
            found = capacity + 1  # the band is far off: the exact route below
            break
        band_keys[found:found + inside.numel()] = x[inside]
        band_positions[found:found + inside.numel()] = inside.add_(offset)
        found += inside.numel()
        del x, inside
    need = active - selected
    if found <= capacity and 0 <= need <= found:
        if need:
            chosen = band_keys[:found].topk(need, sorted=False).indices
            mask.index_fill_(0, band_positions[chosen], True)
        return mask
    # The band missed (beyond 8 standard deviations): exact selection over all keys.
    del band_keys, band_positions
    everything = random_keys(key, 0, numel, numel, device)
    return mask.zero_().index_fill_(0, topk(everything, active)[1], True)
