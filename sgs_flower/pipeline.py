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
import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sgs_flower.secagg.errors import ConfigurationError, EncodingError
from sgs_flower.secagg.quantize import EncodedUpdate, QuantizationConfig, encode
from sgs_flower.secagg.server import decode_checked


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
    extra: tuple[tuple[str, str], ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.metric_range > 0:
            raise ConfigurationError(f"metric_range must be > 0, got {self.metric_range}")
        if len(set(self.metric_keys)) != len(self.metric_keys):
            raise ConfigurationError(f"metric_keys has duplicates: {self.metric_keys}")
        self.quantization  # validates the field and cohort bounds  # noqa: B018

    @property
    def quantization(self) -> QuantizationConfig:
        return QuantizationConfig(
            clip_range=self.clip_range, max_cohort=self.max_cohort, max_weight=self.max_weight,
            field_bits=self.field_bits, noise_headroom=self.noise_headroom,
        )

    def vector_length(self, model_size: int) -> int:
        """Words in the masked vector: model delta, metrics, weight, count."""
        return model_size + len(self.metric_keys) + 2

    def to_config(self) -> dict[str, Any]:
        """Plain values for a Flower ConfigRecord (lists of str, numbers)."""
        d = asdict(self)
        d["metric_keys"] = list(self.metric_keys)
        d["extra"] = json.dumps(list(self.extra))
        return d

    @classmethod
    def from_config(cls, d: Mapping[str, Any]) -> UpdateSpec:
        try:
            return cls(
                clip_range=float(d["clip_range"]), max_cohort=int(d["max_cohort"]), max_weight=int(d["max_weight"]),
                field_bits=int(d["field_bits"]), metric_keys=tuple(str(k) for k in d["metric_keys"]),
                metric_range=float(d["metric_range"]), noise_headroom=int(d["noise_headroom"]),
                extra=tuple((str(a), str(b)) for a, b in json.loads(str(d["extra"]))),
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


def encode_update(
    delta: np.ndarray,
    metrics: Mapping[str, float],
    weight: int,
    spec: UpdateSpec,
    rng: np.random.Generator | None = None,
    integer_noise: np.ndarray | None = None,
) -> EncodedUpdate:
    """One client's flat delta, metrics and weight as field words."""
    missing = [k for k in spec.metric_keys if k not in metrics]
    if missing:
        raise EncodingError(
            f"train reply lacks the metrics {missing} that the server aggregates securely; "
            "return them from your train function or change secure-metrics in the run config"
        )
    scale = spec.clip_range / spec.metric_range
    m = np.array([float(metrics[k]) * scale for k in spec.metric_keys], dtype=np.float64)
    x = np.concatenate([np.asarray(delta, dtype=np.float64).ravel(), m])
    noise = None
    if integer_noise is not None:
        noise = np.concatenate([integer_noise.astype(np.int64), np.zeros(len(m), dtype=np.int64)])
    return encode(x, weight, spec.quantization, rng, noise)


@dataclass(frozen=True)
class DecodedUpdate:
    mean_delta: np.ndarray
    metrics: dict[str, float]
    total_weight: int
    count: int
    weighted_delta_sum: np.ndarray


def decode_update(total: np.ndarray, spec: UpdateSpec, survivors: int) -> DecodedUpdate:
    """The unmasked sum as the weighted-mean delta and metrics (after the integrity check)."""
    dec = decode_checked(total, spec.quantization, survivors)
    k = len(spec.metric_keys)
    scale = spec.metric_range / spec.clip_range
    metrics = {key: float(v) * scale for key, v in zip(spec.metric_keys, dec.mean[dec.mean.size - k :], strict=True)}
    return DecodedUpdate(
        mean_delta=dec.mean[: dec.mean.size - k],
        metrics=metrics,
        total_weight=dec.total_weight,
        count=dec.count,
        weighted_delta_sum=dec.weighted_sum[: dec.mean.size - k],
    )


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=repr).encode()


def binding_digest(
    arrays: Sequence[tuple[str, np.ndarray]], config: Mapping[str, Any], spec_config: Mapping[str, Any]
) -> bytes:
    """SHA-256 over the global model, the train config and the update spec as one party
    holds them. Client and server compute it independently; it keys the masks."""
    h = hashlib.sha256(b"sgs-flower/binding/v1")
    for name, a in arrays:
        arr = np.ascontiguousarray(a)
        meta = _canonical([name, arr.dtype.str, list(arr.shape)])
        h.update(struct.pack(">I", len(meta)) + meta)
        h.update(arr.tobytes())
    cfg = {k: (v.hex() if isinstance(v, bytes) else v) for k, v in config.items()}
    for part in (cfg, dict(spec_config)):
        blob = _canonical(part)
        h.update(struct.pack(">I", len(blob)) + blob)
    return h.digest()
