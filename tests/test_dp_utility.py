"""The DP utility study runs end to end (``--quick``) with the real pipeline and its
numbers are sane.

``--quick`` is 100 clients (all in every round), 5 rounds, seed 0, every mode at
epsilon 8 (delta 1e-5). It reaches the acceptance thresholds of the full study
(central DP >= 70 %, distributed DP within 3 points of it) at seed 0, but 5 rounds
are noisier than the full 20: over seeds 0-3, central DP reached 84-87 % and the
distributed - central gap ranged from -4.2 to +1.6 points (docs/dp_utility.md). So
the gap is asserted within 5 points here; the 3-point claim belongs to the full run
(20 rounds, 3 seeds) that the README reports.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "dp_utility.py"


@pytest.mark.study  # a study, ~1 min
@pytest.mark.timeout(150)
def test_quick_study_reports_matched_epsilon_and_sane_accuracy():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True,
                          cwd=ROOT, timeout=140, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.strip().splitlines()
    out = json.loads(lines[-1])

    for key in ("acc_none", "acc_sample", "acc_central", "acc_distributed", "epsilon", "epsilon_sample",
                "epsilon_central", "epsilon_distributed", "epsilon_server_distributed", "delta"):
        assert key in out, key
    assert out["population"] >= 100 and out["cohort"] == out["population"]
    assert out["delta"] == 1e-5

    # matched epsilon: every DP mode spent at most 8 (and calibration used most of it)
    assert out["epsilon"] == max(out["epsilon_central"], out["epsilon_distributed"])
    for key in ("epsilon_central", "epsilon_distributed", "epsilon_sample"):
        assert 7.0 <= out[key] <= 8.0, (key, out[key])
    # against the server: central DP gives nothing (it saw the noiseless sum),
    # distributed DP a finite epsilon
    assert out["epsilon_server_central"] is None
    assert math.isfinite(out["epsilon_server_distributed"]) and out["epsilon_server_distributed"] > 0

    # accuracies: chance is 10 %
    assert out["acc_none"] >= 0.85
    assert out["acc_central"] >= 0.70
    assert out["acc_distributed"] >= 0.70
    assert abs(out["acc_distributed"] - out["acc_central"]) <= 0.05
    assert out["acc_sample"] >= 0.5
    assert out["acc_none"] >= max(out["acc_central"], out["acc_distributed"]) - 0.02

    # the Markdown table is printed with one row per mode
    text = proc.stdout
    for mode in ("| none |", "| sample-dp |", "| central-dp |", "| distributed-dp |"):
        assert mode in text
