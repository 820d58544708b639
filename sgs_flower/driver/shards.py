"""The round driver's transport over sites in worker processes (issue 30: "simulate.py
implements [the transport] in process and over worker shards").

Why: deployed sites run on their own machines, each making its own signature checks and
key agreements. Driven one after another in one process (:class:`InProcessTransport`),
a round's wall time is the sum of n sites' work; a benchmark of the product path at
n = 10,000 must spread them, as :class:`sgs_flower.secagg.simulate.SiteShards` does for
the bare protocol. :class:`ShardedTransport` forks W workers, each holding a shard of
the :class:`~sgs_flower.driver.inprocess.InProcessSite` objects for the whole run (their
stores, keys and state never leave it) and answering through an
:class:`~sgs_flower.driver.inprocess.InProcessTransport` over its shard: a site behaves
exactly as in process (the same answer code, the same :class:`Drop`\\ s). The driver, the
protocol server and the encoding stay in this process.

It lives in ``driver`` and not in ``secagg/simulate.py`` because it is built on the
site (``sgs_flower.site``) and the driver's transport, which the packages below
``driver`` never import (``tests/test_layering.py``).
"""

from __future__ import annotations

import gc
import multiprocessing
import multiprocessing.connection
import time
import traceback
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

from sgs_flower.driver.inprocess import Drop, InProcessSite, InProcessTransport
from sgs_flower.driver.transport import Outgoing, Reply
from sgs_flower.secagg import wire
from sgs_flower.secagg.process_stats import WorkerStats, end_workers, status_bytes, worker_stats
from sgs_flower.site.request import ModelRecord

#: A worker sends its replies to one exchange in parts of about this many bytes (the
#: masked vectors counted), so neither side holds a whole shard's vectors in transit (a
#: shard's half of a 10,000-site masked-input stage at m = 10,000 is ~200 MB).
REPLY_PART_BYTES = 32 << 20
#: A worker gets its messages of one exchange in batches of about this many bytes of
#: their own (the payloads each message carries alone; what messages share, such as the
#: model record, travels once per batch), one batch in flight per worker: a roster of a
#: large cohort is sent to every site, and a shard's part of a stage in one pickle could
#: be gigabytes.
MESSAGE_BATCH_BYTES = 64 << 20


class WorkerFailed(RuntimeError):
    """A worker process of a :class:`ShardedTransport` raised or died. ``worker`` is its
    index, ``pid`` its process id and ``text`` its traceback (or how it ended). The
    transport is closed (every worker stopped) before this is raised: make a new one."""

    def __init__(self, worker: int, pid: int | None, what: str, text: str) -> None:
        super().__init__(f"worker {worker} of the sharded transport (pid {pid}) {what}:\n{text}")
        self.worker, self.pid, self.text = worker, pid, text


class _Arrays:
    """A model's arrays as a picklable reader (a :class:`ModelRecord`'s ``read`` is
    often a closure, which pickle refuses); each call returns a new list, as
    ``model_of``'s reader does."""

    def __init__(self, named: list[tuple[str, Any]]) -> None:
        self.named = named

    def __call__(self) -> list[tuple[str, Any]]:
        return list(self.named)


def _portable_messages(messages: Sequence[Outgoing]) -> list[Outgoing]:
    """``messages`` as they can be pickled: each :class:`ModelRecord` read once and
    carried as its arrays. One record shared by many messages stays one object (and
    one copy in the pickle), as do shared config records: only the per-message
    mapping of record names is new."""
    converted: dict[int, ModelRecord] = {}
    out: list[Outgoing] = []
    for message in messages:
        if not any(isinstance(v, ModelRecord) for v in message.records.values()):
            out.append(message)
            continue
        records: dict[str, Any] = {}
        for name, value in message.records.items():
            if isinstance(value, ModelRecord):
                if id(value) not in converted:
                    converted[id(value)] = ModelRecord(value.keys, _Arrays(value.read()), value.native)
                value = converted[id(value)]
            records[name] = value
        out.append(Outgoing(message.node, records, message.group, message.kind))
    return out


def _reply_bytes(reply: Reply) -> int:
    rec = reply.records.get(wire.RECORD_KEY) or {}
    payload = sum(len(v) for v in rec.values() if isinstance(v, bytes))
    return payload + (len(reply.vector) if reply.vector is not None else 0)


def _batches(part: list[Outgoing], max_bytes: int) -> list[list[Outgoing]]:
    """``part`` in consecutive batches of about ``max_bytes`` of the messages' own
    payloads (the protocol record's bytes); at least one message per batch."""
    out: list[list[Outgoing]] = [[]]
    size = 0
    for message in part:
        rec = message.records.get(wire.RECORD_KEY) or {}
        own = sum(len(v) for v in rec.values() if isinstance(v, bytes))
        if out[-1] and size + own > max_bytes:
            out.append([])
            size = 0
        out[-1].append(message)
        size += own
    return out


def _worker_main(conn: Connection, sites: Mapping[int, InProcessSite], run_id: int,
                 drops: Mapping[int, Sequence[Drop]], separate: bool) -> None:
    """A worker: its shard of sites answers each batch of messages the parent sends,
    through an :class:`InProcessTransport` over the shard, until told to stop; then it
    reports its :class:`WorkerStats`. A fault that is not a site's (a site's own
    raise is already its error reply) goes back with its traceback."""
    start_rss = status_bytes("VmRSS")
    transport = InProcessTransport(sites, run_id=run_id, drops=drops, separate=separate)
    conn.send(("ready", time.process_time()))
    while True:
        try:
            request = conn.recv()
        except EOFError:  # the parent is gone: nothing to answer
            return
        if request[0] == "stop":
            conn.send(("stats", worker_stats(start_rss, {"sites": sum(transport.site_cpu.values())})))
            conn.close()
            return
        _, messages, timeout = request
        try:
            dropped = len(transport.dropped)
            part: list[Reply] = []
            size = 0
            for message in messages:
                for reply in transport.exchange([message], timeout):
                    part.append(reply)
                    size += _reply_bytes(reply)
                if size >= REPLY_PART_BYTES:
                    conn.send(("part", part))
                    part, size = [], 0
            nodes = {m.node for m in messages if m.node in transport.sites}
            conn.send(("done", part, {u: transport.site_cpu[u] for u in nodes}, {u: transport.calls[u] for u in nodes},
                       transport.dropped[dropped:], time.process_time()))
        except BaseException as exc:  # a fault, not a site's refusal: the parent raises it
            conn.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))


class ShardedTransport:
    """A :class:`~sgs_flower.driver.transport.Transport` over in-process sites (node id ->
    :class:`InProcessSite`) spread over ``workers`` worker processes, the node ids split
    round-robin over the sorted ids. Like :class:`InProcessTransport` (and through one,
    in each worker), ``timeout`` is not needed: a dropout is a :class:`Drop` (``drops``),
    not a late reply. It measures the sites the same way: ``site_cpu`` (each site's CPU
    seconds in its calls, measured in its worker) and ``calls``, cumulated over the run;
    ``dropped`` lists the messages not delivered. So :func:`~sgs_flower.driver.inprocess.run_rounds`
    takes it in place of the sites, and the rest of this process's CPU is the server's.

    ``separate`` (default False): the sites of a worker share the process's caches of
    checked BLS keys, as :class:`~sgs_flower.secagg.simulate.SiteShards`' do. A
    deployed site checks each peer's key once per run, whatever the number of rounds;
    sharing the cache, a worker checks each key once per run too (not once per site),
    which is what the benchmark's public-key floor counts (the key checks once per
    process). True: each answer runs with caches of its own, as
    :class:`InProcessTransport` does by default (every site pays its checks at each
    answer that needs them, so a round costs more than a deployed site's).

    Each exchange sends a worker its messages as one pickled batch (a model or config
    record shared by many messages travels once), or in batches of about
    ``batch_bytes`` of the messages' own payloads when they are larger (one batch in
    flight per worker), and the workers answer in parallel; replies come back in parts
    of about :data:`REPLY_PART_BYTES`. A worker that raises
    or dies gives :class:`WorkerFailed` naming it, with its traceback, within
    ``poll_seconds`` of its end (never a hang); with ``worker_timeout``, a worker silent
    that long is one too. Workers are forked (the sites' train functions need not pickle)
    with the garbage collector frozen across the fork, so the children do not copy the
    parent's pages by touching its objects' headers. Use as a context manager, or call
    :meth:`close`: the workers are stopped then (terminated after an error), and
    ``stats`` holds each one's :class:`WorkerStats` (its peak memory beyond the pages it
    inherited: ``own_peak_bytes``).
    """

    #: the sites answer in worker processes: none of their CPU is this process's
    in_process = False

    def __init__(self, sites: Mapping[int, InProcessSite], *, workers: int = 2, run_id: int = 1,
                 drops: Mapping[int, Sequence[Drop]] | None = None, separate: bool = False,
                 poll_seconds: float = 1.0, worker_timeout: float | None = None,
                 batch_bytes: int = MESSAGE_BATCH_BYTES) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if any(int(n) < 1 for n in sites):
            raise ValueError("node ids must be positive integers (as Flower's)")
        if "fork" not in multiprocessing.get_all_start_methods():
            raise RuntimeError("ShardedTransport forks its workers (the sites' train functions stay in memory, "
                               "unpickled); this platform cannot fork: use InProcessTransport")
        ctx = multiprocessing.get_context("fork")
        order = sorted(int(n) for n in sites)
        workers = min(workers, max(1, len(order)))
        all_drops = {int(n): list(d) for n, d in (drops or {}).items()}
        self._run_id, self.poll_seconds, self.worker_timeout = run_id, poll_seconds, worker_timeout
        self.batch_bytes = batch_bytes
        self.site_cpu: dict[int, float] = dict.fromkeys(order, 0.0)
        self.calls: dict[int, int] = dict.fromkeys(order, 0)
        self.dropped: list[tuple[int, str, int]] = []
        # each worker's own CPU seconds (time.process_time: its sites' calls, and its
        # unpickling of messages and pickling of replies), as of its last answer
        self.worker_cpu: list[float] = []
        self.stats: list[WorkerStats] = []
        self._shard_of: dict[int, int] = {}
        self._conns: list[Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._healthy = True
        # freeze only if the caller has not frozen objects of its own (unfreeze would
        # release theirs too)
        freeze = gc.get_freeze_count() == 0
        if freeze:
            gc.freeze()
        try:
            for w in range(workers):
                shard = order[w::workers]
                self._shard_of.update(dict.fromkeys(shard, w))
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker_main, name=f"sgs-driver-shard-{w}", daemon=True,
                                   args=(child, {u: sites[u] for u in shard}, run_id,
                                         {u: all_drops[u] for u in shard if u in all_drops}, separate))
                self._procs.append(proc)
                self._conns.append(parent)
                proc.start()
                child.close()
            if freeze:
                gc.unfreeze()
                freeze = False
            for w in range(workers):
                self.worker_cpu.append(self._receive(w, "start")[1])
        except BaseException:
            if freeze:
                gc.unfreeze()
            self._healthy = False
            self.close()
            raise

    # ------------------------------------------------------------ Transport
    @property
    def run_id(self) -> int:
        return self._run_id

    @property
    def workers(self) -> int:
        """How many worker processes run (0 once closed)."""
        return len(self._procs)

    @property
    def processes(self) -> tuple[multiprocessing.process.BaseProcess, ...]:
        """The worker processes (for tests and monitoring; empty once closed)."""
        return tuple(self._procs)

    def node_ids(self) -> list[int]:
        return sorted(self._shard_of)

    def exchange(self, messages: Sequence[Outgoing], timeout: float) -> list[Reply]:
        """Each worker answers its sites' messages while the others answer theirs; the
        replies in the order they came (each worker's in its sites' message order)."""
        if not self._conns:
            raise RuntimeError("this ShardedTransport is closed: make a new one")
        parts: list[list[Outgoing]] = [[] for _ in self._conns]
        for message in _portable_messages(messages):
            w = self._shard_of.get(message.node)
            if w is not None:  # no such node: no reply, as on a network
                parts[w].append(message)
        pending = {w: _batches(part, self.batch_bytes) for w, part in enumerate(parts) if part}
        try:
            for w, batches in pending.items():
                self._send(w, ("exchange", batches.pop(0), timeout))
            return self._collect(pending, timeout)
        except BaseException:
            self._healthy = False  # a worker may hold an unread answer: terminate them
            self.close()
            raise

    def _collect(self, pending: dict[int, list[list[Outgoing]]], timeout: float) -> list[Reply]:
        """Read the workers' replies as they come, sending a worker its next batch when
        it finished the last."""
        replies: list[Reply] = []
        waiting = set(pending)
        last = time.monotonic()
        while waiting:
            handles: dict[Any, int] = {self._conns[w]: w for w in waiting}
            ready = multiprocessing.connection.wait(list(handles), timeout=self.poll_seconds)
            if not ready:
                self._check_alive(waiting, last)
                continue
            last = time.monotonic()
            for handle in ready:
                w = handles[handle]
                kind, *payload = self._receive(w, "exchange")
                replies.extend(payload[0])
                if kind == "done":
                    cpu, calls, dropped, self.worker_cpu[w] = payload[1:]
                    self.site_cpu.update(cpu)
                    self.calls.update(calls)
                    self.dropped.extend(dropped)
                    if pending[w]:
                        self._send(w, ("exchange", pending[w].pop(0), timeout))
                    else:
                        waiting.discard(w)
        return replies

    def _check_alive(self, waiting: set[int], last: float) -> None:
        """No worker spoke for ``poll_seconds``: one that ended (with nothing left to
        read) or, with ``worker_timeout``, one silent that long is a failure."""
        for w in sorted(waiting):
            proc = self._procs[w]
            if not proc.is_alive() and not self._conns[w].poll():
                raise WorkerFailed(w, proc.pid, "died", f"it ended with exit code {proc.exitcode}")
            if self.worker_timeout is not None and time.monotonic() - last > self.worker_timeout:
                raise WorkerFailed(w, proc.pid, "hung", f"no answer in {self.worker_timeout:.0f} s")

    def _send(self, w: int, request: tuple[Any, ...]) -> None:
        try:
            self._conns[w].send(request)
        except OSError as exc:  # a broken pipe: the worker ended
            if self._procs[w].is_alive():
                raise
            raise WorkerFailed(w, self._procs[w].pid, "died",
                               f"it ended with exit code {self._procs[w].exitcode}") from exc

    def _receive(self, w: int, during: str) -> tuple[Any, ...]:
        proc = self._procs[w]
        try:
            message = self._conns[w].recv()
        except (EOFError, OSError) as exc:
            proc.join(timeout=1)
            raise WorkerFailed(w, proc.pid, f"died during {during}",
                               f"it ended with exit code {proc.exitcode}") from exc
        if message[0] == "error":
            raise WorkerFailed(w, proc.pid, f"raised during {during}: {message[1]}", message[2])
        return tuple(message)

    # ------------------------------------------------------------ lifetime
    def close(self) -> list[WorkerStats]:
        """Stop the workers and return their :class:`WorkerStats` (none after an error:
        the workers are then terminated). Safe to call twice."""
        if self._healthy and self._conns and not self.stats:
            try:
                for w in range(len(self._conns)):
                    self._send(w, ("stop",))
                self.stats = [self._receive(w, "stop")[1] for w in range(len(self._conns))]
            except (OSError, RuntimeError):
                self._healthy = False
        end_workers(self._procs, self._conns, self._healthy)
        self._procs, self._conns = [], []
        return self.stats

    def __enter__(self) -> ShardedTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
