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
import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sgs_flower.dp.clipping import clip_l2
from sgs_flower.dp.noise import secure_rng, skellam_share
from sgs_flower.dp.rotation import padded_length, rotate, unrotate
from sgs_flower.secagg.errors import ConfigurationError, EncodingError
from sgs_flower.secagg.quantize import EncodedUpdate, QuantizationConfig, encode_parts
from sgs_flower.secagg.server import decode_checked

logger = logging.getLogger("sgs_flower.pipeline")


@dataclass(frozen=True)
class UpdateSpec:
    """How one round's updates are encoded; validated on construction.

    - ``clip_range``: per-coordinate bound on the model delta (clipping is counted).
    - ``metric_keys`` / ``metric_range``: train metrics that travel inside the masked
      vector (scaled so that +-metric_range uses the delta's range), so the server
      learns only their weighted cohort mean.
    - ``max_cohort`` / ``max_weight``: bound the sum, so the field cannot wrap around.
    """

    clip_range: float
    max_cohort: int
    max_weight: int = 1024
    field_bits: int = 32
    metric_keys: tuple[str, ...] = ()
    metric_range: float = 100.0
    noise_headroom: int = 0
    bits_per_coordinate: int = 0  # 0: the most the field admits
    # user-level DP (DESIGN.md section 4), set by the server's DPAggregator
    dp_mode: str = "none"  # "none", "central" or "distributed"
    l2_clip: float = 0.0  # clients clip their (rotated) delta to this L2 norm
    noise_mu_share: float = 0.0  # distributed: each client's Skellam parameter (integer units)
    rotation_seed: int = -1  # distributed: public seed of the randomized Hadamard rotation; -1 = none
    min_survivors: int = 0  # distributed: fewest survivors the noise shares are calibrated for

    def __post_init__(self) -> None:
        if not self.metric_range > 0:
            raise ConfigurationError(f"metric_range must be > 0, got {self.metric_range}")
        if len(set(self.metric_keys)) != len(self.metric_keys):
            raise ConfigurationError(f"metric_keys has duplicates: {self.metric_keys}")
        if self.dp_mode not in ("none", "central", "distributed"):
            raise ConfigurationError(f"dp_mode must be none, central or distributed, got {self.dp_mode!r}")
        if self.dp_mode != "none":
            if not self.l2_clip > 0:
                raise ConfigurationError(f"l2_clip must be > 0 under dp_mode={self.dp_mode}, got {self.l2_clip}")
            if self.metric_keys:
                raise ConfigurationError("train metrics cannot be released under DP: set metric_keys=()")
            if self.max_weight != 1:
                raise ConfigurationError("DP weighs every client equally (the sensitivity argument): max_weight must be 1")
        if self.dp_mode == "distributed" and not self.noise_mu_share > 0:
            raise ConfigurationError(f"distributed DP needs noise_mu_share > 0, got {self.noise_mu_share}")
        if self.dp_mode == "distributed" and not 1 <= self.min_survivors <= self.max_cohort:
            raise ConfigurationError(
                f"distributed DP needs min_survivors in 1..max_cohort={self.max_cohort}, got {self.min_survivors}"
            )
        self.quantization  # validates the field and cohort bounds  # noqa: B018

    @property
    def quantization(self) -> QuantizationConfig:
        return QuantizationConfig(
            clip_range=self.clip_range, max_cohort=self.max_cohort, max_weight=self.max_weight,
            field_bits=self.field_bits, noise_headroom=self.noise_headroom,
            bits_per_coordinate=self.bits_per_coordinate or None,
        )

    def encoded_size(self, model_size: int) -> int:
        """Coordinates the model delta occupies once encoded (padded when rotated)."""
        return padded_length(model_size) if self.rotation_seed >= 0 else model_size

    def vector_length(self, model_size: int) -> int:
        """Words in the masked vector: model delta, metrics, weight, count."""
        return self.encoded_size(model_size) + len(self.metric_keys) + 2

    def to_config(self) -> dict[str, Any]:
        """Plain values for a Flower ConfigRecord (lists of str, numbers)."""
        d = asdict(self)
        d["metric_keys"] = list(self.metric_keys)
        return d

    @classmethod
    def from_config(cls, d: Mapping[str, Any]) -> UpdateSpec:
        try:
            return cls(
                clip_range=float(d["clip_range"]), max_cohort=int(d["max_cohort"]), max_weight=int(d["max_weight"]),
                field_bits=int(d["field_bits"]), metric_keys=tuple(str(k) for k in d["metric_keys"]),
                metric_range=float(d["metric_range"]), noise_headroom=int(d["noise_headroom"]),
                bits_per_coordinate=int(d["bits_per_coordinate"]), dp_mode=str(d["dp_mode"]),
                l2_clip=float(d["l2_clip"]), noise_mu_share=float(d["noise_mu_share"]),
                rotation_seed=int(d["rotation_seed"]), min_survivors=int(d.get("min_survivors", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigurationError(f"malformed update spec from the server: {exc!r}") from exc


def flatten(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """All arrays as one float64 vector, in order."""
    if not arrays:
        return np.zeros(0)
    return np.concatenate([np.asarray(a, dtype=np.float64).ravel() for a in arrays])


def unflatten(vector: np.ndarray, like: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Cut a flat vector back into arrays shaped (and typed) like ``like``."""
    total = sum(int(np.asarray(a).size) for a in like)
    if vector.size != total:
        raise EncodingError(f"vector has {vector.size} values, the model has {total}")
    out, i = [], 0
    for a in like:
        a = np.asarray(a)
        chunk = vector[i : i + a.size].reshape(a.shape)
        out.append(np.rint(chunk).astype(a.dtype) if np.issubdtype(a.dtype, np.integer) else chunk.astype(a.dtype))
        i += a.size
    return out


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
        return x
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
    """One client's flat delta, metrics and weight as field words.

    Under DP the delta is (rotated and) L2-clipped, every client counts with weight 1
    (so one client's influence on the sum is bounded by the clip norm, whatever its
    ``num-examples``), and in distributed DP a Skellam noise share is added in the
    integer domain before masking.
    """
    x = prepare_delta(delta, spec)
    if spec.dp_mode != "none":
        weight = 1
        if spec.dp_mode == "distributed" and integer_noise is None:
            integer_noise = skellam_share(x.size, spec.noise_mu_share, secure_rng())
    missing = [k for k in spec.metric_keys if k not in metrics]
    if missing:
        raise EncodingError(
            f"train reply lacks the metrics {missing} that the server aggregates securely; "
            "return them from your train function or change secure-metrics in the run config"
        )
    scale = spec.clip_range / spec.metric_range
    m = np.array([float(metrics[k]) * scale for k in spec.metric_keys], dtype=np.float64)
    # The delta and the metrics are encoded as two parts of one vector: no concatenated
    # copy of the model; the noise share covers the delta only.
    return encode_parts([x, m], weight, spec.quantization, rng, [integer_noise, None])


@dataclass(frozen=True)
class DecodedUpdate:
    mean_delta: np.ndarray
    metrics: dict[str, float]
    total_weight: int
    count: int
    weighted_delta_sum: np.ndarray


def decode_update(total: np.ndarray, spec: UpdateSpec, survivors: int, model_size: int | None = None) -> DecodedUpdate:
    """The unmasked sum as the weighted-mean delta and metrics (after the integrity check).

    With a rotation, the sum is un-rotated (the rotation is linear, so the sum of the
    rotated updates is the rotation of their sum) and cut back to ``model_size``.
    """
    dec = decode_checked(total, spec.quantization, survivors)
    k = len(spec.metric_keys)
    scale = spec.metric_range / spec.clip_range
    metrics = {key: float(v) * scale for key, v in zip(spec.metric_keys, dec.mean[dec.mean.size - k :], strict=True)}
    wsum = dec.weighted_sum[: dec.weighted_sum.size - k]
    if spec.rotation_seed >= 0:
        if model_size is None:
            raise ConfigurationError("decoding a rotated update needs the model size")
        wsum = unrotate(wsum, spec.rotation_seed, model_size)
    return DecodedUpdate(
        mean_delta=wsum / dec.total_weight,
        metrics=metrics,
        total_weight=dec.total_weight,
        count=dec.count,
        weighted_delta_sum=wsum,
    )


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
