"""The README's main command: ``flwr run .`` with the default secure preset on 10
simulated SuperNodes reaches at least 90 % held-out accuracy, and nothing it started
is left running (scripts/app_results.py stops the managed SuperLink)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_default_flwr_run_reaches_90_percent(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "app_results.py"), "--presets", "secagg", "--keep", str(tmp_path)],
        capture_output=True, text=True, timeout=1500,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])["secagg"]
    assert row["rounds"] == 10
    assert row["accuracy"] >= 0.90
    report = json.loads((tmp_path / "secagg.json").read_text())
    assert all(r["status"] == "ok" and len(r["survivors"]) == 10 for r in report["rounds"])
    # the managed SuperLink lives under app_results' own FLWR_HOME (/tmp/sgs-app-*)
    left = subprocess.run(["pgrep", "-f", "sgs-app-.*flwr-home"], capture_output=True, text=True).stdout.split()
    assert not left
