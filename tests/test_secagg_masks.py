"""Masks: exactly uniform over Z_{2^b}, different for every context, and driven by the
full 256-bit key (not a folded 32-bit seed as in Flower's built-in SecAgg+)."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats

from sgs_flower.secagg import keys, prg

KEY = bytes(range(32))


@pytest.mark.parametrize("bits", [8, 12, 16])
def test_masks_are_uniform_chi_square(bits):
    """Chi-square over all 2^b values (or 4096 bins); p > 1e-4 with a fixed key, so the
    test is deterministic yet would fail for any visibly biased reduction."""
    vals = prg.expand(KEY, 400_000, bits).astype(np.int64)
    assert vals.max() < 1 << bits and vals.min() >= 0
    bins = min(1 << bits, 4096)
    counts = np.bincount(vals >> (bits - int(np.log2(bins))), minlength=bins)
    _, p = stats.chisquare(counts)
    assert p > 1e-4


def test_32_bit_masks_uniform_in_every_byte():
    vals = prg.expand(KEY, 200_000, 32)
    for shift in (0, 8, 16, 24):
        counts = np.bincount((vals >> shift) & 0xFF, minlength=256)
        assert stats.chisquare(counts)[1] > 1e-4


def test_prg_is_aes256_ctr_of_the_full_key():
    """The mask equals an independent AES-256-CTR keystream of the exact 32-byte key."""
    m = 1000
    enc = Cipher(algorithms.AES(KEY), modes.CTR(bytes(16))).encryptor()
    ref = np.frombuffer(enc.update(bytes(4 * m)), dtype=np.uint32)
    np.testing.assert_array_equal(prg.expand(KEY, m, 32), ref)


@pytest.mark.parametrize("byte", [0, 4, 15, 31])
def test_every_key_byte_reaches_the_prg(byte):
    """Keys differing in any single byte (also beyond the first 4) give unrelated masks:
    a seed folded to 32 bits would make most of these collide."""
    other = bytearray(KEY)
    other[byte] ^= 0x01
    a, b = prg.expand(KEY, 4096, 32), prg.expand(bytes(other), 4096, 32)
    assert np.mean(a == b) < 0.01


def test_different_contexts_give_different_masks():
    sk_u, sk_v = keys.generate_private_key(), keys.generate_private_key()
    shared = keys.agree(sk_u, keys.public_bytes(sk_v), 2)
    assert shared == keys.agree(sk_v, keys.public_bytes(sk_u), 1)
    base = dict(version="v", run_id=1, round_id=1, cohort=[1, 2, 3], degree=2, threshold=2,
                field_bits=32, vector_length=10, graph_seed=b"s", bound_digest=b"model-A")
    variants = [base] + [
        {**base, k: v}
        for k, v in [("round_id", 2), ("run_id", 9), ("bound_digest", b"model-B"), ("cohort", [1, 2, 4]),
                     ("graph_seed", b"t"), ("vector_length", 11)]
    ]
    masks = set()
    for ctx_args in variants:
        ctx = keys.round_context(**ctx_args)
        k12 = keys.pairwise_mask_key(shared, ctx, 1, 2)
        assert k12 == keys.pairwise_mask_key(shared, ctx, 2, 1)  # symmetric
        masks.add(prg.expand(k12, 64, 32).tobytes())
        masks.add(prg.expand(keys.self_mask_key(shared, ctx, 1), 64, 32).tobytes())
    assert len(masks) == 2 * len(variants)


def test_mask_expander_add_and_subtract_cancel():
    exp = prg.MaskExpander(1000, np.uint32)
    acc = np.arange(1000, dtype=np.uint32)
    exp.add(acc, KEY, +1)
    assert not np.array_equal(acc, np.arange(1000, dtype=np.uint32))
    exp.add(acc, KEY, -1)
    np.testing.assert_array_equal(acc, np.arange(1000, dtype=np.uint32))


def test_bad_key_length_is_refused():
    with pytest.raises(ValueError, match="mask key must be 32 bytes, got 4"):
        prg.expand(b"abcd", 10, 32)


@pytest.mark.parametrize("dtype", [np.uint32, np.uint64])
@pytest.mark.parametrize("length", [1, 1000, prg.BLOCK_BYTES // 4 * 3 + 5])
def test_accumulate_equals_the_naive_per_keystream_sum(dtype, length):
    """The one-sweep, block-wise accumulation gives word for word what adding (or
    subtracting) each whole keystream in turn gives: lengths below one block, over
    several blocks with a ragged tail, both word sizes, both signs."""
    rng = np.random.default_rng(3)
    streams = [(bytes(rng.integers(0, 256, 32, dtype=np.uint8)), int(s)) for s in rng.choice([-1, 1], 7)]
    base = rng.integers(0, 1 << 32, length, dtype=np.uint64).astype(dtype)
    naive = base.copy()
    for key, sign in streams:
        enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
        ks = np.frombuffer(enc.update(bytes(length * np.dtype(dtype).itemsize)), dtype=dtype)
        naive = naive + ks if sign > 0 else naive - ks
    exp = prg.MaskExpander(length, dtype)
    acc = base.copy()
    exp.accumulate(acc, streams)
    np.testing.assert_array_equal(acc, naive)
    one_by_one = base.copy()
    for key, sign in streams:
        exp.add(one_by_one, key, sign)
    np.testing.assert_array_equal(one_by_one, naive)
    bits = 24 if dtype == np.uint32 else 40
    before = base.copy()
    masked = exp.mask(base, streams, bits)
    np.testing.assert_array_equal(base, before)  # the input is left alone
    np.testing.assert_array_equal(masked, naive & dtype((1 << bits) - 1))


def test_accumulate_refuses_a_wrong_accumulator():
    exp = prg.MaskExpander(10, np.uint32)
    with pytest.raises(ValueError, match=r"accumulator must be uint32 of shape \(10,\)"):
        exp.accumulate(np.zeros(10, dtype=np.uint64), [(KEY, 1)])
    with pytest.raises(ValueError, match="mask key must be 32 bytes"):
        exp.accumulate(np.zeros(10, dtype=np.uint32), [(KEY[:16], 1)])


def test_blockwise_masks_stay_uniform_across_block_edges():
    """Masks spanning several accumulation blocks (64-bit words, 12-bit field): chi-square
    over all 4096 values, as for the single-block masks above."""
    length = prg.BLOCK_BYTES // 8 * 5 + 3
    vals = prg.expand(KEY, length, 12).astype(np.int64)
    _, p = stats.chisquare(np.bincount(vals, minlength=4096))
    assert p > 1e-4
