"""Mask expansion: a 256-bit key becomes an exactly uniform vector in Z_{2^b}.

The PRG is AES-256 in counter mode (hardware AES on every current CPU) with an all-zero
initial counter. That is safe because every key is used for exactly one expansion: keys
come from HKDF with a context that binds the run, the round, the global model and the
pair of clients (see :mod:`sgs_flower.secagg.keys`), so no (key, counter) pair repeats.

Uniformity is exact, not approximate: the keystream is a uniform word of 32 or 64 bits
per coordinate and 2^b divides 2^32 (or 2^64), so reducing mod 2^b (a bit mask, applied
once at the end by the caller) keeps it uniform. Flower's built-in SecAgg+ instead folds
the seed to 32 bits and draws from Mersenne Twister.

This is the hot path of the protocol. Keystreams are written with ``update_into`` into a
preallocated scratch buffer and added to the accumulator in place, so masking a
million coordinates allocates nothing per neighbour.
"""

from __future__ import annotations

import threading

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sgs_flower.secagg.errors import ConfigurationError

KEY_BYTES = 32
_ZERO_COUNTER = bytes(16)
_BLOCK = 16


def dtype_for_bits(field_bits: int) -> np.dtype:
    """The unsigned word that holds Z_{2^b}: uint32 up to 32 bits, uint64 up to 64."""
    if not 1 <= field_bits <= 64:
        raise ConfigurationError(f"field_bits must be in 1..64, got {field_bits}")
    return np.dtype(np.uint32) if field_bits <= 32 else np.dtype(np.uint64)


def reduce_mod(vec: np.ndarray, field_bits: int) -> np.ndarray:
    """Reduce a word vector mod 2^b in place (a no-op when b is the word width)."""
    width = vec.dtype.itemsize * 8
    if field_bits < width:
        np.bitwise_and(vec, vec.dtype.type((1 << field_bits) - 1), out=vec)
    return vec


class MaskExpander:
    """Adds or subtracts PRG(key) to an accumulator, reusing one scratch buffer.

    One expander serves vectors of one length and dtype; make one per client (or per
    server unmasking) and call :meth:`add` once per key.
    """

    def __init__(self, length: int, dtype: np.dtype | type) -> None:
        self.length = int(length)
        self.dtype = np.dtype(dtype)
        nbytes = self.length * self.dtype.itemsize
        self._zeros = bytes(nbytes)
        # update_into wants room for one extra partial block.
        self._scratch = bytearray(nbytes + _BLOCK)
        self._view = np.frombuffer(self._scratch, dtype=self.dtype, count=self.length)

    def keystream(self, key: bytes) -> np.ndarray:
        """PRG(key) as words (a view into the scratch buffer, valid until the next call)."""
        if len(key) != KEY_BYTES:
            raise ConfigurationError(f"a mask key must be {KEY_BYTES} bytes, got {len(key)}")
        enc = Cipher(algorithms.AES(key), modes.CTR(_ZERO_COUNTER)).encryptor()
        enc.update_into(self._zeros, self._scratch)
        return self._view

    def add(self, acc: np.ndarray, key: bytes, sign: int = 1) -> None:
        """acc += sign * PRG(key) (mod the word size; reduce mod 2^b once at the end)."""
        if acc.dtype != self.dtype or acc.shape != (self.length,):
            raise ConfigurationError(
                f"accumulator must be {self.dtype} of shape ({self.length},), "
                f"got {acc.dtype} {acc.shape}"
            )
        ks = self.keystream(key)
        if sign >= 0:
            np.add(acc, ks, out=acc)
        else:
            np.subtract(acc, ks, out=acc)


_local = threading.local()


def get_expander(length: int, dtype: np.dtype | type) -> MaskExpander:
    """A per-thread cached expander, so repeated maskings reuse one scratch buffer."""
    cached: MaskExpander | None = getattr(_local, "expander", None)
    if cached is None or cached.length != length or cached.dtype != np.dtype(dtype):
        cached = MaskExpander(length, dtype)
        _local.expander = cached
    return cached


def expand(key: bytes, length: int, field_bits: int) -> np.ndarray:
    """A fresh mask vector PRG(key) mod 2^b (allocating; for tests and one-off use)."""
    dtype = dtype_for_bits(field_bits)
    out = np.zeros(length, dtype=dtype)
    MaskExpander(length, dtype).add(out, key)
    return reduce_mod(out, field_bits)
