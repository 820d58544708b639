"""Fixed-point encoding of weighted float updates into Z_{2^b}, and back.

A client's update x (a float vector) with integer weight w (e.g. its number of training
examples) becomes ``w * q`` where ``q = stochastic_round(clip(x, -c, c) * s)`` and
``s = L / c`` with ``L = 2^(p-1) - 1`` levels for ``p`` bits per coordinate. Two extra
coordinates carry the weight ``w`` and a count of 1; the server decodes
``sum(w q) / (s * sum(w))``: the weighted mean, without ever seeing a single ``w``.

- Unbiased: stochastic rounding has E[q] = x * s (to 2^-32 of a level, see
  :func:`_round_block`), so the quantization error averages out across clients and
  rounds instead of drifting.
- Bound: each rounded value is within one level of x * s and never beyond +-L, so the
  decoded weighted mean is within ``c / L`` of the true one in every coordinate (when
  nothing was clipped).
- Fast: one pass over the update in cache-sized blocks (see :func:`encode_parts`); the
  rounding randomness is an AES-256-CTR keystream under a fresh key.
- Clipping to [-c, c] is explicit: the number of clipped coordinates is returned and
  reported, never applied silently. With ``wrap=True`` (the non-DP pipeline) values
  beyond the range are not clipped at all but encoded linearly mod 2^b and counted: a
  sum holding any is never released (it is retried at a wider range).
- No wrap-around: the configuration is refused unless
  ``max_cohort * max_weight * (L + headroom) < 2^(b-1)``, the condition for the
  two's-complement sum to decode exactly. DP noise added in the integer domain reserves
  its range through ``noise_headroom``. The weight travels in as many limbs of
  :attr:`QuantizationConfig.limb_bits` bits as its bound needs, so a narrow field
  (issue 21) still carries the exact weight sum.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sgs_flower.secagg.errors import ConfigurationError, EncodingError, OverflowRiskError
from sgs_flower.secagg.prg import Keystream, dtype_for_bits, reduce_mod

EXTRA_COORDINATES = 2  # weight, count: in a field wide enough for the weight sum (else see weight_limbs)
#: The word widths a field may have: 8 bits is the narrowest worth packing, 64 the
#: widest numpy word (every width rule searches this range; QuantizationConfig refuses others).
MIN_FIELD_BITS, MAX_FIELD_BITS = 8, 64


def max_bits_per_coordinate(field_bits: int, max_cohort: int, max_weight: int, noise_headroom: int = 0) -> int:
    """The largest p such that the cohort's sum cannot wrap around mod 2^b."""
    for p in range(min(field_bits, 53), 1, -1):
        levels = (1 << (p - 1)) - 1
        if max_cohort * max_weight * levels + noise_headroom < 1 << (field_bits - 1):
            return p
    raise OverflowRiskError(
        f"no precision fits: a {field_bits}-bit field cannot hold the sum of {max_cohort} clients "
        f"of weight up to {max_weight}; raise field_bits or lower max_cohort/max_weight"
    )


@dataclass(frozen=True)
class QuantizationConfig:
    """How updates are put into the field. Validated on construction.

    ``bits_per_coordinate`` defaults to the most precision the field admits for the
    declared cohort size and maximum weight.
    """

    clip_range: float
    max_cohort: int
    max_weight: int = 1
    field_bits: int = 32
    bits_per_coordinate: int | None = None
    noise_headroom: int = 0
    weight_scaled: bool = False
    weight_scale: int = 0  # scaled weights: coordinates carry (w / weight_scale) * x; 0 = max_weight

    def __post_init__(self) -> None:
        if not (self.clip_range > 0 and np.isfinite(self.clip_range)):
            raise ConfigurationError(f"clip_range must be a positive finite number, got {self.clip_range}")
        if self.max_cohort < 1:
            raise ConfigurationError(f"max_cohort must be >= 1, got {self.max_cohort}")
        if self.max_weight < 1:
            raise ConfigurationError(f"max_weight must be >= 1, got {self.max_weight}")
        if not MIN_FIELD_BITS <= self.field_bits <= MAX_FIELD_BITS:
            raise ConfigurationError(f"field_bits must be in {MIN_FIELD_BITS}..{MAX_FIELD_BITS}, got {self.field_bits}")
        if self.noise_headroom < 0:
            raise ConfigurationError(f"noise_headroom must be >= 0, got {self.noise_headroom}")
        if not 0 <= self.weight_scale <= self.max_weight:
            raise ConfigurationError(f"weight_scale must be in 1..max_weight={self.max_weight} (0: max_weight), "
                                     f"got {self.weight_scale}")
        if self.max_cohort + self.noise_headroom >= 1 << (self.field_bits - 1):
            raise OverflowRiskError(
                f"the count of {self.max_cohort} clients does not fit a {self.field_bits}-bit field"
            )
        # Scaled weights: a coordinate carries (w / max_weight) * x, at most one level per
        # client, so the precision no longer shrinks with max_weight.
        per_coord_weight = 1 if self.weight_scaled else self.max_weight
        best = max_bits_per_coordinate(self.field_bits, self.max_cohort, per_coord_weight, self.noise_headroom)
        if self.bits_per_coordinate is None:
            object.__setattr__(self, "bits_per_coordinate", best)
        elif not 2 <= self.bits_per_coordinate <= best:
            raise OverflowRiskError(
                f"bits_per_coordinate={self.bits_per_coordinate} can overflow: with field_bits="
                f"{self.field_bits}, max_cohort={self.max_cohort} and max_weight={self.max_weight} "
                f"at most {best} bits fit (need field_bits >= bits + log2(cohort * weight) + 1)"
            )

    @property
    def limb_bits(self) -> int:
        """k: bits of the weight per weight coordinate, the most for which the cohort's
        sum of one limb (each < 2^k) cannot wrap: ``max_cohort * (2^k - 1) + headroom <
        2^(b-1)``. A narrow field carries the weight in several such limbs."""
        half = 1 << (self.field_bits - 1)
        k = (half - 1 - self.noise_headroom) // self.max_cohort + 1  # max_cohort * (k' - 1) < half - headroom
        return min(max(1, k.bit_length() - 1), 62)

    @property
    def weight_limbs(self) -> int:
        """Weight coordinates: ceil(bits of max_weight / :attr:`limb_bits`) (1 for every
        32-bit field of a cohort below 2^31 / max_weight, the layout before issue 21)."""
        return -(-max(1, self.max_weight.bit_length()) // self.limb_bits)

    @property
    def extra_coordinates(self) -> int:
        """Words after the parts and tail: the weight limbs, low first, then the count."""
        return self.weight_limbs + 1

    @property
    def levels(self) -> int:
        """L = 2^(p-1) - 1: the largest integer magnitude of one quantized coordinate."""
        assert self.bits_per_coordinate is not None
        return (1 << (self.bits_per_coordinate - 1)) - 1

    @property
    def scale(self) -> float:
        return self.levels / self.clip_range

    @property
    def weight_unit(self) -> int:
        """S: a client of weight w encodes ``(w / S) * x`` (scaled weights); at most one
        level per coordinate while ``w <= S``, which is what the field is sized for."""
        return self.weight_scale or self.max_weight

    @property
    def error_bound(self) -> float:
        """Max |decoded - true weighted mean| per coordinate, when nothing was clipped,
        for any weights in 1..max_weight (see :meth:`error_bound_for` for a known total)."""
        if self.weight_scaled:
            return self.weight_unit * self.clip_range / self.levels
        return self.clip_range / self.levels

    def error_bound_for(self, total_weight: int, survivors: int) -> float:
        """The bound once the round's total weight is known (the server knows it).

        Unscaled: each client's rounding error is below one level, and a weighted mean of
        such errors is too: ``c / L``. Scaled: the sum of ``n`` rounding errors (each below
        one level) is divided by ``sum(w) / S`` (``S`` = :attr:`weight_unit`):
        ``n * S * c / (L * sum(w))``, which equals ``c / L`` when every client has weight
        ``S``. The strategy keeps ``S`` within a factor 2 of the cohort's largest weight
        (docs/protocol.md, "The weight scale"), so the bound does not grow when
        ``num-examples`` is small relative to ``max_weight``.
        """
        if not self.weight_scaled or total_weight <= 0:
            return self.clip_range / self.levels
        return survivors * self.weight_unit * self.clip_range / (self.levels * total_weight)


@dataclass(frozen=True)
class EncodedUpdate:
    vector: np.ndarray
    clipped: int
    clipped_parts: tuple[int, ...] = ()


@dataclass(frozen=True)
class DecodedAggregate:
    mean: np.ndarray
    weighted_sum: np.ndarray
    total_weight: int
    count: int


# Coordinates per pass of the encoder: its int64 (and, when clipping, float64) scratch
# of 256 KiB and the rounding keystream block stay in cache while each coordinate is
# touched a handful of times, instead of each step streaming a float64 copy of the
# whole model through memory.
CHUNK = 1 << 15


def _fraction_bits(magnitude_bits: int) -> int:
    """Fraction bits f kept before rounding: |y| * 2^f + 2^f must stay below 2^63.

    32 whenever |y| < 2^30 (every 32-bit field); fewer only for huge 64-bit levels,
    where float64 itself carries no more fraction than that.
    """
    return max(0, min(32, 62 - magnitude_bits))


def _rounding_stream(rng: np.random.Generator | None, block_words: int) -> Keystream:
    """Uniform 32-bit words for the rounding: AES-256-CTR under a fresh random key.

    About 5x cheaper than numpy's float32 draws (2.6 vs 14 ms for 5e6 words on the
    2-core dev box) and of cryptographic quality. With an ``rng`` (tests, reproducible
    studies) the key is drawn from it, so results repeat.
    """
    key = rng.bytes(32) if rng is not None else os.urandom(32)
    return Keystream(key, np.uint32, block_words)


def _round_block(scaled: np.ndarray, words: np.ndarray, frac_bits: int, out: np.ndarray | None = None) -> np.ndarray:
    """Stochastic rounding of fixed-point values in one integer pass.

    ``scaled`` holds Y = trunc(y * 2^f) (int64; modified in place); ``words`` uniform
    32-bit words (modified too). Returns floor((Y + k) / 2^f) with k uniform in
    [0, 2^f): it is floor(Y / 2^f) + 1 exactly when k >= 2^f - (Y mod 2^f), which has
    probability (Y mod 2^f) / 2^f, so E[result] = Y / 2^f exactly, and |Y / 2^f - y| <
    2^-f. The result is within one integer of y and its bias is below 2^-f (2^-32 of a
    level for every 32-bit field), where a float32 uniform compared with the fraction
    (the previous code) was exact to 2^-24 only.
    """
    if frac_bits == 0:
        if out is not None:
            np.copyto(out, scaled, casting="unsafe")
            return out
        return scaled
    if frac_bits < 32:
        np.right_shift(words, 32 - frac_bits, out=words)
    np.add(scaled, words, out=scaled)
    if out is None:
        return np.right_shift(scaled, frac_bits, out=scaled)
    return np.right_shift(scaled, frac_bits, out=out, casting="unsafe")


def stochastic_round(values: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """Round to an integer neighbour with probabilities that make the result unbiased.

    Returns int64 of the same shape. E[result] = values up to 2^-32 (see
    :func:`_round_block`); values must be finite and below 2^62 in magnitude.
    """
    v = np.asarray(values, dtype=np.float64)
    flat = v.ravel()
    out = np.empty(flat.shape, dtype=np.int64)
    if flat.size == 0:
        return out.reshape(v.shape)
    amax = float(np.max(np.abs(flat)))
    if not np.isfinite(amax):
        raise EncodingError("cannot round non-finite values")
    if amax >= 2.0**62:
        raise EncodingError(f"cannot round values of magnitude {amax:.3g} to int64")
    f = _fraction_bits(int(amax).bit_length())
    stream = _rounding_stream(rng, min(CHUNK, flat.size))
    for start in range(0, flat.size, CHUNK):
        stop = min(start + CHUNK, flat.size)
        y = out[start:stop]
        np.multiply(flat[start:stop], np.float64(2.0**f), out=y, casting="unsafe")
        _round_block(y, stream.words(stop - start), f)
    return out.reshape(v.shape)


def to_field(ints: np.ndarray, field_bits: int) -> np.ndarray:
    """Two's-complement wrap of signed integers into Z_{2^b} words."""
    dtype = dtype_for_bits(field_bits)
    return reduce_mod(ints.astype(np.int64).view(np.uint64).astype(dtype), field_bits)


def from_field(words: np.ndarray, field_bits: int) -> np.ndarray:
    """Z_{2^b} words back to signed integers (inverse of :func:`to_field`)."""
    w = words.astype(np.uint64)
    if field_bits == 64:
        return w.view(np.int64)
    signed = w.astype(np.int64)
    return np.where(signed >= 1 << (field_bits - 1), signed - (1 << field_bits), signed)


def _as_float(values: np.ndarray) -> np.ndarray:
    """A flat float32/float64 view of the update (copied only for other dtypes): the
    encoder works block by block in float64, so a float64 copy of a float32 model
    would be pure memory traffic."""
    x = np.asarray(values)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    return x.ravel()


def _check_weight(weight: int, config: QuantizationConfig) -> None:
    if isinstance(weight, bool) or int(weight) != weight or not 1 <= weight <= config.max_weight:
        raise EncodingError(
            f"weight must be an integer in 1..{config.max_weight} (max_weight), got {weight}: the weight "
            "(e.g. num-examples) is bounded so the cohort's sum cannot overflow; raise max_weight "
            "(run-config max-weight) on the server"
        )


def _bounded_scale(clip_range: float, levels: int, frac_bits: int) -> np.float64:
    """s * 2^f with s = levels / clip_range, lowered by float64 ulps until
    clip_range * scale <= levels * 2^f holds in float64 arithmetic.

    Rounded multiplication is monotone, so then every |x| <= clip_range maps to
    |x * scale| <= levels * 2^f, and the rounded integer is within [-levels, levels]
    *exactly*: the no-wrap-around condition of the field never depends on a rounding
    accident (L / c * c can come out one ulp above L). The change is 2^-52 relative.
    """
    top = np.float64(levels) * np.float64(2.0**frac_bits)
    c = np.float64(clip_range)
    scale = np.float64(levels) / c * np.float64(2.0**frac_bits)
    while c * scale > top:
        scale = np.nextafter(scale, np.float64(0.0))
    return scale


def _wrapped_levels(
    x: np.ndarray, level_scale: np.float64, modulus: np.float64, bits: int, stream: Keystream, dtype: np.dtype[Any]
) -> np.ndarray:
    """Values beyond the range, encoded linearly: ``stochastic_round(x * s) mod 2^b``.

    ``fmod`` is exact in float64, so the only rounding before the stochastic one is the
    product's own (2^-53 relative; none below 2^53 levels). The result is reduced to
    [-2^(b-1), 2^(b-1)) before rounding, which commutes with the reduction mod 2^b."""
    y = np.fmod(np.asarray(x, dtype=np.float64) * level_scale, modulus)
    half = modulus / 2
    y = np.where(y >= half, y - modulus, np.where(y < -half, y + modulus, y))
    lo = np.floor(y)
    u = stream.words(y.size).astype(np.float64) / np.float64(2.0**32)
    q = lo.astype(np.int64) + (u < (y - lo)).astype(np.int64)
    words = q.view(np.uint64)
    if bits < 64:
        words = words & np.uint64((1 << bits) - 1)
    return words.astype(dtype)


def encode_parts(
    parts: Sequence[np.ndarray],
    weight: int,
    config: QuantizationConfig,
    rng: np.random.Generator | None = None,
    integer_noise: Sequence[np.ndarray | None] | None = None,
    tail_words: int = 0,
    wrap: bool = False,
) -> EncodedUpdate:
    """:func:`encode` of the concatenation of ``parts``, without concatenating them.

    ``wrap``: a value beyond the range is not clipped but encoded linearly and wrapped
    mod 2^b (still counted in ``clipped``): the cohort's sum then stays a function of
    the cohort's *linear* sum (garbage where it wraps), so a round re-encoded at a
    wider range reveals nothing that a sum of clipped values would (the clipped
    excesses of the few sites beyond the range). A sum with any such value must not
    be released (see :func:`sgs_flower.pipeline.retry_spec`). Under scaled weights a
    weight above :attr:`QuantizationConfig.weight_unit` is likewise encoded linearly.

    ``tail_words`` zero words are reserved after the parts and before the weight and
    count coordinates, for the caller to fill with raw (unscaled, unweighted) counters.
    Under ``config.weight_scaled`` each coordinate carries ``(w / max_weight) * x``
    instead of ``w * x``: the weight is applied before rounding, in the scale.

    ``integer_noise``, if given, has one entry per part (``None`` for no noise). The
    work is done block by block (``CHUNK`` coordinates): range check, scale, round,
    weight, add noise and wrap, each block in cache, written once into the output. A
    block whose values all lie in [-c, c] (the usual case, found by its min and max)
    skips the clip and the count; any other block is counted and clipped exactly as
    ``np.count_nonzero(np.abs(x) > c)`` and ``np.clip`` would.
    """
    xs = [_as_float(p) for p in parts]
    noises: list[np.ndarray | None] = [None] * len(xs) if integer_noise is None else list(integer_noise)
    if len(noises) != len(xs):
        raise EncodingError(f"{len(noises)} noise shares for {len(xs)} update parts")
    for x, nz in zip(xs, noises, strict=True):
        if nz is not None and np.shape(nz) != x.shape:
            raise EncodingError(f"noise share has shape {np.shape(nz)}, update has {x.shape}")
    _check_weight(weight, config)
    w = int(weight)
    bits = config.field_bits
    dtype = dtype_for_bits(bits)
    word_w = dtype.type(w % (1 << (8 * dtype.itemsize)))  # weighting is word arithmetic mod 2^width
    word_mask = dtype.type((1 << bits) - 1) if bits < dtype.itemsize * 8 else None
    total = sum(x.size for x in xs)
    out = np.empty(total + tail_words + config.extra_coordinates, dtype=dtype)
    out[total : total + tail_words] = 0
    levels = config.levels
    f = _fraction_bits(levels.bit_length())
    scale = _bounded_scale(config.clip_range, levels, f)
    c = np.float64(config.clip_range)
    c_fast = c  # values within +-c_fast take the fast path (|q| <= levels)
    if config.weight_scaled:
        # fl(scale * r) <= scale for r <= 1 (monotone rounding): |q| <= levels still holds
        ratio = np.float64(w) / np.float64(config.weight_unit)
        scale = np.float64(scale * ratio)
        word_w = dtype.type(1)
        if ratio > 1:  # a weight above the scale: in range only below c / ratio (else wrapped, counted)
            if not wrap:
                raise EncodingError(f"weight {w} exceeds the weight scale {config.weight_unit}")
            c_fast = np.float64(c / ratio)
    level_scale = np.float64(scale / np.float64(2.0**f))
    modulus = np.float64(2.0**bits)
    block = max(1, min(CHUNK, total))
    stream = _rounding_stream(rng, block)
    y_buf = np.empty(block, dtype=np.int64)
    clip_buf: np.ndarray | None = None
    clipped, pos = 0, 0
    per_part: list[int] = []
    for x, nz in zip(xs, noises, strict=True):
        before = clipped
        for start in range(0, x.size, block):
            stop = min(start + block, x.size)
            n = stop - start
            xb, y = x[start:stop], y_buf[:n]
            outside: np.ndarray | None = None
            if xb.min() >= -c_fast and xb.max() <= c_fast:  # a NaN fails both comparisons
                np.multiply(xb, scale, out=y, casting="unsafe")
            else:
                if not np.all(np.isfinite(xb)):
                    bad = sum(int(np.count_nonzero(~np.isfinite(p))) for p in xs)
                    raise EncodingError(f"update holds {bad} non-finite values (NaN or inf)")
                clipped += int(np.count_nonzero(np.abs(xb) > c))
                if wrap:
                    outside = np.flatnonzero(np.abs(xb) > c_fast)
                if clip_buf is None:
                    clip_buf = np.empty(block, dtype=np.float64)
                cb = clip_buf[:n]
                np.clip(xb, -c_fast, c_fast, out=cb)
                np.multiply(cb, scale, out=y, casting="unsafe")
            dest = out[pos + start : pos + stop]
            # q lands in the field words directly (int64 -> word: two's complement wrap);
            # weighting and noise are then word arithmetic mod 2^32 (or 2^64), which
            # commutes with the wrap and is cheaper than the same in int64.
            _round_block(y, stream.words(n), f, out=dest)
            if outside is not None and outside.size:
                dest[outside] = _wrapped_levels(xb[outside], level_scale, modulus, bits, stream, dtype)
            if word_w != 1:
                np.multiply(dest, word_w, out=dest)
            if nz is not None:
                np.add(dest, np.asarray(nz[start:stop]).astype(np.int64, copy=False).astype(dtype), out=dest)
            if word_mask is not None:
                np.bitwise_and(dest, word_mask, out=dest)
        pos += x.size
        per_part.append(clipped - before)
    k = config.limb_bits
    for i in range(config.weight_limbs):
        out[total + tail_words + i] = (w >> (k * i)) & ((1 << k) - 1)
    out[-1] = 1
    return EncodedUpdate(out, clipped, tuple(per_part))


def encode(
    update: np.ndarray,
    weight: int,
    config: QuantizationConfig,
    rng: np.random.Generator | None = None,
    integer_noise: np.ndarray | None = None,
) -> EncodedUpdate:
    """Clip, scale, stochastically round, weight and wrap one client's update.

    ``integer_noise`` (a discrete DP noise share, already in quantization units) is added
    after weighting; its range must have been reserved through ``noise_headroom``.
    Non-finite values are refused; clipped coordinates are counted in ``clipped``.
    """
    return encode_parts([update], weight, config, rng, None if integer_noise is None else [integer_noise])


def decode(total: np.ndarray, config: QuantizationConfig) -> DecodedAggregate:
    """Turn the unmasked field sum into the weighted mean (and totals)."""
    ints = from_field(total, config.field_bits)
    extra, k = config.extra_coordinates, config.limb_bits
    weight = sum(int(v) << (k * i) for i, v in enumerate(ints[-extra:-1]))
    count = int(ints[-1])
    weighted_sum = ints[:-extra].astype(np.float64) / config.scale
    if config.weight_scaled:
        weighted_sum *= config.weight_unit
    mean = weighted_sum / weight if weight > 0 else np.full_like(weighted_sum, np.nan)
    return DecodedAggregate(mean, weighted_sum, weight, count)
