"""Secure-aggregation identities for a local deployment: what each site would do.

Each site creates its own Ed25519 identity key (``sgs-flower identity new``), the sites
agree on the roster of public keys out of band, and every site pins it through its
node config (docs/deployment.md, section 2b). :func:`roster_setup` plays all sites on
one machine: it writes one key per site and the shared roster, and returns the
``node_setup`` hook of :class:`~sgs_flower.deploy.local.LocalDeployment` that points
each SuperNode at its own key, the roster and its own state file.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sgs_flower.deploy.local import NodeSetup, NodeSite
from sgs_flower.secagg.identity import write_identity


def roster_setup(workdir: Path, n_sites: int) -> tuple[NodeSetup, Path]:
    """Keys for sites 0..n_sites-1 and their roster; returns (node_setup, roster path)."""
    base = Path(workdir) / "identities"
    base.mkdir(parents=True, exist_ok=True)
    lines = ["# the federation's secure-aggregation identities (one site per line)"]
    keys: dict[int, Path] = {}
    for i in range(n_sites):
        key = base / f"site-{i}.key"
        public = write_identity(key)
        keys[i] = key
        lines.append(f"{public.hex()} site-{i}")
    roster = base / "roster.txt"
    roster.write_text("\n".join(lines) + "\n")

    def setup(site: NodeSite) -> Mapping[str, Any]:
        if site.index not in keys:  # a node added later is not on the roster: it is refused
            return {"sgs-roster": str(roster)}
        return {
            "sgs-identity-key": str(keys[site.index]),
            "sgs-roster": str(roster),
            "sgs-state-file": str(site.directory / "sgs-site-state.json"),
        }

    return setup, roster
