"""The deployment library's pieces without starting Flower (fast; not marked slow).

Command lines are built from recorded ``--help`` fragments, so these run anywhere; the
real processes are exercised by ``tests/test_deploy_local.py``.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sgs_flower.cli import main as sgs_main
from sgs_flower.deploy import DeploymentError, LocalDeployment, NodeSite
from sgs_flower.deploy.flower import FlowerFlags, superlink_command, supernode_command
from sgs_flower.deploy.runs import config_string, prepare_run, stage_app

ROOT = Path(__file__).resolve().parents[1]
TINY_APP = ROOT / "tests" / "fixtures" / "deploy_tiny_app"
HELP_141 = FlowerFlags(
    superlink_help="--host --port --disable-runtime-dependency-installation",
    supernode_help="--host --port --max-retries",
)
HELP_OLD = FlowerFlags(
    superlink_help="--fleet-api-address --control-api-address",
    supernode_help="--clientappio-api-address",
)


def test_node_setup_hook_adds_per_site_files_and_node_config(tmp_path: Path) -> None:
    seen: list[NodeSite] = []

    def setup(site: NodeSite) -> dict[str, str]:
        seen.append(site)
        key = site.directory / "identity.key"
        key.write_text(f"key of site {site.index}")
        return {"identity-key": str(key)}

    dep = LocalDeployment(2, tmp_path, node_setup=setup)
    for i in range(2):
        dep.prepare_site(i)
    assert [s.index for s in seen] == [0, 1]
    assert dep.node_config_by_node[1] == {"identity-key": str(tmp_path / "sites/site-1/identity.key")}
    assert (tmp_path / "sites/site-0/identity.key").read_text() == "key of site 0"
    assert seen[0].private_key.exists() and seen[0].public_key.read_text().startswith("ecdsa-")


def test_supernode_command_carries_node_config_and_tls(tmp_path: Path) -> None:
    cmd = supernode_command(
        HELP_141,
        "127.0.0.1:9092",
        root_certificates=tmp_path / "ca.crt",
        private_key=tmp_path / "k",
        node_config={"partition-id": 1, "identity-key": "/x/id.key", "flag": True},
        max_retries=1,
    )
    assert cmd[cmd.index("--node-config") + 1] == 'partition-id=1 identity-key="/x/id.key" flag=true'
    assert "--insecure" not in cmd and "--root-certificates" in cmd
    assert cmd[cmd.index("--max-retries") + 1] == "1"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    old = supernode_command(
        HELP_OLD, "127.0.0.1:9092", root_certificates=None, private_key=None, node_config={}
    )
    assert "--clientappio-api-address" in old and "--insecure" in old and "--host" not in old
    assert "--max-retries" not in old


def test_superlink_command_follows_the_installed_flags(tmp_path: Path) -> None:
    new = superlink_command(HELP_141, 9093, certs=None, supernode_auth=True, database=None)
    assert new[new.index("--port") + 1] == "9093"
    assert "--enable-supernode-auth" in new and "--insecure" in new
    assert "--disable-runtime-dependency-installation" in new
    old = superlink_command(HELP_OLD, 9093, certs=None, supernode_auth=False, database=tmp_path)
    assert old[old.index("--fleet-api-address") + 1] == "127.0.0.1:9093"
    assert "--port" not in old and "--enable-supernode-auth" not in old
    assert old[old.index("--database") + 1] == str(tmp_path)


def test_prepare_run_fills_output_dir_and_rejects_unknown_keys(tmp_path: Path) -> None:
    staged = stage_app(TINY_APP, tmp_path / "apps" / "app-1", {tmp_path})
    assert (staged / "pyproject.toml").exists()
    paths = prepare_run(staged, {"num-rounds": 2}, tmp_path, 1)
    assert paths.output_dir == tmp_path / "runs" / "run-1" and paths.output_dir.is_dir()
    assert paths.config["output-dir"] == str(paths.output_dir)
    assert config_string({"num-rounds": 2}) == "num-rounds=2"
    with pytest.raises(DeploymentError, match="not-a-key"):
        prepare_run(staged, {"not-a-key": 1}, tmp_path, 2)


def test_sgs_flower_deploy_help_lists_local(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        sgs_main(["deploy", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "local" in out and "TLS" in out


def test_script_is_a_thin_driver_with_the_same_options() -> None:
    out = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "deploy_local.py"), "--help"],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 0, out.stderr
    for opt in ("--app", "--supernodes", "--workdir", "--run-config", "--keep-running"):
        assert opt in out.stdout
    assert len((ROOT / "scripts" / "deploy_local.py").read_text().splitlines()) < 300
