"""Plot a ledger: epsilon (both views) and accuracy per round, as a PNG.

Uses matplotlib's Agg backend so it works on a headless server.
"""

from __future__ import annotations

import math
from pathlib import Path

from sgs_flower.ledger.chain import as_float
from sgs_flower.ledger.ledger import Ledger


def plot_ledger(path: str | Path, out: str | Path) -> Path:
    """Write the PNG for the ledger at ``path`` to ``out``; returns ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ledger = Ledger.open(path)
    rounds, eps_c, eps_s = [], [], []
    aborts: list[int] = []
    acc_rounds, acc = [], []
    for rec in ledger.records:
        if rec["kind"] == "round":
            rounds.append(int(rec["round"]))
            eps_c.append(as_float(rec["epsilon_consumer"]))
            eps_s.append(as_float(rec["epsilon_server"]))
        elif rec["kind"] == "abort":
            aborts.append(int(rec["round"]))
        elif rec["kind"] == "evaluation" and "accuracy" in rec.get("metrics", {}):
            acc_rounds.append(int(rec["round"]))
            acc.append(float(rec["metrics"]["accuracy"]))

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(rounds, eps_c, marker=".", label="epsilon vs model consumers")
    if any(math.isfinite(e) for e in eps_s):
        ax.plot(
            rounds, [e if math.isfinite(e) else float("nan") for e in eps_s],
            marker=".", linestyle="--", label="epsilon vs server",
        )
    if any(not math.isfinite(e) for e in eps_s):
        ax.text(0.01, 0.97, "server view: no protection (central DP)", transform=ax.transAxes, va="top")
    for r in aborts:
        ax.axvline(r, color="red", alpha=0.3)
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative epsilon")
    handles, labels = ax.get_legend_handles_labels()
    if acc:
        ax2 = ax.twinx()
        ax2.plot(acc_rounds, acc, color="green", marker="x", label="accuracy")
        ax2.set_ylabel("accuracy")
        ax2.set_ylim(0, 1)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    if handles:
        ax.legend(handles, labels, loc="lower right")
    ax.set_title(f"privacy ledger: {Path(path).name}")
    fig.tight_layout()
    out_path = Path(out)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
