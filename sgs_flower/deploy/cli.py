"""``sgs-flower deploy local``: run a Flower app on a local TLS + auth deployment.

The same command line as ``scripts/deploy_local.py`` (a thin driver over this module).
Output: the deployment line, the run line, the result JSON, the ledger check and a
final "all processes stopped" line; ``<workdir>/summary.json`` holds the summary.
Exit code 0 when the run completed (and its ledger, if any, verifies), else 1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import tempfile
import time
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

DESCRIPTION = (
    "Run a Flower app on a real local deployment: TLS, SuperNode authentication, "
    "N SuperNodes (all on 127.0.0.1)."
)


def parse_kv(items: Sequence[str]) -> dict[str, Any]:
    """``k=v`` pairs (TOML values; bare words are strings) from repeated options."""
    out: dict[str, Any] = {}
    for item in items:
        for part in item.split():
            k, _, v = part.partition("=")
            try:
                out[k] = tomllib.loads(f"v = {v}")["v"]
            except tomllib.TOMLDecodeError:
                out[k] = v
    return out


def add_local_arguments(ap: argparse.ArgumentParser) -> None:
    """The options of ``deploy local`` (shared with ``scripts/deploy_local.py``)."""
    ap.add_argument("--app", default=".", help="Flower app directory (default: .)")
    ap.add_argument("--supernodes", type=int, default=3)
    ap.add_argument("--workdir", default=None, help="default: a new /tmp/sgs-deploy-* dir")
    ap.add_argument(
        "--run-config", action="append", default=[], help="k=v pairs (TOML values), may repeat"
    )
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--insecure", action="store_true", help="no TLS (debugging only)")
    ap.add_argument("--no-auth", action="store_true", help="no SuperNode auth (debugging only)")
    ap.add_argument(
        "--no-roster",
        action="store_true",
        help="do not give the sites identity keys and a pinned roster (docs/deployment.md, 2b)",
    )
    ap.add_argument(
        "--keep-running",
        action="store_true",
        help="after the run, keep the deployment up until Ctrl-C",
    )


def round_lines(result: dict[str, Any]) -> list[str]:
    """One line per round: its seconds, and for secure rounds the number of server-client
    exchanges and the seconds of each (issue 13: where a deployment's time goes)."""
    secs = list(result.get("round_seconds") or [])
    reports = list(result.get("rounds") or [])
    lines = []
    for i, t in enumerate(secs):
        line = f"round {i + 1}: {t:.1f} s"
        if i < len(reports):
            rep = reports[i]
            stages = ", ".join(f"{k.lower()} {float(v):.1f}" for k, v in (rep.get("stage_seconds") or {}).items())
            line += f", {rep.get('status')}, {rep.get('exchanges', '?')} exchanges ({stages})"
        lines.append(line)
    return lines


def run_local(args: argparse.Namespace) -> int:
    """Start the deployment, run the app once, print the results, stop everything."""
    from sgs_flower.deploy.local import LocalDeployment
    from sgs_flower.deploy.runs import verify_ledger

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="sgs-deploy-"))

    def _sigterm(_sig: int, _frm: Any) -> None:
        raise SystemExit(143)

    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGHUP, _sigterm)
    t0 = time.monotonic()
    run_config = parse_kv(args.run_config)
    extra: dict[str, Any] = {}
    notes: list[str] = []
    if run_config.get("preset") == "plain" or run_config.get("secure-aggregation") is False:
        # the sites' own opt-in: the mod refuses plain train messages by default
        extra["sgs-require-secagg"] = False
        notes.append("plain run: the sites opt in to plain rounds (sgs-require-secagg=false)")
    if run_config.get("min-group") == 0:  # the sites' own opt-out, as the server's (this tool plays both)
        extra["sgs-min-group"] = 0
        notes.append("whole-group participation off: the sites set sgs-min-group=0")
    setup, roster = None, None
    if not args.no_roster:
        from sgs_flower.deploy.identities import roster_setup

        setup, roster = roster_setup(workdir, args.supernodes)
        from sgs_flower.deploy.runs import app_config

        if "roster" in app_config(Path(args.app)):  # an app that takes it (ours): the server's groups are the roster's
            run_config.setdefault("roster", str(roster))
    with LocalDeployment(
        args.supernodes, workdir, tls=not args.insecure, supernode_auth=not args.no_auth,
        node_config_extra=extra, node_setup=setup,
    ) as dep:
        print(
            f"SuperLink {dep.address} (TLS={dep.tls}, auth={dep.supernode_auth}), "
            f"{args.supernodes} SuperNodes online after {time.monotonic() - t0:.1f}s; "
            f"workdir {workdir}",
            flush=True,
        )
        for note in notes:
            print(note, flush=True)
        if roster is not None:
            print(f"secure-aggregation identities: one Ed25519 key per site, roster {roster}", flush=True)
        res = dep.run(args.app, run_config, timeout=args.timeout)
        print(
            f"run {res.run_id}: status={res.status} rc={res.returncode} "
            f"in {res.duration_s:.1f}s; logs in {dep.log_dir}",
            flush=True,
        )
        if res.result is not None:
            print(json.dumps(res.result, indent=2))
            for line in round_lines(res.result):
                print(line, flush=True)
        ledger_ok: bool | None = None
        if res.ledger_path is not None and res.ledger_path.exists():
            ledger_ok, msg = verify_ledger(res.ledger_path)
            print(f"ledger {res.ledger_path}: {msg}", flush=True)
        summary = {
            "run_id": res.run_id,
            "status": res.status,
            "returncode": res.returncode,
            "duration_s": round(res.duration_s, 2),
            "output_dir": str(res.output_dir) if res.output_dir else None,
            "results_file": str(res.results_file) if res.results_file else None,
            "model_file": str(res.model_file) if res.model_file else None,
            "ledger": str(res.ledger_path) if res.ledger_path else None,
            "ledger_ok": ledger_ok,
            "workdir": str(workdir),
        }
        (workdir / "summary.json").write_text(json.dumps(summary, indent=2))
        if args.keep_running:
            print("deployment up; Ctrl-C to stop", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(1)
    print(f"all processes stopped ({time.monotonic() - t0:.1f}s total)")
    return 0 if res.ok and ledger_ok is not False else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m sgs_flower.deploy.cli``, the script)."""
    ap = argparse.ArgumentParser(description=DESCRIPTION)
    add_local_arguments(ap)
    return run_local(ap.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

