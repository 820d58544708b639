"""Command lines for Flower's executables, chosen from the installed ``--help``.

The deployment runs ``flower-superlink``, ``flower-supernode`` and ``flwr`` as
subprocesses and never imports ``flwr``: flags are picked from what the installed
release's ``--help`` lists, so one code path serves several Flower releases (tested:
see ``docs/deployment.md``, "Flower versions").
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sgs_flower.deploy.base import HOST, DeploymentError, free_port
from sgs_flower.deploy.certs import Certificates
from sgs_flower.deploy.runs import config_string


def help_text(exe: str) -> str:
    """``exe --help`` (stdout + stderr, wide), or ``""`` if it cannot be run."""
    try:
        out = subprocess.run(
            [exe, "--help"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout + out.stderr


def flower_bin(name: str) -> str:
    """Executable next to the running interpreter (the venv), else from PATH."""
    cand = Path(sys.executable).parent / name
    if cand.exists():
        return str(cand)
    found = shutil.which(name)
    if not found:
        raise DeploymentError(f"executable {name!r} not found")
    return found


@dataclass(frozen=True)
class FlowerFlags:
    """The ``--help`` texts of the installed SuperLink and SuperNode."""

    superlink_help: str
    supernode_help: str

    @classmethod
    def detect(cls) -> FlowerFlags:
        """Read the installed executables' ``--help`` (about 2 s each)."""
        return cls(
            help_text(flower_bin("flower-superlink")), help_text(flower_bin("flower-supernode"))
        )


def superlink_command(
    flags: FlowerFlags,
    port: int,
    *,
    certs: Certificates | None,
    supernode_auth: bool,
    database: Path | None,
) -> list[str]:
    """``flower-superlink`` on ``HOST:port`` (TLS when ``certs`` is given)."""
    h = flags.superlink_help
    cmd = [flower_bin("flower-superlink")]
    if "--host" in h and "--port" in h:  # >= 1.41: one HTTP API for Fleet/Control/Runtime
        cmd += ["--host", HOST, "--port", str(port)]
    else:  # older gRPC releases: three APIs on three ports
        cmd += [
            "--fleet-api-address",
            f"{HOST}:{port}",
            "--control-api-address",
            f"{HOST}:{free_port()}",
            "--serverappio-api-address",
            f"{HOST}:{free_port()}",
        ]
    if certs is not None:
        cmd += [
            "--ssl-ca-certfile",
            str(certs.ca_cert),
            "--ssl-certfile",
            str(certs.server_cert),
            "--ssl-keyfile",
            str(certs.server_key),
        ]
    else:
        cmd += ["--insecure"]
    if supernode_auth:
        cmd += ["--enable-supernode-auth"]
    cmd += ["--isolation", "subprocess"]
    if database is not None:
        cmd += ["--database", str(database)]
    if "--disable-runtime-dependency-installation" in h:
        cmd += ["--disable-runtime-dependency-installation"]
    return cmd


def supernode_command(
    flags: FlowerFlags,
    superlink: str,
    *,
    root_certificates: Path | None,
    private_key: Path | None,
    node_config: Mapping[str, Any],
    max_retries: int | None = None,
) -> list[str]:
    """``flower-supernode`` connecting to ``superlink`` (TLS when a CA file is given)."""
    h = flags.supernode_help
    cmd = [flower_bin("flower-supernode"), "--superlink", superlink]
    if root_certificates is not None:
        cmd += ["--root-certificates", str(root_certificates)]
    else:
        cmd += ["--insecure"]
    if private_key is not None:
        cmd += ["--auth-supernode-private-key", str(private_key)]
    cmd += ["--node-config", config_string(node_config)]
    if "--clientappio-api-address" in h:  # older releases
        cmd += ["--clientappio-api-address", f"{HOST}:{free_port()}"]
    elif "--port" in h:
        cmd += ["--host", HOST, "--port", str(free_port())]
    cmd += ["--isolation", "subprocess"]
    if max_retries is not None and "--max-retries" in h:
        cmd += ["--max-retries", str(max_retries)]
    return cmd
