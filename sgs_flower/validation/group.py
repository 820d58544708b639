"""The prime-order group: BLS12-381 G1 through ``py_arkworks_bls12381`` (arkworks).

Nothing here implements a curve or field operation: points, scalars, hashing to the
curve (RFC 9380, ``BLS12381G1_XMD:SHA-256_SSWU_RO_``) and multi-scalar multiplication
are the library's. This module only fixes encodings and caches:

* Scalars travel as 32-byte big-endian integers and must be canonical (< R); points as
  48-byte compressed encodings, parsed with the on-curve and subgroup checks
  (:func:`point_from`), so a proof can never smuggle a small-order point in.
* Python ints are turned into library scalars through ``Scalar.from_le_bytes``
  (0.2 us) rather than ``Scalar(int)`` (5 us): the provers and verifiers build tens of
  thousands of them per proof.
* Generators come from ``hash_to_curve`` with a per-purpose domain-separation tag, so
  nobody knows a discrete-log relation between any two of them (what Pedersen binding
  and the inner-product argument need). Each costs ~0.3 ms, so they are cached per
  process and extended on demand.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from py_arkworks_bls12381 import G1Point, Scalar

from sgs_flower.validation.errors import ProofError
from sgs_flower.validation.pins import BLOCK, PINNED

#: The order r of G1 (the BLS12-381 scalar field).
R = 0x73EDA753299D7D483339D80809A1D80553BDA402FFFE5BFEFFFFFFFF00000001
POINT_BYTES = 48
SCALAR_BYTES = 32
DST_PREFIX = b"SGS-FLOWER-VALIDATION-V1-GEN-"

__all__ = [
    "POINT_BYTES",
    "SCALAR_BYTES",
    "G1Point",
    "R",
    "generators",
    "msm",
    "point_bytes",
    "point_from",
    "scalar_bytes",
    "scalar_from",
    "to_scalars",
]

_generators: dict[bytes, list[G1Point]] = {}
_lock = threading.Lock()


def generators(label: bytes, count: int) -> list[G1Point]:
    """``count`` independent generators for ``label``: hash_to_curve(i, DST || label).

    The i-th generator of a label never changes as ``count`` grows, so a proof for 64
    values uses a prefix of the generators of a proof for 128.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    label = bytes(label)
    with _lock:
        cached = _generators.setdefault(label, [])
        if len(cached) < count:
            _load_pinned(label, cached, count)
        dst = DST_PREFIX + label
        derived = len(cached) < count
        while len(cached) < count:
            cached.append(G1Point.hash_to_curve(len(cached).to_bytes(8, "big"), dst))
        if derived:
            _store_pinned(label, cached)
        return cached[:count]


XY_BYTES = 96


def cache_file(label: bytes) -> Path:
    """Where the pinned blocks of ``label``'s generators are cached on disk."""
    root = os.environ.get("SGS_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "sgs-flower"
    )
    return Path(root) / f"generators-{hashlib.sha256(DST_PREFIX + label).hexdigest()[:16]}.bin"


def _load_pinned(label: bytes, cached: list[G1Point], count: int) -> None:
    """Extend ``cached`` with the disk cache's blocks whose SHA-256 matches its pin, in
    order, stopping at the first block that is missing or differs (then derived)."""
    pins = PINNED.get(label, ())
    if len(cached) % BLOCK or len(cached) >= len(pins) * BLOCK:
        return
    try:
        data = cache_file(label).read_bytes()
    except OSError:
        return
    size = BLOCK * XY_BYTES
    for block in range(len(cached) // BLOCK, min(len(pins), -(-count // BLOCK))):
        chunk = data[block * size:(block + 1) * size]
        if len(chunk) != size or hashlib.sha256(chunk).hexdigest() != pins[block]:
            return
        # unchecked parse: the pinned digest already proves these are the derived points
        cached.extend(G1Point.from_xy_bytes_unchecked_be(chunk[i:i + XY_BYTES]) for i in range(0, size, XY_BYTES))


def _store_pinned(label: bytes, cached: list[G1Point]) -> None:
    """Write the whole pinned blocks of ``cached`` to the disk cache, after a derivation
    (so a missing, short or damaged cache is replaced; atomically; a cache that cannot be
    written is only a cost, never an error)."""
    whole = min(len(cached) // BLOCK, len(PINNED.get(label, ())))
    path = cache_file(label)
    try:
        if whole == 0:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(b"".join(bytes(p.to_xy_bytes_be()) for p in cached[:whole * BLOCK]))
        os.replace(tmp, path)
    except OSError:
        return


def point_bytes(p: G1Point) -> bytes:
    """The 48-byte compressed encoding of ``p``."""
    return bytes(p.to_compressed_bytes())


@lru_cache(maxsize=1 << 16)
def _parse(b: bytes) -> G1Point:
    try:
        return G1Point.from_compressed_bytes(b)
    except ValueError:
        pass
    try:
        G1Point.from_compressed_bytes_unchecked(b)
    except ValueError as exc:
        raise ProofError(
            f"bytes {b[:8].hex()}... are not a compressed BLS12-381 G1 point on the curve ({exc})"
        ) from None
    raise ProofError(
        f"point {b[:8].hex()}... is on the curve but not in the prime-order subgroup; "
        "a valid prover never sends it"
    )


def point_from(b: bytes) -> G1Point:
    """Parse a compressed point with on-curve and subgroup checks (cached: the opening
    check re-reads commitments the proof verification already parsed)."""
    b = bytes(b)
    if len(b) != POINT_BYTES:
        raise ProofError(f"a point is {POINT_BYTES} compressed bytes, got {len(b)}")
    return _parse(b)


def scalar_bytes(v: int) -> bytes:
    """32-byte big-endian encoding of ``v mod R``."""
    return (v % R).to_bytes(SCALAR_BYTES, "big")


def scalar_from(b: bytes) -> int:
    """Parse a canonical 32-byte big-endian scalar; ProofError if it is not < R."""
    if len(b) != SCALAR_BYTES:
        raise ProofError(f"a scalar is {SCALAR_BYTES} bytes, got {len(b)}")
    v = int.from_bytes(b, "big")
    if v >= R:
        raise ProofError(f"scalar {b[:8].hex()}... is not canonical (>= the group order R)")
    return v


def to_scalars(values: Sequence[int]) -> list[Scalar]:
    """Library scalars for Python ints (reduced mod R)."""
    from_le = Scalar.from_le_bytes
    return [from_le((v % R).to_bytes(SCALAR_BYTES, "little")) for v in values]


def msm(points: Sequence[G1Point], scalars: Sequence[int]) -> G1Point:
    """sum_i scalars[i] * points[i] in one multi-scalar multiplication."""
    if len(points) != len(scalars):
        raise ValueError(f"msm needs as many scalars as points ({len(scalars)} != {len(points)})")
    if not points:
        return G1Point.identity()
    return G1Point.multiexp_unchecked(list(points), to_scalars(scalars))
