"""Benchmark of the global consistency quorum (issue 30, point 3), measured in one run.

For n = 100, 1,000 and 10,000 signers (every cohort member signs), per site:

- ``ed25519_site_seconds``: what a site paid before (protocol /5): verify
  q = floor(2n/3) + 1 Ed25519 signatures on the survivor-set statement, the same
  ``identity.verify`` calls ``_check_global_quorum`` made;
- ``bls_site_seconds``: what it pays now: the real ``AwaitingUnmask._check_global_quorum``
  on an aggregate of all n signers (signer-list checks, parsing the 96-byte aggregate,
  looking its keys up in the process's verified-key cache, one ``FastAggregateVerify``),
  with the roster's key tuple a fresh object as a deployed site decodes it (so the
  table is rebuilt from the cache, not taken from the in-process memo);
  ``bls_fast_aggregate_verify_seconds`` is the pairing check alone;
- ``bls_key_check_seconds_per_key``: what a site pays once per peer key (per run):
  the Ed25519 binding and the proof of possession (measured over up to 300 keys), and
  ``bls_key_check_seconds_all`` that times n (the first round a site sees those keys);

and on the server, ``server_aggregate_seconds``: ``SecAggServer._aggregate`` over the n
replies (parse each signature with its subgroup check, add them, one aggregate check).

Usage: python scripts/bench_quorum.py [--sizes 100,1000,10000]. The last line printed is
one JSON object. Each figure is the best of a few runs (one run for the server at
10,000); the machine is shared, so treat them as +-20 %.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgs_flower.secagg import bls, identity, keys
from sgs_flower.secagg.client import AwaitingUnmask, _RoundSecrets
from sgs_flower.secagg.graph import consistency_quorum, default_degree, default_threshold
from sgs_flower.secagg.server import RoundParams, SecAggServer
from sgs_flower.secagg.wire import ConsistencySignature, Setup, UnmaskRequest

RUN, ROUND = 1, 1


def best(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(n: int) -> dict[str, float]:
    ids = tuple(range(1, n + 1))
    q = consistency_quorum(n)
    idents = {u: identity.generate_identity() for u in ids}
    publics = {u: identity.identity_public(idents[u]) for u in ids}
    degree = default_degree(n)
    setup = Setup(run_id=RUN, round_id=ROUND, recipient=1, cohort=ids, degree=degree,
                  threshold=default_threshold(degree), field_bits=32, vector_length=8)
    share_context = keys.round_context(setup.version, RUN, ROUND, ids, degree, setup.threshold, 32, 8,
                                       b"seed", b"", "global")
    statement = keys.consistency_statement(share_context, ids)

    # today's check (/5): q Ed25519 verifications
    ed_sigs = {u: identity.sign(idents[u], statement) for u in ids}
    signers_q = ids[:q]

    def ed25519_check() -> None:
        for u in signers_q:
            if not identity.verify(publics[u], ed_sigs[u], statement):
                raise AssertionError
    ed = best(ed25519_check, 3)

    # each site's BLS key for the run, advertised with its PoP and binding
    secrets = {u: bls.run_secret(idents[u], RUN) for u in ids}
    entries = {u: bls.entry(*bls.advertisement(idents[u], RUN, secrets[u])) for u in ids}
    bls_sigs = {u: bls.sign(secrets[u], statement) for u in ids}

    # once per peer key: binding + PoP (cold cache)
    bls.clear_cache()
    sample = ids[: min(n, 300)]
    t = time.perf_counter()
    for u in sample:
        bls.bound_key(publics[u], RUN, entries[u], u)
    per_key = (time.perf_counter() - t) / len(sample)
    for u in ids:  # the rest of the cohort's keys, checked and cached (not timed)
        bls.bound_key(publics[u], RUN, entries[u], u)

    # the server: aggregate the n replies (its keys checked at collect_keys)
    server = SecAggServer(RoundParams(run_id=RUN, round_id=ROUND, cohort=ids, vector_length=8))
    server._bls_table = {u: bls.bound_key(publics[u], RUN, entries[u], u) for u in ids}
    replies = {u: ConsistencySignature(run_id=RUN, round_id=ROUND, sender=u, signature=bls_sigs[u]) for u in ids}
    server_seconds = []
    for _ in range(1 if n >= 10_000 else 3):
        signers, aggregate = server._aggregate(replies, statement)
        server_seconds.append(server.aggregate_seconds)
    assert signers == ids

    # the site: the real check, with a freshly decoded roster tuple each time
    request = UnmaskRequest(run_id=RUN, round_id=ROUND, recipient=1, survivors=ids, aggregate=aggregate,
                            signers=signers)
    table = dict(zip(ids, (publics[u] for u in ids), strict=True))
    members = frozenset(ids)
    sec = _RoundSecrets(setup=setup, seed=b"seed", share_context=share_context, neighbours=frozenset(),
                        c_sk=b"", s_sk=b"", b_u=b"", bls_sk=secrets[1])

    def bls_check() -> None:
        roster_entries = tuple((u, bytes(entries[u])) for u in ids)  # as decoded from the wire
        st = AwaitingUnmask(1, sec, {}, table, {}, ids, b"", False, roster_entries)
        st._check_global_quorum(request, statement, members)
    site = best(bls_check, 3)
    pks = [server._bls_table[u] for u in ids]
    agg = bls.parse_signature(aggregate, "aggregate")
    fav = best(lambda: bls.fast_aggregate_verify(pks, statement, agg), 5)
    return {
        "n": n, "quorum": q,
        "ed25519_site_seconds": ed,
        "bls_site_seconds": site,
        "bls_fast_aggregate_verify_seconds": fav,
        "bls_key_check_seconds_per_key": per_key,
        "bls_key_check_seconds_all": per_key * n,
        "server_aggregate_seconds": min(server_seconds),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="100,1000,10000")
    args = ap.parse_args()
    rows = [measure(int(s)) for s in args.sizes.split(",")]
    print(f"{'n':>7} {'quorum':>7} {'Ed25519/site':>13} {'BLS/site':>10} {'(FAV alone)':>12} "
          f"{'server agg':>11} {'key check once/peer':>20}")
    for r in rows:
        print(f"{r['n']:>7} {r['quorum']:>7} {r['ed25519_site_seconds'] * 1e3:>10.1f} ms "
              f"{r['bls_site_seconds'] * 1e3:>7.1f} ms {r['bls_fast_aggregate_verify_seconds'] * 1e3:>9.1f} ms "
              f"{r['server_aggregate_seconds'] * 1e3:>8.0f} ms "
              f"{r['bls_key_check_seconds_per_key'] * 1e3:>6.2f} ms x n = {r['bls_key_check_seconds_all']:.1f} s")
    print(json.dumps({"quorum": rows}))


if __name__ == "__main__":
    main()
