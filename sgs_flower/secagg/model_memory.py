"""A site's memory of the global models it signed a survivor set for: no differencing
over near copies of one model.

Why: a site signs at most one survivor set per model *digest*, but a digest is exact: a
model with one weight moved by one ulp has a new digest and trains the same. Two rounds
over (nearly) the same model whose cohorts differ by one site give the server that
site's update, weight and metrics as the difference of two sums (issue 18). So the site
also remembers a sketch of each model it signed for, with the signed set and the norm of
its own update, and refuses to sign *another* survivor set for a model closer to a
remembered one than ``min_change`` times its own update norm (the larger of the two
rounds'). Honest rounds over the same survivor set are never refused, whatever the
distance; an honest round with another set moves the model by the cohort's mean update.

The sketch is a CountSketch (Charikar, Chen and Farach-Colton 2002): coordinate ``i``
goes to bucket ``h(i)`` with sign ``s(i)``; the sketch ``S x`` sums ``s(i) x_i`` per
bucket. It is linear and ``E |S x|^2 = |x|^2``, so ``|S m' - S m|`` estimates
``|m' - m|``: a perturbation on a few coordinates is seen exactly (they land in distinct
buckets with high probability), a spread one within about ``sqrt(2 / k)`` relative.
``h`` and ``s`` come from an AES-256-CTR keystream under a key only the site holds, so
the server cannot aim a perturbation at the sketch's null space.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from sgs_flower.secagg.prg import Keystream

SKETCH_BUCKETS = 128
_BLOCK = 1 << 16  # coordinates per bincount
MEMORY_LIMIT = 32  # models remembered (oldest forgotten first); the exact digest rule keeps 512


def model_sketch(arrays: Iterable[np.ndarray], key: bytes) -> np.ndarray:
    """The CountSketch of the model's entries (in the given order) under the site's key.

    One keystream byte per coordinate: its low 7 bits are the bucket, its top bit the
    sign, so one ``bincount`` over 256 slots per block sums both signs (the sketch is
    the first 128 slots minus the last 128). About 30 ms for 5e6 coordinates here,
    a third of that coordinate count's masking."""
    if len(key) != 32:
        raise ValueError("the sketch key must be 32 bytes")
    stream = Keystream(key, np.uint8, _BLOCK)
    out = np.zeros(2 * SKETCH_BUCKETS, dtype=np.float64)
    for a in arrays:
        flat = np.asarray(a).ravel()
        if flat.dtype not in (np.float32, np.float64):
            flat = flat.astype(np.float64)
        for start in range(0, flat.size, _BLOCK):
            x = flat[start : start + _BLOCK]
            out += np.bincount(stream.words(x.size), weights=x, minlength=2 * SKETCH_BUCKETS)
    return out[:SKETCH_BUCKETS] - out[SKETCH_BUCKETS:]


def sketch_bytes(sketch: np.ndarray) -> bytes:
    return np.asarray(sketch, dtype="<f8").tobytes()


def sketch_from_bytes(raw: bytes) -> np.ndarray:
    if len(raw) != 8 * SKETCH_BUCKETS:
        raise ValueError("a model sketch has the wrong size")
    return np.frombuffer(raw, dtype="<f8").copy()


def memory_entry(digest: bytes, signed_set: str, sketch: np.ndarray, step: float) -> dict[str, Any]:
    """One remembered model, as plain JSON data."""
    return {"digest": digest.hex(), "set": signed_set, "sketch": base64.b64encode(sketch_bytes(sketch)).decode(),
            "step": float(step)}


def near_sets(
    memory: Sequence[Mapping[str, Any]], sketch: np.ndarray, step: float, min_change: float
) -> frozenset[str]:
    """The survivor sets signed for remembered models this one is near to: the site may
    sign only those (all of them equal) for this model. A distance that cannot be
    computed (a non-finite model) counts as near."""
    if min_change <= 0:
        return frozenset()
    out = set()
    for entry in memory:
        other = sketch_from_bytes(base64.b64decode(str(entry["sketch"])))
        dist = float(np.linalg.norm(sketch - other))
        limit = min_change * max(float(step), float(entry["step"]))
        if not math.isfinite(dist) or dist <= limit:
            out.add(str(entry["set"]))
    return frozenset(out)


def remember(memory: list[dict[str, Any]], entry: dict[str, Any]) -> list[dict[str, Any]]:
    """The memory with ``entry`` added (the same digest replaced), at most MEMORY_LIMIT."""
    kept = [e for e in memory if e.get("digest") != entry["digest"]]
    kept.append(entry)
    return kept[-MEMORY_LIMIT:]
