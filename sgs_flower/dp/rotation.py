"""Randomized Hadamard rotation: spread a vector's energy before integer rounding.

Distributed DP rounds to integers and adds discrete noise per coordinate; a vector
whose mass sits in a few coordinates would be dominated by rounding error there. A
random rotation H*D (D = random signs from a shared public seed, H = normalised
Walsh-Hadamard matrix) makes the coordinates roughly equal in magnitude, and it is
orthogonal, so L2 norms (and therefore the DP sensitivity) are unchanged. Every
client must use the same seed in a round so the server can un-rotate the sum.
"""

from __future__ import annotations

import numpy as np


def padded_length(n: int) -> int:
    """Smallest power of two >= n (the Hadamard transform needs one)."""
    if n < 1:
        raise ValueError(f"length must be >= 1, got {n}")
    return 1 << (n - 1).bit_length()


def _fwht(x: np.ndarray) -> np.ndarray:
    """Orthonormal fast Walsh-Hadamard transform (its own inverse), O(n log n)."""
    y = x.astype(np.float64, copy=True)
    n = y.shape[0]
    h = 1
    while h < n:
        y = y.reshape(-1, 2, h)
        a, b = y[:, 0, :].copy(), y[:, 1, :]
        y[:, 0, :] = a + b
        y[:, 1, :] = a - b
        y = y.reshape(n)
        h *= 2
    return y / np.sqrt(n)


def _signs(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=n)


def rotate(vector: np.ndarray, seed: int) -> np.ndarray:
    """Pad ``vector`` with zeros to a power of two and apply H * diag(signs(seed))."""
    x = np.asarray(vector, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"rotate expects a flat vector, got shape {x.shape}")
    n = padded_length(x.shape[0])
    padded = np.zeros(n)
    padded[: x.shape[0]] = x
    return _fwht(padded * _signs(seed, n))


def unrotate(rotated: np.ndarray, seed: int, length: int) -> np.ndarray:
    """Exact inverse of :func:`rotate`: returns the first ``length`` coordinates."""
    y = np.asarray(rotated, dtype=np.float64)
    n = y.shape[0]
    if n != padded_length(n):
        raise ValueError(f"rotated length {n} is not a power of two")
    if not 1 <= length <= n:
        raise ValueError(f"length must be in 1..{n}, got {length}")
    return (_fwht(y) * _signs(seed, n))[:length]
