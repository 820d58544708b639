"""Benchmark: what participation in whole groups costs (issue 29), in-process rounds.

Each round is the real protocol (``SecAggServer`` and ``SecAggClient``s in this process,
every message through its byte encoding) over a cohort of n sites pinned in a roster,
with a random ``dropout`` fraction of them failing before their masked input. It runs
once without groups and once with ``sgs-min-group = G`` (sites' policy and the server's
``groups``), on the same dropouts, and prints per setting:

- updates lost to partial groups: the survivors' inputs left out of the sum because a
  member of their group dropped (the cost in updates; dropouts themselves are lost
  either way), as a fraction of the sites that sent a masked input;
- rounds that completed (a round needs two thirds of the cohort to sign; the members of
  a group left out whole sign too);
- the wall time of a round with groups over the time without (the site's group check
  and the server's filter; the protocol's work is the same).

Usage: python scripts/bench_groups.py [--sizes 30,99] [--groups 3,5] [--dropouts 0.05,0.1] [--rounds 20]
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgs_flower.secagg import identity
from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.errors import ThresholdError
from sgs_flower.secagg.groups import GroupRule
from sgs_flower.secagg.identity import Roster
from sgs_flower.secagg.policy import ClientPolicy
from sgs_flower.secagg.server import RoundParams, SecAggServer
from sgs_flower.secagg.simulate import run_protocol
from sgs_flower.secagg.wire import Stage

M, BITS = 1000, 24


def one_setting(n: int, g: int, dropout: float, rounds: int, seed: int) -> dict[str, float]:
    secrets = {u: identity.generate_identity() for u in range(1, n + 1)}
    roster = Roster(frozenset(identity.identity_public(k) for k in secrets.values()))
    rule = GroupRule(roster.keys, g)
    rng = np.random.default_rng(seed)
    vectors = {u: rng.integers(0, 1 << BITS, M, dtype=np.uint64).astype(np.uint32) for u in secrets}
    lost, sent, ok = {False: 0, True: 0}, {False: 0, True: 0}, {False: 0, True: 0}
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for rnd in range(1, rounds + 1):
        drops = {int(u) for u in rng.choice(n, size=round(dropout * n), replace=False) + 1}
        for grouped in (False, True):
            policy = ClientPolicy(roster=roster, min_group=g if grouped else 0)
            clients = {u: SecAggClient(u, identity=k, policy=policy) for u, k in secrets.items()}
            params = RoundParams(run_id=1, round_id=2 * rnd + grouped, cohort=tuple(sorted(secrets)),
                                 vector_length=M, field_bits=BITS)
            server = SecAggServer(params, groups=rule if grouped else None)
            t0 = time.perf_counter()
            try:
                run_protocol(server, clients, vectors, {Stage.MASKED_INPUT: drops}, wire=True)
                ok[grouped] += 1
            except ThresholdError:
                pass
            seconds[grouped].append(time.perf_counter() - t0)
            sent[grouped] += n - len(drops)
            lost[grouped] += len(server.group_excluded)
    return {
        "n": n, "G": g, "dropout": dropout, "rounds": rounds,
        "lost_to_partial_groups": lost[True] / max(sent[True], 1),
        "rounds_ok_without_groups": ok[False], "rounds_ok_with_groups": ok[True],
        "round_seconds_without": statistics.mean(seconds[False]), "round_seconds_with": statistics.mean(seconds[True]),
        "time_ratio": statistics.mean(seconds[True]) / statistics.mean(seconds[False]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--sizes", default="30,99")
    ap.add_argument("--groups", default="3,5")
    ap.add_argument("--dropouts", default="0.05,0.1")
    ap.add_argument("--rounds", type=int, default=20)
    args = ap.parse_args()
    out = []
    for n in (int(x) for x in args.sizes.split(",")):
        for g in (int(x) for x in args.groups.split(",")):
            for p in (float(x) for x in args.dropouts.split(",")):
                r = one_setting(n, g, p, args.rounds, seed=n * 100 + g)
                out.append(r)
                print(f"n={n} G={g} dropout {p:.0%}: {r['lost_to_partial_groups']:.1%} of the sent updates lost to "
                      f"partial groups; rounds ok {r['rounds_ok_with_groups']}/{args.rounds} with groups, "
                      f"{r['rounds_ok_without_groups']}/{args.rounds} without; round time {r['time_ratio']:.2f}x "
                      f"({r['round_seconds_with']:.3f} vs {r['round_seconds_without']:.3f} s)", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
