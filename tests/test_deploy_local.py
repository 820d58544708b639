"""Real local deployment (sgs_flower.deploy): TLS, SuperNode auth, process hygiene.

These start real ``flower-superlink`` / ``flower-supernode`` processes on 127.0.0.1 and
run the tiny Message-API app in ``tests/fixtures/deploy_tiny_app`` (plain FedAvg) through
``flwr run``. The acceptance tests for the secure app live in
``tests/test_deploy_secure.py`` (they need ``sgs_flower/app``).
"""

from __future__ import annotations

import os
import socket
import ssl
import sys
import time
from pathlib import Path

import pytest

from sgs_flower.deploy import (
    DeploymentError,
    LocalDeployment,
    generate_supernode_keys,
    pid_alive,
    pids_with_marker,
    proc_table,
)

ROOT = Path(__file__).resolve().parents[1]

TINY_APP = ROOT / "tests" / "fixtures" / "deploy_tiny_app"

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _expected_fedavg(n_nodes: int, rounds: int) -> float:
    # node i adds (i + 1) with weight 10 * (i + 1)
    w = [10 * (i + 1) for i in range(n_nodes)]
    return rounds * sum(wi * (i + 1) for i, wi in enumerate(w)) / sum(w)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory):
    """One TLS + auth deployment with 2 SuperNodes shared by the tests of this module."""
    workdir = tmp_path_factory.mktemp("deploy")
    dep = LocalDeployment(2, workdir, startup_timeout=90)
    try:
        dep.start()
        yield dep
    finally:
        dep.stop()
        # nothing may survive stop(), whatever happened in the tests
        assert pids_with_marker(dep.marker) == set()
        assert dep.all_pids() == set()


def test_processes_start_with_tls_and_auth(deployment: LocalDeployment) -> None:
    dep = deployment
    assert dep.superlink is not None and dep.superlink.alive()
    cmd = " ".join(dep.superlink.cmd)
    assert "--enable-supernode-auth" in cmd
    assert "--ssl-certfile" in cmd and "--insecure" not in cmd
    for proc in dep.supernodes.values():
        assert proc.alive()
        assert "--auth-supernode-private-key" in proc.cmd
        assert "--root-certificates" in proc.cmd and "--insecure" not in proc.cmd
    # every registered key is an online node
    assert dep.online_node_ids() == set(dep.node_ids.values())
    # only 127.0.0.1, and the SuperLink speaks TLS with a certificate from our CA
    host, port = dep.address.split(":")
    assert host == "127.0.0.1"
    assert dep.certs is not None
    ctx = ssl.create_default_context(cafile=str(dep.certs.ca_cert))
    with (
        socket.create_connection((host, int(port)), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=host) as tls,
    ):
        assert tls.version() in {"TLSv1.2", "TLSv1.3"}
    # a plaintext HTTP request is not served
    import httpx

    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{dep.address}/health", timeout=3).raise_for_status()


def test_unregistered_supernode_cannot_join(deployment: LocalDeployment) -> None:
    dep = deployment
    before = dep.online_node_ids()
    priv, _pub = generate_supernode_keys(dep.key_dir, "intruder")
    proc = dep.start_supernode(99, private_key=priv, name="intruder", max_retries=1)
    deadline = time.monotonic() + 60
    while proc.alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not proc.alive(), "unregistered SuperNode kept running"
    assert proc.popen.returncode != 0
    log = proc.log.read_text()
    assert "Failed to activate SuperNode" in log or "could not establish" in log
    assert dep.online_node_ids() == before
    assert dep.superlink is not None
    assert "No SuperNode found with the given public key" in dep.superlink.log.read_text()


def test_supernode_without_key_cannot_join(deployment: LocalDeployment) -> None:
    dep = deployment
    before = dep.online_node_ids()
    proc = dep.start_supernode(98, name="no-key", max_retries=1, without_key=True)
    deadline = time.monotonic() + 60
    while proc.alive() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not proc.alive(), "SuperNode without a key kept running"
    assert proc.popen.returncode != 0
    assert dep.online_node_ids() == before


def test_run_completes_with_correct_aggregate(deployment: LocalDeployment) -> None:
    dep = deployment
    res = dep.run(TINY_APP, {"num-rounds": 2, "min-nodes": 2}, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:]
    assert res.status == "finished:completed", res.run_info
    assert res.result is not None
    assert res.result["w"] == pytest.approx([_expected_fedavg(2, 2)] * 4, rel=1e-6)
    # Context.state persists on each SuperNode across rounds
    assert res.result["train_metrics"]["2"]["calls"] == pytest.approx(2.0)
    assert sorted(res.result["nodes"]) == sorted(dep.node_ids.values())
    # the app source tree was not touched (flwr run migrates pyproject.toml in place)
    assert res.output_dir is not None and res.output_dir.is_relative_to(dep.workdir)


def test_failed_start_leaves_no_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception half-way through start() (here: SuperNodes never come online)."""
    dep = LocalDeployment(1, tmp_path / "dep", startup_timeout=8)

    def boom(*_a, **_k):
        raise DeploymentError("injected failure after processes were started")

    monkeypatch.setattr(dep, "wait_for_nodes", boom)
    with pytest.raises(DeploymentError, match="injected"), dep:
        pass
    started = [p.pid for p in dep._all_procs]
    assert started, "the superlink/supernode should have been started before the failure"
    assert not any(pid_alive(p) for p in started)
    assert pids_with_marker(dep.marker) == set()


def test_script_cli_end_to_end_no_leftovers(tmp_path: Path) -> None:
    """`sgs-flower deploy local ...` runs, prints the result and leaves nothing."""
    import json
    import subprocess

    workdir = tmp_path / "cli"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sgs_flower.cli",
            "deploy",
            "local",
            "--app",
            str(TINY_APP),
            "--supernodes",
            "2",
            "--workdir",
            str(workdir),
            "--run-config",
            "num-rounds=1",
            "--timeout",
            "150",
        ],
        capture_output=True,
        text=True,
        timeout=200,
        env=env,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith("SuperLink 127.0.0.1:") and "TLS=True, auth=True" in lines[0]
    assert lines[-1].startswith("all processes stopped")
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["status"] == "finished:completed"
    result = json.loads((Path(summary["output_dir"]) / "result.json").read_text())
    assert result["w"] == pytest.approx([_expected_fedavg(2, 1)] * 4, rel=1e-6)
    # No process of that deployment is left: they all ran with FLWR_HOME in workdir
    flwr_home = str(workdir.resolve() / "flwr_home").encode()
    leftovers = []
    for pid in proc_table():
        try:
            env_bytes = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if b"FLWR_HOME=" + flwr_home in env_bytes.split(b"\0"):
            leftovers.append(pid)
    assert leftovers == []
