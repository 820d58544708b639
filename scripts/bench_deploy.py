"""Benchmark: plain FedAvg vs the secure preset on a real local deployment, one run.

Both runs use ``sgs-flower deploy local`` (TLS, SuperNode authentication, one Ed25519
identity per site and a pinned roster; 3 SuperNodes by default), one after the other
in this process, so they see the same machine. Printed: each round's seconds, and
for secure rounds the number of server-client exchanges and the seconds of each
(from the results file's round reports); then the steady-state seconds per round
(rounds 2..N: round 1 of the secure run pays the full key setup, later rounds are
pipelined) and their ratio. The last line is one JSON object.

Usage: python scripts/bench_deploy.py [--supernodes 3] [--rounds 4] [--secure-preset secagg] [--groups-off]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sgs_flower.deploy.cli import add_local_arguments, round_lines, run_local


def one(preset: str, supernodes: int, rounds: int, workdir: Path, extra: str = "") -> dict:
    ap = argparse.ArgumentParser()
    add_local_arguments(ap)
    args = ap.parse_args(["--supernodes", str(supernodes), "--workdir", str(workdir),
                          "--run-config", f'preset="{preset}" num-server-rounds={rounds} {extra}'.strip()])
    if run_local(args) != 0:
        raise SystemExit(f"{preset}: the deployment run failed; see {workdir}")
    summary = json.loads((workdir / "summary.json").read_text())
    return dict(json.loads(Path(summary["results_file"]).read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--supernodes", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--secure-preset", default="secagg")
    ap.add_argument("--groups-off", action="store_true",
                    help="also run the secure preset with whole-group participation off (min-group=0 on both sides: "
                         "the round time before issue 29 made groups the default)")
    args = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="sgs-bench-deploy-"))
    out: dict = {"supernodes": args.supernodes, "rounds": args.rounds}
    runs = [("plain", "plain", ""), ("secure", args.secure_preset, "")]
    if args.groups_off:
        runs.append(("secure_nogroups", args.secure_preset, "min-group=0"))
    for label, preset, extra in runs:
        res = one(preset, args.supernodes, args.rounds, base / label, extra)
        secs = list(res["round_seconds"])
        steady = sum(secs[1:]) / max(len(secs) - 1, 1)
        out[label] = {"preset": preset, "round_seconds": secs, "steady_seconds": steady,
                      "exchanges": [r.get("exchanges") for r in res.get("rounds", [])],
                      "accuracy": res.get("final_accuracy")}
        print(f"--- {label} ({preset})", file=sys.stderr)
        for line in round_lines(res):
            print(line, file=sys.stderr)
    ratio = out["secure"]["steady_seconds"] / out["plain"]["steady_seconds"]
    out["ratio"] = ratio
    print(f"steady state (rounds 2-{args.rounds}): plain {out['plain']['steady_seconds']:.1f} s, "
          f"{out['secure']['preset']} {out['secure']['steady_seconds']:.1f} s per round: {ratio:.2f}x", file=sys.stderr)
    if args.groups_off:
        off = out["secure_nogroups"]["steady_seconds"]
        out["groups_over_no_groups"] = out["secure"]["steady_seconds"] / off
        print(f"whole-group participation (the default) over groups off: {out['groups_over_no_groups']:.3f}x "
              f"({out['secure']['steady_seconds']:.1f} vs {off:.1f} s per round)", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
