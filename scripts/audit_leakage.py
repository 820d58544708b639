"""Leakage audit: can the server reconstruct a client's digits from what it observes?

Runs the gradient-inversion attack (sgs_flower.audit) against (a) plaintext updates,
(b) DP-noised updates, (c) secure aggregates of growing cohorts and (d) the default
protected configuration, plus the canary audit of a DP run; writes a PNG grid and a
Markdown table, and prints one JSON object as the last line.

    python scripts/audit_leakage.py            # full audit, < 5 min on 2 CPU cores
    python scripts/audit_leakage.py --quick    # acceptance settings only, < 60 s
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from sgs_flower.audit import canary, experiment, report


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="acceptance settings, untrained model only"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/audit"), help="directory for PNG and table"
    )
    parser.add_argument(
        "--iterations", type=int, default=None, help="attack iterations (default 150/200)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest for these tiny kernels)"
    )
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=UserWarning)
    t0 = time.perf_counter()
    rows = experiment.run_audit(quick=args.quick, iterations=args.iterations, seed=args.seed)
    audits = [canary.run_canary_audit(seed=args.seed)]
    if not args.quick:
        audits.append(canary.run_canary_audit(epsilon=2.0, seed=args.seed))
        audits.append(canary.run_canary_audit(epsilon=2.0, remove_noise=True, seed=args.seed))
        audits.append(canary.run_canary_audit(remove_noise=True, seed=args.seed))

    args.out.mkdir(parents=True, exist_ok=True)
    by_key = {r.setting.key: r for r in experiment.worst_cases(rows)}
    plain, prot = by_key["plain_b1"], by_key["protected_n10"]
    report.grid(rows, sorted(plain.shown)[:16], args.out / "audit_leakage.png")
    text = (
        "### Gradient inversion, worst case over models and attacks\n\n"
        + report.table(rows)
        + "\n\n### Canary audit of DP runs (delta = 1e-5)\n\n"
        + report.canary_table(audits)
        + "\n"
    )
    (args.out / "audit_leakage.md").write_text(text)
    print(text)
    result: dict[str, object] = {
        "psnr_plain": round(plain.scores.psnr, 2),
        "psnr_protected": round(prot.scores.psnr, 2),
        "psnr_baseline": round(plain.baseline.psnr, 2),
        "ident_plain": round(plain.scores.ident, 3),
        "ident_protected": round(prot.scores.ident, 3),
        "labels_plain": round(plain.scores.label_acc, 3),
        **report.summary(rows),
        "canary": [a.as_dict() for a in audits],
        "png": str(args.out / "audit_leakage.png"),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
