"""The client update pipeline, both ends, with no Flower (DESIGN.md section 2).

Client: delta = new - global -> flatten -> append metrics -> quantize (clip counted,
stochastic rounding, weight, optional integer noise share) -> Z_{2^b} words, then the
secure-aggregation client masks them. Server: the unmasked sum -> integrity check ->
weighted mean delta and weighted mean metrics.

Both ends must agree on every parameter; :class:`UpdateSpec` travels in the round's
setup message and is bound into the context digest, so a server cannot quietly change
it for one client.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from typing import Any

import numpy as np

from sgs_flower.dp.clipping import clip_l2
from sgs_flower.dp.noise import NOISE_SIGMAS, noise_headroom, secure_rng, skellam_share
from sgs_flower.dp.rotation import padded_length, rotate, unrotate
from sgs_flower.dp.site import DP_FLAG_WORDS, DPContribution, dp_dimension
from sgs_flower.secagg.errors import (
    ConfigurationError,
    EncodingError,
    InconsistentRequestError,
    MalformedMessageError,
    OverflowRiskError,
    PolicyError,
    StaleMessageError,
)
from sgs_flower.secagg.input_validation import (
    MODES,
    ValidationLayout,
    check_field_bits,
    layout_for,
    params_for,
)
from sgs_flower.secagg.prg import dtype_for_bits
from sgs_flower.secagg.quantize import (
    CHUNK,
    MAX_FIELD_BITS,
    MIN_FIELD_BITS,
    EncodedUpdate,
    QuantizationConfig,
    encode_parts,
    from_field,
    to_field,
)
from sgs_flower.secagg.server import decode_checked
from sgs_flower.secagg.wire import MAX_RETRIES  # retries of a round's masked input a site answers

logger = logging.getLogger("sgs_flower.pipeline")


# Range statistics (non-DP rounds): for each of the two delta parts, the count of
# coordinates with |x| >= range * 2^k for k = HIST_LOW .. HIST_LOW + HIST_BINS - 1.
# Summed securely like everything else, they let the server pick the next round's
# range (geometric steps, as adaptive clipping does) without seeing any one update.
HIST_LOW = -3
HIST_BINS = 16
MAX_METRIC_SLOTS = 64
# Linear-MAC words of the model-confidential mode: a forged aggregate passes each with
# probability at most 1/2 (a change in the top bit only), so 48 words give 2^-48.
TAG_WORDS = 48
DEFAULT_MAX_WEIGHT = 1_000_000
# Round 1's weight scale when none is configured (at most max_weight): num-examples up to
# 8,192 need no retry in round 1; later rounds take the cohort's covering scale.
DEFAULT_WEIGHT_SCALE = 1 << 13

# Why a site's update could not be used, counted inside the masked vector (outside DP)
# instead of answered as an error: whether a site fails can depend on its data (a weight
# above max_weight, a NaN loss), and an error reply would tell the server that bit
# about one site (issue 18). One counter word per reason, summed over the survivors.
FAILURE_REASONS = (
    "train step raised",
    "train reply malformed",
    "weight outside 1..max_weight",
    "non-finite update or metric",
    "the site's encoder raised",
)

# Train and evaluation metrics are carried exactly, not quantized (issue 28): each site
# puts ``round(m * 2^F) * w`` (its metric m in fixed point with F fraction bits, times
# its integer weight w) into the vector as limbs of the field's limb width, positive and
# negative parts apart (so a sum of limbs never wraps and a failed site's zeros add
# nothing). The server's sum of limbs is then the exact integer sum over the survivors,
# and the weighted mean FedAvg computes comes out to 2^-(F+1) of the metric, whatever
# its size next to the metric's range: metrics cost a few words, never precision.
METRIC_FRACTION_BITS = 52

# The fields a retry's spec may change; every other field must equal the round's.
RETRY_FIELDS = ("clip_range", "int_clip_range", "weight_scale")


def weight_bins(max_weight: int) -> int:
    """Bins of the weight histogram: ``count(w > 2^k)`` for k = 0 .. bins - 1, enough to
    find the smallest power of two >= every weight up to ``max_weight``."""
    return (max_weight - 1).bit_length()


#: The quantization bound, as a fraction of the round's range, that the word width is
#: chosen for outside DP (see :func:`narrowest_field_bits`).
DEFAULT_WIDTH_ERROR = 4e-3
#: The quantization bound in the model's own units that the word width is chosen for
#: outside DP, whatever the range (issue 28): FedAvg's model to ~2^-15 per coordinate
#: per round, where a range of +-16 at ``DEFAULT_WIDTH_ERROR`` alone gave 0.06.
DEFAULT_MODEL_ERROR = 2.0**-15


def width_error_for(clip_range: float, width_error: float, model_error: float) -> float:
    """The bound, as a fraction of the range, that a round at range ``clip_range`` is
    sized for: ``width_error`` of the range, and never above ``model_error`` in the
    model's units. Why both: the range follows the update's largest coordinates, so a
    fraction of it alone lets a few large coordinates (BatchNorm's running variance, a
    high learning rate) coarsen every coordinate; the absolute bound keeps FedAvg's
    model within ``model_error`` per coordinate, and costs bits only where the range is
    wide (one bit per doubling of the range beyond ``model_error / width_error``)."""
    return min(width_error, model_error / clip_range)


def narrowest_field_bits(
    max_cohort: int, max_weight: int, width_error: float = DEFAULT_WIDTH_ERROR, *, weight_scaled: bool | None = None,
    noise_headroom: int = 0, floor: int = MIN_FIELD_BITS,
) -> int:
    """The word width b of a round outside DP: the narrowest field whose fixed point
    keeps the aggregate within ``width_error`` times the range and whose cohort sum
    cannot wrap.

    Rule (issue 21): the precision p needs ``L = 2^(p-1) - 1 >= 1 / width_error`` levels
    (each decoded coordinate of the weighted mean is then within ``c / L <=
    width_error * c`` of the true one, c the round's range, whenever every weight is at
    most the weight scale; :meth:`QuantizationConfig.error_bound_for` is the bound the
    server reports); b is the smallest width at which :class:`QuantizationConfig`
    admits p bits for ``max_cohort`` clients: ``max_cohort * L + headroom <
    2^(b-1)``, i.e. ``b = p + ceil(log2(max_cohort)) + 1`` or so; the weight needs no
    width of its own (it travels in limbs). Both sides derive nothing else from it:
    b is in the spec (whose digest keys the masks) and in the round's setup, every site
    re-validates the spec's overflow bound and checks its own floor (``sgs-min-bits``).
    Default 4e-3: L = 255 (p = 9, the bound c / 255 = 0.39 % of the range), b = 13 for
    10 clients, 15 for 50, 16 for 100 (upload about b / 32 of float32).
    """
    if not 0 < width_error < 1:
        raise ConfigurationError(f"width_error must be in (0, 1), got {width_error}")
    scaled = max_weight > 1 if weight_scaled is None else weight_scaled
    need = 2
    while (1 << (need - 1)) - 1 < 1.0 / width_error:
        need += 1
    for bits in range(max(floor, MIN_FIELD_BITS), MAX_FIELD_BITS + 1):
        try:
            q = QuantizationConfig(clip_range=1.0, max_cohort=max_cohort, max_weight=max_weight, field_bits=bits,
                                   noise_headroom=noise_headroom, weight_scaled=scaled)
        except OverflowRiskError:
            continue
        assert q.bits_per_coordinate is not None
        if q.bits_per_coordinate >= need:
            return bits
    raise OverflowRiskError(
        f"no field up to 64 bits holds {need} bits per coordinate for {max_cohort} clients of weight up to "
        f"{max_weight}: raise width_error or lower max_cohort"
    )


@dataclass(frozen=True)
class UpdateSpec:
    """How one round's updates are encoded; validated on construction.

    Vector layout (outside DP): the float entries of the model delta (model order), its
    integer entries (``int_size`` coordinates: BatchNorm counters and other integer
    buffers), ``metric_slots`` train metrics, then raw counters (range histograms of the
    float and integer parts, clip counts of both parts and of every metric slot), the
    weight and the count. Under DP: the delta (rotated when ``rotation_seed >= 0``),
    weight and count only: nothing else is released there.

    - ``clip_range`` / ``int_clip_range``: per-coordinate bounds of the float and integer
      parts of the delta; clipping is counted and the counts are aggregated securely.
    - ``metric_slots``: how many train metrics a client may put in the vector (sorted by
      name; the names travel in plaintext beside it, the values never do).
      ``metric_range`` bounds each metric unless ``metric_ranges`` names its own bound.
    - ``max_cohort`` / ``max_weight``: bound the sum, so the field cannot wrap around.
      Outside DP each coordinate carries ``(w / weight_scale) * x`` (scaled weights);
      ``weight_scale`` (a power of two or ``max_weight``; 0 means ``max_weight``) is
      chosen by the server from the cohort's securely summed weight histogram, so the
      precision does not depend on how small ``num-examples`` is next to ``max_weight``.
      A weight above it is encoded linearly (wrapping), counted, and never released.
    """

    clip_range: float
    max_cohort: int
    max_weight: int = DEFAULT_MAX_WEIGHT
    field_bits: int = 32
    metric_slots: int = 0
    metric_range: float = 100.0
    metric_ranges: tuple[tuple[str, float], ...] = ()
    int_size: int = 0
    int_clip_range: float = 1024.0
    noise_headroom: int = 0
    bits_per_coordinate: int = 0  # 0: the most the field admits
    weight_scale: int = 0  # S: outside DP a client of weight w encodes (w / S) * x; 0 = max_weight
    # user-level DP (DESIGN.md section 4), set by the server's DPAggregator
    dp_mode: str = "none"  # "none", "central" or "distributed"
    l2_clip: float = 0.0  # clients clip their (rotated) delta to this L2 norm
    noise_mu_share: float = 0.0  # distributed: each client's Skellam parameter (integer units)
    rotation_seed: int = -1  # distributed: public seed of the randomized Hadamard rotation; -1 = none
    min_survivors: int = 0  # distributed: fewest survivors the noise shares are calibrated for
    # model-confidential mode (sgs_flower.confidential): the id of the sites' model key;
    # "" = off. Then the vector carries the site's whole new model (not the delta) and
    # TAG_WORDS linear-MAC words after the metric slots, all under the key's masks.
    model_key: str = ""
    # input validation (issue 31, docs/validation.md): "" = off, else the round's
    # validation layout as canonical JSON (secagg.input_validation.ValidationLayout: the
    # mode "l2" or "linf", the bound parameters, the body words), built by
    # :func:`with_validation`. Every site re-derives the bound from the rest of the spec
    # (:func:`validation_layout`), so a server cannot set one an honest update fails.
    validation: str = ""

    def __post_init__(self) -> None:
        if not (self.metric_range > 0 and np.isfinite(self.metric_range)):
            # finite: a slot's limbs are sized from it (metric_bits); infinity would size nothing
            raise ConfigurationError(f"metric_range must be a positive finite number, got {self.metric_range}")
        for name, r in self.metric_ranges:
            if not (isinstance(name, str) and r > 0 and np.isfinite(r)):
                raise ConfigurationError(f"metric_ranges[{name!r}] must be a positive finite number, got {r}")
        if not 0 <= self.metric_slots <= MAX_METRIC_SLOTS:
            raise ConfigurationError(f"metric_slots must be in 0..{MAX_METRIC_SLOTS}, got {self.metric_slots}")
        if self.int_size < 0:
            raise ConfigurationError(f"int_size must be >= 0, got {self.int_size}")
        if not (self.int_clip_range > 0 and np.isfinite(self.int_clip_range)):
            raise ConfigurationError(f"int_clip_range must be a positive finite number, got {self.int_clip_range}")
        if self.dp_mode not in ("none", "central", "distributed"):
            raise ConfigurationError(f"dp_mode must be none, central or distributed, got {self.dp_mode!r}")
        if not (self.l2_clip >= 0 and np.isfinite(self.l2_clip)):
            raise ConfigurationError(f"l2_clip must be a finite number >= 0, got {self.l2_clip}")
        if self.dp_mode != "none":
            if not self.l2_clip > 0:
                raise ConfigurationError(f"l2_clip must be > 0 under dp_mode={self.dp_mode}, got {self.l2_clip}")
            if self.metric_slots:
                raise ConfigurationError("train metrics cannot be released under DP: set metric_slots=0")
            if self.max_weight != 1:
                raise ConfigurationError("DP weighs every client equally (the sensitivity argument): max_weight must be 1")
        ws = self.weight_scale
        if ws and not (1 <= ws <= self.max_weight and (ws & (ws - 1) == 0 or ws == self.max_weight)):
            raise ConfigurationError(
                f"weight_scale must be a power of two in 1..max_weight={self.max_weight} or max_weight itself "
                f"(0: max_weight), got {ws}"
            )
        if self.dp_mode == "distributed" and not self.noise_mu_share > 0:
            raise ConfigurationError(f"distributed DP needs noise_mu_share > 0, got {self.noise_mu_share}")
        if self.dp_mode == "distributed" and not 1 <= self.min_survivors <= self.max_cohort:
            raise ConfigurationError(
                f"distributed DP needs min_survivors in 1..max_cohort={self.max_cohort}, got {self.min_survivors}"
            )
        needed = noise_headroom(self.noise_mu_share, self.max_cohort) if self.dp_mode == "distributed" else 0
        if self.noise_headroom < needed:
            # the field must hold the noise of every share that may survive; a spec that
            # reserves less could wrap the noisy sum (a wrong model, never a release)
            raise OverflowRiskError(
                f"the spec reserves {self.noise_headroom} for the noise, but {self.max_cohort} Skellam shares of "
                f"mu={self.noise_mu_share:.6g} reach {needed} ({NOISE_SIGMAS:g} std): at {self.field_bits}-bit "
                "words the noisy sum could wrap; the site refuses"
            )
        if self.model_key:
            if self.dp_mode != "none":
                raise ConfigurationError(
                    "the model-confidential mode does not combine with DP yet: its vector carries whole models, "
                    "which the DP clip (on updates) does not bound"
                )
            if not re.fullmatch(r"[0-9a-f]{32}", self.model_key):
                raise ConfigurationError(f"model_key must be 32 hex digits (a key id), got {self.model_key!r}")
        if self.validation:
            layout = ValidationLayout.from_json(self.validation)
            if self.model_key:
                raise ConfigurationError("input validation does not combine with the model-confidential mode yet: its "
                                         "vector carries whole models, which the round's bound does not describe")
            check_field_bits(self.field_bits)
            if layout.mode == "l2" and self.dp_mode == "none" and not self.l2_clip > 0:
                raise ConfigurationError("validate='l2' outside DP bounds the update's L2 norm by l2_clip "
                                         "(SecAggConfig.validation_norm): set it")
        self.quantization  # validates the field and cohort bounds  # noqa: B018

    @property
    def quantization(self) -> QuantizationConfig:
        return QuantizationConfig(
            clip_range=self.clip_range, max_cohort=self.max_cohort, max_weight=self.max_weight,
            field_bits=self.field_bits, noise_headroom=self.noise_headroom,
            bits_per_coordinate=self.bits_per_coordinate or None,
            weight_scaled=self.dp_mode == "none" and self.max_weight > 1,
            weight_scale=self.weight_scale if self.dp_mode == "none" else 0,
        )

    @property
    def weight_unit(self) -> int:
        """The weight scale S in effect (``max_weight`` when ``weight_scale`` is 0)."""
        return self.weight_scale or self.max_weight

    @property
    def counters(self) -> int:
        """Raw counter words: two range histograms, two clip counts, one per metric slot,
        one per :data:`FAILURE_REASONS`, the weight histogram (:func:`weight_bins`) and
        the count of weights above the weight scale."""
        if self.dp_mode != "none":
            return 0
        return 2 * HIST_BINS + 2 + self.metric_slots + len(FAILURE_REASONS) + weight_bins(self.max_weight) + 1

    @property
    def tag_words(self) -> int:
        """Words of the model key's linear MAC (model-confidential mode only), after the
        metric slots: see :mod:`sgs_flower.confidential.masked_model`."""
        return TAG_WORDS if self.model_key else 0

    @property
    def metric_bits(self) -> int:
        """Bits of one site's ``|round(m * 2^F) * w|`` at the widest metric range: the
        exact value a metric slot carries (see :data:`METRIC_FRACTION_BITS`)."""
        widest = max([self.metric_range, *(r for _, r in self.metric_ranges)])
        return int(np.ceil(np.log2(widest + 1))) + METRIC_FRACTION_BITS + self.max_weight.bit_length() + 1

    @property
    def metric_limbs(self) -> int:
        """Limbs of one metric slot's value, each below 2^limb_bits (the width at which
        the cohort's sum of one limb cannot wrap)."""
        return -(-self.metric_bits // self.quantization.limb_bits)

    @property
    def metric_words(self) -> int:
        """Words of the metric slots: per slot the limbs of its positive and of its
        negative part (one of them zero), after the delta and before the tag words."""
        return 2 * self.metric_slots * self.metric_limbs if self.metric_slots else 0

    @property
    def failure_counters_at(self) -> int:
        """Index, within the counters, of the first :data:`FAILURE_REASONS` counter (after
        the two range histograms, the two clip counts and the metric clip counts)."""
        return 2 * HIST_BINS + 2 + self.metric_slots

    @property
    def flag_words(self) -> int:
        """Under DP, one coordinate after the delta: 0 for a usable update, the clip norm
        for a site whose update could not be used. Both have L2 norm <= the clip norm, so
        the sensitivity is unchanged, and the flag's sum carries the round's noise: the
        server learns a noisy count of failed sites, never whether one site failed."""
        return DP_FLAG_WORDS if self.dp_mode != "none" else 0

    @property
    def flag_value(self) -> float:
        return min(self.l2_clip, self.clip_range)

    def dp_dimension(self, model_size: int) -> int:
        """Coordinates of the DP-protected vector: the (padded) delta and the flag (the
        delta alone outside DP, where there is no flag)."""
        if self.dp_mode == "none":
            return self.encoded_size(model_size)
        return dp_dimension(model_size, self.rotation_seed >= 0)

    def dp_contribution(self, model_size: int) -> DPContribution:
        """What a site's distributed-DP contribution under this spec carries, from every
        field that changes it (see :mod:`sgs_flower.dp.site`): the site computes its
        noise multiplier and its spend from this, never from the spec's claims."""
        if self.dp_mode != "distributed":
            raise ConfigurationError(f"no distributed-DP contribution under dp_mode={self.dp_mode!r}")
        return DPContribution(
            levels=self.quantization.levels, clip_range=self.clip_range, l2_clip=self.l2_clip,
            dim=self.dp_dimension(model_size), mu_share=self.noise_mu_share, min_survivors=self.min_survivors,
            cohort=self.max_cohort,
        )

    def range_of(self, metric: str) -> float:
        """The fixed-point range of one train metric (its own, else ``metric_range``)."""
        return dict(self.metric_ranges).get(metric, self.metric_range)

    def encoded_size(self, model_size: int) -> int:
        """Coordinates the model delta occupies once encoded (padded when rotated)."""
        return padded_length(model_size) if self.rotation_seed >= 0 else model_size

    def vector_length(self, model_size: int) -> int:
        """Words in the masked vector: model delta, metrics, counters, weight, count."""
        extra = self.quantization.extra_coordinates
        return (self.encoded_size(model_size) + self.flag_words + self.metric_words + self.tag_words + self.counters
                + extra)

    def to_config(self) -> dict[str, Any]:
        """Plain values for a Flower ConfigRecord (lists of str, numbers)."""
        d = asdict(self)
        del d["metric_ranges"]
        d["metric_range_names"] = [k for k, _ in self.metric_ranges]
        d["metric_range_values"] = [float(v) for _, v in self.metric_ranges]
        return d

    @classmethod
    def from_config(cls, d: Mapping[str, Any]) -> UpdateSpec:
        """The spec as the server sent it. A field this version does not know, or one it
        lacks, is refused: every field may change what a site's contribution reveals or
        how much noise it carries, so a site never ignores one it cannot interpret."""
        known = set(_CONFIG_FIELDS)
        unknown, missing = sorted(set(d) - known), sorted(known - set(d))
        if unknown or missing:
            raise MalformedMessageError(
                f"update spec from the server has unknown fields {unknown} or lacks {missing}; this site "
                "refuses a spec it cannot fully interpret (client and server versions must match)"
            )
        try:
            names, values = list(d["metric_range_names"]), list(d["metric_range_values"])
            if len(names) != len(values):
                raise ValueError("metric_range_names and metric_range_values differ in length")
            return cls(
                clip_range=float(d["clip_range"]), max_cohort=int(d["max_cohort"]), max_weight=int(d["max_weight"]),
                field_bits=int(d["field_bits"]), metric_slots=int(d["metric_slots"]),
                metric_range=float(d["metric_range"]),
                metric_ranges=tuple((str(k), float(v)) for k, v in zip(names, values, strict=True)),
                int_size=int(d["int_size"]), int_clip_range=float(d["int_clip_range"]),
                noise_headroom=int(d["noise_headroom"]),
                bits_per_coordinate=int(d["bits_per_coordinate"]), dp_mode=str(d["dp_mode"]),
                l2_clip=float(d["l2_clip"]), noise_mu_share=float(d["noise_mu_share"]),
                rotation_seed=int(d["rotation_seed"]), min_survivors=int(d["min_survivors"]),
                weight_scale=int(d["weight_scale"]), model_key=str(d["model_key"]),
                validation=str(d["validation"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MalformedMessageError(f"malformed update spec from the server: {exc!r}") from exc


_CONFIG_FIELDS = tuple(UpdateSpec(clip_range=1.0, max_cohort=1).to_config())


def flatten(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """All arrays as one float64 vector, in order."""
    if not arrays:
        return np.zeros(0)
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


def unflatten(vector: np.ndarray, like: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Cut a flat vector back into arrays shaped (and typed) like ``like``.

    Integer (and bool) entries are rounded to the nearest integer, as a model's counter
    must be; 0-d entries (BatchNorm's ``num_batches_tracked``) stay 0-d arrays, never
    NumPy scalars (which Flower's ``Array`` refuses).
    """
    total = sum(int(np.asarray(a).size) for a in like)
    if vector.size != total:
        raise EncodingError(f"vector has {vector.size} values, the model has {total}")
    out, i = [], 0
    for a in like:
        a = np.asarray(a)
        chunk = np.asarray(vector[i : i + a.size]).reshape(a.shape)
        if a.dtype == np.bool_:
            arr = np.asarray(chunk >= 0.5)
        elif np.issubdtype(a.dtype, np.integer):
            arr = np.asarray(np.rint(chunk)).astype(a.dtype)
        else:
            arr = np.asarray(chunk).astype(a.dtype)
        out.append(arr.reshape(a.shape))
        i += a.size
    return out


def is_float_entry(a: np.ndarray) -> bool:
    """Float entries form the delta's first part; the rest (integer counters, bools)
    the second, with its own range: a BatchNorm counter grows by hundreds per round
    where a weight moves by 1e-3, and one range for both would cost all the precision."""
    return bool(np.issubdtype(np.asarray(a).dtype, np.floating))


def update_order(like: Sequence[np.ndarray]) -> list[int]:
    """Indices of the model's entries in vector order: float entries, then the others."""
    return [i for i, a in enumerate(like) if is_float_entry(a)] + [
        i for i, a in enumerate(like) if not is_float_entry(a)
    ]


def int_size_of(like: Sequence[np.ndarray]) -> int:
    """Coordinates of the model's non-float entries (``UpdateSpec.int_size``)."""
    return int(sum(np.asarray(a).size for a in like if not is_float_entry(a)))


def model_delta(new: Sequence[np.ndarray], old: Sequence[np.ndarray]) -> np.ndarray:
    """``new - old`` flattened in :func:`update_order` (float32 stays float32)."""
    order = update_order(old)
    parts = []
    for i in order:
        n, o = np.asarray(new[i]), np.asarray(old[i])
        if n.shape != o.shape:
            raise EncodingError(f"train reply's entry {i} has shape {n.shape}, the global model's has {o.shape}")
        if is_float_entry(o):
            parts.append((n - o).ravel())
        else:
            parts.append((n.astype(np.float64) - o.astype(np.float64)).ravel())
    if not parts:
        return np.zeros(0)
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def apply_delta(like: Sequence[np.ndarray], delta: np.ndarray) -> list[np.ndarray]:
    """``like + delta`` (``delta`` in :func:`update_order`), each entry in its own dtype
    and shape: integer entries rounded (plain FedAvg would average them as floats)."""
    order = update_order(like)
    base = flatten([like[i] for i in order])
    moved = unflatten(base + delta, [like[i] for i in order])
    out: list[np.ndarray] = [np.empty(0)] * len(like)
    for i, arr in zip(order, moved, strict=True):
        out[i] = arr
    return out


def metric_slot_names(metrics: Mapping[str, Any], spec: UpdateSpec) -> tuple[list[str], list[str]]:
    """The numeric metrics that take the slots (sorted by name, at most ``metric_slots``)
    and the names left out (too many, or not a number)."""
    numeric = sorted(k for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool))
    other = sorted(k for k in metrics if k not in numeric)
    return numeric[: spec.metric_slots], numeric[spec.metric_slots :] + other


def magnitude_histogram(x: np.ndarray, r: float) -> np.ndarray:
    """``out[j]`` = how many |x| >= r * 2^(HIST_LOW + j), j = 0..HIST_BINS-1.

    Why bit twiddling: this runs on every coordinate of every client's update in the
    masked-input hot path, where ``frexp`` and a boolean selection cost more than the
    AES keystreams. Here each block is scaled by 1 / r in the input's own float type and
    the binary exponent is read from the IEEE-754 bits (floor(log2 y) for a normal y),
    then counted with one ``bincount`` over all possible exponents. A value within one
    rounding of a bin edge r * 2^k may fall on either side of it: a heuristic for the
    next round's range, it does not need more.
    """
    x = np.asarray(x).ravel()
    if x.dtype != np.float32:
        x = x.astype(np.float64, copy=False)
    uint: type[np.unsignedinteger[Any]]
    if x.dtype == np.float32:
        uint, shift, mask, bias = np.uint32, 23, 0xFF, 127
    else:
        uint, shift, mask, bias = np.uint64, 52, 0x7FF, 1023
    counts = np.zeros(mask + 1, dtype=np.int64)
    inv = x.dtype.type(1.0 / r)
    block = min(CHUNK, max(x.size, 1))
    y_buf, e_buf = np.empty(block, dtype=x.dtype), np.empty(block, dtype=uint)
    for start in range(0, x.size, CHUNK):
        n = min(CHUNK, x.size - start)
        y, e = y_buf[:n], e_buf[:n]
        np.multiply(x[start : start + n], inv, out=y)
        np.right_shift(y.view(uint), shift, out=e)
        np.bitwise_and(e, mask, out=e)  # the sign bit goes: the exponent of |x| / r
        counts += np.bincount(e, minlength=mask + 1)
    # counts[bias + k] holds the values with r * 2^k <= |x| < r * 2^(k+1)
    at_least = np.cumsum(counts[::-1])[::-1]
    return at_least[bias + HIST_LOW : bias + HIST_LOW + HIST_BINS].copy()


def prepare_delta(delta: np.ndarray, spec: UpdateSpec) -> np.ndarray:
    """Steps 3-4 of the pipeline: optional rotation, then L2 clipping under DP.

    Without either, a float32 or float64 delta comes back as it is (a flat view, not a
    float64 copy): the encoder reads it block by block in float64 anyway, and a copy
    of a large model is pure memory traffic in the client's hot path.
    """
    x = np.asarray(delta).ravel()
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    if spec.rotation_seed >= 0:
        x = rotate(x, spec.rotation_seed)
    if spec.dp_mode == "none":
        if not spec.l2_clip > 0:
            return x
        # a validated round outside DP (issue 31, SecAggConfig.validation_norm): the float
        # part's L2 norm is what every site proves, so an honest site clips to it, and says so
        n_float = x.size - spec.int_size
        clip = clip_l2(x[:n_float], spec.l2_clip)
        if not clip.clipped:
            return x
        logger.warning("update L2 norm %.4g clipped to the round's validated norm bound %.4g (SecAggConfig."
                       "validation_norm)", clip.original_norm, spec.l2_clip)
        return np.concatenate([clip.vector, x[n_float:]])
    clip = clip_l2(x, spec.l2_clip)
    if clip.clipped:
        logger.info("update L2 norm %.4g clipped to %.4g", clip.original_norm, spec.l2_clip)
    return clip.vector


def encode_update(
    delta: np.ndarray,
    metrics: Mapping[str, float],
    weight: int,
    spec: UpdateSpec,
    rng: np.random.Generator | None = None,
    integer_noise: np.ndarray | None = None,
) -> EncodedUpdate:
    """One client's flat delta (in :func:`update_order`), metrics and weight as field words.

    Under DP the delta is (rotated and) L2-clipped, every client counts with weight 1
    (so one client's influence on the sum is bounded by the clip norm, whatever its
    ``num-examples``), and in distributed DP a Skellam noise share is added in the
    integer domain before masking; no metric or counter is released. Outside DP the
    metrics take their slots (see :func:`metric_slot_names`) and the counters follow.
    """
    x = prepare_delta(delta, spec)
    if spec.dp_mode != "none":
        return _encode_dp(x, 0.0, spec, rng, integer_noise)
    if not 0 <= spec.int_size <= x.size:
        raise EncodingError(f"the spec's int_size {spec.int_size} exceeds the update's {x.size} coordinates")
    n_float = x.size - spec.int_size
    xf, xi_raw = x[:n_float], x[n_float:]
    c = spec.clip_range
    xi = xi_raw * (c / spec.int_clip_range)
    names, _ = metric_slot_names(metrics, spec)
    values: list[float] = []
    metric_clipped = np.zeros(spec.metric_slots, dtype=np.int64)
    for i, name in enumerate(names):
        value, r = float(metrics[name]), spec.range_of(name)
        if not np.isfinite(value):
            raise EncodingError(f"train metric {name!r} is not finite")
        metric_clipped[i] = abs(value) > r
        values.append(float(np.clip(value, -r, r)))
    # The delta's parts are encoded as parts of one vector: no concatenated copy of the
    # model. Out-of-range values wrap (linear encoding, counted), never clip: see encode_parts.
    # Under input validation they are clipped (still counted): the round is never retried
    # (a retry input would be unproven) and a wrapped word would break the honest site's
    # own bound, so the count only keeps the round from being released.
    enc = encode_parts([xf, xi], weight, spec.quantization, rng,
                       tail_words=spec.metric_words + spec.tag_words + spec.counters, wrap=not spec.validation)
    enc.vector[x.size : x.size + spec.metric_words] = metric_limb_words(values, weight, spec)
    counters = np.concatenate([
        magnitude_histogram(xf, c), magnitude_histogram(xi_raw, spec.int_clip_range),
        np.array(enc.clipped_parts[:2], dtype=np.int64), metric_clipped, np.zeros(len(FAILURE_REASONS), np.int64),
        weight_histogram(weight, spec.max_weight), np.array([weight > spec.weight_unit], dtype=np.int64),
    ])
    _write_counters(enc.vector, counters, spec, x.size)
    return EncodedUpdate(enc.vector, enc.clipped_parts[0] + enc.clipped_parts[1], enc.clipped_parts)


def metric_limb_words(values: Sequence[float], weight: int, spec: UpdateSpec) -> np.ndarray:
    """The metric slots' words: ``round(m * 2^F) * w`` of each value, exact (Python
    integers), as :attr:`UpdateSpec.metric_limbs` limbs of its positive and of its
    negative part, low limb first. ``values`` are already within their ranges."""
    out = np.zeros(spec.metric_words, dtype=dtype_for_bits(spec.field_bits))
    k, limbs = spec.quantization.limb_bits, spec.metric_limbs
    mask = (1 << k) - 1
    for i, v in enumerate(values):
        n = round(v * 2.0**METRIC_FRACTION_BITS) * int(weight)  # float * 2^F is exact; round() gives an int
        base = (2 * i + (n < 0)) * limbs
        mag = abs(n)
        for j in range(limbs):
            out[base + j] = (mag >> (k * j)) & mask
    return out


def metric_sums(words: np.ndarray, spec: UpdateSpec) -> list[int]:
    """The cohort's exact ``sum(round(m * 2^F) * w)`` per slot from its summed limbs
    (each limb sum is below 2^(b-1), so it decodes as a non-negative integer)."""
    ints = [int(v) for v in from_field(np.asarray(words), spec.field_bits)]
    k, limbs = spec.quantization.limb_bits, spec.metric_limbs
    out = []
    for i in range(spec.metric_slots):
        pos, neg = (sum(ints[(2 * i + part) * limbs + j] << (k * j) for j in range(limbs)) for part in (0, 1))
        out.append(pos - neg)
    return out


def weight_histogram(weight: int, max_weight: int) -> np.ndarray:
    """``out[k]`` = 1 if ``weight > 2^k``, k = 0 .. :func:`weight_bins` - 1."""
    return np.array([weight > (1 << k) for k in range(weight_bins(max_weight))], dtype=np.int64)


# ------------------------------------------------------------------ input validation (issue 31)
MIN_SOUNDNESS_BITS = 40  # the weakest check a site accepts: 2^-40 per challenge (docs/validation.md)
VALIDATION_COMPLETENESS_BITS = 64  # honest DP noise beyond the bound: probability below 2^-64 (Gaussian tail)


def validation_bound(spec: UpdateSpec, mode: str, model_size: int) -> int:
    """B, the bound on ``||x||_2`` in integer units for ``mode`` under ``spec``, where x is
    the encoded body (:func:`validation_body`) an honest site of weight at most the
    weight scale produces:

    - outside DP, ``"l2"`` (a spec with ``l2_clip`` > 0, which honest sites clip their
      float delta to, :func:`prepare_delta`): ``(L / c) min(l2_clip, c sqrt(m)) + sqrt(m)
      + sqrt(int_size) L``; ``"linf"``: every body word is a clipped, weight-scaled level,
      at most ``L`` in magnitude, so ``||x|| <= sqrt(m) L`` (m body words): the range per
      coordinate proven through the L2 bound it implies (the proof is an L2 check; so
      loose that random words of the round's width meet it: the product refuses it,
      ``SecAggConfig.validate``);
    - under DP, ``"l2"``: the clipped delta and the flag have L2 norm at most the clip
      norm, so ``||q|| <= (L / c) min(l2_clip, c sqrt(d)) + sqrt(d)`` (scale, then
      stochastic rounding, d body words); ``"linf"``: ``sqrt(d) L``;
    - under distributed DP plus the site's Skellam share (variance ``2 mu`` per word),
      bounded by the Laurent-Massart chi-square tail at 2^-64
      (``sigma^2 (d + 2 sqrt(d t) + 2 t)``, ``t = 64 ln 2``), the Gaussian approximation of
      the Skellam share; by the triangle inequality the sum of both."""
    if mode not in MODES:
        raise ConfigurationError(f"validate must be one of {MODES}, got {mode!r}")
    q = spec.quantization
    d = validation_body(spec, model_size)
    if spec.dp_mode == "none":
        if mode == "linf":
            return math.ceil(math.sqrt(d) * q.levels)
        if not spec.l2_clip > 0:
            raise ConfigurationError("validate='l2' outside DP needs the update's norm bound (the spec's l2_clip, "
                                     "SecAggConfig.validation_norm)")
        # the float part clipped to l2_clip and weight-scaled by w / S <= 1, then rounded;
        # the integer entries' words at most L each
        return math.ceil(q.levels / spec.clip_range * min(spec.l2_clip, spec.clip_range * math.sqrt(d))
                         + math.sqrt(d) + math.sqrt(spec.int_size) * q.levels)
    signal = (q.levels / spec.clip_range * min(spec.l2_clip, spec.clip_range * math.sqrt(d)) + math.sqrt(d)
              if mode == "l2" else math.sqrt(d) * q.levels)
    noise = 0.0
    if spec.dp_mode == "distributed":
        t = VALIDATION_COMPLETENESS_BITS * math.log(2)
        noise = math.sqrt(2 * spec.noise_mu_share * (d + 2 * math.sqrt(d * t) + 2 * t))
    return math.ceil(signal + noise)


def validation_body(spec: UpdateSpec, model_size: int) -> int:
    """Words of x, at the start of the vector: the encoded delta (padded when rotated),
    and under DP the flag word after it; the weight, metrics and counters are not in it."""
    return spec.dp_dimension(model_size) if spec.dp_mode != "none" else spec.encoded_size(model_size)


def with_validation(spec: UpdateSpec, mode: str, model_size: int, soundness_bits: int = 40) -> UpdateSpec:
    """The server's spec for a validated round: ``spec`` with the layout of ``mode`` (the
    bound :func:`validation_bound`, k and range bits from ``params_for``)."""
    layout = layout_for(mode, validation_bound(spec, mode, model_size), validation_body(spec, model_size),
                        soundness_bits)
    return replace(spec, validation=layout.to_json())


def validation_layout(spec: UpdateSpec, model_size: int) -> ValidationLayout | None:
    """The round's validation layout as a site checks it (None when the spec has none):
    the body and the bound must be those the rest of the spec implies for this model, so
    a server cannot make an honest update fail (a bound below it) or pass anything (a
    bound above it); ``InconsistentRequestError`` otherwise. Hand the result to
    ``SecAggClient.handle(..., validation=)`` at the masked input, and to
    ``RoundParams(validation=)`` on the server."""
    if not spec.validation:
        if spec.dp_mode == "none" and spec.l2_clip:
            raise InconsistentRequestError(
                "the update spec asks this site to clip its update to an L2 norm (l2_clip) outside DP without "
                "validating anyone's input: that norm is only the bound of a validated round; refused before training")
        return None
    layout = ValidationLayout.from_json(spec.validation)
    body, bound = validation_body(spec, model_size), validation_bound(spec, layout.mode, model_size)
    if layout.body != body or layout.params.bound != bound:
        raise InconsistentRequestError(
            f"the spec's validation layout (body {layout.body}, bound {layout.params.bound}) is not the one its own "
            f"fields imply for a {model_size}-weight model (body {body}, bound {bound}); refused"
        )
    soundness = layout.params.soundness_bits
    if soundness < MIN_SOUNDNESS_BITS or layout.params != params_for(bound, soundness):
        raise InconsistentRequestError(
            f"the spec's validation parameters are not params_for(bound, soundness_bits >= {MIN_SOUNDNESS_BITS}) "
            f"(got soundness_bits {soundness}, k {layout.params.k}): a weaker check than the protocol's; refused"
        )
    return layout


def _write_counters(vector: np.ndarray, counters: np.ndarray, spec: UpdateSpec, body: int) -> None:
    cap = ((1 << (spec.field_bits - 1)) - 1) // spec.max_cohort  # the cohort's sum cannot wrap
    start = body + spec.metric_words + spec.tag_words
    vector[start : start + spec.counters] = to_field(np.minimum(counters, cap), spec.field_bits)


def _encode_dp(
    x: np.ndarray, flag: float, spec: UpdateSpec, rng: np.random.Generator | None, integer_noise: np.ndarray | None
) -> EncodedUpdate:
    """The DP vector: the clipped delta, the flag coordinate, weight 1, and under
    distributed DP the site's Skellam share over both (``spec.dp_dimension`` values)."""
    noises: list[np.ndarray | None] = [None, None]
    if spec.dp_mode == "distributed":
        if integer_noise is None:
            integer_noise = skellam_share(x.size + 1, spec.noise_mu_share, secure_rng())
        if np.shape(integer_noise) != (x.size + 1,):
            raise EncodingError(f"noise share has shape {np.shape(integer_noise)}, the DP vector has {x.size + 1} values")
        noises = [integer_noise[: x.size], integer_noise[x.size :]]
    return encode_parts([x, np.array([flag])], 1, spec.quantization, rng, noises)


def encode_failure(
    spec: UpdateSpec,
    model_size: int,
    reason: str,
    rng: np.random.Generator | None = None,
    integer_noise: np.ndarray | None = None,
) -> EncodedUpdate:
    """What a site sends when its update cannot be used (see :data:`FAILURE_REASONS`):
    a vector of the same length as a real one, masked and answered at the same stage,
    so the server cannot tell from the reply that this site failed.

    Outside DP: a zero delta, weight 0 (it does not count in the mean), count 1, and the
    reason's counter at 1. Under DP: a zero delta, weight 1 (every client counts once),
    the flag at the clip norm, and the site's noise share as always: the others'
    noise floor assumed every survivor's share."""
    if reason not in FAILURE_REASONS:
        raise ValueError(f"unknown failure reason {reason!r}")
    size = spec.encoded_size(model_size)
    if spec.dp_mode != "none":
        return _encode_dp(np.zeros(size), spec.flag_value, spec, rng, integer_noise)
    vector = np.zeros(spec.vector_length(model_size), dtype=dtype_for_bits(spec.field_bits))
    counters = np.zeros(spec.counters, dtype=np.int64)
    counters[spec.failure_counters_at + FAILURE_REASONS.index(reason)] = 1
    _write_counters(vector, counters, spec, size)
    vector[-1] = 1  # the count coordinate: this site is a survivor; its weight word stays 0
    return EncodedUpdate(vector, 0, (0, 0))


@dataclass(frozen=True)
class DecodedUpdate:
    mean_delta: np.ndarray
    metrics: dict[str, float]
    total_weight: int
    count: int
    weighted_delta_sum: np.ndarray
    slot_means: tuple[float, ...] = ()  # metric slots' weighted means (exact to 2^-(F+1), see metric_sums)
    clipped: tuple[int, int] = (0, 0)  # coordinates clipped (float part, integer part), all survivors
    metric_clipped: tuple[int, ...] = ()  # clients whose metric in each slot was clipped
    histograms: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())  # see magnitude_histogram
    failures: tuple[tuple[str, int], ...] = ()  # outside DP: survivors whose update could not be used, by reason
    failed_estimate: float = 0.0  # survivors whose update could not be used (under DP a noisy count)
    failed_std: float = 0.0  # the std of that count's noise (distributed DP; 0 where it is exact)
    error_bound: float = 0.0  # this round's quantization bound on the float part's mean
    int_error_bound: float = 0.0
    weight_histogram: tuple[int, ...] = ()  # survivors with weight > 2^k, k = 0.. (outside DP)
    weights_over_scale: int = 0  # survivors whose weight exceeded the spec's weight scale

    @property
    def metric_error_bound(self) -> float:
        """Max |released - true weighted mean| of a metric: each site's ``round(m * 2^F)``
        is within 2^-(F+1) of m, and so is any weighted mean of them."""
        return 2.0 ** -(METRIC_FRACTION_BITS + 1)


def decode_update(
    total: np.ndarray,
    spec: UpdateSpec,
    survivors: int,
    model_size: int | None = None,
    metric_names: Sequence[str] | None = None,
) -> DecodedUpdate:
    """The unmasked sum as the weighted-mean delta and metrics (after the integrity check).

    With a rotation, the sum is un-rotated (the rotation is linear, so the sum of the
    rotated updates is the rotation of their sum) and cut back to ``model_size``.
    ``metric_names`` (what every survivor reported, in slot order) label the metric
    slots; without them no metric is released.
    """
    q = spec.quantization
    dec = decode_checked(total, q, survivors)
    k, t = spec.metric_slots, spec.counters
    body = dec.weighted_sum[: dec.weighted_sum.size - t - spec.tag_words - spec.metric_words]
    flag_sum = float(np.sum(body[body.size - spec.flag_words :])) if spec.flag_words else 0.0
    wsum = body[: body.size - spec.flag_words].copy()
    bound = q.error_bound_for(dec.total_weight, survivors)
    weight = max(dec.total_weight, 1)  # 0 only when no survivor's update could be used
    if spec.dp_mode != "none":
        if spec.rotation_seed >= 0:
            if model_size is None:
                raise ConfigurationError("decoding a rotated update needs the model size")
            wsum = unrotate(wsum, spec.rotation_seed, model_size)
        return DecodedUpdate(mean_delta=wsum / weight, metrics={}, total_weight=dec.total_weight,
                             count=dec.count, weighted_delta_sum=wsum, error_bound=bound,
                             failed_estimate=flag_sum / spec.flag_value, failed_std=_flag_noise_std(spec, survivors))
    c = spec.clip_range
    if spec.int_size:
        wsum[wsum.size - spec.int_size :] *= spec.int_clip_range / c
    at_metrics = wsum.size + spec.flag_words
    sums = metric_sums(total[at_metrics : at_metrics + spec.metric_words], spec)
    slot_means = tuple(float(Fraction(v, weight << METRIC_FRACTION_BITS)) for v in sums)
    extra = spec.quantization.extra_coordinates
    raw = from_field(np.asarray(total[total.size - extra - t : total.size - extra]), spec.field_bits)
    hist_f, hist_i = raw[:HIST_BINS].copy(), raw[HIST_BINS : 2 * HIST_BINS].copy()
    if spec.model_key:  # the in-range bins are under the model key's masks: unknown (-1), never 0
        hist_f[:-HIST_LOW] = hist_i[:-HIST_LOW] = -1
    clipped = (int(raw[2 * HIST_BINS]), int(raw[2 * HIST_BINS + 1]))
    at = spec.failure_counters_at
    metric_clipped = tuple(int(v) for v in raw[2 * HIST_BINS + 2 : at])
    failed = [int(v) for v in raw[at : at + len(FAILURE_REASONS)]]
    at += len(FAILURE_REASONS)
    w_hist = tuple(int(v) for v in raw[at : at + weight_bins(spec.max_weight)])
    over_scale = int(raw[at + len(w_hist)])
    failures = tuple((r, n) for r, n in zip(FAILURE_REASONS, failed, strict=True) if n)
    metrics: dict[str, float] = {}
    if metric_names is not None:
        for i, name in enumerate(metric_names[:k]):
            metrics[name] = slot_means[i]
    return DecodedUpdate(
        mean_delta=wsum / weight, metrics=metrics, total_weight=dec.total_weight, count=dec.count,
        weighted_delta_sum=wsum, slot_means=slot_means, clipped=clipped, metric_clipped=metric_clipped,
        histograms=(tuple(int(v) for v in hist_f), tuple(int(v) for v in hist_i)),
        error_bound=bound, int_error_bound=bound * spec.int_clip_range / c,
        failures=failures, failed_estimate=float(sum(failed)),
        weight_histogram=w_hist, weights_over_scale=over_scale,
    )


def _flag_noise_std(spec: UpdateSpec, survivors: int) -> float:
    """Std of the distributed noise on the summed flag, in units of one failed site:
    ``survivors`` Skellam shares, over the fixed point of one flag."""
    if spec.dp_mode != "distributed":
        return 0.0
    return float(np.sqrt(2.0 * survivors * spec.noise_mu_share) / (spec.quantization.scale * spec.flag_value))


def covering_range(current: float, histogram: Sequence[int]) -> float:
    """The smallest histogram threshold ``current * 2^k`` (k >= HIST_LOW) that no value
    reached: every summed |x| lies below it. Past the top bin (values beyond
    ``current * 2^(HIST_LOW + HIST_BINS - 1)``) the next power, a lower bound only: the
    retry's own histogram then says more."""
    for j, count in enumerate(histogram):
        if count == 0:
            return current * 2.0 ** (HIST_LOW + j)
    return current * 2.0 ** (HIST_LOW + len(histogram))


def covering_weight_scale(max_weight: int, histogram: Sequence[int]) -> int:
    """The smallest power of two >= every survivor's weight (from the securely summed
    ``count(w > 2^k)``), at most ``max_weight``: within a factor 2 of the largest weight."""
    for k, count in enumerate(histogram):
        if count == 0:
            return min(1 << k, max_weight)
    return max_weight


def retry_spec(
    spec: UpdateSpec, decoded: DecodedUpdate, target_error: float = 2.0**-14
) -> tuple[UpdateSpec | None, list[str]]:
    """Server side, outside DP: the spec a retry of this round's masked input needs, and
    why; ``(None, [])`` when the aggregate may be released.

    A retry is needed when a coordinate lay beyond its part's range (the new range covers
    every summed value, from the magnitude histogram, and is at least twice the old one),
    when a weight exceeded the weight scale, or when the round's quantization bound is
    above ``target_error`` times the range while a finer weight scale covers every
    weight. A retry always takes the covering weight scale
    (:func:`covering_weight_scale`): the precision it gives costs nothing more."""
    if spec.dp_mode != "none" or decoded.total_weight <= 0:
        return None, []
    reasons: list[str] = []
    c, ci, ws = spec.clip_range, spec.int_clip_range, spec.weight_unit
    if decoded.clipped[0]:
        c = max(2 * c, covering_range(c, decoded.histograms[0]))
        reasons.append(f"{decoded.clipped[0]} coordinates beyond +-{spec.clip_range:g}")
    if decoded.clipped[1]:
        ci = max(2 * ci, covering_range(ci, decoded.histograms[1]))
        reasons.append(f"{decoded.clipped[1]} integer coordinates beyond +-{spec.int_clip_range:g}")
    need = covering_weight_scale(spec.max_weight, decoded.weight_histogram)
    if decoded.weights_over_scale:
        reasons.append(f"{decoded.weights_over_scale} weights above the weight scale {spec.weight_unit}")
    elif ws > need and decoded.error_bound > target_error * spec.clip_range:
        reasons.append(f"quantization bound {decoded.error_bound:.3g} above {target_error:.3g} x the range at weight "
                       f"scale {spec.weight_unit}; the cohort's weights need {need}")
    if not reasons:
        return None, []
    return replace(spec, clip_range=c, int_clip_range=ci, weight_scale=need), reasons


def check_retry_spec(base: UpdateSpec, earlier: Sequence[UpdateSpec], new: UpdateSpec) -> None:
    """Site side: refuse a retry spec unless it is one this site may answer.

    Only outside DP; at most :data:`MAX_RETRIES` per round; only :data:`RETRY_FIELDS`
    may differ from the round's spec; no range narrower than the previous attempt's;
    and not the ranges and weight scale of any earlier attempt (a repeat would only give
    the server another rounding of the same sum). Raises a typed :class:`ProtocolError`.
    """
    if base.dp_mode != "none":
        raise PolicyError("a retry of the masked input is refused under DP: the round's noise was drawn once")
    if len(earlier) >= MAX_RETRIES:
        raise PolicyError(f"this round's masked input was already retried {len(earlier)} times "
                          f"(at most {MAX_RETRIES}); refused")
    new_config, base_config = new.to_config(), base.to_config()
    for name in _CONFIG_FIELDS:
        if name in RETRY_FIELDS:
            continue
        if new_config[name] != base_config[name]:
            raise InconsistentRequestError(
                f"a retry may change only {', '.join(RETRY_FIELDS)}; its spec changes {name!r}: refused"
            )
    last = earlier[-1] if earlier else base
    if new.clip_range < last.clip_range or new.int_clip_range < last.int_clip_range:
        raise PolicyError("a retry's range may only widen (never narrower than the previous attempt's); refused")
    key = (new.clip_range, new.int_clip_range, new.weight_unit)
    if any((a.clip_range, a.int_clip_range, a.weight_unit) == key for a in (base, *earlier)):
        raise StaleMessageError("a retry repeats the ranges and weight scale of an earlier attempt; refused")


def adapted_range(needed: Sequence[float], current: float, margin: float = 2.0) -> float:
    """The next round's range: ``margin`` times the largest range the last rounds needed
    (each the :func:`covering_range` of its round), never narrower than that, whatever
    one round's histogram says; ``current`` when nothing was recorded."""
    return margin * max(needed) if needed else current


def _raw_bytes(arr: np.ndarray) -> memoryview | bytes:
    """The array's memory as hashlib reads it: a zero-copy view of a contiguous array
    (``tobytes()`` would copy the whole model once more per digest), the same bytes;
    ``tobytes()`` only for dtypes without the buffer protocol (e.g. datetime64)."""
    try:
        return arr.data.cast("B")
    except (TypeError, ValueError):
        return arr.tobytes()


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr).encode()


def model_digest(arrays: Sequence[tuple[str, np.ndarray]]) -> bytes:
    """SHA-256 over the global model alone (names, dtypes, shapes, values). A client
    signs at most one survivor set per model digest (never aggregated twice)."""
    h = hashlib.sha256(b"sgs-flower/model/v1")
    for name, a in arrays:
        arr = np.ascontiguousarray(a)
        meta = _canonical([name, arr.dtype.str, list(arr.shape)])
        h.update(struct.pack(">I", len(meta)) + meta)
        h.update(_raw_bytes(arr))
    return h.digest()


def spec_digest(spec: UpdateSpec) -> bytes:
    """SHA-256 of a spec as one party holds it: keys a retry's masks (with the round's
    mask context), so sites given different retry specs mask with keys that do not cancel."""
    return hashlib.sha256(b"sgs-flower/spec/v1" + _canonical(spec.to_config())).digest()


def binding_digest(
    arrays: Sequence[tuple[str, np.ndarray]] | bytes, config: Mapping[str, Any], spec_config: Mapping[str, Any]
) -> bytes:
    """SHA-256 over the global model (or its :func:`model_digest`), the train config and
    the update spec as one party holds them. Client and server compute it
    independently; it keys the masks."""
    h = hashlib.sha256(b"sgs-flower/binding/v2")
    h.update(arrays if isinstance(arrays, bytes) else model_digest(arrays))
    cfg = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in config.items()}
    for part in (cfg, dict(spec_config)):
        blob = _canonical(part)
        h.update(struct.pack(">I", len(blob)) + blob)
    return h.digest()
