"""Run the Flower App with ``flwr run`` for each preset and tabulate what came out.

This is how the README's results table is made: a copy of the app in a temporary
folder (``flwr run`` rewrites a legacy ``[tool.flwr.federations]`` section of the app's
pyproject.toml, so the checkout is never touched), ``FLWR_HOME`` pointing into that
folder, one managed local simulation SuperLink for all presets, and every process that
``flwr run`` left behind (the detached SuperLink) stopped at the end, also on failure.

Usage: python scripts/app_results.py [--presets plain,secagg,...] [--supernodes 10]
       [--rounds 10] [--quick] [--keep DIR]
The last line printed is one JSON object (preset -> accuracy, epsilon, round seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
APP_PARTS = ["pyproject.toml", "README.md", "sgs_flower", "strategies", "clients", "configs"]


def copy_app(dst: Path) -> Path:
    app = dst / "app"
    app.mkdir(parents=True)
    for part in APP_PARTS:
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, app / part, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
        elif src.exists():
            shutil.copy2(src, app / part)
    return app


def processes_using(marker: str) -> list[int]:
    """PIDs whose command line or environment mentions ``marker`` (our FLWR_HOME)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker.encode() in blob:
            pids.append(int(entry.name))
    return pids


def stop_all(marker: str) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = processes_using(marker)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        if not pids:
            return
        time.sleep(2.0)


def run_preset(app: Path, home: Path, preset: str, supernodes: int, rounds: int, out_dir: Path) -> dict:
    results = out_dir / f"{preset}.json"
    ledger = out_dir / f"{preset}-ledger.jsonl"
    ledger.unlink(missing_ok=True)
    run_config = f'preset="{preset}" num-server-rounds={rounds} results-file="{results}" ledger="{ledger if preset.endswith("-dp") and preset != "sample-dp" else ""}"'
    cmd = ["flwr", "run", str(app), "--stream", "--federation-config", f"num-supernodes={supernodes}",
           "--run-config", run_config]
    env = {**os.environ, "FLWR_HOME": str(home)}
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    (out_dir / f"{preset}.log").write_text(proc.stdout + proc.stderr)
    if not results.exists():
        raise RuntimeError(f"preset {preset}: no results (exit {proc.returncode}); see {out_dir / (preset + '.log')}")
    data = json.loads(results.read_text())
    acc = data["accuracy"]
    secs = data["round_seconds"]
    row = {
        "preset": preset,
        "rounds": len(secs),
        "accuracy": acc[str(max(int(k) for k in acc))],
        "epsilon_consumer": data.get("epsilon", {}).get("consumer"),
        "epsilon_server": data.get("epsilon", {}).get("server"),
        "delta": data.get("epsilon", {}).get("delta"),
        # round 1 includes starting the simulation backend; report the steady state
        "round_seconds": sum(secs[1:]) / max(len(secs) - 1, 1),
        "wall_seconds": time.monotonic() - t0,
        "stopped": data.get("stopped", ""),
    }
    if preset == "sample-dp":
        eps = [m.get("dp-epsilon") for m in data["train_metrics"].values() if "dp-epsilon" in m]
        row["epsilon_consumer"] = eps[-1] if eps else None  # mean client epsilon (per example)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="plain,secagg,central-dp,distributed-dp,sample-dp")
    ap.add_argument("--supernodes", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="3 rounds")
    ap.add_argument("--keep", type=Path, default=None, help="keep logs and results here")
    args = ap.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    work = Path(tempfile.mkdtemp(prefix="sgs-app-"))
    out_dir = args.keep or work / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    home = work / "flwr-home"
    rows = []
    try:
        app = copy_app(work)
        for preset in args.presets.split(","):
            row = run_preset(app, home, preset, args.supernodes, rounds, out_dir)
            rows.append(row)
            print(f"{preset}: accuracy {row['accuracy']:.4f}, epsilon {row['epsilon_consumer']}, "
                  f"{row['round_seconds']:.2f} s/round", file=sys.stderr)
    finally:
        stop_all(str(home))
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print("| preset | rounds | accuracy | epsilon (consumers) | epsilon (server) | delta | s/round |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        def f(x: object) -> str:
            return "-" if x is None else (f"{x:.3g}" if isinstance(x, float) else str(x))
        print(f"| {r['preset']} | {r['rounds']} | {r['accuracy']:.4f} | {f(r['epsilon_consumer'])} | "
              f"{f(r['epsilon_server'])} | {f(r['delta'])} | {r['round_seconds']:.2f} |")
    print(json.dumps({r["preset"]: r for r in rows}))
    return rows


if __name__ == "__main__":
    main()
