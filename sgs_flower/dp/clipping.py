"""L2 clipping of one flat update, with a report instead of silence.

User-level DP needs every client's contribution bounded by ``clip_norm``; how often
and how hard clipping bites is what tells an operator whether ``clip_norm`` is sane,
so the result always says what happened.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClipResult:
    """The clipped vector and what clipping did to it."""

    vector: np.ndarray
    original_norm: float
    clip_norm: float
    clipped: bool
    scale: float  # factor applied (1.0 when not clipped)


def clip_l2(vector: np.ndarray, clip_norm: float) -> ClipResult:
    """Scale ``vector`` down to L2 norm ``clip_norm`` if it is longer; never scale up."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be > 0, got {clip_norm}")
    flat = np.asarray(vector, dtype=np.float64)
    if flat.ndim != 1:
        raise ValueError(f"clip_l2 expects a flat vector, got shape {flat.shape}")
    if not np.all(np.isfinite(flat)):
        raise ValueError("cannot clip a vector with NaN or infinite entries")
    norm = float(np.linalg.norm(flat))
    if norm <= clip_norm:
        return ClipResult(flat.copy(), norm, clip_norm, False, 1.0)
    scale = clip_norm / norm
    return ClipResult(flat * scale, norm, clip_norm, True, scale)
