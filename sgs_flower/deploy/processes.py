"""Process trees: find, signal and reap everything a deployment started.

SuperLink and SuperNode launch their helpers (``flower-superexec``, ``flwr-serverapp``,
``flwr-clientapp``) in new sessions, outside our process groups, so killing a process
group is not enough. Two nets catch them: the parent/child tree read from ``/proc``
(collected *before* signalling, so children re-parented to init are not missed) and the
marker environment variable every started process inherits (:data:`MARKER_ENV`).
Linux only (``/proc``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sgs_flower.deploy.base import MARKER_ENV


def proc_table() -> dict[int, int]:
    """pid -> ppid for every process visible in /proc."""
    table: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            # comm may contain spaces/parens: split after the last ')'
            rest = stat[stat.rindex(")") + 2 :].split()
            if rest[0] == "Z":  # zombie: already dead
                continue
            table[int(entry)] = int(rest[1])
        except (OSError, ValueError, IndexError):
            continue
    return table


def descendants(pid: int, table: Mapping[int, int] | None = None) -> set[int]:
    """All live descendants of ``pid`` (not including ``pid``)."""
    table = proc_table() if table is None else table
    children: dict[int, list[int]] = {}
    for p, pp in table.items():
        children.setdefault(pp, []).append(p)
    out: set[int] = set()
    stack = [pid]
    while stack:
        for c in children.get(stack.pop(), []):
            if c not in out:
                out.add(c)
                stack.append(c)
    return out


def pids_with_marker(marker: str) -> set[int]:
    """Live processes whose environment contains ``SGS_DEPLOY_ID=<marker>``."""
    needle = f"{MARKER_ENV}={marker}".encode()
    me = os.getpid()
    found: set[int] = set()
    for pid in proc_table():
        if pid == me:
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if needle in env.split(b"\0"):
            found.add(pid)
    return found


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    return pid in proc_table()


def signal_all(pids: Iterable[int], sig: int) -> None:
    """Send ``sig`` to each pid, ignoring ones that are gone or not ours."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_tree(roots: Iterable[int], marker: str | None, timeout: float = 5.0) -> set[int]:
    """SIGTERM, then SIGKILL, ``roots``, their descendants and ``marker`` processes.

    Returns the pids that were signalled. Descendants are collected *before* signalling
    so that children re-parented to init on their parent's death are not missed.
    """
    roots = [p for p in roots if p > 0]
    table = proc_table()
    targets: set[int] = set()
    for r in roots:
        if r in table:
            targets.add(r)
        targets |= descendants(r, table)
    if marker:
        targets |= pids_with_marker(marker)
    targets.discard(os.getpid())
    if not targets:
        return targets
    signal_all(targets, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = set(proc_table())
        # new helpers may have been spawned meanwhile: include them
        extra = pids_with_marker(marker) - targets if marker else set()
        if extra:
            signal_all(extra, signal.SIGTERM)
            targets |= extra
        if not (targets & live):
            break
        time.sleep(0.1)
    for _ in range(3):
        live = set(proc_table())
        left = targets & live
        if marker:
            left |= pids_with_marker(marker)
        if not left:
            break
        signal_all(left, signal.SIGKILL)
        targets |= left
        time.sleep(0.2)
    return targets


@dataclass
class ManagedProcess:
    """A process a deployment started: its Popen, command line and log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    cmd: list[str]
    _logf: Any = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        """True until the process has exited (``poll``)."""
        return self.popen.poll() is None

    def tree(self) -> set[int]:
        """The process and its live descendants (just the descendants once it exited)."""
        return {self.pid} | descendants(self.pid) if self.alive() else descendants(self.pid)
