"""Benchmark: a model-confidential round against a ``secagg`` round, in one Flower simulation run.

One ``run_simulation`` per cohort size n (default 10 and 50 SuperNodes, the app's digits
CNN and its real training: ``sgs_flower.app.client_app``). Inside the one ServerApp the
two strategies take turns on the same SuperNodes: ``SecAggStrategy(FedAvg)`` (the
``secagg`` preset's protocol) for R rounds, the same with ``confidential=True`` for R
rounds, and again (each ``start`` numbering its rounds after the last one's), so drift in the machine's load hits both alike. A Grid proxy counts
the bytes of every reply (protocol payloads, masked vectors, model-key messages) and
the wall time of each round is the strategy's own ``RoundReport.seconds``.

Printed per n: mean seconds of a secure round (rounds after each start's first, which
sets up in full: 5 exchanges; the others are pipelined: 3), the confidential/secagg
ratio, the upload per client per round and its ratio (the model-key phase, once per
run, is counted in the confidential rounds' bytes), and the first rounds apart. The
last line is one JSON object.

Usage: python scripts/bench_confidential.py [--sizes 10,50] [--rounds 4] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _reply_bytes(msg: Any) -> int:
    if msg.has_error():
        return len(msg.error.reason or "")
    n = 0
    for rec in msg.content.config_records.values():
        for v in rec.values():
            if isinstance(v, bytes):
                n += len(v)
            elif isinstance(v, list):
                n += sum(len(x) if isinstance(x, bytes | str) else 8 for x in v)
            elif isinstance(v, str):
                n += len(v)
            else:
                n += 8
    for rec in msg.content.array_records.values():
        n += sum(len(a.data) for a in rec.values())
    return n


def run_size(n: int, rounds: int, repeats: int) -> dict[str, Any]:
    import os
    import tempfile

    from flwr.app import ArrayRecord, ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from sgs_flower.app import client_app
    from sgs_flower.digits import make_model
    from strategies import SecAggConfig, SecAggStrategy

    out: dict[str, Any] = {"secagg": [], "confidential": [], "bytes": {"secagg": 0, "confidential": 0},
                           "replies_rounds": {"secagg": 0, "confidential": 0}, "first": {"secagg": [], "confidential": []}}

    class CountingGrid(Grid):
        def __init__(self, grid: Grid) -> None:
            self.grid, self.count = grid, 0

        @property
        def run(self):  # type: ignore[no-untyped-def,override]
            return self.grid.run

        def set_run(self, run_id: int) -> None:
            self.grid.set_run(run_id)

        def create_message(self, *a: Any, **k: Any):  # type: ignore[no-untyped-def]
            return self.grid.create_message(*a, **k)

        def get_node_ids(self):  # type: ignore[no-untyped-def]
            return self.grid.get_node_ids()

        def get_nodes(self):  # type: ignore[no-untyped-def]
            return self.grid.get_nodes()

        def push_messages(self, messages):  # type: ignore[no-untyped-def]
            return self.grid.push_messages(messages)

        def pull_messages(self, ids):  # type: ignore[no-untyped-def]
            replies = list(self.grid.pull_messages(ids))
            self.count += sum(_reply_bytes(r) for r in replies)
            return replies

        def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
            return self.pull_messages(self.push_messages(messages))

    def main(grid: Grid, context: Context) -> None:
        g = CountingGrid(grid)
        initial = ArrayRecord(make_model("cnn").state_dict())
        cfg = ConfigRecord({"lr": 0.05, "local-epochs": 2, "batch-size": 16})
        first = 1
        # each strategy continues from its own last model (a site refuses a plaintext model
        # once it has seen the run's masked one: the confidential turns resume the masked model)
        model = {"secagg": initial, "confidential": initial}
        for _ in range(repeats):
            for kind in ("secagg", "confidential"):
                inner = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=n, min_train_nodes=n)
                conf = kind == "confidential"
                st = SecAggStrategy(inner, SecAggConfig(clip_range=4.0 if conf else 1.0, confidential=conf))
                before = g.count
                # rounds numbered on: a site contributes once per (run, round)
                res = st.start(grid=g, initial_arrays=model[kind], num_rounds=rounds, train_config=cfg,
                               first_round=first)
                model[kind] = res.arrays
                first += rounds
                bad = [r for r in st.reports if r.status != "ok"]
                if bad:
                    raise SystemExit(f"{kind} round failed: {bad[0].reason}")
                out["bytes"][kind] += g.count - before
                out["replies_rounds"][kind] += rounds
                out["first"][kind].append(st.reports[0].seconds)
                out[kind].extend(r.seconds for r in st.reports[1:])

    server = ServerApp()
    server.main()(main)
    with tempfile.TemporaryDirectory() as state:
        os.environ["SGS_STATE_DIR"] = state  # the sites' state and model keys: not the user's
        run_simulation(server_app=server, client_app=client_app.app, num_supernodes=n,
                       backend_config={"client_resources": {"num_cpus": 1},
                                       "init_args": {"num_cpus": 2, "logging_level": "error"}})
    mean = {k: sum(out[k]) / len(out[k]) for k in ("secagg", "confidential")}
    upload = {k: out["bytes"][k] / (n * out["replies_rounds"][k]) for k in ("secagg", "confidential")}
    return {
        "n": n, "rounds_each": rounds, "repeats": repeats,
        "secagg_round_s": round(mean["secagg"], 3), "confidential_round_s": round(mean["confidential"], 3),
        "round_ratio": round(mean["confidential"] / mean["secagg"], 3),
        "secagg_first_round_s": round(sum(out["first"]["secagg"]) / repeats, 3),
        "confidential_first_round_s": round(sum(out["first"]["confidential"]) / repeats, 3),
        "secagg_upload_bytes_per_client_round": round(upload["secagg"]),
        "confidential_upload_bytes_per_client_round": round(upload["confidential"]),
        "upload_ratio": round(upload["confidential"] / upload["secagg"], 4),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,50")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="n = 10 only, 3 rounds, once")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    rounds, repeats = args.rounds, args.repeats
    if args.quick:
        sizes, rounds, repeats = [10], 3, 1
    rows = {}
    for n in sizes:
        row = run_size(n, rounds, repeats)
        rows[f"n{n}"] = row
        print(f"n={n}: secagg {row['secagg_round_s']} s/round, confidential {row['confidential_round_s']} s/round "
              f"= {row['round_ratio']}x; upload {row['secagg_upload_bytes_per_client_round']} vs "
              f"{row['confidential_upload_bytes_per_client_round']} B/client/round = {row['upload_ratio']}x", flush=True)
    print(json.dumps(rows))
    return rows


if __name__ == "__main__":
    main()
