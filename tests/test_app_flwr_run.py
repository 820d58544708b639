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


@pytest.mark.slow
def test_an_all_aborting_flwr_run_fails_naming_the_cause(tmp_path):
    """Every client's num-examples is above max-weight, so every site refuses to encode
    and every round aborts: after 3 in a row the ServerApp raises, and Flower records
    the run as failed with our message. (``flwr run --stream`` itself exits 0 whatever
    the run's status in flwr 1.41; the run's status is where a user, or a script,
    sees it: ``flwr ls``.) No results file claims a finished training."""
    from sgs_flower.app.results import run_once

    results = tmp_path / "r.json"
    cfg = {"preset": "secagg", "max-weight": 10, "num-server-rounds": 5, "results-file": str(results),
           "model-file": "", "ledger": ""}
    proc, runs = run_once(tmp_path, 5, cfg)
    log = proc.stdout + proc.stderr
    assert [r["status"] for r in runs] == ["finished:failed"], runs
    details = runs[0]["status-details"]
    assert "3 secure rounds in a row aborted (max_consecutive_aborts=3)" in details
    assert "no survivor's update could be used (5 x weight outside 1..max_weight" in details  # the cause, in one line
    assert "SecureAggregationFailed" in log
    assert not results.exists()


@pytest.mark.slow
def test_the_neighbourhood_quorum_runs_where_the_sites_opted_in_and_fails_loudly_where_not(tmp_path):
    """run-config ``consistency="neighbourhood"`` through ``flwr run``: sites that opted in
    (``sgs-consistency=neighbourhood``) train with it; default sites refuse its setup, and
    the run fails naming the refusal (no results file claims a training)."""
    from sgs_flower.app.results import run_once

    for opted_in in (True, False):
        work = tmp_path / ("in" if opted_in else "out")
        work.mkdir()
        results = work / "r.json"
        cfg = {"preset": "secagg", "consistency": "neighbourhood", "num-server-rounds": 3,
               "results-file": str(results), "model-file": "", "ledger": ""}
        site = "sgs-consistency=neighbourhood" if opted_in else ""
        proc, runs = run_once(work, 5, cfg, site_config=site)
        if opted_in:
            assert [r["status"] for r in runs] == ["finished:completed"], (runs, proc.stderr[-2000:])
            report = json.loads(results.read_text())
            assert [r["status"] for r in report["rounds"]] == ["ok"] * 3
            assert report["accuracy"]["3"] > report["accuracy"]["0"] + 0.3  # it trained
        else:
            assert [r["status"] for r in runs] == ["finished:failed"], runs
            assert "PolicyError: round asks for the neighbourhood consistency quorum" in runs[0]["status-details"]
            assert not results.exists()
