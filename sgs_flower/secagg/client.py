"""The client side of SecAgg+, one small state class per protocol stage.

A state accepts exactly the message valid for it and returns ``(next_state, reply)``.
:class:`SecAggClient` wraps the states: it checks every message's header (version,
run, round, stage, recipient) before dispatching, and it can be saved to and restored
from plain data, so a Flower client can keep it in ``Context.state`` between the
protocol's messages.

The client defends the one secret that matters: per neighbour it reveals either the
share of the self-mask seed or the share of the masking key, never both, and it checks
the server's survivor/dropped sets against what it saw before revealing anything.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sgs_flower.secagg import keys, shamir
from sgs_flower.secagg.errors import (
    InconsistentRequestError,
    MalformedMessageError,
    ProtocolError,
    StaleMessageError,
    ThresholdError,
    UnknownSenderError,
)
from sgs_flower.secagg.graph import neighbours, validate
from sgs_flower.secagg.prg import dtype_for_bits, get_expander, reduce_mod
from sgs_flower.secagg.wire import (
    PROTOCOL_VERSION,
    AdvertiseKeys,
    KeyRoster,
    MaskedInput,
    Message,
    NeighbourKeys,
    Setup,
    ShareBundle,
    ShareKeys,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
    decode,
    encode,
)

_SHARE_PLAINTEXT = 16 + 2 * shamir.SHARE_BYTES


def share_x(cohort: tuple[int, ...], node: int) -> int:
    """The Shamir x-coordinate of a share held by ``node``: its cohort position + 1."""
    return cohort.index(node) + 1


@dataclass
class _RoundSecrets:
    setup: Setup
    share_context: bytes  # keys the share encryption: the round's protocol parameters only
    neighbours: frozenset[int]
    c_sk: bytes
    s_sk: bytes
    b_u: bytes


@dataclass
class AwaitingSetup:
    """Idle: waits for a round's setup, then creates fresh keys and advertises them."""

    node_id: int

    def on_setup(self, msg: Setup) -> tuple[AwaitingRoster, AdvertiseKeys]:
        u = self.node_id
        if u not in msg.cohort:
            raise UnknownSenderError(f"node {u} is not in the cohort of round {msg.round_id}")
        if len(set(msg.cohort)) != len(msg.cohort):
            raise MalformedMessageError("setup cohort has duplicate node ids")
        validate(len(msg.cohort), msg.degree, msg.threshold)
        dtype_for_bits(msg.field_bits)
        graph = neighbours(msg.cohort, msg.degree, msg.graph_seed)
        _, share_context = keys.round_contexts(msg, b"")
        c_sk, s_sk = keys.generate_private_key(), keys.generate_private_key()
        secrets = _RoundSecrets(
            setup=msg, share_context=share_context, neighbours=graph[u],
            c_sk=keys.private_bytes(c_sk), s_sk=keys.private_bytes(s_sk), b_u=os.urandom(32),
        )
        reply = AdvertiseKeys(
            run_id=msg.run_id, round_id=msg.round_id, sender=u,
            c_pk=keys.public_bytes(c_sk), s_pk=keys.public_bytes(s_sk),
            self_mask_commitment=keys.self_mask_commitment(secrets.b_u, msg.run_id, msg.round_id, u),
        )
        return AwaitingRoster(u, secrets), reply


@dataclass
class AwaitingRoster:
    """Has advertised keys; waits for the neighbours' keys, then shares its secrets."""

    node_id: int
    secrets: _RoundSecrets

    def on_roster(self, msg: KeyRoster) -> tuple[AwaitingShares, ShareKeys]:
        u, sec = self.node_id, self.secrets
        roster: dict[int, NeighbourKeys] = {}
        seen_keys: set[bytes] = set()
        for nk in msg.keys:
            if nk.node not in sec.neighbours:
                raise UnknownSenderError(f"roster names node {nk.node}, which is not a neighbour of node {u}")
            if nk.node in roster:
                raise MalformedMessageError(f"roster names node {nk.node} twice")
            if nk.c_pk in seen_keys or nk.s_pk in seen_keys or nk.c_pk == nk.s_pk:
                raise MalformedMessageError(f"roster reuses a public key (node {nk.node})")
            seen_keys.update((nk.c_pk, nk.s_pk))
            roster[nk.node] = nk
        t = sec.setup.threshold
        if len(roster) < t:
            raise ThresholdError(
                f"only {len(roster)} of node {u}'s neighbours advertised keys, threshold is {t}: "
                "its secrets could not be recovered, so it does not take part"
            )
        order = sorted(roster)
        xs = [share_x(sec.setup.cohort, v) for v in order]
        sk_shares = shamir.split(sec.s_sk, xs, t)
        b_shares = shamir.split(sec.b_u, xs, t)
        c_sk = keys.load_private_key(sec.c_sk)
        cts = []
        for v, sk_sh, b_sh in zip(order, sk_shares, b_shares, strict=True):
            shared = keys.agree(c_sk, roster[v].c_pk, v)
            k = keys.share_key(shared, sec.share_context, u, v)
            plaintext = keys.node_bytes(u) + keys.node_bytes(v) + sk_sh + b_sh
            cts.append((v, keys.encrypt_share(k, plaintext, sec.share_context, u, v)))
        reply = ShareKeys(run_id=msg.run_id, round_id=msg.round_id, sender=u, ciphertexts=tuple(cts))
        return AwaitingShares(u, sec, roster), reply


@dataclass
class AwaitingShares:
    """Has shared its secrets; waits for its neighbours' shares, then masks its input."""

    node_id: int
    secrets: _RoundSecrets
    roster: dict[int, NeighbourKeys]

    def on_shares(
        self, msg: ShareBundle, vector: np.ndarray, bound_digest: bytes
    ) -> tuple[AwaitingUnmask, MaskedInput]:
        """Mask the input. ``bound_digest`` is the digest of the global model and config
        this client trained on: it keys the masks (see :func:`keys.round_contexts`)."""
        u, sec = self.node_id, self.secrets
        setup = sec.setup
        held: dict[int, tuple[bytes, bytes]] = {}
        c_sk = keys.load_private_key(sec.c_sk)
        for v, blob in msg.ciphertexts:
            if v not in self.roster:
                raise UnknownSenderError(f"share from node {v}, which is not in node {u}'s roster")
            if v in held:
                raise MalformedMessageError(f"two shares from node {v}")
            shared = keys.agree(c_sk, self.roster[v].c_pk, v)
            k = keys.share_key(shared, sec.share_context, u, v)
            plain = keys.decrypt_share(k, blob, sec.share_context, v, u)
            if len(plain) != _SHARE_PLAINTEXT or plain[:8] != keys.node_bytes(v) or plain[8:16] != keys.node_bytes(u):
                raise MalformedMessageError(f"share from node {v} is not addressed from {v} to {u}")
            held[v] = (plain[16 : 16 + shamir.SHARE_BYTES], plain[16 + shamir.SHARE_BYTES :])
        if len(held) < setup.threshold:
            raise ThresholdError(
                f"only {len(held)} of node {u}'s neighbours shared keys, threshold is {setup.threshold}"
            )
        dtype = dtype_for_bits(setup.field_bits)
        if not isinstance(vector, np.ndarray) or vector.dtype != dtype or vector.shape != (setup.vector_length,):
            raise MalformedMessageError(
                f"input must be {dtype} of shape ({setup.vector_length},), got "
                f"{getattr(vector, 'dtype', type(vector).__name__)} {getattr(vector, 'shape', '')}"
            )
        context, _ = keys.round_contexts(setup, bound_digest)
        masked = mask_input(vector, sec, {v: self.roster[v] for v in held}, u, context)
        reply = MaskedInput(run_id=msg.run_id, round_id=msg.round_id, sender=u, vector=masked)
        return AwaitingUnmask(u, sec, self.roster, held), reply


def mask_input(
    vector: np.ndarray, sec: _RoundSecrets, peers: dict[int, NeighbourKeys], u: int, context: bytes
) -> np.ndarray:
    """y = x + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)  (mod 2^b)."""
    setup = sec.setup
    acc = reduce_mod(vector.copy(), setup.field_bits)
    exp = get_expander(setup.vector_length, acc.dtype)
    s_sk = keys.load_private_key(sec.s_sk)
    exp.add(acc, keys.self_mask_key(sec.b_u, context, u))
    for v, nk in peers.items():
        shared = keys.agree(s_sk, nk.s_pk, v)
        exp.add(acc, keys.pairwise_mask_key(shared, context, u, v), +1 if v > u else -1)
    return reduce_mod(acc, setup.field_bits)


@dataclass
class AwaitingUnmask:
    """Has sent its masked input; answers one unmask request, after checking it."""

    node_id: int
    secrets: _RoundSecrets
    roster: dict[int, NeighbourKeys]
    held: dict[int, tuple[bytes, bytes]]

    def on_unmask(self, msg: UnmaskRequest) -> tuple[AwaitingSetup, UnmaskResponse]:
        u, t = self.node_id, self.secrets.setup.threshold
        survivors, dropped = set(msg.survivors), set(msg.dropped)
        if len(survivors) != len(msg.survivors) or len(dropped) != len(msg.dropped):
            raise InconsistentRequestError("unmask request lists a node twice")
        both = survivors & dropped
        if both:
            raise InconsistentRequestError(
                f"unmask request names nodes {sorted(both)} as both survived and dropped: revealing "
                "both shares would unmask their inputs; refused"
            )
        if u not in survivors:
            raise InconsistentRequestError(f"unmask request says node {u} dropped, but it sent its masked input")
        named = (survivors - {u}) | dropped
        seen = set(self.held)
        if named != seen:
            extra, missing = sorted(named - seen), sorted(seen - named)
            raise InconsistentRequestError(
                f"unmask request differs from what node {u} saw in the masked-input stage "
                f"(unexpected {extra}, missing {missing}); refused"
            )
        if len(survivors) < t:
            raise InconsistentRequestError(
                f"unmask request has {len(survivors)} survivors, fewer than the threshold {t}; refused"
            )
        reply = UnmaskResponse(
            run_id=msg.run_id, round_id=msg.round_id, sender=u,
            self_mask_shares=tuple((v, self.held[v][1]) for v in sorted(survivors - {u})),
            key_shares=tuple((v, self.held[v][0]) for v in sorted(dropped)),
        )
        return AwaitingSetup(u), reply


ClientState = AwaitingSetup | AwaitingRoster | AwaitingShares | AwaitingUnmask


@dataclass
class SecAggClient:
    """One client's protocol endpoint across rounds.

    ``handle`` validates the header, runs the current state, and returns the reply.
    Any :class:`ProtocolError` leaves the client idle for the round (it sends nothing
    more), which the server treats as a dropout.
    """

    node_id: int
    state: ClientState = field(init=False)
    last_masked: tuple[int, int] = (-1, -1)  # (run, round) of the last masked input sent

    def __post_init__(self) -> None:
        self.state = AwaitingSetup(self.node_id)

    @property
    def stage(self) -> Stage | None:
        return {
            AwaitingRoster: Stage.SHARE_KEYS,
            AwaitingShares: Stage.MASKED_INPUT,
            AwaitingUnmask: Stage.UNMASK,
        }.get(type(self.state))

    def abandon(self) -> None:
        """Leave the round in progress (the local training failed): send nothing more."""
        self.state = AwaitingSetup(self.node_id)

    def handle(self, msg: Message, *, vector: np.ndarray | None = None, bound_digest: bytes = b"") -> Message:
        try:
            return self._handle(msg, vector, bound_digest)
        except ProtocolError:
            self.state = AwaitingSetup(self.node_id)
            raise
        except ThresholdError:
            self.state = AwaitingSetup(self.node_id)
            raise

    def _handle(self, msg: Message, vector: np.ndarray | None, bound_digest: bytes) -> Message:
        if not isinstance(msg, Message) or msg.to_server:
            raise MalformedMessageError(f"expected a server-to-client message, got {type(msg).__name__}")
        version = getattr(msg, "version", None)
        if version != PROTOCOL_VERSION:
            raise StaleMessageError(f"protocol version {version!r} is not {PROTOCOL_VERSION!r}")
        recipient = getattr(msg, "recipient", None)
        if recipient != self.node_id:
            raise UnknownSenderError(f"message addressed to node {recipient} reached node {self.node_id}")
        if isinstance(msg, Setup):
            if (msg.run_id, msg.round_id) <= self.last_masked and msg.run_id == self.last_masked[0]:
                raise StaleMessageError(
                    f"setup for round {msg.round_id} of run {msg.run_id} is stale or replayed: node "
                    f"{self.node_id} already sent its input for round {self.last_masked[1]}"
                )
            self.state, advertise = AwaitingSetup(self.node_id).on_setup(msg)
            return advertise
        st = self.state
        if isinstance(st, AwaitingSetup):
            raise StaleMessageError(
                f"{type(msg).__name__} for round {msg.round_id} of run {msg.run_id} arrived, but node "
                f"{self.node_id} has no round in progress (stale, replayed or out of order)"
            )
        setup = st.secrets.setup
        if (msg.run_id, msg.round_id) != (setup.run_id, setup.round_id):
            raise StaleMessageError(
                f"{type(msg).__name__} is for run {msg.run_id} round {msg.round_id}, but the round in "
                f"progress is run {setup.run_id} round {setup.round_id} (replayed or stale)"
            )
        if isinstance(st, AwaitingRoster) and isinstance(msg, KeyRoster):
            self.state, share_keys = st.on_roster(msg)
            return share_keys
        if isinstance(st, AwaitingShares) and isinstance(msg, ShareBundle):
            if vector is None:
                raise MalformedMessageError("the masked-input stage needs the client's input vector")
            self.state, masked = st.on_shares(msg, vector, bound_digest)
            self.last_masked = (setup.run_id, setup.round_id)
            return masked
        if isinstance(st, AwaitingUnmask) and isinstance(msg, UnmaskRequest):
            self.state, response = st.on_unmask(msg)
            return response
        raise StaleMessageError(
            f"{type(msg).__name__} (stage {msg.stage.name}) is not valid while node {self.node_id} "
            f"is at stage {self.stage.name if self.stage else 'idle'}"
        )

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Plain data (ints, str, bytes, lists) for a Flower ``ConfigRecord``."""
        out: dict[str, Any] = {
            "node_id": self.node_id,
            "state": type(self.state).__name__,
            "last_masked": list(self.last_masked),
        }
        st = self.state
        if isinstance(st, AwaitingSetup):
            return out
        sec = st.secrets
        out.update(setup=encode(sec.setup), share_context=sec.share_context, c_sk=sec.c_sk, s_sk=sec.s_sk, b_u=sec.b_u)
        if isinstance(st, AwaitingShares | AwaitingUnmask):
            roster = KeyRoster(run_id=sec.setup.run_id, round_id=sec.setup.round_id, recipient=self.node_id,
                               keys=tuple(st.roster.values()))
            out["roster"] = encode(roster)
        if isinstance(st, AwaitingUnmask):
            out["held_nodes"] = list(st.held)
            out["held_shares"] = [a + b for a, b in st.held.values()]
        return out

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> SecAggClient:
        client = cls(int(d["node_id"]))
        client.last_masked = (int(d["last_masked"][0]), int(d["last_masked"][1]))
        name = d["state"]
        if name == "AwaitingSetup":
            return client
        setup = decode(d["setup"])
        assert isinstance(setup, Setup)
        graph = neighbours(setup.cohort, setup.degree, setup.graph_seed)
        sec = _RoundSecrets(setup, d["share_context"], graph[client.node_id], d["c_sk"], d["s_sk"], d["b_u"])
        if name == "AwaitingRoster":
            client.state = AwaitingRoster(client.node_id, sec)
            return client
        roster_msg = decode(d["roster"])
        assert isinstance(roster_msg, KeyRoster)
        roster = {nk.node: nk for nk in roster_msg.keys}
        if name == "AwaitingShares":
            client.state = AwaitingShares(client.node_id, sec, roster)
            return client
        n = shamir.SHARE_BYTES
        held = {int(v): (bytes(s[:n]), bytes(s[n:])) for v, s in zip(d["held_nodes"], d["held_shares"], strict=True)}
        client.state = AwaitingUnmask(client.node_id, sec, roster, held)
        return client
