"""Run the Flower App with ``flwr run`` for each preset and tabulate what came out.

This is how the README's results tables are made. The runs, their labels and what each
writes (results JSON, log, verified DP ledger, model, PNG) are described in
:mod:`sgs_flower.app.results`; this script parses flags and prints the table.

Runs (``--runs``, comma-separated labels; default the DP results table):
``plain-100``, ``central-dp-100``, ``distributed-dp-100`` (100 SuperNodes, the DP
presets' training keys); ``plain-10``, ``secagg-10``, ``sample-dp-10`` (10 SuperNodes,
the sample-dp preset's training keys); or a bare preset (``plain``, ``secagg``,
``central-dp``, ``distributed-dp``, ``sample-dp``) on ``--supernodes`` SuperNodes.

Usage: python scripts/app_results.py [--runs LABELS] [--rounds N] [--quick] [--keep DIR] [--repeat K] [--set KEY=VALUE]
``--quick``: distributed-dp alone at 100 SuperNodes, 6 rounds (tail 3), under a minute.
``--repeat K``: the list K times, interleaved; each row's s/round is the mean over the K
runs, and the sample-dp benchmark lines give the per-run ratios' range. The README's
benchmark line: ``--runs plain-10,secagg-10,sample-dp-10 --repeat 5``.
The last line printed is one JSON object: label -> accuracy, epsilon_consumer,
epsilon_server, supernodes, rounds, seconds (and more).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

# Runnable from a checkout without installing the package (the app copied is this checkout).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgs_flower.app.results import DP_RUNS, run_all, table_lines


def main(argv: list[str] | None = None) -> dict[str, dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", "--presets", dest="runs", default=DP_RUNS, help="comma-separated run labels")
    ap.add_argument("--supernodes", type=int, default=10, help="for runs named by a bare preset")
    ap.add_argument("--rounds", type=int, default=None, help="override every run's num-server-rounds")
    ap.add_argument("--quick", action="store_true", help="distributed-dp alone, 100 SuperNodes, 6 rounds")
    ap.add_argument("--keep", type=Path, default=None, help="keep logs, results, ledgers and PNGs here")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the list this many times, interleaved; s/round is the mean over them")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="KEY=VALUE",
                    help="a run-config key for every run (repeatable; VALUE as JSON, else a string), "
                         "e.g. --set validate=none to time a DP preset without its input validation")
    args = ap.parse_args(argv)
    extra: dict[str, Any] = {}
    for item in args.extra:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--set needs KEY=VALUE, got {item!r}")
        try:
            extra[key] = json.loads(value)
        except json.JSONDecodeError:
            extra[key] = value
    runs, rounds = args.runs, args.rounds
    if args.quick:
        runs, rounds = "distributed-dp-100", rounds or 6
    labels = [r.strip() for r in runs.split(",") if r.strip()]
    rows, failed = run_all(labels, args.supernodes, rounds, args.keep, args.repeat, extra)
    for line in table_lines(rows):
        print(line)
    print(json.dumps(rows))
    if failed:
        raise SystemExit(f"runs failed: {failed}")
    return rows


if __name__ == "__main__":
    main()
