"""Benchmark: one Flower simulation harness, three aggregations, the same machine and run.

``plain`` (Flower's Message-API FedAvg), ``flower`` (Flower's built-in SecAgg+) and
``ours`` (``SecAggStrategy`` with the ``secagg_mod`` client mod); ``--legacy-plain`` adds
``flower_plain`` (the legacy DefaultWorkflow without SecAgg+). Same cohort, model, Ray
backend and cheap deterministic client for every run; each variant runs in its own
process (this script with ``--worker``). What runs, how it is timed and how the models
are checked: :mod:`sgs_flower.app.bench_flower`, which holds the benchmark.

Usage: python scripts/bench_vs_flower.py [--quick] [--n N] [--m M] [--rounds R] [--groups-off]
Human-readable lines go to stderr; the last line on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgs_flower.app.bench_flower import BACKEND, NO_GROUPS, VARIANTS, compare, run_worker


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small sizes (n=5, m=200,000, 3 rounds): well under 60 s")
    ap.add_argument("--n", type=int, default=None, help="clients (SuperNodes), all sampled every round; default 50")
    ap.add_argument("--m", type=int, default=None, help="model parameters (float32); default 5,000,000")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per run, >= 2; default 3")
    ap.add_argument("--legacy-plain", action="store_true", help="also run the legacy DefaultWorkflow without SecAgg+")
    ap.add_argument("--groups-off", action="store_true",
                    help="also run ours with whole-group participation off (the round time before issue 29)")
    ap.add_argument("--verbose", action="store_true", help="keep Flower's INFO logs")
    ap.add_argument("--profile", metavar="DIR", default=None,
                    help="cProfile the ServerApp and every client mod call of plain/ours into DIR")
    ap.add_argument("--worker", choices=(*VARIANTS, NO_GROUPS, "flower_plain"), help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    n = args.n if args.n is not None else (5 if args.quick else 50)
    m = args.m if args.m is not None else (200_000 if args.quick else 5_000_000)
    rounds = args.rounds if args.rounds is not None else 3
    if rounds < 2:
        ap.error("--rounds must be >= 2 (the marginal round time needs rounds 1 and R)")
    if n < 3:
        ap.error("--n must be >= 3 (secure aggregation refuses smaller cohorts)")
    if m < 1:
        ap.error("--m must be >= 1")
    if args.worker:
        run_worker(args.worker, n, m, rounds, args.out, args.verbose, args.profile)
        return 0

    variants = [*VARIANTS, "flower_plain"] if args.legacy_plain else list(VARIANTS)
    if args.groups_off:
        variants.append(NO_GROUPS)
    if args.profile is not None:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    print(f"bench_vs_flower: n={n} clients, m={m:,} float32 parameters, {rounds} rounds, "
          f"variants {variants}, Ray num_cpus={BACKEND['init_args']['num_cpus']}", file=sys.stderr)
    # the sites' state files and kept deltas (n x m x 4 bytes) go to a folder removed at the end
    with tempfile.TemporaryDirectory(prefix="sgs-bench-sites-") as sites:
        os.environ["SGS_STATE_DIR"] = sites
        out = compare(n, m, rounds, variants, args.verbose, args.profile, Path(__file__).resolve())
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
