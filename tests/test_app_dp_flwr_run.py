"""Distributed DP that learns, through a real Flower simulation (``flwr run``).

The ``--quick`` path of scripts/app_results.py, shortened to 4 rounds: the
distributed-dp preset on 100 SuperNodes (user-level DP needs many clients), every
round a real SecAgg+ round with Skellam shares, here without the preset's input
validation (`--set validate=none`: 400 simulated proofs would cost ~13 CPU minutes; validated
DP rounds through Flower are in test_flower_simulation.py). The released model must be far above
chance (10 %), the spent epsilon within the preset's budget against both the model's
consumers and the server, and the ledger must verify.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sgs_flower.dp.ledger_accounting import verify

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_distributed_dp_at_100_supernodes_learns_within_budget(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "app_results.py"), "--quick", "--rounds", "4", "--keep", str(tmp_path),
         "--set", "validate=none"],
        capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])["distributed-dp-100"]
    assert row["supernodes"] == 100 and row["rounds"] == 4
    assert row["accuracy"] >= 0.6, row  # chance is 0.1
    assert 0 < row["epsilon_consumer"] <= 8.0
    assert 0 < row["epsilon_server"] <= 8.0  # distributed DP: the noise is added before the server sees the sum
    assert row["ledger_verified"] is True
    assert verify(tmp_path / "distributed-dp-100-ledger.jsonl").ok
    report = json.loads((tmp_path / "distributed-dp-100.json").read_text())
    assert all(r["status"] == "ok" and len(r["survivors"]) == 100 for r in report["rounds"])
    assert (tmp_path / "distributed-dp-100.png").stat().st_size > 10_000
    left = subprocess.run(["pgrep", "-f", "sgs-app-.*flwr-home"], capture_output=True, text=True).stdout.split()
    assert not left


@pytest.mark.study  # ~1 min; the budget stop is in CI through Flower simulation
@pytest.mark.slow
def test_a_run_stopped_by_the_budget_saves_the_model_and_says_so(tmp_path):
    """central-dp with its noise calibrated for 6 rounds at epsilon 8 but a budget of
    max-epsilon 4: the server refuses the round that would pass 4 before it runs, the
    run ends (completed, not failed) with the released model saved, a warning naming
    the budget, and a ledger that verifies and stays within the budget."""
    import numpy as np

    from sgs_flower.app.results import run_once

    results, ledger, model = tmp_path / "b.json", tmp_path / "b-ledger.jsonl", tmp_path / "final.npz"
    cfg = {"preset": "central-dp", "num-server-rounds": 6, "tail-rounds": 2, "max-epsilon": 4.0,
           "results-file": str(results), "ledger": str(ledger), "model-file": str(model)}
    proc, runs = run_once(tmp_path, 20, cfg)
    log = proc.stdout + proc.stderr
    assert [r["status"] for r in runs] == ["finished:completed"], (runs, log[-3000:])
    data = json.loads(results.read_text())
    done = len(data["round_seconds"])
    assert 1 <= done < 6, data["stopped"]
    assert "budget" in data["stopped"]
    assert f"training stopped by the privacy budget after round {done} of 6" in log
    assert 0 < data["epsilon"]["consumer"] <= 4.0
    saved = np.load(model)
    assert set(saved.files) and all(np.isfinite(saved[k]).all() for k in saved.files)
    assert verify(ledger).ok
