"""How close a reconstruction is to the private image, and what guessing would score.

Why these metrics: PSNR/MSE measure pixel error, SSIM measures whether the structure
(strokes) survived, and the identification rate answers the question a privacy
reviewer actually asks -- "could the server tell *which* training image it was?" --
by checking whether the reconstruction's nearest neighbour among all 1,797 digits is
the true image (chance: 1/1797, about 0.06 %). Every metric is also computed for a
trivial baseline (the dataset mean image), so "no better than guessing" is a number.

Images are arrays (N, 1, 8, 8) with values in [0, 1].
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

_SSIM_C1 = 0.01**2  # (K1 * data range)^2 with data range 1, as in Wang et al. 2004
_SSIM_C2 = 0.03**2


def mse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image mean squared error."""
    return ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB for data range 1 (capped at 100 dB for identical images)."""
    return 10.0 * np.log10(1.0 / np.maximum(mse(a, b), 1e-10))


def _box3(img: np.ndarray) -> np.ndarray:
    """Mean over every 3x3 window of (N, H, W) images ('valid' region: (N, H-2, W-2))."""
    h, w = img.shape[1] - 2, img.shape[2] - 2
    out = np.zeros((img.shape[0], h, w))
    for i in range(3):
        for j in range(3):
            out += img[:, i : i + h, j : j + w]
    return out / 9.0


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image SSIM with a uniform 3x3 window (a 7x7 window would not fit 8x8 images well)."""
    x = a.reshape(len(a), a.shape[-2], a.shape[-1]).astype(np.float64)
    y = b.reshape(len(b), b.shape[-2], b.shape[-1]).astype(np.float64)
    mx, my = _box3(x), _box3(y)
    vx = _box3(x * x) - mx**2
    vy = _box3(y * y) - my**2
    cxy = _box3(x * y) - mx * my
    num = (2 * mx * my + _SSIM_C1) * (2 * cxy + _SSIM_C2)
    den = (mx**2 + my**2 + _SSIM_C1) * (vx + vy + _SSIM_C2)
    return (num / den).reshape(len(a), -1).mean(axis=1)


def nearest_index(recon: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """Index of each reconstruction's nearest neighbour (Euclidean) in ``gallery``."""
    r = recon.reshape(len(recon), -1).astype(np.float64)
    g = gallery.reshape(len(gallery), -1).astype(np.float64)
    d = (r**2).sum(1)[:, None] - 2 * r @ g.T + (g**2).sum(1)[None, :]
    return d.argmin(axis=1)


def match(recon: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """For each reconstruction, the index of the target it is scored against.

    A batch or an aggregate reveals a *set* of images with no order, so (as in Geiping
    et al. 2020) reconstructions are paired with targets by the assignment of least
    total MSE. With more targets than reconstructions (an aggregate of many clients)
    each reconstruction gets a distinct target; this favours the attacker, which is
    the right side to err on in an audit.
    """
    cost = ((recon.reshape(len(recon), 1, -1) - targets.reshape(1, len(targets), -1)) ** 2).mean(-1)
    rows, cols = linear_sum_assignment(cost)
    out = np.empty(len(recon), dtype=np.int64)
    out[rows] = cols
    return out


def label_accuracy(predicted: np.ndarray, true: np.ndarray) -> float:
    """Share of the true labels recovered, as multisets (order is unknowable in a batch)."""
    common = Counter(predicted.tolist()) & Counter(true.tolist())
    return sum(common.values()) / max(len(true), 1)


@dataclass(frozen=True)
class LeakageScores:
    """Mean leakage metrics over the scored reconstructions of one setting."""

    n_images: int
    mse: float
    psnr: float
    ssim: float
    ident: float
    label_acc: float

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def score(
    recon: np.ndarray,
    targets: np.ndarray,
    target_ids: np.ndarray,
    gallery: np.ndarray,
    labels_pred: np.ndarray,
    labels_true: np.ndarray,
) -> LeakageScores:
    """Score reconstructions against their (matched) targets.

    ``target_ids`` are the targets' indices in ``gallery`` (the full dataset), used
    for the identification rate. ``recon`` and ``targets`` must already be paired.
    """
    ident = nearest_index(recon, gallery) == target_ids
    return LeakageScores(
        n_images=len(recon),
        mse=float(mse(recon, targets).mean()),
        psnr=float(psnr(recon, targets).mean()),
        ssim=float(ssim(recon, targets).mean()),
        ident=float(ident.mean()),
        label_acc=label_accuracy(labels_pred, labels_true),
    )


def baseline_scores(
    targets: np.ndarray, target_ids: np.ndarray, gallery: np.ndarray, gallery_labels: np.ndarray
) -> LeakageScores:
    """What an attacker scores with no observation at all: the dataset mean image for
    every target, and the most common label for every label."""
    mean_img = np.repeat(gallery.mean(axis=0, keepdims=True), len(targets), axis=0)
    mode = np.bincount(gallery_labels).argmax()
    true_labels = gallery_labels[target_ids]
    return score(mean_img, targets, target_ids, gallery, np.full(len(targets), mode), true_labels)
