"""Run a whole SecAgg+ round in one process, with no Flower.

For tests, benchmarks, and users who want to check the protocol: n clients and the
server exchange the real messages (optionally through their byte encoding), with
dropouts injected at any stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.errors import ProtocolError, SecAggError, ThresholdError
from sgs_flower.secagg.policy import ClientPolicy
from sgs_flower.secagg.quantize import DecodedAggregate, QuantizationConfig, encode
from sgs_flower.secagg.server import RoundOutcome, RoundParams, SecAggServer, decode_checked
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


def _stage_key(stage: Stage | int | str) -> Stage:
    if isinstance(stage, str):
        return Stage[stage.upper()]
    return Stage(stage)


def run_protocol(
    server: SecAggServer,
    clients: Mapping[int, SecAggClient],
    vectors: Mapping[int, np.ndarray],
    dropouts: Mapping[Stage, Collection[int]] | None = None,
    wire: bool = False,
    bound_digests: Mapping[int, bytes] | None = None,
    seconds: dict[str, float] | None = None,
    upload_bytes: dict[int, int] | None = None,
) -> RoundOutcome:
    """Drive the five stages; a client in ``dropouts[stage]`` sends nothing from that
    stage on. With ``wire=True`` every message goes through its byte encoding."""
    drops = {s: set(v) for s, v in (dropouts or {}).items()}
    gone: set[int] = set()
    timing = seconds if seconds is not None else {}
    upload = upload_bytes if upload_bytes is not None else {}

    def exchange(stage: Stage, outgoing: Mapping[int, Message]) -> dict[int, Message | bytes]:
        gone.update(drops.get(stage, ()))
        replies: dict[int, Message | bytes] = {}
        t0 = time.perf_counter()
        for node, msg in outgoing.items():
            if node in gone:
                continue
            if wire:
                msg = decode_message(encode_message(msg))
            try:
                kw: dict = {}
                if stage == Stage.MASKED_INPUT:
                    kw["vector"] = vectors[node]
                    kw["bound_digest"] = (bound_digests or {}).get(node, b"")
                reply = clients[node].handle(msg, **kw)
            except (ProtocolError, ThresholdError):
                gone.add(node)
                continue
            if wire:
                data = encode_message(reply)
                upload[node] = upload.get(node, 0) + len(data)
                replies[node] = data
            else:
                replies[node] = reply
        timing[f"clients_stage{int(stage)}"] = time.perf_counter() - t0
        return replies

    t = time.perf_counter()
    rosters = server.collect_keys(exchange(Stage.ADVERTISE_KEYS, server.setup_messages()))
    timing["server_stage1"] = time.perf_counter() - t - timing["clients_stage1"]
    t = time.perf_counter()
    bundles = server.collect_shares(exchange(Stage.SHARE_KEYS, rosters))
    timing["server_stage2"] = time.perf_counter() - t - timing["clients_stage2"]
    t = time.perf_counter()
    requests = server.collect_masked(exchange(Stage.MASKED_INPUT, bundles))
    timing["server_stage3"] = time.perf_counter() - t - timing["clients_stage3"]
    t = time.perf_counter()
    unmask = server.collect_consistency(exchange(Stage.CONSISTENCY, requests))
    timing["server_stage4"] = time.perf_counter() - t - timing["clients_stage4"]
    t = time.perf_counter()
    outcome = server.collect_unmask(exchange(Stage.UNMASK, unmask))
    timing["server_stage5"] = time.perf_counter() - t - timing["clients_stage5"]
    return outcome


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
) -> RoundResult:
    """Securely aggregate ``inputs`` (one float array per client, same shape).

    Clients are indexed 0..n-1 (node ids are index + 1); ``dropouts`` maps a stage
    (``Stage``, its number 1-5, or its name) to the indices that stop answering there.
    Returns the weighted mean of the survivors' inputs as the server decodes it; raises
    :class:`~sgs_flower.secagg.errors.ThresholdError` when too few survive.

    ``consistency`` is the round's consistency quorum: ``"global"`` (the default) or
    ``"neighbourhood"``, for which the simulated sites opt in (``sgs-consistency``).
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
    params = RoundParams(
        run_id=run_id, round_id=round_id, cohort=tuple(ids), vector_length=m, field_bits=field_bits,
        degree=degree, threshold=threshold, min_clients=min_clients, consistency=consistency,
    )
    server = SecAggServer(params)
    # the simulated sites accept this cohort's size (the default policy stops at 1,000)
    # and, when the round asks for it, the neighbourhood quorum
    policy = ClientPolicy(max_cohort=max(ClientPolicy().max_cohort, n), consistency=consistency)
    clients = {u: SecAggClient(u, policy=policy) for u in ids}
    drops = {_stage_key(s): {i + 1 for i in v} for s, v in (dropouts or {}).items()}
    seconds: dict[str, float] = {}
    upload: dict[int, int] = {}
    outcome = run_protocol(
        server, clients, {u: e.vector for u, e in zip(ids, encoded, strict=True)}, drops, wire,
        seconds=seconds, upload_bytes=upload,
    )
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
    )


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
    bundles: dict[int, ShareBundle] = field(default_factory=dict)


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

        def exchange(stage: Stage, current: Mapping[int, Message], ahead: Mapping[int, Message] | None = None,
                     kw: Callable[[int], dict[str, Any]] | None = None):
            offline.update(drops.get(stage, ()))
            rec.exchanges.append(stage.name)
            return self._exchange(rec, current, ahead or {}, offline, kw)

        ahead, self.ahead = self.ahead, None
        if ahead is not None and (ahead.server.params.round_id, ahead.server.params.cohort) != (round_id, rec.cohort):
            ahead = None  # set up for another round or cohort: discarded, full setup
        try:
            if ahead is not None:
                server, bundles, rec.pipelined = ahead.server, ahead.bundles, True
            else:
                server = SecAggServer(self.params(round_id, cohort), bound_digest=None)
                rosters = server.collect_keys(exchange(Stage.ADVERTISE_KEYS, server.setup_messages())[0])
                bundles = server.collect_shares(exchange(Stage.SHARE_KEYS, rosters)[0])
            server.bind_model(digest)  # the model travels with the masked-input request
            requests = server.collect_masked(exchange(
                Stage.MASKED_INPUT, bundles,
                kw=lambda u: {"vector": vectors[u], "bound_digest": digest},
            )[0])
            nxt: _Ahead | None = None
            if next_cohort is not None:
                try:
                    nxt = _Ahead(SecAggServer(self.params(round_id + 1, next_cohort), bound_digest=None))
                except SecAggError:
                    nxt = None
            cur, adv = exchange(Stage.CONSISTENCY, requests, nxt.server.setup_messages() if nxt else None)
            unmask = server.collect_consistency(cur)
            next_rosters = None
            if nxt is not None:
                try:
                    next_rosters = nxt.server.collect_keys(adv)
                except SecAggError:
                    nxt = None
            cur, shares = exchange(Stage.UNMASK, unmask, next_rosters)
            rec.outcome = server.collect_unmask(cur)
            if nxt is not None:
                try:
                    nxt.bundles = nxt.server.collect_shares(shares)
                except SecAggError:
                    nxt = None
        except SecAggError as exc:  # aborted: nothing released, the next round sets up in full
            rec.error = exc
            return rec
        self.ahead = nxt
        rec.ahead_ready = nxt is not None
        return rec
