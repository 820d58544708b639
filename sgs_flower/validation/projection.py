"""Random Rademacher projections and the parameters of the probabilistic L2 check.

The check (ACORN, Bell et al. 2023; RiseFL, Zhu et al.) replaces "||x||_2 <= B", which
would need a range proof per coordinate, by k projections v_j = <a_j, x> onto Rademacher
vectors a_j in {-1,+1}^m drawn *after* x is fixed; only the k values v_j are range-proven.

Soundness. Let delta be what a cheating site adds to the sum, L = ||delta||_2 and
v = <a, delta> for one Rademacher a. Then E v^2 = L^2 and
E v^4 = 3 L^4 - 2 sum_i delta_i^4 <= 3 L^4, so Paley–Zygmund gives, for 0 <= theta < 1,

    P[v^2 > theta L^2] >= (1 - theta)^2 (E v^2)^2 / E v^4 >= (1 - theta)^2 / 3.

The site passes only if every |v_j| <= A (A = the largest |v| the range proof accepts,
:attr:`BoundParams.accept`). If L > gamma*B then A^2 < theta*L^2 with
theta = (A / (gamma B))^2, so each independent projection passes with probability at
most 1 - (1-theta)^2/3 and all k with at most (1 - (1-theta)^2/3)^k. :func:`params_for`
picks the smallest power-of-two k for which some theta > 0 brings this below
2^-soundness_bits (k >= soundness_bits / log2(3/2)), then the largest such theta*,
and reports gamma = A / (B sqrt(theta*)).

Large single entries: if some |delta_i| > A, condition on the other signs: the two
values of a_i give v's 2|delta_i| > 2A apart, so at most one lies in [-A, A] and each
projection passes with probability <= 1/2 (all k: <= 2^-k). An entry that wraps
modulo the group order r (or modulo the masking field) is such an entry.

Completeness. For an honest x with ||x||_2 <= B, Hoeffding gives
P[|<a, x>| >= t] <= 2 exp(-t^2 / (2 ||x||^2)); with t = tau B and a union over the k
projections the honest site fails with probability <= 2k exp(-tau^2/2). tau is the
smallest value making that <= 2^-completeness_bits, and the acceptance interval is set
to hold tau*B: honest sites are rejected with probability :attr:`BoundParams.completeness_error`.

Fiat–Shamir caveat: the bound is per challenge. The seed is derived by the protocol after
x is fixed; an attacker who can try 2^t candidate updates (and so 2^t challenges)
before committing succeeds with probability <= 2^(t - soundness_bits).

Encoding of the range. The range proof shows u_j = scale*v_j + shift in [0, 2^bits) with
bits in {8, 16, 32, 64} (Bulletproofs wants k*bits a power of two) and
shift = 2^(bits-1): the accepted v are [-shift/scale, (shift-1)/scale], symmetric up
to one unit. ``scale`` = floor((shift - 1) / ceil(tau B)) >= 1 spreads the accepted
interval over the whole power-of-two range, so A stays within a factor
(1 + 1/scale) of tau*B instead of being rounded up to 2^(bits-1).

Expansion. a_j[i] = (-1)^bit, bit = bit (j mod 8) of byte i*ceil(k/8) + j//8 of an
AES-256-CTR keystream (initial counter 0) under key = SHA-256(domain || seed): the k
signs of a coordinate are adjacent, so a chunk of coordinates is a contiguous slice of
the keystream and the projection is computed in chunks (no k x m matrix is held).
The inner products are exact: x is split into 20-bit halves and each chunk's products
are float64 matrix products whose partial sums stay below 2^53.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from sgs_flower.errors import ConfigurationError, EncodingError

RADEMACHER_DOMAIN = b"sgs-flower/validation/rademacher/v1"
MAX_ABS_ENTRY = 1 << 40  # |x_i| < 2^40: the encoded update's integer units
CHUNK_COORDINATES = 1 << 15  # 32768 coordinates x k=128 signs: 32 MB of float64 per chunk
SEED_BYTES = 32
RANGE_BITS = (8, 16, 32, 64)
_HALF = 20  # x = hi * 2^20 + lo
_REL_TOL = 1e-9


def _is_pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def min_projections(soundness_bits: int) -> int:
    """Smallest power-of-two k with (2/3)^k < 2^-soundness_bits (theta -> 0 limit)."""
    need = soundness_bits / math.log2(1.5)
    k = 8
    while k <= need:
        k *= 2
    return k


def max_theta(k: int, soundness_bits: int) -> float:
    """Largest theta with (1 - (1-theta)^2/3)^k <= 2^-soundness_bits (0 if none)."""
    inner = 3.0 * (1.0 - 2.0 ** (-soundness_bits / k))
    if inner >= 1.0:
        return 0.0
    return 1.0 - math.sqrt(inner)


def tau_for(k: int, completeness_bits: int) -> float:
    """Smallest tau with 2k exp(-tau^2/2) <= 2^-completeness_bits."""
    return math.sqrt(2.0 * (math.log(2 * k) + completeness_bits * math.log(2.0)))


def pass_probability_bound(theta: float, k: int) -> float:
    """Paley–Zygmund: P[all k projections of a too-long vector pass] <= this."""
    return (1.0 - (1.0 - theta) ** 2 / 3.0) ** k


@dataclass(frozen=True)
class BoundParams:
    """One round's L2-bound statement, everything the prover and verifier must agree on.

    ``bound`` B in the integer units of the encoded update; ``k`` projections; ``tau``
    the completeness slack (honest |v| <= tau*||x|| except w.p. completeness_error);
    ``shift`` T = 2^(bits-1) and ``scale`` c: the committed values are c*v_j + T and the
    range proof shows them in [0, 2^bits); ``gamma``: a site whose contribution has
    norm > gamma*B passes with probability <= 2^-soundness_bits per challenge.
    """

    bound: int
    k: int
    tau: float
    shift: int
    bits: int
    gamma: float
    soundness_bits: int
    completeness_error: float
    scale: int = 1

    def __post_init__(self) -> None:
        self.validate()

    @property
    def accept(self) -> float:
        """A: the largest |v_j| the range proof admits (shift/scale; the positive side
        stops one unit of v earlier)."""
        return self.shift / self.scale

    def committed_value(self, v: int) -> int:
        """u = scale*v + shift: the integer committed for projection v."""
        return self.scale * v + self.shift

    def to_config(self) -> dict[str, Any]:
        """A plain JSON-able dict (ints and floats)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_config(cls, d: Mapping[str, Any]) -> BoundParams:
        """Parse and validate :meth:`to_config`'s dict; ConfigurationError on anything
        missing, mistyped, impossible, or inconsistent (a claimed gamma or completeness
        error that the other fields do not give)."""
        if not isinstance(d, Mapping):
            raise ConfigurationError(f"bound params must be a mapping, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ConfigurationError(f"unknown bound-params keys {sorted(unknown)}")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in d:
                if f.name == "scale":
                    values[f.name] = 1
                    continue
                raise ConfigurationError(f"bound params lack {f.name!r}")
            v = d[f.name]
            if f.type in ("int", int):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ConfigurationError(f"bound params {f.name!r} must be an int, got {v!r}")
            else:
                if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                    raise ConfigurationError(f"bound params {f.name!r} must be a finite number, got {v!r}")
                v = float(v)
            values[f.name] = v
        return cls(**values)  # validated in __post_init__

    def validate(self) -> None:
        """ConfigurationError unless the fields are consistent (see :func:`params_for`)."""
        if self.bound < 1:
            raise ConfigurationError(f"bound must be a positive integer, got {self.bound}")
        if not _is_pow2(self.k) or self.k < 8:
            raise ConfigurationError(f"k must be a power of two >= 8, got {self.k}")
        if self.bits not in RANGE_BITS:
            raise ConfigurationError(f"bits must be one of {RANGE_BITS}, got {self.bits}")
        if self.shift != 1 << (self.bits - 1):
            raise ConfigurationError(f"shift must be 2^(bits-1) = {1 << (self.bits - 1)}, got {self.shift}")
        if self.scale < 1:
            raise ConfigurationError(f"scale must be >= 1, got {self.scale}")
        if not 1 <= self.soundness_bits <= 256:
            raise ConfigurationError(f"soundness_bits must be in [1, 256], got {self.soundness_bits}")
        if self.tau <= 0 or (self.shift - 1) < self.scale * self.tau * self.bound:
            raise ConfigurationError(
                f"the range [-(T-1)/scale, (T-1)/scale] does not hold tau*B = {self.tau * self.bound:.1f}: "
                "honest sites would fail; derive the params with params_for"
            )
        theta = max_theta(self.k, self.soundness_bits)
        if theta <= 0.0:
            raise ConfigurationError(
                f"k = {self.k} projections cannot reach 2^-{self.soundness_bits} soundness "
                f"(need k >= {min_projections(self.soundness_bits)})"
            )
        gamma = self.accept / (self.bound * math.sqrt(theta))
        if not math.isclose(self.gamma, gamma, rel_tol=_REL_TOL):
            raise ConfigurationError(f"gamma {self.gamma} does not follow from the params (it is {gamma})")
        err = completeness_error(self.k, self.scale, self.shift, self.bound)
        if not math.isclose(self.completeness_error, err, rel_tol=_REL_TOL, abs_tol=1e-300):
            raise ConfigurationError(
                f"completeness_error {self.completeness_error} does not follow from the params (it is {err})"
            )


def completeness_error(k: int, scale: int, shift: int, bound: int) -> float:
    """2k exp(-t^2/(2B^2)) with t = (shift-1)/scale, the smallest rejected |v| side."""
    t = (shift - 1) / scale / bound
    return min(1.0, 2.0 * k * math.exp(-t * t / 2.0))


def params_for(
    bound: int, soundness_bits: int = 40, completeness_bits: int = 40, *, k: int | None = None
) -> BoundParams:
    """The round's parameters for an L2 bound ``bound`` (integer units).

    k: the smallest power of two reaching the soundness target (128 for 40 bits), or the
    given one (a larger k lowers gamma at proportional cost). tau from completeness;
    bits the smallest of 8/16/32/64 whose half-range holds ceil(tau*B); scale spreads the
    range over it. gamma follows (see the module docstring).
    """
    if isinstance(bound, bool) or not isinstance(bound, int) or bound < 1:
        raise ConfigurationError(f"bound must be a positive integer (encoded units), got {bound!r}")
    if not 1 <= soundness_bits <= 256 or not 1 <= completeness_bits <= 256:
        raise ConfigurationError(
            f"soundness_bits and completeness_bits must be in [1, 256], got {soundness_bits}, {completeness_bits}"
        )
    k_min = min_projections(soundness_bits)
    if k is None:
        k = k_min
    elif not _is_pow2(k) or k < k_min:
        raise ConfigurationError(f"k must be a power of two >= {k_min} for {soundness_bits}-bit soundness, got {k}")
    tau = tau_for(k, completeness_bits)
    need = math.ceil(tau * bound)
    for bits in RANGE_BITS:
        shift = 1 << (bits - 1)
        if shift - 1 >= need:
            break
    else:
        raise ConfigurationError(
            f"tau*B = {tau * bound:.3g} does not fit a 64-bit range proof; lower the encoding scale"
        )
    scale = (shift - 1) // need
    theta = max_theta(k, soundness_bits)
    gamma = (shift / scale) / (bound * math.sqrt(theta))
    params = BoundParams(
        bound=bound,
        k=k,
        tau=tau,
        shift=shift,
        bits=bits,
        gamma=gamma,
        soundness_bits=soundness_bits,
        completeness_error=completeness_error(k, scale, shift, bound),
        scale=scale,
    )  # validated in __post_init__
    return params


def _keystream(seed: bytes, start: int, length: int) -> bytes:
    """``length`` keystream bytes from byte offset ``start`` (a multiple of 16)."""
    key = hashlib.sha256(RADEMACHER_DOMAIN + seed).digest()
    counter = (start // 16).to_bytes(16, "big")
    enc = Cipher(algorithms.AES(key), modes.CTR(counter)).encryptor()
    return enc.update(bytes(length))


def rademacher_bits(seed: bytes, k: int, start: int, stop: int) -> np.ndarray:
    """The sign bits of coordinates [start, stop) as a (stop-start, k) uint8 array of
    0/1 (1 means a_j[i] = -1). ``start`` must be a multiple of 16."""
    if len(seed) != SEED_BYTES:
        raise ConfigurationError(f"the projection seed is {SEED_BYTES} bytes, got {len(seed)}")
    if start % 16:
        raise ValueError("start must be a multiple of 16 coordinates")
    stride = (k + 7) // 8
    raw = np.frombuffer(_keystream(seed, start * stride, (stop - start) * stride), dtype=np.uint8)
    return np.unpackbits(raw.reshape(stop - start, stride), axis=1, bitorder="little")[:, :k]


def rademacher(seed: bytes, k: int, m: int) -> np.ndarray:
    """The k x m matrix of +-1 (int8). For tests and small m: :func:`project` never builds it."""
    return (1 - 2 * rademacher_bits(seed, k, 0, m).astype(np.int8)).T.copy()


def project(x: np.ndarray, seed: bytes, k: int) -> list[int]:
    """Exact <a_j, x> for j < k as Python ints (x: 1-D integer array, |x_i| < 2^40)."""
    arr = np.asarray(x)
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise EncodingError(f"x must be a 1-D integer vector, got shape {arr.shape} dtype {arr.dtype}")
    if k < 1:
        raise ConfigurationError(f"k must be >= 1, got {k}")
    # compare in the input's own dtype (as Python ints) before any cast: a uint64 2^64-1
    # would cast to -1, and np.abs(int64 min) is negative
    if arr.size and (int(arr.min()) <= -MAX_ABS_ENTRY or int(arr.max()) >= MAX_ABS_ENTRY):
        raise EncodingError("an entry of x has |x_i| >= 2^40: outside the encoding the proof covers")
    arr = arr.astype(np.int64, copy=False)
    totals = [0] * k
    m = arr.size
    for start in range(0, m, CHUNK_COORDINATES):
        stop = min(m, start + CHUNK_COORDINATES)
        chunk = arr[start:stop]
        halves = np.empty((stop - start, 2), dtype=np.float64)
        halves[:, 0] = chunk & ((1 << _HALF) - 1)  # lo in [0, 2^20)
        halves[:, 1] = chunk >> _HALF  # hi in [-2^20, 2^20)
        signs = 1.0 - 2.0 * rademacher_bits(seed, k, start, stop).astype(np.float64)
        part = signs.T @ halves  # (k, 2), every partial sum < 2^15 * 2^20 < 2^53: exact
        lo = np.rint(part[:, 0]).astype(np.int64)
        hi = np.rint(part[:, 1]).astype(np.int64)
        for j in range(k):
            totals[j] += (int(hi[j]) << _HALF) + int(lo[j])
    return totals
