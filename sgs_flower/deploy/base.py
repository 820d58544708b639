"""What every part of the local deployment shares: the loopback host, the process
marker, the error type and two small helpers.

Kept separate so that :mod:`certs`, :mod:`processes`, :mod:`flower` and :mod:`local`
depend on this module and not on each other.
"""

from __future__ import annotations

import socket
from pathlib import Path

HOST = "127.0.0.1"
# Every process a deployment starts carries ``SGS_DEPLOY_ID=<marker>`` in its
# environment; Flower's helpers inherit it, which is how strays are found on stop.
MARKER_ENV = "SGS_DEPLOY_ID"


class DeploymentError(RuntimeError):
    """A step of the local deployment failed (message includes the relevant log tail)."""


def free_port(host: str = HOST) -> int:
    """Return a currently free TCP port on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def tail(path: Path, n: int = 40) -> str:
    """The last ``n`` lines of a log file, for error messages."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "<no log>"
    return "\n".join(lines[-n:])
