"""What a worker process used, and errors that can travel back from one.

Why a module of its own: two pools of worker processes hold simulated sites, the bare
protocol's (:class:`sgs_flower.secagg.simulate.SiteShards`) and the round driver's
(:class:`sgs_flower.driver.shards.ShardedTransport`). Both report a worker's memory the
same way, and the driver may import from ``secagg`` but never the reverse, so the shared
helpers live here, below both.
"""

from __future__ import annotations

import pickle
import resource
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class WorkerStats:
    """What one worker process used: its CPU seconds (user + system, since it started),
    its resident memory when it started (what it shares, copy-on-write, with the process
    that forked it), its peak resident memory, and the CPU seconds its sites spent
    answering, by key (per stage, "sites_stageN", in :class:`SiteShards`; "sites" in
    :class:`ShardedTransport`), measured around their calls, so without the pipe
    transfers."""

    cpu_seconds: float
    start_rss_bytes: int
    peak_rss_bytes: int
    handle_cpu_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def own_peak_bytes(self) -> int:
        """The peak beyond what it inherited: its own allocations (the inherited pages
        are the parent's, counted there)."""
        return max(0, self.peak_rss_bytes - self.start_rss_bytes)


def status_bytes(field_name: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux: ``VmRSS`` now,
    ``VmHWM`` its peak), in bytes; 0 where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return 0


def worker_stats(start_rss: int, handle_cpu: dict[str, float]) -> WorkerStats:
    """This process's :class:`WorkerStats` now, given its resident memory at start."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak = status_bytes("VmHWM") or usage.ru_maxrss * 1024  # ru_maxrss: KiB on Linux
    return WorkerStats(usage.ru_utime + usage.ru_stime, start_rss, peak, dict(handle_cpu))


def portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (it travels back to the parent), else a
    RuntimeError that names it."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def end_workers(procs: list[Any], conns: list[Any], healthy: bool) -> None:
    """Wait for stopped workers (5 s each; none after an error) and terminate any still
    alive, then close their pipes: both pools end their workers this way."""
    for proc in procs:
        proc.join(timeout=5 if healthy else 0)
        if proc.is_alive():
            proc.terminate()
            proc.join()
    for conn in conns:
        conn.close()
