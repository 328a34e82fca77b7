"""Random keys: distinct, split-invariant, uniform enough, and the masks drawn from them."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_ggr.sparse import draws
from lightning_ggr.sparse.draws import (
    draw_key,
    key_dtype,
    layer_key,
    random_keys,
    top_keys_mask,
)
from lightning_ggr.sparse.masks import random_mask


def test_the_keys_of_a_layer_are_distinct_31_bit_numbers():
    keys = random_keys(12345, 0, 1 << 16, 1 << 16, "cpu")
    assert keys.dtype == torch.int32
    assert keys.unique().numel() == keys.numel()
    assert int(keys.min()) >= 0


def test_a_wide_layer_gets_distinct_62_bit_keys_for_any_range():
    numel = (1 << 33) + 7  # more than 2**31 weights: the Feistel bijection of [0, 2**62)
    keys = random_keys(99, 1 << 32, 4096, numel, "cpu")
    assert keys.dtype == torch.int64 == key_dtype(numel)
    assert keys.unique().numel() == 4096
    assert int(keys.min()) >= 0 and int(keys.max()) < 1 << 62
    assert int(keys.max()) >= 1 << 40  # spread over the whole space, not only the low bits
    assert torch.equal(keys[100:200], random_keys(99, (1 << 32) + 100, 100, numel, "cpu"))


@pytest.mark.parametrize("chunk", [7, 1 << 16])
def test_any_split_of_a_layer_computes_the_same_keys(monkeypatch, chunk):
    monkeypatch.setattr(draws, "CPU_CHUNK", chunk)
    whole = random_keys(7, 0, 1000, 1000, "cpu")
    for start, stop in ((0, 1), (0, 500), (500, 1000), (333, 334), (17, 981), (1000, 1000)):
        assert torch.equal(random_keys(7, start, stop - start, 1000, "cpu"), whole[start:stop])


def test_keys_outside_the_layer_are_refused():
    with pytest.raises(ValueError, match=r"positions \[990, 1010\) are outside a layer of 1000"):
        random_keys(7, 990, 20, 1000, "cpu")


def test_the_key_depends_on_the_draw_and_the_layer_name():
    assert layer_key(1, "a.weight") == layer_key(1, "a.weight")
    assert len({layer_key(1, "a.weight"), layer_key(2, "a.weight"), layer_key(1, "b.weight")}) == 3
    generator = torch.Generator().manual_seed(3)
    first, second = draw_key(generator), draw_key(generator)
    assert first != second and 0 <= first < 1 << 62
    assert draw_key(torch.Generator().manual_seed(3)) == first


@settings(max_examples=60, deadline=None)
@given(numel=st.integers(1, 3000), share=st.floats(0.0, 1.0), key=st.integers(0, (1 << 62) - 1))
def test_the_mask_is_exactly_the_top_keys(numel, share, key):
    active = round(share * numel)
    mask = top_keys_mask(key, numel, active, "cpu")
    keys = random_keys(key, 0, numel, numel, "cpu")
    expected = torch.zeros(numel, dtype=torch.bool)
    expected[keys.topk(active).indices] = True
    assert torch.equal(mask, expected)


def test_a_band_that_misses_falls_back_to_the_exact_selection(monkeypatch):
    reference = top_keys_mask(5, 10_000, 1234, "cpu")
    for band in ((0, 0), (1 << 31, 1 << 31), (1 << 30, (1 << 30) + 10)):
        monkeypatch.setattr(draws, "_band", lambda numel, active, space, band=band: band)
        assert torch.equal(top_keys_mask(5, 10_000, 1234, "cpu"), reference)


def test_random_masks_look_uniform():
    """Rows, columns and 8x8 blocks of a 10% mask over 512 x 512 hold counts as a uniform
    random draw would (within 6 standard deviations of their chi-square), and two draws are
    independent."""
    shape, density = (512, 512), 0.1
    active = round(density * shape[0] * shape[1])
    first = random_mask(shape, active, key=layer_key(1, "w"))
    second = random_mask(shape, active, key=layer_key(2, "w"))
    for counts in (first.sum(1), first.sum(0),
                   first.view(64, 8, 64, 8).sum((1, 3)).flatten()):
        cells = counts.numel()
        expected = active / cells
        chi2 = float(((counts.double() - expected) ** 2 / expected).sum())
        assert abs(chi2 - cells) < 6 * math.sqrt(2 * cells), chi2
    overlap = int((first & second).sum())
    mean = active * density
    assert abs(overlap - mean) < 6 * math.sqrt(mean)
    # neighbours are not correlated: a position's right neighbour is active 10% of the time
    right = int((first[:, :-1] & first[:, 1:]).sum()) / int(first[:, :-1].sum())
    assert abs(right - density) < 0.01


def test_random_mask_takes_a_key_or_draws_one():
    generator = torch.Generator().manual_seed(0)
    key = draw_key(torch.Generator().manual_seed(0))
    assert torch.equal(random_mask((6, 7), 9, generator), random_mask((6, 7), 9, key=key))
    with pytest.raises(TypeError, match="needs a generator or a key"):
        random_mask((2, 2), 1)


def test_every_position_bit_flips_every_key_bit_half_the_time():
    """Avalanche: flipping one bit of a position flips each bit of its key with probability
    1/2 (measured 0.49-0.51 over 20,000 positions), so no pattern of positions (rows,
    columns, strides) shows through the keys."""
    positions = torch.randint(0, 1 << 31, (20_000,), generator=torch.Generator().manual_seed(0))
    key = layer_key(3, "w")
    rounds = draws._round_keys(key, 4)
    keys = draws._permute31_(positions.clone(), rounds)
    for bit in range(31):
        flipped = draws._permute31_(positions ^ (1 << bit), rounds) ^ keys
        rates = torch.stack([((flipped >> out) & 1).double().mean() for out in range(31)])
        assert ((rates - 0.5).abs() < 0.05).all(), (bit, rates)
