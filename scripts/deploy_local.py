#!/usr/bin/env python3
"""Run a Flower app on a real local deployment: TLS, SuperNode authentication, N SuperNodes.

A thin driver kept for old command lines; the deployment lives in
:mod:`sgs_flower.deploy` and the same command is ``sgs-flower deploy local``::

    python scripts/deploy_local.py --app . --supernodes 3 --workdir /tmp/dep \\
        --run-config 'preset="distributed-dp" num-server-rounds=2 min-survivors=3'

As a library::

    from sgs_flower.deploy import LocalDeployment
    with LocalDeployment(3, workdir) as dep:          # start() is called by __enter__
        res = dep.run(".", {"preset": "secagg", "num-server-rounds": 2})
"""

from __future__ import annotations

import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sgs_flower.deploy.cli import main

if __name__ == "__main__":
    sys.exit(main())
