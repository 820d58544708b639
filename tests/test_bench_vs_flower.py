"""The Flower head-to-head benchmark runs end to end (``--quick``) and its secure final
models match plain FedAvg. Timing ratios are reported, not asserted."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_vs_flower.py"


@pytest.mark.study  # runs the benchmark script, ~1 min
@pytest.mark.timeout(240)
def test_quick_benchmark_reports_ratios_and_correct_models():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick"], capture_output=True, text=True,
                          cwd=ROOT, timeout=230, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    out = json.loads(last)

    assert (out["n"], out["m"], out["rounds"]) == (5, 200_000, 3)
    for key in ("plain_seconds_per_round", "flower_secaggplus_seconds_per_round", "ours_seconds_per_round",
                "ours_over_plain", "flower_secaggplus_over_plain", "ours_over_flower"):
        assert math.isfinite(out[key]) and out[key] > 0, key
    assert out["ours_over_flower"] == pytest.approx(out["ours_over_plain"] / out["flower_secaggplus_over_plain"])
    assert out["ours_secure_statuses"] == ["ok", "ok", "ok"]

    # Plain FedAvg is exact up to float32 rounding; both secure protocols quantize.
    # Ours: clip_range 1 over 2^24 - 1 levels at n=5 (6e-8 per round) plus float32 rounding;
    # Flower's SecAgg+: range 16 over 2^22 levels on the weighted weights (~1e-5).
    assert out["plain_max_abs_diff_vs_exact"] < 1e-6
    # issue 21: each round's word width is chosen for its stated bound (width_error x range)
    assert out["ours_max_abs_diff_vs_plain"] <= sum(out["ours_error_bounds"]) + 1e-6
    assert out["flower_max_abs_diff_vs_plain"] < 1e-4
    # and the model did move (a bench that aggregated nothing would also "match")
    assert out["plain_max_abs_change"] > 1e-4  # 3 rounds of mean offset -2e-4 at n=5
    assert "ours / plain" in proc.stderr and "Flower SecAgg+ / plain" in proc.stderr
