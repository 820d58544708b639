"""Issue 20 on a real local deployment: the model-confidential preset, then ``sgs-flower unmask``.

A real ``flower-superlink`` (TLS, SuperNode authentication) and three real
``flower-supernode`` processes on 127.0.0.1, every site with its own Ed25519 identity
pinning the roster (``sgs_flower.deploy.identities.roster_setup``), the sgs-flower app
submitted with ``flwr run``. The confidential run trains 2 rounds; the server saves
only the masked model; a site's model-key file (beside its state file) unmasks it with
the ``sgs-flower unmask`` command. The same deployment then runs the plain preset with
the same seeds: the unmasked model must be that run's model (FedAvg), within the
quantization bound carried through local training, and reach its held-out accuracy.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sgs_flower.deploy import LocalDeployment, pids_with_marker
from sgs_flower.deploy.identities import roster_setup

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]
N_NODES = 3
TRAIN: dict[str, Any] = {"local-epochs": 1, "lr": 0.05, "batch-size": 32, "seed": 0, "num-server-rounds": 2,
                         "stage-timeout": 300.0}


def _accuracy(model: dict[str, np.ndarray]) -> float:
    from sgs_flower.digits import evaluate, make_model, set_weights, train_test_split

    net = make_model("cnn")
    set_weights(net, list(model.values()))
    return float(evaluate(net, train_test_split()[1])[1])


def test_confidential_preset_on_a_deployment_and_unmask(tmp_path: Path) -> None:
    setup, roster = roster_setup(tmp_path, N_NODES)
    dep = LocalDeployment(N_NODES, tmp_path, startup_timeout=180, node_setup=setup,
                          node_config_extra={"sgs-require-secagg": False})
    try:
        dep.start()
        conf = dep.run(ROOT, {**TRAIN, "preset": "confidential"}, timeout=900)
        assert conf.ok, conf.stdout[-4000:]
        results = json.loads(Path(conf.results_file).read_text())  # type: ignore[arg-type]
        assert results["confidential"] and all(r["status"] == "ok" for r in results["rounds"])
        masked = Path(results["masked_model"])
        with np.load(masked) as f:
            assert set(f.files) == {"sgs.masked-model", "sgs.masked-model.meta"}  # all the server kept
        keys = sorted(tmp_path.rglob("*.model-key.json"))
        assert len(keys) == N_NODES  # one per site, beside its state file
        assert all((k.stat().st_mode & 0o777) == 0o600 for k in keys)
        out = tmp_path / "unmasked.npz"
        proc = subprocess.run([sys.executable, "-m", "sgs_flower.cli", "unmask", str(masked), str(out),
                               "--key", str(keys[0])], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        with np.load(out) as f:
            unmasked = {k: np.asarray(f[k], dtype=np.float64) for k in f.files}
        plain = dep.run(ROOT, {**TRAIN, "preset": "plain"}, timeout=900)
        assert plain.ok, plain.stdout[-4000:]
        with np.load(plain.model_file) as f:  # type: ignore[arg-type]
            reference = {k: np.asarray(f[k], dtype=np.float64) for k in f.files}
    finally:
        dep.stop()
        assert pids_with_marker(dep.marker) == set()
    assert list(unmasked) == list(reference)
    diff = max(float(np.max(np.abs(unmasked[k] - reference[k]))) for k in reference)
    assert diff < 1e-3, diff  # round 1 exact to the bound; local SGD carries it into round 2
    acc, ref_acc = _accuracy(unmasked), _accuracy(reference)
    assert abs(acc - ref_acc) < 0.005 and acc > 0.8, (acc, ref_acc)
    del roster
