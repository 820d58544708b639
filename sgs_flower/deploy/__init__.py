"""Local Flower deployment with TLS and SuperNode authentication (``sgs-flower deploy``).

Small modules with one job each:

* :mod:`~sgs_flower.deploy.certs` - throwaway CA, SuperLink certificate, SuperNode keys;
* :mod:`~sgs_flower.deploy.processes` - process trees and the marker that finds strays;
* :mod:`~sgs_flower.deploy.flower` - Flower command lines for the installed release;
* :mod:`~sgs_flower.deploy.runs` - staging the app, output paths, reading results;
* :mod:`~sgs_flower.deploy.local` - :class:`LocalDeployment`, which ties them together;
* :mod:`~sgs_flower.deploy.cli` - the ``sgs-flower deploy local`` command.

Flower is only ever run as subprocesses (``flower-superlink``, ``flower-supernode``,
``flwr``); nothing here imports ``flwr``.
"""

from sgs_flower.deploy.base import HOST, MARKER_ENV, DeploymentError, free_port
from sgs_flower.deploy.certs import Certificates, generate_certificates, generate_supernode_keys
from sgs_flower.deploy.local import CONNECTION_NAME, LocalDeployment, NodeSetup, NodeSite
from sgs_flower.deploy.processes import (
    ManagedProcess,
    descendants,
    kill_tree,
    pid_alive,
    pids_with_marker,
    proc_table,
)
from sgs_flower.deploy.runs import RunResult, verify_ledger

__all__ = [
    "CONNECTION_NAME",
    "HOST",
    "MARKER_ENV",
    "Certificates",
    "DeploymentError",
    "LocalDeployment",
    "ManagedProcess",
    "NodeSetup",
    "NodeSite",
    "RunResult",
    "descendants",
    "free_port",
    "generate_certificates",
    "generate_supernode_keys",
    "kill_tree",
    "pid_alive",
    "pids_with_marker",
    "proc_table",
    "verify_ledger",
]
