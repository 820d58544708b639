"""Acceptance of the leakage audit: the attack works on plaintext, protection closes it.

Runs ``scripts/audit_leakage.py --quick`` (under 60 s) and checks its JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sgs_flower import digits as task
from sgs_flower.audit.inversion import AttackConfig, invert, recover_labels
from sgs_flower.audit.observe import Observation, client_update, secure_mean

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    out = tmp_path_factory.mktemp("audit")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "audit_leakage.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result["png"]).is_file()
    # its speed (under a minute on a quiet 2-core machine) is a benchmark figure, not asserted here
    return result


def test_attack_reconstructs_plaintext_single_image_updates(quick: dict[str, float]) -> None:
    assert quick["ident_plain"] >= 0.5
    assert quick["psnr_plain"] >= quick["psnr_baseline"] + 10
    assert quick["labels_plain"] == 1.0


def test_default_protection_closes_it(quick: dict[str, float]) -> None:
    assert quick["ident_protected"] <= 0.05
    assert quick["psnr_protected"] <= quick["psnr_baseline"] + 1


def test_dp_alone_at_epsilon_8_closes_it(quick: dict[str, float]) -> None:
    assert quick["ident_dp_eps8_b1"] <= 0.05
    assert quick["psnr_dp_eps8_b1"] <= quick["psnr_baseline"] + 1


def test_small_secure_cohort_still_leaks(quick: dict[str, float]) -> None:
    """Secure aggregation alone: the sum of 10 one-image clients is still invertible."""
    assert quick["ident_secagg_n10"] > 0.2


def test_idlg_label_recovery_and_secure_mean() -> None:
    torch.manual_seed(0)
    net = task.Net()
    w = task.get_weights(net)
    x, y = task.load_digits_arrays()
    params = {n: p.detach() for n, p in net.named_parameters()}
    for i in range(10):
        upd = client_update(w, x[i : i + 1], y[i : i + 1], epochs=1, lr=0.1, batch_size=1)
        assert recover_labels(upd, params, 1)[0] == y[i]
    ups = [np.full(5, 1.0), np.full(5, 3.0), np.full(5, 5.0)]
    np.testing.assert_allclose(secure_mean(ups), 3.0, atol=1e-6)


def test_unrolled_attack_inverts_multi_step_updates() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = task.Net()
    w = task.get_weights(net)
    x, y = task.load_digits_arrays()
    obs = [
        Observation(
            client_update(w, x[i : i + 1], y[i : i + 1], epochs=3, lr=0.1, batch_size=1),
            1,
            3,
            0.1,
            0.9,
            1,
        )
        for i in range(4)
    ]
    rec, _ = invert(net, w, obs, AttackConfig(iterations=150, mode="unrolled"))
    mse = ((rec[:, 0] - x[:4]) ** 2).mean()
    assert mse < 0.01
