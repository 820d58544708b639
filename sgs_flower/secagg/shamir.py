"""Shamir t-of-n secret sharing of 32-byte secrets over the prime field GF(2^31 - 1).

A 32-byte secret is cut into eleven 3-byte chunks (the last padded with a zero byte);
each chunk is below 2^24 < p and is shared with its own random polynomial of degree
t - 1, so any t - 1 shares are independent of the secret (perfect secrecy per chunk).
The field is small on purpose: every product of two elements fits in int64, so sharing
and reconstruction are vectorised numpy over all chunks (and all receivers) at once.

Share x-coordinates are small positive integers (the client's position in the sorted
cohort plus one), never raw node ids, which could collide mod p.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from sgs_flower.secagg.errors import ConfigurationError, MalformedMessageError, ReconstructionError

PRIME = (1 << 31) - 1
SECRET_BYTES = 32
_CHUNK = 3
N_CHUNKS = -(-SECRET_BYTES // _CHUNK)  # 11
SHARE_BYTES = 4 * N_CHUNKS  # 44


def _random_field_elements(count: int) -> np.ndarray:
    """``count`` exactly uniform elements of GF(p) from the OS CSPRNG (rejection sampling)."""
    out = np.empty(0, dtype=np.int64)
    while out.size < count:
        need = count - out.size
        words = np.frombuffer(os.urandom(4 * (need + 8)), dtype=np.uint32)
        cand = (words & np.uint32(0x7FFFFFFF)).astype(np.int64)  # uniform in [0, p]
        out = np.concatenate([out, cand[cand < PRIME]])
    return out[:count]


def _secret_to_chunks(secret: bytes) -> np.ndarray:
    if len(secret) != SECRET_BYTES:
        raise ConfigurationError(f"secrets must be {SECRET_BYTES} bytes, got {len(secret)}")
    padded = np.frombuffer(secret + bytes(N_CHUNKS * _CHUNK - SECRET_BYTES), dtype=np.uint8)
    c = padded.reshape(N_CHUNKS, _CHUNK).astype(np.int64)
    return (c[:, 0] << 16) | (c[:, 1] << 8) | c[:, 2]


def _chunks_to_secret(chunks: np.ndarray) -> bytes:
    if np.any(chunks >= (1 << 24)) or np.any(chunks < 0):
        raise ReconstructionError("reconstructed value is out of range: a share is corrupt")
    b = np.stack([(chunks >> 16) & 0xFF, (chunks >> 8) & 0xFF, chunks & 0xFF], axis=1)
    raw = b.astype(np.uint8).tobytes()
    if any(raw[SECRET_BYTES:]):
        raise ReconstructionError("reconstructed padding is not zero: a share is corrupt")
    return raw[:SECRET_BYTES]


def split(secret: bytes, xs: Sequence[int], threshold: int) -> list[bytes]:
    """Share ``secret`` so that any ``threshold`` of the shares at ``xs`` rebuild it.

    Returns one ``SHARE_BYTES``-byte share per x, in the order of ``xs``.
    """
    return split_many([secret], xs, threshold)[0]


def split_many(secrets: Sequence[bytes], xs: Sequence[int], threshold: int) -> list[list[bytes]]:
    """:func:`split` of several secrets at the same points in one vectorised pass (a
    client shares two, its masking key and its self-mask seed, with the same k
    neighbours). Every chunk of every secret has its own random polynomial, exactly as
    when each secret is split alone; returns, per secret, one share per x."""
    xs_arr = np.asarray(xs, dtype=np.int64)
    if not 1 <= threshold <= len(xs_arr):
        raise ConfigurationError(f"threshold {threshold} must be in 1..{len(xs_arr)} (the share count)")
    if np.any(xs_arr <= 0) or np.any(xs_arr >= PRIME) or len(set(xs_arr.tolist())) != len(xs_arr):
        raise ConfigurationError("share x-coordinates must be distinct and in 1..p-1")
    width = len(secrets) * N_CHUNKS
    coeffs = _random_field_elements((threshold - 1) * width).reshape(threshold - 1, width)
    secret_chunks = np.concatenate([_secret_to_chunks(secret) for secret in secrets])
    # Horner's rule, vectorised over receivers (rows) and every secret's chunks (columns).
    # In place, into one buffer: at k ~ 30 receivers the arrays are small and the cost
    # is numpy's per-call overhead, so each step is three calls and no allocation.
    x = xs_arr[:, None]
    steps = [*coeffs[::-1], secret_chunks]  # highest coefficient first, the secret last
    acc = np.empty((len(xs_arr), width), dtype=np.int64)
    acc[:] = steps[0]
    for row in steps[1:]:
        np.multiply(acc, x, out=acc)
        np.add(acc, row, out=acc)
        np.remainder(acc, PRIME, out=acc)
    raw = acc.astype(">u4")
    return [
        [row.tobytes() for row in raw[:, i * N_CHUNKS : (i + 1) * N_CHUNKS]] for i in range(len(secrets))
    ]


def _lagrange_at_zero(xs: Sequence[int]) -> np.ndarray:
    """Lagrange basis values at 0 for the points ``xs`` (mod p):
    lambda_i = prod_{j != i} x_j / (x_j - x_i).

    The t x t products are taken in numpy, halving the columns each step (log2 t
    steps; every product of two field elements fits in int64), so the server's one
    reconstruction per client costs microseconds, not t^2 Python multiplications."""
    x = np.asarray(xs, dtype=np.int64)
    t = x.size
    off = ~np.eye(t, dtype=bool)
    # rows 0..t-1: the numerators' factors x_j; rows t..2t-1: the denominators' x_j - x_i
    m = np.ones((2 * t, t), dtype=np.int64)
    m[:t][off] = np.broadcast_to(x[None, :], (t, t))[off]
    m[t:][off] = ((x[None, :] - x[:, None]) % PRIME)[off]
    while m.shape[1] > 1:
        if m.shape[1] % 2:
            m = np.concatenate([m, np.ones((2 * t, 1), dtype=np.int64)], axis=1)
        m = m[:, 0::2] * m[:, 1::2] % PRIME
    num, den = m[:t, 0], m[t:, 0]
    # modular inverses by Python's extended Euclid (pow(d, -1, p)): the same values as
    # Fermat's d^(p-2) (p is prime; d != 0 as the points are distinct), several times
    # faster, and the server inverts t of them per client it rebuilds
    inv = np.asarray([pow(d, -1, PRIME) for d in den.tolist()], dtype=np.int64)
    return num * inv % PRIME


def share_to_array(share: bytes) -> np.ndarray:
    """Decode a share's bytes into field elements, refusing anything malformed."""
    if len(share) != SHARE_BYTES:
        raise MalformedMessageError(f"a share must be {SHARE_BYTES} bytes, got {len(share)}")
    arr = np.frombuffer(share, dtype=">u4").astype(np.int64)
    if np.any(arr >= PRIME):
        raise MalformedMessageError("a share holds a value outside the field")
    return arr


def combine(shares: Sequence[tuple[int, bytes]], threshold: int) -> bytes:
    """Rebuild the secret from at least ``threshold`` (x, share) pairs."""
    if len(shares) < threshold:
        raise ReconstructionError(f"{len(shares)} shares given, {threshold} needed")
    chosen = list(shares)[:threshold]
    xs = [x for x, _ in chosen]
    if len(set(xs)) != len(xs):
        raise ReconstructionError("duplicate share x-coordinates")
    ys = np.stack([share_to_array(s) for _, s in chosen])  # (t, chunks)
    return combine_rows(xs, ys)


def combine_rows(xs: Sequence[int], ys: np.ndarray) -> bytes:
    """Rebuild a secret from the shares at distinct points ``xs``, given already decoded
    and checked (:func:`share_to_array`) as the rows of ``ys`` (one row per x, as many as
    the threshold): the server decodes each unmask answer once, all its shares at once."""
    if len(set(xs)) != len(xs):
        raise ReconstructionError("duplicate share x-coordinates")
    lam = _lagrange_at_zero(xs)
    chunks = ((lam[:, None] * ys) % PRIME).sum(axis=0) % PRIME
    return _chunks_to_secret(chunks)
