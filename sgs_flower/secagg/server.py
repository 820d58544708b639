"""The server side of SecAgg+: routes keys and shares, sums masked inputs, unmasks.

The server is driven stage by stage with the replies it collected; each ``collect_*``
call validates every reply, excludes (and records in :attr:`SecAggServer.rejected`)
any client whose message is stale, replayed, mis-addressed, malformed or from outside
the cohort, treats missing replies as dropouts, and returns the messages for the next
stage. Nothing a client sends can crash it: a bad message only removes its sender.

The server never holds an individual input in the clear: masked inputs are added into
one accumulator as they arrive, and unmasking removes only masks.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from blspy import G1Element, G2Element

from sgs_flower.secagg import bls, identity, keys, shamir
from sgs_flower.secagg import input_validation as iv
from sgs_flower.secagg.client import share_x
from sgs_flower.secagg.errors import (
    ConfigurationError,
    FailedProofError,
    InconsistentAggregateError,
    InconsistentRequestError,
    MalformedMessageError,
    ProtocolError,
    ReconstructionError,
    SecAggError,
    SignatureError,
    StaleMessageError,
    ThresholdError,
    UnknownSenderError,
    UnprovenInputError,
)
from sgs_flower.secagg.graph import (
    CONSISTENCY_GLOBAL,
    CONSISTENCY_NEIGHBOURHOOD,
    check_consistency_mode,
    consistency_quorum,
    default_degree,
    default_threshold,
    graph_seed,
    neighbourhood_quorum,
    neighbours,
    validate,
)
from sgs_flower.secagg.groups import GroupRule, whole_group_members
from sgs_flower.secagg.prg import dtype_for_bits, get_expander, reduce_mod
from sgs_flower.secagg.quantize import DecodedAggregate, QuantizationConfig, decode
from sgs_flower.secagg.wire import (
    MAX_RETRIES,
    PROTOCOL_VERSION,
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    KeyRoster,
    MaskedInput,
    Message,
    NeighbourKeys,
    RetryInput,
    RetryRequest,
    Setup,
    ShareBundle,
    ShareKeys,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
)
from sgs_flower.secagg.wire import decode as decode_message

_CIPHERTEXT_BYTES = keys.NONCE_BYTES + 16 + 16 + 2 * shamir.SHARE_BYTES


@dataclass(frozen=True)
class RoundParams:
    """A round's public protocol parameters, validated on construction."""

    run_id: int
    round_id: int
    cohort: tuple[int, ...]
    vector_length: int
    field_bits: int = 32
    degree: int | None = None
    threshold: int | None = None
    min_clients: int | None = None
    # the consistency quorum (graph.CONSISTENCY_MODES): "global" (default) or "neighbourhood"
    # (sites must opt in, policy sgs-consistency); announced in the setup and bound into the
    # round context
    consistency: str = CONSISTENCY_GLOBAL
    # input validation (issue 31): what every survivor proves about its input, None for
    # a round without; the masked vectors then carry the commitment blinds in limbs after
    # the vector_length words (RoundParams.masked_length)
    validation: iv.ValidationLayout | None = None

    def __post_init__(self) -> None:
        check_consistency_mode(self.consistency, "RoundParams.consistency")
        if self.validation is not None:
            iv.check_field_bits(self.field_bits)
            if self.validation.body > self.vector_length:
                raise ConfigurationError(
                    f"the validated body of {self.validation.body} words exceeds the vector of {self.vector_length}"
                )
        cohort = tuple(sorted(set(self.cohort)))
        if len(cohort) != len(self.cohort):
            raise ConfigurationError("cohort contains duplicate node ids")
        object.__setattr__(self, "cohort", cohort)
        n = len(cohort)
        if n < 2:
            raise ConfigurationError(f"a cohort needs at least 2 clients, got {n}")
        if self.vector_length < 1:
            raise ConfigurationError(f"vector_length must be >= 1, got {self.vector_length}")
        dtype_for_bits(self.field_bits)
        if self.degree is None:
            object.__setattr__(self, "degree", default_degree(n))
        assert self.degree is not None
        if self.threshold is None:
            object.__setattr__(self, "threshold", default_threshold(self.degree))
        assert self.threshold is not None
        validate(n, self.degree, self.threshold)
        if self.min_clients is None:
            object.__setattr__(self, "min_clients", max(3, self.threshold))
        assert self.min_clients is not None
        if self.min_clients < 2:
            raise ConfigurationError("min_clients must be >= 2: the 'sum' of one client is its input")
        if self.min_clients > n:
            raise ConfigurationError(
                f"cohort of {n} is below min_clients={self.min_clients}: a sum over so few clients "
                "reveals too much; sample more clients or lower min_clients"
            )

    @property
    def graph_seed(self) -> bytes:
        """Derived from run, round and cohort, as every client derives it."""
        return graph_seed(self.run_id, self.round_id, self.cohort)

    @property
    def masked_length(self) -> int:
        """Words of a masked input: the vector, and in a validated round the blinds' limbs."""
        return self.vector_length + iv.blind_words(self.validation, self.field_bits, len(self.cohort))

    @property
    def quorum(self) -> int:
        """Survivors and signers below which the round aborts: in the global mode also the
        signatures on the survivor set every client needs before it unmasks."""
        return consistency_quorum(len(self.cohort))


@dataclass
class RoundOutcome:
    """What the server learned: the field sum of the survivors' inputs, and who took part."""

    total: np.ndarray
    survivors: tuple[int, ...]
    dropped: dict[int, Stage]
    rejected: dict[int, ProtocolError]
    # input validation: the survivors left out because their proof failed (their input is
    # not in ``total``), and the summed blinds the aggregate opening was checked with
    cheaters: tuple[int, ...] = ()
    summed_blinds: tuple[int, ...] = ()


class SecAggServer:
    """Runs one round. Call ``setup_messages`` then ``collect_keys``, ``collect_shares``,
    ``collect_masked`` and ``collect_unmask`` in order, each with the replies received
    (a mapping from the transport's authenticated sender id to the message or its bytes).

    ``bound_digest`` is the digest of the global model and config the round trains on
    (it keys the masks). A round set up ahead of time (pipelined: its keys travel during
    the previous round, before its model exists) passes ``None`` and calls
    :meth:`bind_model` with the digest of the model its masked-input request carries,
    before :meth:`collect_masked`.
    """

    def __init__(
        self, params: RoundParams, bound_digest: bytes | None = b"", groups: GroupRule | None = None,
        min_group: int = 0,
    ) -> None:
        self.params = params
        # participation in whole groups (sgs_flower.secagg.groups): a member of a group
        # that did not send its masked input whole stays out of the sum, as a dropout.
        # Without a roster's groups, ``min_group`` learns them from this round's signed
        # advertisements, as the sites do at their first round of a run
        self.groups = groups
        self.min_group = min_group
        self.group_excluded: set[int] = set()
        p = params
        assert p.degree is not None and p.threshold is not None
        self.graph = neighbours(p.cohort, p.degree, p.graph_seed)
        self.context: bytes | None = None
        self.bound_digest: bytes | None = None
        self.share_context = keys.round_context(
            PROTOCOL_VERSION, p.run_id, p.round_id, p.cohort, p.degree, p.threshold,
            p.field_bits, p.vector_length, p.graph_seed, b"", p.consistency,
        )  # what advertisements and consistency signatures are bound to
        self.dtype = dtype_for_bits(p.field_bits)
        self.stage: Stage = Stage.ADVERTISE_KEYS
        self.rejected: dict[int, ProtocolError] = {}
        self.dropped: dict[int, Stage] = {}
        self.advertised: dict[int, AdvertiseKeys] = {}
        self.shared: dict[int, ShareKeys] = {}
        self.u2: set[int] = set()
        self.u3: set[int] = set()
        self.u4: set[int] = set()
        self.signatures: dict[int, bytes] = {}
        self.bls_keys: tuple[tuple[int, bytes], ...] = ()  # every advertised member's BLS entry (global rounds)
        self._bls_table: dict[int, G1Element] = {}  # their checked keys
        self.aggregate: bytes = b""  # the signers' aggregate consistency signature (global rounds)
        self.aggregate_seconds = 0.0  # time spent parsing, adding and checking it (benchmarks)
        self._survivors: tuple[int, ...] = ()  # U3 as sent in the consistency and unmask requests
        self._acc: np.ndarray | None = None
        self._seeds: dict[int, bytes] | None = None  # survivors' self-mask seeds, once unmasked (for retries)
        self.retries = 0
        # input validation (params.validation): each survivor's masked vector (kept until
        # the proofs are checked, so a cheater's can be taken out of the sum) and digest,
        # the round's challenge seed, the valid proofs and the evidence against cheaters
        self._vectors: dict[int, np.ndarray] = {}
        self.digests: dict[int, bytes] = {}
        self.challenge: bytes = b""
        self.proofs: dict[int, iv.BoundProof] = {}
        self.evidence: dict[int, bytes] = {}
        self.validation_seconds = 0.0  # time spent verifying proofs and the opening (benchmarks)
        if bound_digest is not None:
            self.bind_model(bound_digest)

    def bind_model(self, bound_digest: bytes) -> None:
        """Bind the masks to the model and config the masked-input request carries (the
        server's own view: masks of a client that saw another model will not match).
        Once, and before any masked input is summed."""
        if self.bound_digest is not None:
            if self.bound_digest == bound_digest:
                return
            raise ConfigurationError(f"round {self.params.round_id} is already bound to another model")
        if self.stage not in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT) or self.u3:
            raise ConfigurationError(f"round {self.params.round_id}: the model is bound before masked inputs, not after")
        p = self.params
        assert p.degree is not None and p.threshold is not None
        self.bound_digest = bytes(bound_digest)
        self.context = keys.round_context(
            PROTOCOL_VERSION, p.run_id, p.round_id, p.cohort, p.degree, p.threshold,
            p.field_bits, p.vector_length, p.graph_seed, self.bound_digest, p.consistency,
        )

    # ------------------------------------------------------------ helpers
    def _expect(self, stage: Stage) -> None:
        if self.stage != stage:
            raise StaleMessageError(f"server is at stage {self.stage.name}, not {stage.name}")

    def _accept(
        self, replies: Mapping[int, Message | bytes], expected: set[int], kind: type[Message]
    ) -> dict[int, Message]:
        """Validate replies; excluded senders are recorded, never raised."""
        ok: dict[int, Message] = {}
        for node, raw in replies.items():
            try:
                ok[node] = self._validate(node, raw, expected, kind)
            except ProtocolError as exc:
                self.rejected[node] = exc
        for node in expected - set(ok):
            self.dropped.setdefault(node, self.stage)
        return ok

    def _validate(self, node: int, raw: Message | bytes, expected: set[int], kind: type[Message]) -> Message:
        if node not in self.params.cohort:
            raise UnknownSenderError(f"node {node} is not in the cohort of round {self.params.round_id}")
        if node not in expected:
            raise UnknownSenderError(
                f"node {node} is not expected at stage {self.stage.name} (it dropped or was excluded earlier)"
            )
        msg = decode_message(raw) if isinstance(raw, bytes | bytearray | memoryview) else raw
        if not isinstance(msg, Message) or not msg.to_server:
            raise MalformedMessageError(f"node {node} sent {type(msg).__name__}, not a client message")
        if msg.version != PROTOCOL_VERSION:  # type: ignore[attr-defined]
            raise StaleMessageError(f"node {node} speaks {msg.version!r}, not {PROTOCOL_VERSION!r}")  # type: ignore[attr-defined]
        if (msg.run_id, msg.round_id) != (self.params.run_id, self.params.round_id):
            raise StaleMessageError(
                f"node {node} sent a message for run {msg.run_id} round {msg.round_id}; this is run "
                f"{self.params.run_id} round {self.params.round_id} (replayed or stale)"
            )
        if not isinstance(msg, kind):
            raise StaleMessageError(
                f"node {node} sent {type(msg).__name__} (stage {msg.stage.name}) during stage {self.stage.name}"
            )
        if msg.sender != node:  # type: ignore[attr-defined]
            raise UnknownSenderError(f"message from node {node} claims to come from node {msg.sender}")  # type: ignore[attr-defined]
        return msg

    def _require(self, count: int, what: str) -> None:
        assert self.params.min_clients is not None
        if count < self.params.min_clients:
            raise ThresholdError(
                f"round {self.params.round_id} aborted: {count} clients {what}, fewer than "
                f"min_clients={self.params.min_clients}; no aggregate is released"
            )

    # ------------------------------------------------------------ stages
    def setup_messages(self) -> dict[int, Setup]:
        p = self.params
        assert p.degree is not None and p.threshold is not None
        return {
            u: Setup(run_id=p.run_id, round_id=p.round_id, recipient=u, cohort=p.cohort, degree=p.degree,
                     threshold=p.threshold, field_bits=p.field_bits, vector_length=p.vector_length,
                     consistency=p.consistency)
            for u in p.cohort
        }

    def collect_keys(self, replies: Mapping[int, Message | bytes]) -> dict[int, KeyRoster]:
        self._expect(Stage.ADVERTISE_KEYS)
        ok = self._accept(replies, set(self.params.cohort), AdvertiseKeys)
        seen: dict[bytes, int] = {}
        probe = keys.generate_private_key()
        global_mode = self.params.consistency != CONSISTENCY_NEIGHBOURHOOD
        if global_mode:  # every new member's BLS key checked on all cores; refusals named below
            bls.prefetch([(m.identity_key, self.params.run_id, bls.entry(m.bls_key, m.bls_pop, m.bls_binding))
                          for m in ok.values() if isinstance(m, AdvertiseKeys)])
        for node, msg in sorted(ok.items()):
            assert isinstance(msg, AdvertiseKeys)
            try:
                for k in (msg.c_pk, msg.s_pk):
                    if len(k) != keys.PUBLIC_KEY_BYTES:
                        raise MalformedMessageError(f"node {node} sent a {len(k)}-byte public key")
                    if k in seen:
                        raise MalformedMessageError(f"node {node} reuses a public key of node {seen[k]}")
                    keys.agree(probe, k, node)  # refuses low-order points before anyone uses them
                if len(msg.self_mask_commitment) != 32:
                    raise MalformedMessageError(f"node {node} sent a malformed self-mask commitment")
                if msg.identity_key in seen:
                    raise MalformedMessageError(f"node {node} presents the identity key of node {seen[msg.identity_key]}")
                statement = keys.advertise_statement(
                    self.share_context, node, msg.c_pk, msg.s_pk, msg.self_mask_commitment
                )
                if not identity.verify(msg.identity_key, msg.signature, statement):
                    raise SignatureError(f"node {node}'s advertisement does not carry a valid signature")
                if global_mode:  # its BLS key: bound to its identity, with a valid PoP, not another's
                    bls_pk = bls.bound_key(msg.identity_key, self.params.run_id,
                                           bls.entry(msg.bls_key, msg.bls_pop, msg.bls_binding), node)
                    if msg.bls_key in seen:
                        raise MalformedMessageError(f"node {node} presents the BLS key of node {seen[msg.bls_key]}")
            except ProtocolError as exc:
                self.rejected[node] = exc
                self.dropped[node] = Stage.ADVERTISE_KEYS
                continue
            seen[msg.c_pk] = seen[msg.s_pk] = seen[msg.identity_key] = node
            if global_mode:
                seen[msg.bls_key] = node
                self._bls_table[node] = bls_pk
            self.advertised[node] = msg
        self._require(len(self.advertised), "advertised keys")
        self.stage = Stage.SHARE_KEYS
        out = {}
        identities = tuple((v, self.advertised[v].identity_key) for v in sorted(self.advertised))
        if global_mode:  # one tuple object for every roster (in process, sites share its checked table)
            self.bls_keys = tuple(
                (v, bls.entry(a.bls_key, a.bls_pop, a.bls_binding)) for v in sorted(self.advertised)
                for a in (self.advertised[v],)
            )
        for u in self.advertised:
            nks = tuple(
                NeighbourKeys(v, a.c_pk, a.s_pk, a.identity_key, a.self_mask_commitment, a.signature)
                for v in sorted(self.graph[u]) if v in self.advertised for a in (self.advertised[v],)
            )
            out[u] = KeyRoster(run_id=self.params.run_id, round_id=self.params.round_id, recipient=u, keys=nks,
                               identities=identities, bls_keys=self.bls_keys)
        return out

    def collect_shares(self, replies: Mapping[int, Message | bytes]) -> dict[int, ShareBundle]:
        self._expect(Stage.SHARE_KEYS)
        ok = self._accept(replies, set(self.advertised), ShareKeys)
        for node, msg in ok.items():
            assert isinstance(msg, ShareKeys)
            want = {v for v in self.graph[node] if v in self.advertised}
            got = [v for v, _ in msg.ciphertexts]
            try:
                if len(set(got)) != len(got) or set(got) != want:
                    raise MalformedMessageError(
                        f"node {node} must send one share to each of its {len(want)} advertised neighbours"
                    )
                for v, ct in msg.ciphertexts:
                    if len(ct) != _CIPHERTEXT_BYTES:
                        raise MalformedMessageError(f"node {node}'s share for node {v} has {len(ct)} bytes")
            except ProtocolError as exc:
                self.rejected[node] = exc
                self.dropped[node] = Stage.SHARE_KEYS
                continue
            self.shared[node] = msg
        self.u2 = set(self.shared)
        self._require(len(self.u2), "shared their keys")
        self.stage = Stage.MASKED_INPUT
        inbox: dict[int, list[tuple[int, bytes]]] = {v: [] for v in self.u2}
        for u, msg in sorted(self.shared.items()):
            for v, ct in msg.ciphertexts:
                if v in inbox:
                    inbox[v].append((u, ct))
        p = self.params
        return {
            v: ShareBundle(run_id=p.run_id, round_id=p.round_id, recipient=v, ciphertexts=tuple(cts))
            for v, cts in inbox.items()
        }

    def collect_masked(self, replies: Mapping[int, Message | bytes]) -> dict[int, ConsistencyRequest]:
        self._expect(Stage.MASKED_INPUT)
        if self.context is None:
            raise ConfigurationError(
                f"round {self.params.round_id}: bind_model() must bind the round's model before masked inputs"
            )
        ok = self._accept(replies, self.u2, MaskedInput)
        valid: dict[int, np.ndarray] = {}
        for node, msg in sorted(ok.items()):
            assert isinstance(msg, MaskedInput)
            vec = msg.vector
            if msg.field_bits != self.params.field_bits:
                # a site masking at another width: its masks cannot cancel with the others'
                self.rejected[node] = InconsistentRequestError(
                    f"node {node} masked at {msg.field_bits} bits, the round's field is {self.params.field_bits}"
                )
                self.dropped[node] = Stage.MASKED_INPUT
                continue
            if not isinstance(vec, np.ndarray) or vec.dtype != self.dtype or vec.shape != (self.params.masked_length,):
                self.rejected[node] = MalformedMessageError(
                    f"node {node}'s masked vector must be {self.dtype} of shape ({self.params.masked_length},), "
                    f"got {getattr(vec, 'dtype', type(vec).__name__)} {getattr(vec, 'shape', '')}"
                )
                self.dropped[node] = Stage.MASKED_INPUT
                continue
            valid[node] = vec
        if self.groups is None and self.min_group:
            federation = frozenset(a.identity_key for a in self.advertised.values())
            if len(federation) < self.min_group:
                raise ThresholdError(f"{len(federation)} sites advertised keys, fewer than one group of min_group = "
                                     f"{self.min_group}: no sum could be over a whole group")
            self.groups = GroupRule(federation, self.min_group)
        if self.groups is not None:
            identities = {v: a.identity_key for v, a in self.advertised.items()}
            keep = whole_group_members(valid, identities, self.groups)
            self.group_excluded = set(valid) - keep
            for node in self.group_excluded:  # its masks are recovered as a dropout's; its self-mask hides its input
                self.dropped[node] = Stage.MASKED_INPUT
            valid = {v: vec for v, vec in valid.items() if v in keep}
        acc = np.zeros(self.params.masked_length, dtype=self.dtype)
        for node, vec in valid.items():
            np.add(acc, vec, out=acc)
            self.u3.add(node)
            if self.params.validation is not None:
                self._vectors[node] = vec
                self.digests[node] = iv.input_digest(vec, self.params.field_bits)
        self._require(len(self.u3), "sent masked inputs")
        self._require_quorum(len(self.u3 | self._group_signers()), "sent masked inputs")
        self._acc = acc
        self.stage = Stage.CONSISTENCY
        p = self.params
        # one tuple object for every request of this round (consistency and unmask): sites
        # in one process then share its checked view (client._survivor_view)
        survivors = self._survivors = tuple(sorted(self.u3))
        digests: tuple[tuple[int, bytes], ...] = ()
        if p.validation is not None:  # the challenge: fixed now that every survivor's input is
            digests = tuple((v, self.digests[v]) for v in survivors)
            self.challenge = iv.challenge_seed(self.context, p.validation, survivors, digests)
        return {
            v: ConsistencyRequest(run_id=p.run_id, round_id=p.round_id, recipient=v, survivors=survivors,
                                  digests=digests)
            for v in sorted(self.u3 | self._group_signers())
        }

    def _group_signers(self) -> set[int]:
        """Members of groups left out whole that may still sign the survivor set: the
        quorum (global, or a site's neighbourhood) counts every cohort member that signed
        the one set, and they did send their masked inputs (sgs_flower.secagg.groups). An
        honest member signs one set per round whether or not it is in it, so counting it
        is what counting a survivor is; without it, a neighbourhood round with groups of 3
        at 5 % dropout fell short of its neighbourhood quorums (about 10 % of the cohort is
        left out with its group)."""
        if self.groups is None:
            return set()
        return set(self.group_excluded)

    def _require_quorum(self, count: int, what: str) -> None:
        if count < self.params.quorum:
            raise ThresholdError(
                f"round {self.params.round_id} aborted: {count} clients {what}, fewer than the "
                f"consistency quorum of {self.params.quorum} (two thirds of the cohort of "
                f"{len(self.params.cohort)}) that clients require before unmasking; no aggregate is released"
            )

    def collect_consistency(self, replies: Mapping[int, Message | bytes]) -> dict[int, UnmaskRequest]:
        """Check each survivor's signature on U3 and forward what the round's consistency
        quorum needs (``RoundParams.consistency``):

        - ``"global"`` (default): the valid BLS signatures added into one aggregate, sent
          with the list of its signers to every signer (:meth:`_aggregate`); a client
          reveals once q(n) = floor(2n/3) + 1 of the cohort are in it. Fewer than q(n)
          valid signers abort the round (as fewer than q(n) survivors do).
        - ``"neighbourhood"`` (opt-in): to each signer the valid ones of its neighbours, as
          many as its neighbourhood quorum needs (it counts its own): O(k) per client. A
          signer whose neighbourhood holds too few signatures could not unmask, and a
          client whose masks then lack t answering neighbours could not be unmasked: the
          round aborts here, before any share is revealed."""
        self._expect(Stage.CONSISTENCY)
        ok = self._accept(replies, self.u3 | self._group_signers(), ConsistencySignature)
        survivors = self._survivors
        statement = keys.consistency_statement(self.share_context, survivors)
        p = self.params
        evidence = self._check_proofs(ok)
        if p.consistency != CONSISTENCY_NEIGHBOURHOOD:
            signed, self.aggregate = self._aggregate(ok, statement)
            self.u4 = set(signed)
            self._require_quorum(len(self.u4), "signed the survivor set")
            self.stage = Stage.UNMASK
            return {
                v: UnmaskRequest(run_id=p.run_id, round_id=p.round_id, recipient=v, survivors=survivors,
                                 aggregate=self.aggregate, signers=signed, evidence=_evidence_for(v, evidence))
                for v in signed
            }
        for node, msg in sorted(ok.items()):
            assert isinstance(msg, ConsistencySignature)
            if not identity.verify(self.advertised[node].identity_key, msg.signature, statement):
                self.rejected[node] = SignatureError(f"node {node}'s consistency signature does not verify")
                self.dropped.setdefault(node, Stage.CONSISTENCY)
                continue
            self.signatures[node] = msg.signature
        self.u4 = set(self.signatures)
        self._require_quorum(len(self.u4), "signed the survivor set")
        assert p.degree is not None and p.threshold is not None
        need = neighbourhood_quorum(p.degree) - 1  # the recipient counts its own signature
        forwarded: dict[int, tuple[tuple[int, bytes], ...]] = {}
        for v in sorted(self.u4):
            signers = sorted(self.graph[v] & self.u4)
            if len(signers) >= need:
                forwarded[v] = tuple((w, self.signatures[w]) for w in signers[:need])
        for v in sorted(self.u2):
            answering = len(self.graph[v].intersection(forwarded))
            if answering < p.threshold:
                raise ThresholdError(
                    f"round {p.round_id} aborted: only {answering} of node {v}'s neighbours hold the consistency "
                    f"quorum of their neighbourhood ({need + 1} signatures of {p.degree + 1}), {p.threshold} must "
                    "answer the unmask stage to remove its masks; no aggregate is released"
                )
        self.stage = Stage.UNMASK
        return {
            v: UnmaskRequest(run_id=p.run_id, round_id=p.round_id, recipient=v, survivors=survivors, signatures=sigs,
                             evidence=_evidence_for(v, evidence))
            for v, sigs in forwarded.items()
        }

    def _check_proofs(self, ok: Mapping[int, Message]) -> tuple[tuple[int, bytes], ...]:
        """Input validation at the consistency stage: every survivor's bound proof for
        the round's challenge, and the evidence against those whose proof fails.

        - A survivor that sent no proof, or one not signed by its identity key for this
          challenge, has an input in the sum that can be neither checked nor excluded
          with evidence (honest sites would have no reason to believe the server): the
          round aborts (:class:`UnprovenInputError`), nothing is released.
        - A survivor whose signed proof is malformed or fails is left out like a
          dropout: its masked vector is taken out of the sum, its self-mask is never
          asked for, and the unmask request carries its signed proof so that every
          honest site checks the failure itself before revealing its masking-key shares.
        Returns the evidence (sorted by node), empty without validation."""
        layout = self.params.validation
        if layout is None:
            return ()
        start = time.perf_counter()
        p = self.params
        unproven = []
        signed: dict[int, tuple[bytes, bytes]] = {}
        for v in sorted(self.u3):
            msg = ok.get(v)
            proof, signature = (msg.proof, msg.proof_signature) if isinstance(msg, ConsistencySignature) else (b"", b"")
            statement = iv.proof_statement(p.run_id, p.round_id, v, self.challenge, proof)
            if not proof or not identity.verify(self.advertised[v].identity_key, signature, statement):
                unproven.append(v)
            else:
                signed[v] = (proof, signature)
        contexts = {v: iv.proof_context(p.run_id, p.round_id, v, self.advertised[v].identity_key, self.challenge,
                                        layout) for v in signed}
        # one batched verification (one MSM) for every proof; each failure names its site
        proofs, failures = iv.verify_many({v: proof for v, (proof, _) in signed.items()}, contexts, layout)
        for v, failure in failures.items():
            self.evidence[v] = iv.evidence_blob(signed[v][1], signed[v][0])
            self.rejected[v] = FailedProofError(f"node {v}'s bound proof fails: {failure}")
            self.dropped[v] = Stage.CONSISTENCY
        self.proofs.update(proofs)
        self.validation_seconds += time.perf_counter() - start
        if unproven:
            raise UnprovenInputError(
                f"round {p.round_id} aborted: survivors {unproven} sent no proof of their input's bound signed for "
                "this round's challenge; their inputs are in the sum and can be neither checked nor excluded; no "
                "aggregate is released"
            )
        assert self._acc is not None
        for v in self.evidence:  # out of the sum, as a dropout: its pairwise masks are recovered at unmask
            np.subtract(self._acc, self._vectors.pop(v), out=self._acc)
            self.u3.discard(v)
        self._require(len(self.u3), "sent masked inputs with a valid proof")
        return tuple(sorted(self.evidence.items()))

    def _aggregate(self, ok: Mapping[int, Message], statement: bytes) -> tuple[tuple[int, ...], bytes]:
        """(signers, aggregate) of a global round: each reply's BLS signature parsed (a
        malformed one excludes its sender), all added into one G2 point and checked once
        against the sum of the signers' keys (each PoP-checked at collect_keys). Only if
        that fails, someone sent a signature on something else: each is then checked
        alone, the bad ones excluded (``SignatureError``) and the rest added again, so a
        lying client costs the server O(n) pairings once, never an honest round.

        Cost per round (benchmarks): ~90 us per signature to parse (subgroup check), a
        G2 addition each, one aggregate verification; the list of signers (8 bytes each)
        and 96 bytes of signature go to every signer."""
        start = time.perf_counter()
        parsed: dict[int, G2Element] = {}
        for node, msg in sorted(ok.items()):
            assert isinstance(msg, ConsistencySignature)
            try:
                parsed[node] = bls.parse_signature(msg.signature, f"node {node}'s consistency signature")
            except ProtocolError as exc:
                self.rejected[node] = exc
                self.dropped.setdefault(node, Stage.CONSISTENCY)
        table = self._bls_table
        signers = tuple(sorted(parsed))
        total = bls.aggregate([parsed[v] for v in signers])
        if signers and not bls.fast_aggregate_verify([table[v] for v in signers], statement, total):
            for node in signers:
                if not bls.verify(table[node], statement, parsed[node]):
                    self.rejected[node] = SignatureError(f"node {node}'s consistency signature does not verify")
                    self.dropped.setdefault(node, Stage.CONSISTENCY)
                    del parsed[node]
            signers = tuple(sorted(parsed))
            total = bls.aggregate([parsed[v] for v in signers])
        for node in signers:
            self.signatures[node] = ok[node].signature  # type: ignore[attr-defined]
        self.aggregate_seconds = time.perf_counter() - start
        return signers, bytes(total)

    def collect_unmask(self, replies: Mapping[int, Message | bytes]) -> RoundOutcome:
        self._expect(Stage.UNMASK)
        ok = self._accept(replies, set(self.u4), UnmaskResponse)
        dropped_after_sharing = self.u2 - self.u3
        # per client to rebuild: (x, decoded share) of each neighbour that answered
        b_shares: dict[int, list[tuple[int, np.ndarray]]] = {v: [] for v in self.u3}
        sk_shares: dict[int, list[tuple[int, np.ndarray]]] = {v: [] for v in dropped_after_sharing}
        cohort = self.params.cohort
        for node, msg in sorted(ok.items()):
            assert isinstance(msg, UnmaskResponse)
            want_b = sorted(self.graph[node].intersection(self.u3))
            want_sk = sorted(self.graph[node].intersection(dropped_after_sharing))
            pairs = (*msg.self_mask_shares, *msg.key_shares)
            try:
                if [v for v, _ in msg.self_mask_shares] != want_b or [v for v, _ in msg.key_shares] != want_sk:
                    raise MalformedMessageError(f"node {node}'s unmask response does not match its request")
                bad = next((s for _, s in pairs if len(s) != shamir.SHARE_BYTES), None)
                if bad is not None:
                    raise MalformedMessageError(f"a share must be {shamir.SHARE_BYTES} bytes, got {len(bad)}")
                # every share of the answer decoded and range-checked in one pass
                rows = np.frombuffer(b"".join(s for _, s in pairs), dtype=">u4").astype(np.int64)
                if np.any(rows >= shamir.PRIME):
                    raise MalformedMessageError(f"node {node}'s unmask response holds a value outside the field")
            except ProtocolError as exc:
                self.rejected[node] = exc
                self.dropped.setdefault(node, Stage.UNMASK)
                continue
            x = share_x(cohort, node)
            rows = rows.reshape(len(pairs), shamir.N_CHUNKS)
            for i, (v, _) in enumerate(pairs):
                (b_shares if i < len(msg.self_mask_shares) else sk_shares)[v].append((x, rows[i]))
        assert self._acc is not None and self.params.threshold is not None and self.context is not None
        t = self.params.threshold
        acc = self._acc
        exp = get_expander(self.params.masked_length, self.dtype)
        streams: list[tuple[bytes, int]] = []
        p = self.params
        seeds: dict[int, bytes] = {}
        for v in sorted(self.u3):
            if len(b_shares[v]) < t:
                raise ThresholdError(
                    f"round {p.round_id} aborted: only {len(b_shares[v])} of node {v}'s neighbours "
                    f"answered the unmask stage, {t} are needed to remove its self-mask; no aggregate"
                )
            b_v = _combine(b_shares[v], t)
            if keys.self_mask_commitment(b_v, p.run_id, p.round_id, v) != self.advertised[v].self_mask_commitment:
                raise ReconstructionError(f"self-mask seed of node {v} does not match its commitment: a bad share")
            seeds[v] = b_v
            streams.append((keys.self_mask_key(b_v, self.context, v), -1))
        for v in sorted(dropped_after_sharing):
            if len(sk_shares[v]) < t:
                raise ThresholdError(
                    f"round {p.round_id} aborted: only {len(sk_shares[v])} of dropped node {v}'s neighbours "
                    f"answered the unmask stage, {t} are needed to remove its pairwise masks; no aggregate"
                )
            raw = _combine(sk_shares[v], t)
            s_sk = keys.load_private_key(raw)
            if keys.public_bytes(s_sk) != self.advertised[v].s_pk:
                raise ReconstructionError(f"masking key of node {v} does not match its public key: a bad share")
            for w in sorted(self.u3 & self.graph[v]):
                shared = keys.agree(s_sk, self.advertised[w].s_pk, w)
                # w added +PRG(s_wv) if v > w, else -PRG(s_wv): take it back out.
                streams.append((keys.pairwise_mask_key(shared, self.context, v, w), -1 if v > w else +1))
        # every threshold and reconstruction check has passed: one sweep removes all masks
        exp.accumulate(acc, streams)
        reduce_mod(acc, p.field_bits)
        self._acc = None
        self._vectors = {}
        blinds: tuple[int, ...] = ()
        if p.validation is not None:
            # the aggregate opening, before anything is released: raises OpeningError (the
            # round aborts) when what was summed is not what was proven
            start = time.perf_counter()
            blinds = tuple(iv.check_sum(p.validation, [self.proofs[v] for v in sorted(self.u3)], acc,
                                        p.vector_length, p.field_bits, len(p.cohort), self.challenge))
            self.validation_seconds += time.perf_counter() - start
            acc = acc[: p.vector_length]
        self._seeds = seeds
        self.stage = Stage.ADVERTISE_KEYS
        return RoundOutcome(acc, tuple(sorted(self.u3)), dict(self.dropped), dict(self.rejected),
                            tuple(sorted(self.evidence)), blinds)

    # ------------------------------------------------------------ retry (docs/protocol.md, "Retry")
    def retry_messages(self) -> dict[int, RetryRequest]:
        """After :meth:`collect_unmask`: ask every survivor to re-encode its update under a
        retry spec (which the caller sends beside these messages) and mask it again."""
        if self._seeds is None:
            raise StaleMessageError(f"round {self.params.round_id}: a retry comes only after the unmask stage")
        if self.retries >= MAX_RETRIES:
            raise ConfigurationError(f"round {self.params.round_id}: at most {MAX_RETRIES} retries (sites refuse more)")
        if self.params.validation is not None:
            raise ConfigurationError(
                f"round {self.params.round_id} validates its inputs: a retry input would enter the sum without a "
                "proof for a challenge drawn after it, so validated rounds are not retried (sites refuse); the round "
                "is not released and the next one starts at the wider range"
            )
        self.stage = Stage.RETRY
        p = self.params
        survivors = tuple(sorted(self.u3))
        return {
            v: RetryRequest(run_id=p.run_id, round_id=p.round_id, recipient=v, survivors=survivors,
                            attempt=self.retries + 1)
            for v in survivors
        }

    def collect_retry(self, replies: Mapping[int, Message | bytes], spec_digest: bytes) -> RoundOutcome:
        """Sum the survivors' retry vectors and remove their self masks (keyed from the
        seeds reconstructed at unmask, under the retry's context); the pairwise masks
        cancel because the survivor set is the signed one. Every survivor must answer:
        the pairwise masks of a missing one cannot be removed (no honest site reveals a
        survivor's key), so a missing reply aborts the round (nothing released)."""
        self._expect(Stage.RETRY)
        assert self._seeds is not None and self.context is not None
        self.retries += 1
        attempt = self.retries
        ok = self._accept(replies, set(self.u3), RetryInput)
        self.stage = Stage.ADVERTISE_KEYS
        p = self.params
        acc = np.zeros(p.vector_length, dtype=self.dtype)
        missing = sorted(self.u3 - set(ok))
        for node, msg in sorted(ok.items()):
            assert isinstance(msg, RetryInput)
            vec = msg.vector
            if (msg.field_bits != p.field_bits or not isinstance(vec, np.ndarray) or vec.dtype != self.dtype
                    or vec.shape != (p.vector_length,)):
                self.rejected[node] = MalformedMessageError(f"node {node}'s retry vector has the wrong width, dtype or shape")
                missing.append(node)
                continue
            np.add(acc, vec, out=acc)
        if missing:
            raise ThresholdError(
                f"round {p.round_id} aborted: survivors {sorted(missing)} did not answer retry {attempt}; a retry "
                "needs every survivor (their pairwise masks cannot be removed); no aggregate is released"
            )
        context = keys.retry_context(self.context, attempt, spec_digest)
        streams = [(keys.self_mask_key(b_v, context, v), -1) for v, b_v in sorted(self._seeds.items())]
        get_expander(p.vector_length, self.dtype).accumulate(acc, streams)
        reduce_mod(acc, p.field_bits)
        return RoundOutcome(acc, tuple(sorted(self.u3)), dict(self.dropped), dict(self.rejected))


def _evidence_for(recipient: int, evidence: tuple[tuple[int, bytes], ...]) -> tuple[tuple[int, bytes], ...]:
    """The evidence an unmask request carries: against every proven cheater but its
    recipient. A cheater still helps unmask (its signature counted, like a colluder's,
    and its shares of honest neighbours are needed as a dropout's would be); shown
    evidence against itself it would refuse, as an honest site shown any must."""
    return tuple(item for item in evidence if item[0] != recipient)


def _combine(shares: list[tuple[int, np.ndarray]], t: int) -> bytes:
    """Rebuild one secret from the first ``t`` decoded shares (``shamir.combine`` on rows)."""
    chosen = shares[:t]
    return shamir.combine_rows([x for x, _ in chosen], np.stack([row for _, row in chosen]))


def decode_checked(total: np.ndarray, config: QuantizationConfig, survivors: int) -> DecodedAggregate:
    """Decode the unmasked sum and check its integrity coordinates.

    Every client sets the count coordinate to 1, so it must sum to the number of
    survivors (a site whose update could not be used sends weight 0, so the weight
    total may be anything from 0 to survivors * max_weight). If it does not, some clients masked under a different context (the
    server sent them a different model or config) and the "sum" is garbage: nothing is
    released.
    """
    out = decode(total, config)
    if out.count != survivors or not 0 <= out.total_weight <= survivors * config.max_weight:
        raise InconsistentAggregateError(
            f"aggregate integrity check failed: count coordinate {out.count} for {survivors} survivors, "
            f"weight total {out.total_weight}; clients masked under different contexts (e.g. the server "
            "sent them different global models or configs). No aggregate is released."
        )
    return out


__all__ = ["RoundOutcome", "RoundParams", "SecAggError", "SecAggServer", "decode_checked"]
