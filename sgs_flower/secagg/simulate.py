"""Run a whole SecAgg+ round on one machine, with no Flower.

For tests, benchmarks, and users who want to check the protocol: n clients and the
server exchange the real messages (optionally through their byte encoding), with
dropouts injected at any stage. The clients run in this process or, with
``workers`` > 1, in worker processes that each hold a shard of them for the whole round
(:class:`SiteShards`): deployed sites run on their own machines, each doing its own
signature checks and key agreements, and a simulation that ran them all on one core
would time the sum of n sites' work, not a round.
"""

from __future__ import annotations

import gc
import math
import multiprocessing
import multiprocessing.connection
import time
import traceback
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.errors import ConfigurationError, ProtocolError, SecAggError, ThresholdError
from sgs_flower.secagg.input_validation import ValidationLayout, layout_for
from sgs_flower.secagg.policy import ClientPolicy
from sgs_flower.secagg.process_stats import (
    WorkerStats,
    end_workers,
    portable,
    status_bytes,
    worker_stats,
)
from sgs_flower.secagg.quantize import DecodedAggregate, QuantizationConfig, encode
from sgs_flower.secagg.server import RoundOutcome, RoundParams, SecAggServer, decode_checked
from sgs_flower.secagg.stages import Replies, mask_and_unmask, share_keys
from sgs_flower.secagg.wire import Message, ShareBundle, Stage
from sgs_flower.secagg.wire import decode as decode_message
from sgs_flower.secagg.wire import encode as encode_message


@dataclass
class RoundResult:
    """The decoded aggregate and what happened in the round."""

    aggregate: np.ndarray
    decoded: DecodedAggregate
    outcome: RoundOutcome
    survivors: list[int]
    clipped: int
    config: QuantizationConfig
    seconds: dict[str, float] = field(default_factory=dict)
    upload_bytes: dict[int, int] = field(default_factory=dict)
    workers: int = 1  # processes the sites ran in (1: this one)
    worker_stats: list[WorkerStats] = field(default_factory=list)  # per worker process, when workers > 1
    # CPU seconds by stage: "sites_stageN", the sites' handling summed over sites (measured
    # around their handle calls, in whichever process they ran), and "server_stageN", the
    # server's own calls (setup_messages and collect_*) in this process
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    server: SecAggServer | None = None  # the round's server: its graph and U2, U3, U4 (benchmarks)


def _stage_key(stage: Stage | int | str) -> Stage:
    if isinstance(stage, str):
        return Stage[stage.upper()]
    return Stage(stage)


def _answer(client: SecAggClient, msg: Message | bytes, kw: Mapping[str, Any], wire: bool) -> Message | bytes | None:
    """One site's answer to one message, or None when it refuses (a typed protocol or
    threshold error: the site sends nothing from then on, which the server treats as a
    dropout). A message given as bytes is decoded first and, with ``wire``, the reply is
    returned encoded. The serial path and the worker processes both call this, so a
    site behaves the same wherever it runs."""
    if isinstance(msg, bytes):
        msg = decode_message(msg)
    try:
        reply = client.handle(msg, **kw)
    except (ProtocolError, ThresholdError):
        return None
    return encode_message(reply) if wire else reply


# (node, message, keyword arguments of SecAggClient.handle) -> answer or None; with
# ``wire`` the message is encoded only when it is sent (one at a time, or one batch
# at a time), never all at once: the rosters of a 10,000-site round are 320 KB each
_Item = tuple[int, Message, dict[str, Any]]
_AnswerAll = Callable[[list[_Item], bool], dict[int, "Message | bytes | None"]]


def run_protocol(
    server: SecAggServer,
    clients: Mapping[int, SecAggClient] | SiteShards,
    vectors: Mapping[int, np.ndarray],
    dropouts: Mapping[Stage, Collection[int]] | None = None,
    wire: bool = False,
    bound_digests: Mapping[int, bytes] | None = None,
    seconds: dict[str, float] | None = None,
    upload_bytes: dict[int, int] | None = None,
    cpu_seconds: dict[str, float] | None = None,
    validation: ValidationLayout | None = None,
) -> RoundOutcome:
    """Drive the five stages; a client in ``dropouts[stage]`` sends nothing from that
    stage on. With ``wire=True`` every message goes through its byte encoding.

    ``clients`` are the sites, either in this process (a mapping) or spread over worker
    processes (:class:`SiteShards`, which then hold their state between the stages);
    the messages, refusals and results are the same either way. ``cpu_seconds`` gets
    the server's CPU by stage ("server_stageN") and, for sites in this process, theirs
    ("sites_stageN"; sites in workers report it in :attr:`SiteShards.stats`). ``validation``
    is the layout every site is handed at its masked input (issue 31; the server's is
    ``server.params.validation``)."""
    cpu = cpu_seconds if cpu_seconds is not None else {}
    if isinstance(clients, SiteShards):
        answer_all: _AnswerAll = clients.answer
    else:
        local = clients

        def answer_all(items: list[_Item], wire: bool) -> dict[int, Message | bytes | None]:
            t = time.process_time()
            out = {
                node: _answer(local[node], encode_message(msg) if wire else msg, kw, wire) for node, msg, kw in items
            }
            if items:
                key = f"sites_stage{int(items[0][1].stage)}"
                cpu[key] = cpu.get(key, 0.0) + time.process_time() - t
            return out

    return _drive(server, answer_all, vectors, dropouts, wire, bound_digests, seconds, upload_bytes, cpu, validation)


def _drive(
    server: SecAggServer,
    answer_all: _AnswerAll,
    vectors: Mapping[int, np.ndarray],
    dropouts: Mapping[Stage, Collection[int]] | None,
    wire: bool,
    bound_digests: Mapping[int, bytes] | None,
    seconds: dict[str, float] | None,
    upload_bytes: dict[int, int] | None,
    cpu: dict[str, float],
    validation: ValidationLayout | None = None,
) -> RoundOutcome:
    drops = {s: set(v) for s, v in (dropouts or {}).items()}
    gone: set[int] = set()
    timing = seconds if seconds is not None else {}
    upload = upload_bytes if upload_bytes is not None else {}

    def exchange(stage: Stage, outgoing: Mapping[int, Message], nxt: Any = None,
                 parts: Mapping[int, Message] | None = None) -> tuple[Replies, Replies]:
        gone.update(drops.get(stage, ()))
        t0 = time.perf_counter()
        items: list[_Item] = []
        for node, msg in outgoing.items():
            if node in gone:
                continue
            kw: dict[str, Any] = {}
            if stage == Stage.MASKED_INPUT:
                kw["vector"] = vectors[node]
                kw["bound_digest"] = (bound_digests or {}).get(node, b"")
                if validation is not None:
                    kw["validation"] = validation
            items.append((node, msg, kw))
        answers = answer_all(items, wire)
        replies: dict[int, Message | bytes] = {}
        for node, _, _ in items:  # in the order the server sent them
            reply = answers[node]
            if reply is None:
                gone.add(node)
                continue
            if isinstance(reply, bytes):
                upload[node] = upload.get(node, 0) + len(reply)
            replies[node] = reply
        timing[f"clients_stage{int(stage)}"] = time.perf_counter() - t0
        return replies, {}  # never pipelined: nothing rides on these exchanges

    def server_call(stage: Stage, call: Callable[..., Any], *args: Any) -> Any:
        t, w = time.process_time(), time.perf_counter()
        try:
            return call(*args)
        finally:
            key = f"server_stage{int(stage)}"
            cpu[key] = cpu.get(key, 0.0) + time.process_time() - t
            timing[key] = timing.get(key, 0.0) + time.perf_counter() - w

    # the protocol's stage sequence, as every round runs it (sgs_flower.secagg.stages)
    bundles = share_keys(server, exchange, server_call)
    outcome, _ = mask_and_unmask(server, exchange, bundles, call=server_call)
    return outcome


# ------------------------------------------------------------ sites in worker processes
def _shard_main(conn: Connection, ids: tuple[int, ...], policy: ClientPolicy) -> None:
    """A worker process: the sites ``ids`` live here for the whole round (their keys and
    state never leave it). It answers each batch of messages the parent sends, in order,
    with what :func:`_answer` gives, until told to stop, then reports its
    :class:`WorkerStats`."""
    start_rss = status_bytes("VmRSS")
    clients = {u: SecAggClient(u, policy=policy) for u in ids}
    handle_cpu: dict[str, float] = {}
    conn.send(("ready", None))
    while True:
        request = conn.recv()
        if request[0] == "stop":
            conn.send(("stats", worker_stats(start_rss, handle_cpu)))
            conn.close()
            return
        _, wire, items, stage = request
        try:
            t = time.process_time()
            out = {node: _answer(clients[node], msg, kw, wire) for node, msg, kw in items}
            handle_cpu[stage] = handle_cpu.get(stage, 0.0) + time.process_time() - t
        except BaseException as exc:  # a bug, not a refusal: the parent raises it
            conn.send(("error", portable(exc), traceback.format_exc()))
            continue
        conn.send(("ok", out))


class SiteShards:
    """The simulated sites of a round split over ``workers`` processes, as real sites run
    on their own machines: each site's cryptography (its signature checks, key agreements,
    share encryption and masking) is its own and runs in its own shard, so the round's
    wall time is about the total site CPU over the number of workers, while the server
    stays in this process. Nothing is shared between sites that the serial path does not
    share (each shard derives and verifies for its own sites).

    Shards are formed round-robin over the sorted ids. Processes are forked where the
    platform can (the sites need nothing of the parent but their ids and policy) and the
    garbage collector is frozen across the fork, so the children do not copy the
    parent's pages by touching its objects' headers. Use as a context manager, or call
    :meth:`close`: the workers are stopped (or, after an error, terminated) then.
    """

    def __init__(
        self, ids: Sequence[int], policy: ClientPolicy, workers: int, *, max_batch_bytes: int = 32 << 20
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        methods = multiprocessing.get_all_start_methods()
        ctx = multiprocessing.get_context("fork") if "fork" in methods else multiprocessing.get_context("spawn")
        order = sorted(ids)
        workers = min(workers, max(1, len(order)))
        self.max_batch_bytes = max_batch_bytes
        self.stats: list[WorkerStats] = []
        self._conns: list[Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []
        self._shard_of: dict[int, int] = {}
        self._healthy = True
        # freeze only if the caller has not frozen objects of its own (unfreeze would
        # release theirs too)
        freeze = gc.get_freeze_count() == 0
        if freeze:
            gc.freeze()
        try:
            for w in range(workers):
                shard = tuple(order[w::workers])
                self._shard_of.update(dict.fromkeys(shard, w))
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_shard_main, args=(child, shard, policy), daemon=True,
                                   name=f"secagg-shard-{w}")
                self._procs.append(proc)
                self._conns.append(parent)
                proc.start()
                child.close()
            if freeze:
                gc.unfreeze()
                freeze = False
            for conn in self._conns:
                self._receive(conn)
        except BaseException:
            if freeze:
                gc.unfreeze()
            self.close()
            raise

    @property
    def workers(self) -> int:
        return len(self._procs)

    def _receive(self, conn: Connection) -> Any:
        try:
            kind, *payload = conn.recv()
        except EOFError as exc:
            self._healthy = False
            raise RuntimeError("a secure-aggregation worker process died") from exc
        if kind == "error":
            self._healthy = False
            err, text = payload
            err.add_note(f"in a worker process:\n{text}")
            raise err
        return payload[0]

    def answer(self, items: list[_Item], wire: bool = False) -> dict[int, Message | bytes | None]:
        """Every site's answer (or None for a refusal) to its message in ``items``, each
        shard working on its own sites' part while the others work on theirs.

        A shard's part goes in batches of about ``max_batch_bytes`` (input vectors and
        encoded messages counted; a stage without either goes in one batch, so the
        objects its messages share, such as the identity table, travel once), one batch
        in flight per shard: the next is sent when its answers are back. So neither
        side ever holds more than a batch of vectors in transit (a shard's whole part of
        a 10,000-site masked-input stage is 200 MB each way), and with blocking pipes
        and one request per shard no two processes can wait on each other's sends."""
        try:
            return self._answer(items, wire)
        except BaseException:
            self._healthy = False  # a shard may hold an unread answer: terminate at close
            raise

    def _batches(self, part: list[_Item], wire: bool) -> Iterator[list[tuple[int, Message | bytes, dict[str, Any]]]]:
        batch: list[tuple[int, Message | bytes, dict[str, Any]]] = []
        size = 0
        for node, msg, kw in part:
            payload: Message | bytes = encode_message(msg) if wire else msg
            batch.append((node, payload, kw))
            size += (len(payload) if isinstance(payload, bytes) else 0) + sum(
                v.nbytes for v in kw.values() if isinstance(v, np.ndarray)
            )
            if size >= self.max_batch_bytes:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    def _answer(self, items: list[_Item], wire: bool) -> dict[int, Message | bytes | None]:
        parts: list[list[_Item]] = [[] for _ in self._conns]
        for item in items:
            parts[self._shard_of[item[0]]].append(item)
        pending = {conn: self._batches(part, wire) for conn, part in zip(self._conns, parts, strict=True)}
        busy: list[Connection] = []
        stage = f"sites_stage{int(items[0][1].stage)}" if items else ""

        def send_next(conn: Connection) -> None:
            batch = next(pending[conn], None)
            if batch is not None:
                conn.send(("answer", wire, batch, stage))
                busy.append(conn)

        for conn in self._conns:
            send_next(conn)
        out: dict[int, Message | bytes | None] = {}
        error: BaseException | None = None
        while busy:
            for ready in multiprocessing.connection.wait(busy):
                assert isinstance(ready, Connection)
                busy.remove(ready)
                try:
                    out.update(self._receive(ready))
                except BaseException as exc:  # read the other shards' answers first
                    error = error or exc
                    continue
                if error is None:
                    send_next(ready)
        if error is not None:
            raise error
        return out

    def close(self) -> list[WorkerStats]:
        """Stop the workers and return their :class:`WorkerStats` (none after an error:
        the workers are then terminated)."""
        if self._healthy and not self.stats:
            try:
                for conn in self._conns:
                    conn.send(("stop",))
                self.stats = [self._receive(conn) for conn in self._conns]
            except (OSError, RuntimeError):
                self._healthy = False
        end_workers(self._procs, self._conns, self._healthy)
        self._procs, self._conns = [], []
        return self.stats

    def __enter__(self) -> SiteShards:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def simulate_round(
    inputs: Sequence[np.ndarray],
    weights: Sequence[int] | None = None,
    *,
    clip_range: float = 1.0,
    field_bits: int = 32,
    max_weight: int | None = None,
    degree: int | None = None,
    threshold: int | None = None,
    min_clients: int | None = None,
    dropouts: Mapping[Stage | int | str, Collection[int]] | None = None,
    seed: int | None = None,
    run_id: int = 1,
    round_id: int = 1,
    wire: bool = False,
    integer_noise: Sequence[np.ndarray] | None = None,
    consistency: str = "global",
    workers: int = 1,
    min_group: int = 0,
    validate: str | None = None,
    bound: float | None = None,
    soundness_bits: int = 40,
) -> RoundResult:
    """Securely aggregate ``inputs`` (one float array per client, same shape).

    Clients are indexed 0..n-1 (node ids are index + 1); ``dropouts`` maps a stage
    (``Stage``, its number 1-5, or its name) to the indices that stop answering there.
    Returns the weighted mean of the survivors' inputs as the server decodes it; raises
    :class:`~sgs_flower.secagg.errors.ThresholdError` when too few survive.

    ``consistency`` is the round's consistency quorum: ``"global"`` (the default) or
    ``"neighbourhood"``, for which the simulated sites opt in (``sgs-consistency``).

    ``workers`` > 1 runs the sites in that many worker processes (:class:`SiteShards`),
    as deployed sites run on their own machines: each still does all of its own checks
    and key agreements, so the round's wall time is about the total site CPU over
    ``workers`` plus the server's. The messages, refusals and results are those of
    ``workers=1``; ``seconds["clients_stageN"]`` is then the wall time of the parallel
    stage, and ``worker_stats`` what each worker used (its CPU and memory are not in
    this process's own figures). ``cpu_seconds`` holds the sites' CPU by stage, summed
    over sites wherever they ran, and the server's.

    ``min_group`` >= 2 turns on participation in whole groups (:mod:`sgs_flower.secagg.groups`,
    the Flower glue's default is 3) on both sides: the server (``SecAggServer(min_group=...)``)
    and the sites (``sgs-min-group``) learn the federation from this round's cohort, and a
    group with a member that sent no masked input stays out of the sum whole.

    ``validate`` turns on input validation (issue 31, docs/validation.md): ``"linf"``
    proves the L2 bound implied by the range, ``sqrt(m) * L * max_weight`` in integer
    units (``L`` levels per coordinate); ``"l2"`` proves ``bound`` (an L2 norm in the
    inputs' units, converted to ``(bound * L / clip_range + sqrt(m)) * max_weight``, the
    rounding included). A site whose proof fails is left out (``outcome.cheaters``).
    """
    n = len(inputs)
    if weights is None:
        weights = [1] * n
    if len(weights) != n:
        raise ValueError(f"{n} inputs but {len(weights)} weights")
    shape = np.asarray(inputs[0]).shape
    for i, x in enumerate(inputs):
        if np.asarray(x).shape != shape:
            raise ValueError(f"input {i} has shape {np.asarray(x).shape}, input 0 has {shape}")
    config = QuantizationConfig(
        clip_range=clip_range, max_cohort=n, max_weight=max_weight or max(weights), field_bits=field_bits
    )
    rng = np.random.default_rng(seed)
    ids = [i + 1 for i in range(n)]
    encoded = [
        encode(x, w, config, rng, None if integer_noise is None else integer_noise[i])
        for i, (x, w) in enumerate(zip(inputs, weights, strict=True))
    ]
    m = encoded[0].vector.size
    layout = None
    if validate is not None:
        layout = layout_for(validate, integer_bound(validate, bound, int(np.prod(shape)), config), int(np.prod(shape)),
                            soundness_bits)
    params = RoundParams(
        run_id=run_id, round_id=round_id, cohort=tuple(ids), vector_length=m, field_bits=field_bits,
        degree=degree, threshold=threshold, min_clients=min_clients, consistency=consistency, validation=layout,
    )
    server = SecAggServer(params, min_group=min_group)
    # the simulated sites accept this cohort's size (the default policy stops at 1,000)
    # and, when the round asks for it, the neighbourhood quorum
    policy = ClientPolicy(max_cohort=max(ClientPolicy().max_cohort, n), consistency=consistency, min_group=min_group)
    drops = {_stage_key(s): {i + 1 for i in v} for s, v in (dropouts or {}).items()}
    seconds: dict[str, float] = {}
    upload: dict[int, int] = {}
    vectors = {u: e.vector for u, e in zip(ids, encoded, strict=True)}
    stats: list[WorkerStats] = []
    cpu: dict[str, float] = {}
    used = 1
    if workers > 1:
        shards = SiteShards(ids, policy, workers)
        used = shards.workers  # at most one per site
        try:
            outcome = run_protocol(server, shards, vectors, drops, wire, seconds=seconds, upload_bytes=upload,
                                   cpu_seconds=cpu, validation=layout)
        finally:
            stats = shards.close()
        for st in stats:
            for key, value in st.handle_cpu_seconds.items():
                cpu[key] = cpu.get(key, 0.0) + value
    else:
        clients = {u: SecAggClient(u, policy=policy) for u in ids}
        outcome = run_protocol(server, clients, vectors, drops, wire, seconds=seconds, upload_bytes=upload,
                               cpu_seconds=cpu, validation=layout)
    decoded = decode_checked(outcome.total, config, len(outcome.survivors))
    survivors = [u - 1 for u in outcome.survivors]
    return RoundResult(
        aggregate=decoded.mean.reshape(shape),
        decoded=decoded,
        outcome=outcome,
        survivors=survivors,
        clipped=sum(encoded[i].clipped for i in survivors),
        config=config,
        seconds=seconds,
        upload_bytes={u - 1: b for u, b in upload.items()},
        workers=used,
        worker_stats=stats,
        cpu_seconds=cpu,
        server=server,
    )


def integer_bound(validate: str, bound: float | None, size: int, config: QuantizationConfig) -> int:
    """:func:`simulate_round`'s validation bound in integer units (see its docstring)."""
    weight = config.max_weight
    if validate == "linf":
        return math.ceil(math.sqrt(size) * config.levels * weight)
    if validate == "l2":
        if bound is None or not bound > 0:
            raise ConfigurationError("validate='l2' needs bound=, the inputs' L2 norm bound (> 0)")
        return math.ceil((bound * config.scale + math.sqrt(size)) * weight)
    raise ConfigurationError(f"validate must be 'l2', 'linf' or None, got {validate!r}")


# ---------------------------------------------------------------- pipelined rounds
@dataclass
class PipelinedRound:
    """One round of :class:`PipelinedRunner`: its outcome (or the error that aborted it)
    and the exchanges it made (stage names, in order)."""

    round_id: int
    cohort: tuple[int, ...]
    outcome: RoundOutcome | None = None
    error: SecAggError | None = None
    exchanges: list[str] = field(default_factory=list)
    pipelined: bool = False  # its keys and shares travelled during the previous round
    refused: dict[int, Exception] = field(default_factory=dict)  # this round's parts clients refused
    ahead_refused: dict[int, Exception] = field(default_factory=dict)  # next round's parts refused
    ahead_ready: bool = False  # the next round was set up during this one


@dataclass
class _Ahead:
    server: SecAggServer
    bundles: dict[int, ShareBundle] | None = None


class PipelinedRunner:
    """Several SecAgg+ rounds in one process, the key agreement of round r + 1 riding on
    round r's consistency (its advertisements) and unmask (its shares) exchanges, so a
    steady-state round makes three exchanges: masked input, consistency, unmask.

    The first round, and any round after an aborted one (or whose advance setup failed),
    makes the full five. Clients are kept across rounds (``clients``); each round's
    ``dropouts`` maps a stage to the nodes that are offline from that exchange on (for
    this round), which includes the next round's parts riding on those exchanges.
    """

    def __init__(
        self,
        clients: Mapping[int, SecAggClient],
        vector_length: int,
        *,
        run_id: int = 1,
        field_bits: int = 32,
        degree: int | None = None,
        threshold: int | None = None,
        min_clients: int | None = None,
        wire: bool = False,
        consistency: str = "global",
    ) -> None:
        self.clients = dict(clients)
        self.consistency = consistency  # the sites' policies must accept it (sgs-consistency)
        self.vector_length = vector_length
        self.run_id = run_id
        self.field_bits = field_bits
        self.degree, self.threshold, self.min_clients = degree, threshold, min_clients
        self.wire = wire
        self.ahead: _Ahead | None = None

    def params(self, round_id: int, cohort: Sequence[int]) -> RoundParams:
        return RoundParams(
            run_id=self.run_id, round_id=round_id, cohort=tuple(cohort), vector_length=self.vector_length,
            field_bits=self.field_bits, degree=self.degree, threshold=self.threshold, min_clients=self.min_clients,
            consistency=self.consistency,
        )

    def _carry(self, msg: Message) -> Message:
        return decode_message(encode_message(msg)) if self.wire else msg

    def _exchange(
        self,
        rec: PipelinedRound,
        current: Mapping[int, Message],
        ahead: Mapping[int, Message],
        offline: set[int],
        kw: Callable[[int], dict[str, Any]] | None = None,
    ) -> tuple[dict[int, Message | bytes], dict[int, Message | bytes]]:
        """One exchange: each node gets its part of this round, the next round's part,
        or both in one message; returns the replies to each, by node."""
        cur: dict[int, Message | bytes] = {}
        nxt: dict[int, Message | bytes] = {}
        for node in sorted(set(current) | set(ahead)):
            if node in offline:
                continue
            client = self.clients[node]
            if node in current:
                msg = self._carry(current[node])
                try:
                    reply = client.handle(msg, **(kw(node) if kw else {}))
                except (ProtocolError, ThresholdError) as exc:
                    rec.refused[node] = exc  # the next round's part is not looked at
                    continue
                cur[node] = self._carry(reply)
                if node in ahead:
                    try:
                        nxt[node] = self._carry(client.handle_next(self._carry(ahead[node]), msg))
                    except (ProtocolError, ThresholdError) as exc:
                        rec.ahead_refused[node] = exc
            else:  # in the next round's cohort only: a setup-only message in this exchange
                try:
                    nxt[node] = self._carry(client.handle(self._carry(ahead[node])))
                except (ProtocolError, ThresholdError) as exc:
                    rec.ahead_refused[node] = exc
        return cur, nxt

    def run_round(
        self,
        round_id: int,
        cohort: Sequence[int],
        vectors: Mapping[int, np.ndarray],
        *,
        next_cohort: Sequence[int] | None = None,
        dropouts: Mapping[Stage, Collection[int]] | None = None,
        bound_digest: bytes | None = None,
    ) -> PipelinedRound:
        """Run round ``round_id`` over ``cohort``; with ``next_cohort``, set round
        ``round_id + 1`` up during it. ``bound_digest`` stands for the digest of the
        round's model (default: one per round)."""
        rec = PipelinedRound(round_id, tuple(sorted(cohort)))
        digest = bound_digest if bound_digest is not None else b"model of round %d" % round_id
        drops = {Stage(s): set(v) for s, v in (dropouts or {}).items()}
        offline: set[int] = set()

        def exchange(stage: Stage, outgoing: Mapping[int, Message], nxt: Any = None,
                     parts: Mapping[int, Message] | None = None) -> tuple[Replies, Replies]:
            offline.update(drops.get(stage, ()))
            rec.exchanges.append(stage.name)
            kw = (lambda u: {"vector": vectors[u], "bound_digest": digest}) if stage == Stage.MASKED_INPUT else None
            return self._exchange(rec, outgoing, parts or {}, offline, kw)

        def next_round() -> _Ahead | None:
            if next_cohort is None:
                return None
            try:
                return _Ahead(SecAggServer(self.params(round_id + 1, next_cohort), bound_digest=None))
            except SecAggError:
                return None

        ahead, self.ahead = self.ahead, None
        if ahead is not None and (ahead.server.params.round_id, ahead.server.params.cohort) != (round_id, rec.cohort):
            ahead = None  # set up for another round or cohort: discarded, full setup
        try:  # the protocol's stage sequence, as every round runs it (sgs_flower.secagg.stages)
            if ahead is not None:
                server, bundles, rec.pipelined = ahead.server, ahead.bundles or {}, True
            else:
                server = SecAggServer(self.params(round_id, cohort), bound_digest=None)
                bundles = share_keys(server, exchange)
            server.bind_model(digest)  # the model travels with the masked-input request
            rec.outcome, nxt = mask_and_unmask(server, exchange, bundles, next_round)
        except SecAggError as exc:  # aborted: nothing released, the next round sets up in full
            rec.error = exc
            return rec
        self.ahead = nxt
        rec.ahead_ready = nxt is not None
        return rec
