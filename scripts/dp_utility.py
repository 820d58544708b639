"""Utility of the four privacy modes on federated digits, at matched epsilon.

An in-process federated loop over ``--population`` simulated clients (default 100,
~14 training digits each) through the project's real pipeline: local SGD, encoding,
the real SecAgg+ protocol every round, central/distributed DP release and accounting,
and Opacus DP-SGD for sample-level DP. The study lives in :mod:`sgs_flower.dp_utility`
(what runs and why); this script parses flags and prints. See docs/dp_utility.md.

    python scripts/dp_utility.py            # full study, 3 seeds (~3-4 min on 2 CPU cores)
    python scripts/dp_utility.py --quick    # 5 rounds, one seed, < 60 s

Prints a Markdown table and, as the last line, one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgs_flower.dp_utility import MODES, Study, Summary, result_of, run_mode, summarize, table


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="5 rounds, one seed: < 60 s")
    parser.add_argument("--population", type=int, default=None, help="simulated clients (default 100)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 20, --quick 5)")
    parser.add_argument("--tail", type=int, default=None,
                        help="average the global models of the last TAIL rounds (default rounds // 2)")
    parser.add_argument("--epsilon", type=float, default=8.0, help="target epsilon of every DP mode")
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {MODES}")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; --quick 0)")
    parser.add_argument("--ledger-dir", type=Path, default=None, help="write the DP ledgers here")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest here)")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s) {sorted(unknown)}; choose from {MODES}")
    seeds = [int(x) for x in (args.seeds or ("0" if args.quick else "0,1,2")).split(",") if x.strip()]
    study = Study(target_epsilon=args.epsilon, delta=args.delta)
    if args.quick:
        study = replace(study, rounds=5)
    if args.population is not None:
        study = replace(study, population=args.population)
    if args.rounds is not None:
        study = replace(study, rounds=args.rounds)
    study = replace(study, tail=max(1, min(study.rounds, args.tail or study.rounds // 2)))
    if args.ledger_dir is not None:
        args.ledger_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    summaries: list[Summary] = []
    for mode in modes:
        rows = []
        for seed in seeds:
            row = run_mode(mode, replace(study, seed=seed), args.ledger_dir)
            rows.append(row)
            print(f"{mode} seed {seed}: accuracy {row.accuracy:.4f} (tail average), per round {row.curve}, "
                  f"{row.seconds:.1f} s", file=sys.stderr, flush=True)
        summaries.append(summarize(mode, rows, study))

    print(f"Digits, {study.population} clients (all in every round), {study.rounds} rounds, model = mean of "
          f"the last {study.tail} global models, seeds {seeds}, target epsilon {study.target_epsilon:g} "
          f"at delta {study.delta:g}\n")
    print(table(summaries, study))
    result = result_of(summaries, study, seeds, time.perf_counter() - t0)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
