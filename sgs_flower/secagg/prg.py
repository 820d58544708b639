"""Mask expansion: a 256-bit key becomes an exactly uniform vector in Z_{2^b}.

The PRG is AES-256 in counter mode (hardware AES on every current CPU) with an all-zero
initial counter. That is safe because every key is used for exactly one expansion: keys
come from HKDF with a context that binds the run, the round, the global model and the
pair of clients (see :mod:`sgs_flower.secagg.keys`), so no (key, counter) pair repeats.

Uniformity is exact, not approximate: the keystream is a uniform word of 16, 32 or
64 bits per coordinate and 2^b divides it, so reducing mod 2^b (a bit mask, applied once
at the end by the caller) keeps it uniform. Flower's built-in SecAgg+ instead folds the
seed to 32 bits and draws from Mersenne Twister.

Narrow fields (issue 21): the keystream costs AES work per byte, so a coordinate takes
only the word its field needs, :func:`keystream_bytes`: 2 bytes for b <= 16 (words are
uint16), 4 up to 32 and 8 beyond. A 16-bit field therefore halves the keystream floor
of the masked-input stage against 32-bit words. (A 3-byte keystream for 17..24 bits,
the low 16 bits added as uint16 and the high byte apart, was tried and measured 1.35x
slower than 4 bytes here: numpy's mixed-width adds cost more than the AES they save.)

This is the hot path of the protocol. :meth:`MaskExpander.accumulate` (and
:meth:`MaskExpander.mask`) add many keystreams in one sweep over the accumulator: for
each cache-sized block of it, every key's AES-CTR stream writes its next block of
keystream into one small scratch buffer and is added (or subtracted) in place, so the
accumulator block stays in the CPU cache across all keys and nothing the size of the
vector is allocated or re-read per key. :meth:`MaskExpander.add` (one key over the
whole vector) remains for callers that handle one key at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

from sgs_flower.secagg.errors import ConfigurationError

KEY_BYTES = 32
_ZERO_COUNTER = bytes(16)
_BLOCK = 16
# Bytes of accumulator handled per sweep step: the block and the keystream scratch
# (2 x 256 KiB) stay in a 1 MiB L2 cache while every key is added. Measured on a
# 2-core EPYC: 64 KiB..1 MiB blocks are all within noise; smaller ones pay for the
# per-call overhead of ``update_into``, the whole vector pays for memory traffic.
BLOCK_BYTES = 1 << 18


def dtype_for_bits(field_bits: int) -> np.dtype:
    """The unsigned word that holds Z_{2^b}: uint16 up to 16 bits (half the memory and
    the adds of a uint32), uint32 up to 32, uint64 up to 64."""
    if not 1 <= field_bits <= 64:
        raise ConfigurationError(f"field_bits must be in 1..64, got {field_bits}")
    if field_bits <= 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32) if field_bits <= 32 else np.dtype(np.uint64)


def keystream_bytes(field_bits: int) -> int:
    """AES-CTR keystream bytes one coordinate of a Z_{2^b} mask takes (see module doc)."""
    return dtype_for_bits(field_bits).itemsize


def reduce_mod(vec: np.ndarray, field_bits: int) -> np.ndarray:
    """Reduce a word vector mod 2^b in place (a no-op when b is the word width)."""
    width = vec.dtype.itemsize * 8
    if field_bits < width:
        np.bitwise_and(vec, vec.dtype.type((1 << field_bits) - 1), out=vec)
    return vec


def aes_ctr(key: bytes) -> CipherContext:
    """The AES-256-CTR keystream generator of one mask key (counter starts at zero)."""
    if len(key) != KEY_BYTES:
        raise ConfigurationError(f"a mask key must be {KEY_BYTES} bytes, got {len(key)}")
    return Cipher(algorithms.AES(key), modes.CTR(_ZERO_COUNTER)).encryptor()


class Keystream:
    """One AES-256-CTR keystream read block by block into a reusable scratch buffer.

    Consecutive :meth:`words` calls continue the same stream, so reading it in blocks
    gives exactly the words that one whole-vector expansion would (CTR is a stream).
    """

    def __init__(self, key: bytes, dtype: np.dtype | type = np.uint32, block_words: int | None = None) -> None:
        self.dtype = np.dtype(dtype)
        self.block_words = block_words or max(1, BLOCK_BYTES // self.dtype.itemsize)
        nbytes = self.block_words * self.dtype.itemsize
        self._enc = aes_ctr(key)
        self._zeros = bytes(nbytes)
        self._scratch = bytearray(nbytes + _BLOCK)  # update_into wants one spare block
        self._view = np.frombuffer(self._scratch, dtype=self.dtype, count=self.block_words)

    def words(self, n: int) -> np.ndarray:
        """The next ``n`` (<= block_words) words (a view, valid until the next call)."""
        if n == self.block_words:
            self._enc.update_into(self._zeros, self._scratch)
        else:
            self._enc.update_into(memoryview(self._zeros)[: n * self.dtype.itemsize], self._scratch)
        return self._view[:n]


class MaskExpander:
    """Adds or subtracts PRG(key) to an accumulator, reusing scratch buffers.

    One expander serves vectors of one length and dtype; make one per client (or per
    server unmasking). Use :meth:`accumulate` / :meth:`mask` for all of a vector's keys
    at once (the fast path), or :meth:`add` once per key.
    """

    def __init__(self, length: int, dtype: np.dtype | type) -> None:
        self.length = int(length)
        self.dtype = np.dtype(dtype)
        self.block_words = max(1, BLOCK_BYTES // self.dtype.itemsize)
        # Whole-vector buffers for add()/keystream(), allocated on first use only: the
        # block-wise paths never need them (they would be 2x the vector's size).
        self._zeros = b""
        self._scratch = bytearray()
        self._view = np.zeros(0, dtype=self.dtype)
        self._block_zeros = bytes(self.block_words * self.dtype.itemsize)
        self._block_scratch = bytearray(len(self._block_zeros) + _BLOCK)
        self._block_view = np.frombuffer(self._block_scratch, dtype=self.dtype, count=self.block_words)

    def _check(self, acc: np.ndarray) -> None:
        if not isinstance(acc, np.ndarray) or acc.dtype != self.dtype or acc.shape != (self.length,):
            raise ConfigurationError(
                f"accumulator must be {self.dtype} of shape ({self.length},), "
                f"got {getattr(acc, 'dtype', type(acc).__name__)} {getattr(acc, 'shape', '')}"
            )

    def keystream(self, key: bytes) -> np.ndarray:
        """PRG(key) as words (a view into the scratch buffer, valid until the next call)."""
        enc = aes_ctr(key)
        if not self._scratch:
            nbytes = self.length * self.dtype.itemsize
            self._zeros = bytes(nbytes)
            self._scratch = bytearray(nbytes + _BLOCK)
            self._view = np.frombuffer(self._scratch, dtype=self.dtype, count=self.length)
        enc.update_into(self._zeros, self._scratch)
        return self._view

    def add(self, acc: np.ndarray, key: bytes, sign: int = 1) -> None:
        """acc += sign * PRG(key) (mod the word size; reduce mod 2^b once at the end)."""
        self._check(acc)
        ks = self.keystream(key)
        if sign >= 0:
            np.add(acc, ks, out=acc)
        else:
            np.subtract(acc, ks, out=acc)

    def accumulate(self, acc: np.ndarray, streams: Iterable[tuple[bytes, int]], base: np.ndarray | None = None) -> None:
        """acc = (base or acc) + sum(sign * PRG(key) for key, sign in streams), in one sweep.

        Equal, word for word, to calling :meth:`add` once per key (a test checks it),
        but the accumulator is swept once in cache-sized blocks instead of once per key,
        and each keystream block is added while it is still in cache. Words wrap mod
        the word size; reduce mod 2^b once at the end. ``base`` (same shape and dtype,
        may be ``acc`` itself) is copied in block by block, which saves the caller a
        separate full copy.
        """
        self._check(acc)
        if base is not None and base is not acc:
            self._check(base)
        plan: list[tuple[CipherContext, bool]] = [(aes_ctr(key), sign >= 0) for key, sign in streams]
        bw, zeros, scratch, view = self.block_words, self._block_zeros, self._block_scratch, self._block_view
        itemsize = self.dtype.itemsize
        for start in range(0, self.length, bw):
            stop = min(start + bw, self.length)
            n = stop - start
            block = acc[start:stop]
            if base is not None and base is not acc:
                np.copyto(block, base[start:stop])
            data = zeros if n == bw else memoryview(zeros)[: n * itemsize]
            ks = view if n == bw else view[:n]
            for enc, plus in plan:
                enc.update_into(data, scratch)
                if plus:
                    np.add(block, ks, out=block)
                else:
                    np.subtract(block, ks, out=block)

    def mask(self, vector: np.ndarray, streams: Sequence[tuple[bytes, int]], field_bits: int) -> np.ndarray:
        """A new vector: (vector + sum(sign * PRG(key))) mod 2^b; ``vector`` is untouched.

        What a client sends: its encoded input plus its self mask and pairwise masks.
        """
        out = np.empty(self.length, dtype=self.dtype)
        self.accumulate(out, streams, base=vector)
        return reduce_mod(out, field_bits)


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
    MaskExpander(length, dtype).accumulate(out, [(key, +1)])
    return reduce_mod(out, field_bits)
