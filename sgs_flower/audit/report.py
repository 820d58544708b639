"""Turn audit rows into the table, the JSON summary and the picture a reader checks.

Kept apart from the experiment so the numbers can be re-rendered (README, CI log)
without re-running attacks, and so matplotlib is imported only when drawing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sgs_flower import digits as task
from sgs_flower.audit.canary import CanaryAuditResult
from sgs_flower.audit.experiment import Row, worst_cases

_HEADER = (
    "| setting | model / attack | images | PSNR dB | SSIM | MSE | ident | labels | "
    "baseline PSNR | baseline ident | chance ident |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|"
)


def table(rows: Sequence[Row]) -> str:
    """Markdown table of the worst case per setting (the number a reviewer should read)."""
    lines = [_HEADER]
    for r in worst_cases(rows):
        s, b = r.scores, r.baseline
        lines.append(
            f"| ({r.setting.group}) {r.setting.label} | {r.model} / {r.mode} | {s.n_images} | "
            f"{s.psnr:.1f} | {s.ssim:.2f} | {s.mse:.4f} | {s.ident:.2f} | {s.label_acc:.2f} | "
            f"{b.psnr:.1f} | {b.ident:.2f} | {r.chance_ident:.4f} |"
        )
    return "\n".join(lines)


def canary_table(results: Sequence[CanaryAuditResult]) -> str:
    """Markdown table of canary audits: accounted epsilon vs the empirical lower bound."""
    lines = [
        "| run | noise z | rounds | canaries | accounted eps | empirical eps lower bound (95 %) | "
        "bound ceiling | GDP estimate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in results:
        run = "honest" if c.noise_applied else "BROKEN (noise removed)"
        lines.append(
            f"| {run} | {c.noise_multiplier:.3f} | {c.rounds} | {c.canaries} | {c.epsilon_accounted:.2f} | "
            f"{c.epsilon_lower:.2f} ({c.correct}/{c.guesses} correct) | {c.epsilon_ceiling:.2f} | "
            f"{c.epsilon_gdp_estimate:.1f} |"
        )
    return "\n".join(lines)


def summary(rows: Sequence[Row]) -> dict[str, Any]:
    """Flat numbers per setting (worst case), keyed ``psnr_<key>``, ``ident_<key>``, ..."""
    out: dict[str, Any] = {}
    for r in worst_cases(rows):
        k = r.setting.key
        out[f"psnr_{k}"] = round(r.scores.psnr, 2)
        out[f"ssim_{k}"] = round(r.scores.ssim, 3)
        out[f"ident_{k}"] = round(r.scores.ident, 3)
        out[f"labels_{k}"] = round(r.scores.label_acc, 3)
        out[f"psnr_baseline_{k}"] = round(r.baseline.psnr, 2)
    return out


def grid(rows: Sequence[Row], targets: Sequence[int], path: Path) -> None:
    """PNG: the true images on top, then the worst-case reconstruction of each setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_all, _ = task.load_digits_arrays()
    # whole-partition cohorts are scored against their own images, not these targets
    shown = [
        r for r in worst_cases(rows) if r.setting.images and any(int(t) in r.shown for t in targets)
    ]
    fig, axes = plt.subplots(
        len(shown) + 1,
        len(targets),
        figsize=(0.55 * len(targets) + 3.4, 0.62 * (len(shown) + 1)),
        squeeze=False,
    )
    labels = ["true images"] + [
        f"({r.setting.group}) {r.setting.label}\nPSNR {r.scores.psnr:.1f} dB, ident {r.scores.ident:.2f}"
        for r in shown
    ]
    for i, label in enumerate(labels):
        for j, t in enumerate(targets):
            ax = axes[i, j]
            img = x_all[t] if i == 0 else shown[i - 1].shown.get(int(t))
            if img is not None:
                ax.imshow(np.asarray(img).reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[i, 0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=6.5)
    fig.tight_layout(pad=0.2)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
