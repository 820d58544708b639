"""The client side of SecAgg+, one small state class per protocol stage.

A state accepts exactly the message valid for it and returns ``(next_state, reply)``.
:class:`SecAggClient` wraps the states: it checks every message's header (version,
run, round, stage, recipient) before dispatching, and it can be saved to and restored
from plain data, so a Flower client can keep it in ``Context.state`` between the
protocol's messages.

The client assumes the server lies (the active-server model of Bonawitz et al. 2017):

- it checks the round's parameters against its site's :class:`ClientPolicy` before it
  allocates anything, and derives the graph seed itself;
- it signs its advertised keys with its long-term identity key and checks every
  neighbour's signature (and, with a pinned roster, that every identity is on it);
- before it reveals any share it signs the survivor set once, and it unmasks only the
  set it signed, and only with a quorum of valid signatures on that same set: by
  default (the round's ``consistency`` is "global") floor(2n/3) + 1 of the cohort,
  proven by one BLS aggregate signature that it checks with one verification against
  keys it checked once each (proof of possession, bound to the identity key:
  :mod:`sgs_flower.secagg.bls`); in a round announcing "neighbourhood", which only a site whose policy opted in
  (``sgs-consistency``) joins, two thirds of its closed neighbourhood (itself and its
  neighbours, :func:`neighbourhood_quorum`): O(log n) signature checks, not O(n)
  (docs/protocol.md, "The consistency check"); who dropped is derived from what it
  saw, never taken from the server;
- it signs at most one survivor set per global model, so one model cannot be
  aggregated twice over cohorts that differ by one client.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sgs_flower.secagg import bls, identity, keys, shamir
from sgs_flower.secagg import input_validation as iv
from sgs_flower.secagg.errors import (
    ConfigurationError,
    InconsistentRequestError,
    MalformedMessageError,
    PolicyError,
    ProtocolError,
    SignatureError,
    StaleMessageError,
    ThresholdError,
    UnknownSenderError,
)
from sgs_flower.secagg.graph import (
    CONSISTENCY_NEIGHBOURHOOD,
    cohort_index,
    consistency_quorum,
    graph_seed,
    neighbourhood_quorum,
    neighbours_of,
    validate,
)
from sgs_flower.secagg.groups import GroupRule, check_epochs, check_whole_groups, left_out_members
from sgs_flower.secagg.memo import memo_by_identity
from sgs_flower.secagg.policy import ClientPolicy
from sgs_flower.secagg.prg import dtype_for_bits, get_expander
from sgs_flower.secagg.wire import (
    MAX_RETRIES,
    PIPELINED_STAGES,
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
    decode,
    encode_parts,
)

_SHARE_PLAINTEXT = 16 + 2 * shamir.SHARE_BYTES
HISTORY_LIMIT = 512  # model digests remembered (oldest forgotten first)


def share_x(cohort: tuple[int, ...], node: int) -> int:
    """The Shamir x-coordinate of a share held by ``node``: its cohort position + 1."""
    return cohort_index(cohort)[node] + 1


def share_xs(cohort: tuple[int, ...], nodes: Sequence[int]) -> list[int]:
    """:func:`share_x` of each of ``nodes``, the cohort's index looked up once (a site
    splits its secrets for all its neighbours at once)."""
    index = cohort_index(cohort)
    return [index[v] + 1 for v in nodes]


def survivor_set_digest(survivors: tuple[int, ...]) -> str:
    return _survivor_set_digest(tuple(survivors))


@memo_by_identity(8)
def _survivor_set_digest(survivors: tuple[int, ...]) -> str:
    return hashlib.sha256(keys.pack_nodes(sorted(survivors))).hexdigest()


@memo_by_identity(8)
def _survivor_view(survivors: tuple[int, ...]) -> tuple[tuple[int, ...], frozenset[int]]:
    """The survivor set sorted and as a set, or :class:`InconsistentRequestError` for a
    list naming a node twice. Cached: a pure function of the list, which every client of
    an in-process round receives (a deployed client computes it once, in C-speed set and
    sort calls)."""
    members = frozenset(survivors)
    if len(members) != len(survivors):
        raise InconsistentRequestError("survivor set lists a node twice")
    return tuple(sorted(members)), members


@memo_by_identity(8)
def _all_advertised(members: frozenset[int], identities: dict[int, bytes]) -> bool:
    """Whether every survivor advertised keys (is in the identity table): one C-speed
    subset test, memoised for the shared objects of an in-process round."""
    return members <= identities.keys()


@memo_by_identity(8)
def _all_allowed(signers: tuple[int, ...], allowed: frozenset[int] | dict[int, bytes]) -> bool:
    """Whether every listed signer may sign (a survivor, or under whole-group
    participation any member of the identity table): one C-speed subset test, memoised
    for the shared objects of an in-process round."""
    return frozenset(signers) <= (allowed if isinstance(allowed, frozenset) else allowed.keys())


@memo_by_identity(8)
def _identity_table(
    identities: tuple[tuple[int, bytes], ...], cohort: tuple[int, ...], roster: identity.Roster | None
) -> dict[int, bytes]:
    """The round's identity table after the checks every client makes (members of the
    cohort, each once, no key twice, on the roster when one is pinned). Cached, and the
    same read-only mapping is shared, so that n in-process clients do not each rebuild
    and re-check an n-entry table (O(n^2) at 10,000 clients)."""
    index = cohort_index(cohort)
    table: dict[int, bytes] = {}
    for node, key in identities:
        if node not in index:
            raise UnknownSenderError(f"identity table names node {node}, which is not in the cohort")
        if node in table:
            raise MalformedMessageError(f"identity table names node {node} twice")
        table[node] = key
    identity.check_identity_table(table, roster)
    return table


@dataclass
class _RoundSecrets:
    setup: Setup
    seed: bytes  # the graph seed, derived from run, round and cohort
    share_context: bytes  # keys the share encryption: the round's protocol parameters only
    neighbours: frozenset[int]
    c_sk: bytes
    s_sk: bytes
    b_u: bytes
    # the BLS secret key this round advertised (global consistency only, else empty):
    # kept with the round like the X25519 secrets, so a restored round signs with the
    # key its peers hold for it
    bls_sk: bytes = b""


@dataclass
class AwaitingSetup:
    """Idle: waits for a round's setup, then creates fresh keys and advertises them."""

    node_id: int

    def on_setup(self, msg: Setup, ident: bytes, policy: ClientPolicy) -> tuple[AwaitingRoster, AdvertiseKeys]:
        u = self.node_id
        n = len(msg.cohort)
        # Bounds first: nothing sized by the server is built before the policy agrees.
        policy.check_round(n, msg.degree, msg.threshold, msg.vector_length, msg.consistency)
        try:
            index = cohort_index(msg.cohort)
        except ConfigurationError as exc:
            raise MalformedMessageError("setup cohort has duplicate node ids") from exc
        if u not in index:
            raise UnknownSenderError(f"node {u} is not in the cohort of round {msg.round_id}")
        validate(n, msg.degree, msg.threshold)
        dtype_for_bits(msg.field_bits)
        policy.check_width(msg.field_bits)
        seed = graph_seed(msg.run_id, msg.round_id, msg.cohort)
        _, share_context = keys.round_contexts(msg, seed, b"")
        c_sk, s_sk = keys.generate_private_key(), keys.generate_private_key()
        global_mode = msg.consistency != CONSISTENCY_NEIGHBOURHOOD
        # the global quorum is checked as one BLS aggregate: the run's key, bound to the identity
        bls_sk = bls.run_secret(ident, msg.run_id) if global_mode else b""
        secrets = _RoundSecrets(
            setup=msg, seed=seed, share_context=share_context,
            neighbours=neighbours_of(msg.cohort, msg.degree, seed, u),
            c_sk=keys.private_bytes(c_sk), s_sk=keys.private_bytes(s_sk), b_u=os.urandom(32), bls_sk=bls_sk,
        )
        c_pk, s_pk = keys.public_bytes(c_sk), keys.public_bytes(s_sk)
        commitment = keys.self_mask_commitment(secrets.b_u, msg.run_id, msg.round_id, u)
        bls_key, bls_pop, bls_binding = bls.advertisement(ident, msg.run_id, bls_sk) if global_mode else (b"",) * 3
        reply = AdvertiseKeys(
            run_id=msg.run_id, round_id=msg.round_id, sender=u, c_pk=c_pk, s_pk=s_pk,
            self_mask_commitment=commitment, identity_key=identity.identity_public(ident),
            signature=identity.sign(ident, keys.advertise_statement(share_context, u, c_pk, s_pk, commitment)),
            bls_key=bls_key, bls_pop=bls_pop, bls_binding=bls_binding,
        )
        return AwaitingRoster(u, secrets), reply


@dataclass
class AwaitingRoster:
    """Has advertised keys; waits for the neighbours' signed keys, then shares its secrets."""

    node_id: int
    secrets: _RoundSecrets

    def on_roster(
        self, msg: KeyRoster, ident: bytes, policy: ClientPolicy
    ) -> tuple[AwaitingShares, ShareKeys]:
        u, sec = self.node_id, self.secrets
        table = _identity_table(tuple(msg.identities), tuple(sec.setup.cohort), policy.roster)
        if table.get(u) != identity.identity_public(ident):
            raise InconsistentRequestError(f"identity table does not hold node {u}'s own identity key")
        roster: dict[int, NeighbourKeys] = {}
        seen_keys: set[bytes] = set()
        for nk in msg.keys:
            if nk.node not in sec.neighbours:
                raise UnknownSenderError(f"roster names node {nk.node}, which is not a neighbour of node {u}")
            if nk.node in roster:
                raise MalformedMessageError(f"roster names node {nk.node} twice")
            if nk.c_pk in seen_keys or nk.s_pk in seen_keys or nk.c_pk == nk.s_pk:
                raise MalformedMessageError(f"roster reuses a public key (node {nk.node})")
            if table.get(nk.node) != nk.identity_key:
                raise InconsistentRequestError(f"node {nk.node}'s keys are signed by an identity the table does not give it")
            statement = keys.advertise_statement(sec.share_context, nk.node, nk.c_pk, nk.s_pk, nk.self_mask_commitment)
            if not identity.verify(nk.identity_key, nk.signature, statement):
                raise SignatureError(f"node {nk.node}'s advertised keys do not carry its valid signature for this round")
            seen_keys.update((nk.c_pk, nk.s_pk))
            roster[nk.node] = nk
        bls_entries = tuple(msg.bls_keys)
        if sec.setup.consistency != CONSISTENCY_NEIGHBOURHOOD:
            # every member's BLS key checked now (PoP and identity binding, once per key
            # and process), before any share exists: a rogue key is refused here
            bls.key_table(bls_entries, table, sec.setup.run_id)
        elif bls_entries:
            raise MalformedMessageError("a neighbourhood round's key roster carries BLS keys (only global rounds use them)")
        t = sec.setup.threshold
        if len(roster) < t:
            raise ThresholdError(
                f"only {len(roster)} of node {u}'s neighbours advertised keys, threshold is {t}: "
                "its secrets could not be recovered, so it does not take part"
            )
        order = sorted(roster)
        xs = share_xs(sec.setup.cohort, order)
        sk_shares, b_shares = shamir.split_many([sec.s_sk, sec.b_u], xs, t)
        c_sk = keys.load_private_key(sec.c_sk)
        cts = []
        share_keys: dict[int, bytes] = {}
        u_bytes = keys.node_bytes(u)
        for v, sk_sh, b_sh in zip(order, sk_shares, b_shares, strict=True):
            shared = keys.agree(c_sk, roster[v].c_pk, v)
            k = share_keys[v] = keys.share_key(shared, sec.share_context, u, v)
            plaintext = u_bytes + keys.node_bytes(v) + sk_sh + b_sh
            cts.append((v, keys.encrypt_share(k, plaintext, sec.share_context, u, v)))
        reply = ShareKeys(run_id=msg.run_id, round_id=msg.round_id, sender=u, ciphertexts=tuple(cts))
        return AwaitingShares(u, sec, roster, table, share_keys, bls_entries), reply


@dataclass
class AwaitingShares:
    """Has shared its secrets; waits for its neighbours' shares, then masks its input."""

    node_id: int
    secrets: _RoundSecrets
    roster: dict[int, NeighbourKeys]
    identities: dict[int, bytes]
    # the share-encryption keys of on_roster, kept in memory (never saved: a restored
    # client derives them again) so that decrypting costs no second X25519 per neighbour
    share_keys: dict[int, bytes] = field(default_factory=dict, repr=False)
    # every member's BLS key entry (global rounds), as the roster carried it (checked there)
    bls_keys: tuple[tuple[int, bytes], ...] = ()

    def on_shares(
        self, msg: ShareBundle, vector: np.ndarray, bound_digest: bytes, model_digest: bytes, min_survivors: int,
        near_sets: frozenset[str] = frozenset(), validation: iv.ValidationLayout | None = None,
    ) -> tuple[AwaitingConsistency, MaskedInput]:
        """Mask the input. ``bound_digest`` is the digest of the global model and config
        this client trained on: it keys the masks (see :func:`keys.round_contexts`).
        ``model_digest`` (the model alone) is remembered so that the client signs one
        survivor set per model; ``min_survivors`` is the fewest survivors its noise
        share was calibrated for (distributed DP; 0 otherwise). ``near_sets`` are the
        survivor sets the site signed for models near this one (see
        :mod:`sgs_flower.secagg.model_memory`): it may sign only such a set now.

        ``validation`` (issue 31): the round's validation layout. The site then reads x
        (the layout's body words as signed integers), draws the k commitment blinds and
        appends them as limbs (:func:`input_validation.blind_limb_words`) to the vector
        it masks, and keeps x, the blinds and the digest of what it sent until the
        consistency stage, where it proves x's bound for the round's challenge."""
        u, sec = self.node_id, self.secrets
        setup = sec.setup
        held: dict[int, tuple[bytes, bytes]] = {}
        c_sk = keys.load_private_key(sec.c_sk)
        u_bytes = keys.node_bytes(u)
        for v, blob in msg.ciphertexts:
            if v not in self.roster:
                raise UnknownSenderError(f"share from node {v}, which is not in node {u}'s roster")
            if v in held:
                raise MalformedMessageError(f"two shares from node {v}")
            k = self.share_keys.get(v) or keys.share_key(
                keys.agree(c_sk, self.roster[v].c_pk, v), sec.share_context, u, v
            )
            plain = keys.decrypt_share(k, blob, sec.share_context, v, u)
            if len(plain) != _SHARE_PLAINTEXT or plain[:8] != keys.node_bytes(v) or plain[8:16] != u_bytes:
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
        context, _ = keys.round_contexts(setup, sec.seed, bound_digest)
        site: iv.SiteInput | None = None
        if validation is not None:
            if setup.field_bits > iv.MAX_FIELD_BITS or validation.body > setup.vector_length:
                raise MalformedMessageError(
                    f"a validated round needs words of at most {iv.MAX_FIELD_BITS} bits and a body within the vector "
                    f"(got {setup.field_bits} bits, body {validation.body} of {setup.vector_length} words)"
                )
            site = iv.SiteInput.draw(validation, vector, setup.field_bits)
            limbs = iv.blind_limb_words(site.blinds, setup.field_bits, len(setup.cohort))
            vector = np.concatenate([vector, limbs.astype(dtype, copy=False)])
        masked = mask_input(vector, sec, {v: self.roster[v] for v in held}, u, context)
        if site is not None:
            site.digest = iv.input_digest(masked, setup.field_bits)
        reply = MaskedInput(run_id=msg.run_id, round_id=msg.round_id, sender=u, vector=masked,
                            field_bits=setup.field_bits)
        nxt = AwaitingConsistency(u, sec, self.roster, self.identities, held, model_digest, min_survivors,
                                  tuple(sorted(near_sets)), context, self.bls_keys, site)
        return nxt, reply


def mask_input(
    vector: np.ndarray, sec: _RoundSecrets, peers: dict[int, NeighbourKeys], u: int, context: bytes
) -> np.ndarray:
    """y = x + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv)  (mod 2^b).

    All 1 + k keystreams are added in one sweep over the vector (block by block, while
    each block is in cache), which keeps the stage at the AES keystream floor."""
    setup = sec.setup
    exp = get_expander(vector.size, vector.dtype)  # the round's length, and the blind limbs of a validated round
    s_sk = keys.load_private_key(sec.s_sk)
    streams = [(keys.self_mask_key(sec.b_u, context, u), +1)]
    streams += [
        (keys.pairwise_mask_key(keys.agree(s_sk, nk.s_pk, v), context, u, v), +1 if v > u else -1)
        for v, nk in peers.items()
    ]
    return exp.mask(vector, streams, setup.field_bits)


@dataclass
class AwaitingConsistency:
    """Has sent its masked input; signs the survivor set once, after checking it."""

    node_id: int
    secrets: _RoundSecrets
    roster: dict[int, NeighbourKeys]
    identities: dict[int, bytes]
    held: dict[int, tuple[bytes, bytes]]
    model_digest: bytes
    min_survivors: int
    near_sets: tuple[str, ...] = ()
    mask_context: bytes = b""  # what the masks were keyed with (a retry derives its context from it)
    bls_keys: tuple[tuple[int, bytes], ...] = ()
    validation: iv.SiteInput | None = None  # a validated round: x, blinds, digest of the masked input

    def on_consistency(
        self, msg: ConsistencyRequest, ident: bytes, history: dict[str, str], groups: GroupRule | None = None
    ) -> tuple[AwaitingUnmask, ConsistencySignature]:
        u, sec = self.node_id, self.secrets
        # the site's sgs-min-group: a union of whole groups, or no signature. A site whose
        # group is left out whole (a member of it sent no masked input) signs too, so the
        # consistency quorum counts it (its own input stays out, hidden by its self-mask)
        left_out = _left_out(msg.survivors, self.identities, groups) if groups is not None else frozenset()
        u3 = check_survivor_set(msg.survivors, u, sec, self.held, self.identities, self.min_survivors, left_out)
        if groups is not None:
            _check_whole_groups(u3, self.identities, groups)
        site = self.validation
        if site is None and msg.digests:
            raise MalformedMessageError("a consistency request carries masked-input digests in a round without "
                                        "input validation")
        if site is not None:
            iv.check_digests(msg.digests, u3, u, site.digest)
        key = self.model_digest.hex()
        signed = survivor_set_digest(u3)
        if history.get(key, signed) != signed:
            raise PolicyError(
                "this global model was already aggregated over another survivor set: a second sum "
                "over a different set would reveal the difference; refused"
            )
        if any(s != signed for s in self.near_sets):
            raise PolicyError(
                "this global model is a near copy of one already aggregated over another survivor set "
                "(closer than sgs-min-model-change times this site's update): a second sum over a different "
                "set would reveal the difference; refused"
            )
        history[key] = signed
        while len(history) > HISTORY_LIMIT:
            history.pop(next(iter(history)))
        statement = keys.consistency_statement(sec.share_context, u3)
        # the same statement either way; BLS in a global round (the server aggregates it)
        if sec.setup.consistency == CONSISTENCY_NEIGHBOURHOOD:
            signature = identity.sign(ident, statement)
        else:
            signature = bls.sign(sec.bls_sk, statement)
        proof = proof_signature = seed = b""
        if site is not None:
            # the challenge is common to every site and fixed only now, after every x is
            seed = iv.challenge_seed(self.mask_context, site.layout, u3, msg.digests)
            if u in u3:  # a site left out with its group has no input in the sum to prove
                proof, proof_signature = iv.prove(site, ident, msg.run_id, msg.round_id, u, seed)
        reply = ConsistencySignature(run_id=msg.run_id, round_id=msg.round_id, sender=u, signature=signature,
                                     proof=proof, proof_signature=proof_signature)
        return (AwaitingUnmask(u, sec, self.roster, self.identities, self.held, u3, self.mask_context,
                               groups is not None, self.bls_keys, site.layout if site is not None else None, seed,
                               self.min_survivors), reply)


def check_survivor_set(
    survivors: tuple[int, ...],
    u: int,
    sec: _RoundSecrets,
    held: dict[int, tuple[bytes, bytes]],
    identities: dict[int, bytes],
    min_survivors: int,
    left_out: frozenset[int] | set[int] = frozenset(),
) -> tuple[int, ...]:
    """The survivor set as this client can vouch for it, or an error naming the check.
    ``left_out``: under participation in whole groups, the cohort members whose whole
    group is outside the set: this client may be one (its absence is then no
    inconsistency), and they may sign, so the consistency quorum counts them.

    Only O(k) Python work beyond C-speed set operations on the list: the checks are on
    this client's own neighbourhood (who sent it shares), and the set's size."""
    u3, members = _survivor_view(tuple(survivors))
    if u not in members and u not in left_out:
        raise InconsistentRequestError(f"survivor set says node {u} dropped, but it sent its masked input")
    if not _all_advertised(members, identities):
        unknown = sorted(members - identities.keys())
        raise InconsistentRequestError(f"survivor set names nodes {unknown} that did not advertise keys")
    unseen = sorted(v for v in sec.neighbours if v in members and v not in held)
    if unseen:
        raise InconsistentRequestError(
            f"survivor set names neighbours {unseen} that never sent node {u} their shares; refused"
        )
    quorum = consistency_quorum(len(sec.setup.cohort))
    if len(u3) < min_survivors or len(u3) + len(left_out) < quorum:
        raise InconsistentRequestError(
            f"survivor set has {len(u3)} nodes, fewer than the {max(quorum, min_survivors)} this "
            "round needs (consistency quorum or the survivors the noise was calibrated for); refused"
        )
    return u3


@dataclass
class AwaitingUnmask:
    """Has signed a survivor set; answers one unmask request for exactly that set."""

    node_id: int
    secrets: _RoundSecrets
    roster: dict[int, NeighbourKeys]
    identities: dict[int, bytes]
    held: dict[int, tuple[bytes, bytes]]
    survivors: tuple[int, ...]
    mask_context: bytes = b""
    # under whole-group participation the quorum counts every cohort member that signed,
    # the members of groups left out whole included (each honest site signs one set)
    cohort_signers: bool = False
    bls_keys: tuple[tuple[int, bytes], ...] = ()
    # a validated round: its layout and challenge seed (to check evidence against cheaters)
    # and the fewest survivors the site's noise share was calibrated for
    layout: iv.ValidationLayout | None = None
    seed: bytes = b""
    min_survivors: int = 0

    def on_unmask(self, msg: UnmaskRequest) -> tuple[Unmasked, UnmaskResponse]:
        """Reveal shares for the set this client signed, once the quorum of the round's
        consistency mode validly signed the identical set: "global" (the default),
        floor(2n/3) + 1 of the cohort (:func:`_check_global_quorum`); "neighbourhood"
        (opt-in), two thirds of its closed neighbourhood, itself and its neighbours
        (:func:`_check_neighbourhood_quorum`). The mode is the one in the setup this
        client accepted (its policy refused "neighbourhood" unless it opted in), and it
        is bound into the round context every signature covers."""
        u, sec = self.node_id, self.secrets
        view = _survivor_view(tuple(msg.survivors))[0] if len(msg.survivors) == len(self.survivors) else ()
        if view is not self.survivors and view != self.survivors:
            raise InconsistentRequestError(
                f"unmask request names another survivor set than the one node {u} signed; refused"
            )
        statement = keys.consistency_statement(sec.share_context, self.survivors)
        members = _survivor_view(self.survivors)[1]
        if sec.setup.consistency == CONSISTENCY_NEIGHBOURHOOD:
            if msg.aggregate or msg.signers:
                raise MalformedMessageError("a neighbourhood round's unmask request carries per-signer signatures, "
                                            "not an aggregate")
            self._check_neighbourhood_quorum(msg, statement, members)
        else:
            self._check_global_quorum(msg, statement, members)
        members = self._without_cheaters(msg, members)
        # Who dropped is derived from what this client saw, never taken from the server:
        # neighbours that sent it shares but are not survivors (or, in a validated round,
        # survivors whose failing proof this client checked itself).
        reply = UnmaskResponse(
            run_id=msg.run_id, round_id=msg.round_id, sender=u,
            self_mask_shares=tuple((v, self.held[v][1]) for v in sorted(self.held) if v in members),
            key_shares=tuple((v, self.held[v][0]) for v in sorted(self.held) if v not in members),
        )
        return Unmasked(u, sec, self.roster, self.survivors, self.mask_context,
                        validated=self.layout is not None), reply

    def _without_cheaters(self, msg: UnmaskRequest, members: frozenset[int]) -> frozenset[int]:
        """The survivors whose self-masks this client reveals: in a validated round, the
        signed set without the survivors the request proves to have cheated
        (:func:`input_validation.check_evidence`: each one's identity signed, under the
        seed this client derived, a proof that fails). A cheater counts as a colluder: its
        consistency signature still counts in the quorum (which tolerates colluders), and
        the remaining survivors must still be at least the ones this site's noise share
        was calibrated for. Outside validation, evidence is a malformed request."""
        if self.layout is None:
            if msg.evidence:
                raise MalformedMessageError("an unmask request carries evidence in a round without input validation")
            return members
        sec = self.secrets
        cheaters = iv.check_evidence(msg.evidence, members, self.node_id, self.identities, self.layout,
                                     sec.setup.run_id, sec.setup.round_id, self.seed)
        if not cheaters:
            return members
        rest = members - cheaters
        if len(rest) < max(2, self.min_survivors):
            raise InconsistentRequestError(
                f"without the {len(cheaters)} proven cheaters only {len(rest)} survivors remain, fewer than the "
                f"{max(2, self.min_survivors)} this site's input may be summed with; refused"
            )
        return rest

    def _check_global_quorum(self, msg: UnmaskRequest, statement: bytes, members: frozenset[int]) -> None:
        """The global quorum (the default): floor(2n/3) + 1 survivors of the cohort
        signed this set, proven by one BLS aggregate signature over the listed signers.

        Honest clients sign one set each, so two sets cannot both reach the quorum
        without n/3 or more colluders anywhere in the cohort. The aggregate verifies only
        if every listed signer signed exactly this statement (keys are PoP-checked, so no
        listed key can cancel another's): one ``FastAggregateVerify``, two pairings,
        plus one G1 addition per signer, instead of ~2n/3 Ed25519 verifications. The
        signer list is checked first (members allowed to sign, each once, enough of
        them), so a short or padded list is refused without any pairing."""
        u, sec = self.node_id, self.secrets
        if msg.signatures:
            raise MalformedMessageError(
                "a global round's unmask request carries one aggregate signature and its signers, "
                "not per-signer signatures"
            )
        quorum = consistency_quorum(len(sec.setup.cohort))
        signers = msg.signers
        allowed = self.identities if self.cohort_signers else members
        if not _all_allowed(signers, allowed):
            signer = next(v for v in signers if v not in allowed)
            raise InconsistentRequestError(f"consistency signature from node {signer}, which is not a survivor")
        if len(frozenset(signers)) != len(signers):
            seen: set[int] = set()
            for v in signers:
                if v in seen:
                    raise MalformedMessageError(f"two consistency signatures from node {v}")
                seen.add(v)
        if len(signers) < quorum:
            raise InconsistentRequestError(
                f"only {len(signers)} survivors signed the survivor set, {quorum} are needed before "
                f"node {u} reveals any share; refused"
            )
        aggregate = bls.parse_signature(msg.aggregate, "the unmask request's aggregate consistency signature")
        table = bls.key_table(self.bls_keys, self.identities, sec.setup.run_id)
        if not bls.verify_signers(table, frozenset(signers), statement, aggregate):
            raise SignatureError(
                f"the aggregate consistency signature of the {len(signers)} listed signers does not verify on the "
                f"survivor set node {u} signed: forged, tampered, or naming a signer that did not sign this set"
            )

    def _check_neighbourhood_quorum(self, msg: UnmaskRequest, statement: bytes, members: frozenset[int]) -> None:
        """The neighbourhood quorum (opt-in): floor(2(k+1)/3) + 1 of this client's closed
        neighbourhood (itself and its k neighbours) validly signed this set.

        Why the neighbourhood suffices (docs/protocol.md, "The consistency check"): to
        unmask a survivor W alone, the server needs t shares of W's self-mask seed from
        W's neighbours and, for a neighbour z of W, t shares of z's masking key from z's
        neighbours, which z's neighbours give only if they signed a set without z. A
        neighbour z that reveals W's seed holds q - 1 neighbours' signatures on a set
        with z in it; honest clients sign once, so the server needs q + t - k - 1
        colluders among z's k neighbours. Signatures from outside the neighbourhood are
        not looked at; every forwarded signature from inside it must verify (a server
        that forwards one on another set is lying)."""
        u, sec = self.node_id, self.secrets
        closed = sec.neighbours | {u}
        quorum = neighbourhood_quorum(sec.setup.degree)
        valid: set[int] = set()
        seen: set[int] = set()
        for signer, signature in msg.signatures:
            if signer not in members and not (self.cohort_signers and signer in self.identities):
                raise InconsistentRequestError(f"consistency signature from node {signer}, which is not a survivor")
            if signer in seen:
                raise MalformedMessageError(f"two consistency signatures from node {signer}")
            seen.add(signer)
            if signer not in closed:
                continue  # not one this client counts: no verification is spent on it
            if not identity.verify(self.identities[signer], signature, statement):
                raise SignatureError(f"consistency signature of node {signer} does not verify: forged or tampered")
            valid.add(signer)
        valid.add(u)  # it signed this very set itself (AwaitingConsistency)
        if len(valid) < quorum:
            raise InconsistentRequestError(
                f"only {len(valid)} survivors signed the survivor set, {quorum} are needed before "
                f"node {u} reveals any share (two thirds of its closed neighbourhood of "
                f"{sec.setup.degree + 1}: itself and its neighbours); refused"
            )


@dataclass
class Unmasked:
    """Has unmasked for the survivor set it signed. The round is over for everything but
    a retry of its masked input (at most ``MAX_RETRIES``, each attempt numbered in
    order): the same update re-encoded under a retry spec, masked with pairwise masks
    among the same survivors and a self mask, all keyed from this round's secrets under
    :func:`keys.retry_context`. The server holds this site's self-mask seed now, so
    what hides its retry vector is the pairwise masks with its surviving neighbours,
    whose keys no honest site revealed (each revealed key shares only for neighbours
    outside the signed set, and answers one unmask request), as in the round itself."""

    node_id: int
    secrets: _RoundSecrets
    roster: dict[int, NeighbourKeys]
    survivors: tuple[int, ...]
    mask_context: bytes
    attempts: int = 0
    validated: bool = False  # the round validated its inputs: no retry (its input would be unproven)

    def check_retry(self, msg: RetryRequest) -> None:
        u = self.node_id
        if self.validated:
            raise PolicyError(
                f"node {u}'s round validated its inputs: a retry input would enter the sum without a proof for a "
                "challenge drawn after it, so retries are refused under input validation"
            )
        if u not in self.survivors:  # left out with its group: its input never enters a sum
            raise PolicyError(f"node {u} is not among the survivors it signed for (its group was left out); a retry "
                              "of its input is refused")
        if tuple(sorted(msg.survivors)) != self.survivors or len(msg.survivors) != len(self.survivors):
            raise InconsistentRequestError(
                f"retry request names another survivor set than the one node {u} signed and unmasked for; refused"
            )
        if self.attempts >= MAX_RETRIES:
            raise PolicyError(f"node {u} already answered {self.attempts} retries of this round (at most "
                              f"{MAX_RETRIES}); refused")
        if msg.attempt != self.attempts + 1:
            raise StaleMessageError(
                f"retry attempt {msg.attempt} arrived, node {u} expects attempt {self.attempts + 1} (replayed or "
                "out of order)"
            )
        if not self.mask_context:
            raise StaleMessageError(f"node {u} holds no mask context for this round's retry")

    def on_retry(self, msg: RetryRequest, vector: np.ndarray, spec_digest: bytes) -> tuple[Unmasked, RetryInput]:
        self.check_retry(msg)
        sec, u = self.secrets, self.node_id
        dtype = dtype_for_bits(sec.setup.field_bits)
        if not isinstance(vector, np.ndarray) or vector.dtype != dtype or vector.shape != (sec.setup.vector_length,):
            raise MalformedMessageError(f"retry input must be {dtype} of shape ({sec.setup.vector_length},)")
        context = keys.retry_context(self.mask_context, msg.attempt, spec_digest)
        members = set(self.survivors)
        # the survivors among its neighbours all shared with it (checked before it signed)
        peers = {v: nk for v, nk in self.roster.items() if v in members and v in sec.neighbours and v != u}
        masked = mask_input(vector, sec, peers, u, context)
        nxt = Unmasked(u, sec, self.roster, self.survivors, self.mask_context, msg.attempt, self.validated)
        return nxt, RetryInput(run_id=msg.run_id, round_id=msg.round_id, sender=u, vector=masked,
                               field_bits=sec.setup.field_bits)


ClientState = AwaitingSetup | AwaitingRoster | AwaitingShares | AwaitingConsistency | AwaitingUnmask | Unmasked
_STAGE_OF = {
    AwaitingRoster: Stage.SHARE_KEYS,
    AwaitingShares: Stage.MASKED_INPUT,
    AwaitingConsistency: Stage.CONSISTENCY,
    AwaitingUnmask: Stage.UNMASK,
}


@dataclass
class SecAggClient:
    """One client's protocol endpoint across rounds.

    ``handle`` validates the header, runs the current state, and returns the reply.
    Any refusal leaves the client idle for the round (it sends nothing more), which
    the server treats as a dropout. ``identity`` is the site's Ed25519 private key
    (a fresh one when none is given, which a roster cannot pin); ``policy`` is the
    site's :class:`ClientPolicy`; ``history`` maps each global-model digest the client
    signed a survivor set for to that set (see :class:`AwaitingConsistency`).

    Pipelining: besides the round in progress (``state``) the client holds at most one
    round being set up ahead of time (``pending``: the next round's keys, advertised
    during this round's consistency check and shared during its unmask stage, see
    :meth:`handle_next`). Each message part is dispatched to the instance of its own
    (run, round) and checked there; a refusal leaves only that round.
    """

    node_id: int
    identity: bytes = field(default_factory=identity.generate_identity, repr=False)
    policy: ClientPolicy = field(default_factory=ClientPolicy)
    state: ClientState = field(init=False)
    pending: AwaitingRoster | AwaitingShares | None = field(default=None, init=False)
    last_masked: tuple[int, int] = (-1, -1)  # (run, round) of the last masked input sent
    # (run, round, stage) of the last first-part message this client answered: a
    # pipelined part is accepted only riding on the message just answered
    answered: tuple[int, int, int] = (-1, -1, 0)
    history: dict[str, str] = field(default_factory=dict)
    # participation in whole groups without a pinned roster: the identity keys of the
    # cohort of the first survivor set this client was asked to sign in the run (learnt on
    # first use, see sgs_flower.secagg.groups); empty until then
    federation: frozenset[bytes] = frozenset()
    # with a pinned roster: the digests of the roster epochs this site signed sums under
    # (kept in the site's state file across runs), so an edited epoch is refused
    roster_epochs: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.state = AwaitingSetup(self.node_id)

    def group_rule(self, cohort: Mapping[int, bytes]) -> GroupRule | None:
        """The groups a survivor set must respect: the pinned roster's, else those of the
        federation learnt at this client's first consistency check (from ``cohort``, the
        identities that advertised keys in that round), else None (groups off)."""
        rule = self.policy.group_rule
        if rule is not None and self.policy.roster is not None:  # a roster change never regroups (groups.py)
            self.roster_epochs = check_epochs(self.roster_epochs, self.policy.roster)
        if rule is not None or not self.policy.min_group or self.policy.roster is not None:
            return rule
        if not self.federation:
            keys = _key_set(cohort)
            if len(keys) < self.policy.min_group:
                raise PolicyError(f"the cohort holds {len(keys)} sites, fewer than one group of sgs-min-group = "
                                  f"{self.policy.min_group}: no sum over it could be over a whole group")
            self.federation = keys
        return self.policy.learnt_group_rule(self.federation)

    @property
    def stage(self) -> Stage | None:
        return _STAGE_OF.get(type(self.state))

    @property
    def pending_round(self) -> tuple[int, int] | None:
        """(run, round) of the round being set up ahead of time, if any."""
        if self.pending is None:
            return None
        setup = self.pending.secrets.setup
        return setup.run_id, setup.round_id

    def abandon(self) -> None:
        """Leave the round in progress (the local training failed): send nothing more.
        A round being set up ahead of time is another round and is kept."""
        self.state = AwaitingSetup(self.node_id)

    def handle(
        self,
        msg: Message,
        *,
        vector: np.ndarray | None = None,
        bound_digest: bytes = b"",
        model_digest: bytes = b"",
        min_survivors: int = 0,
        near_sets: frozenset[str] = frozenset(),
        validation: iv.ValidationLayout | None = None,
    ) -> Message:
        """Answer a message's first part (a message of its own round).

        At the masked-input stage ``validation`` is the round's validation layout (issue
        31, from the round's update spec: :func:`sgs_flower.pipeline.validation_layout`),
        None for a round without; a site with ``require_validation`` refuses the latter."""
        try:
            reply = self._handle(msg, vector, bound_digest, model_digest or bound_digest, min_survivors, near_sets,
                                 validation)
        except (ProtocolError, ThresholdError):
            self.state = AwaitingSetup(self.node_id)
            self.answered = (-1, -1, 0)
            raise
        self.answered = (msg.run_id, msg.round_id, int(msg.stage))
        return reply

    def handle_next(self, msg: Message, riding_on: Message) -> Message:
        """Answer a pipelined part: the next round's :class:`Setup` riding on this round's
        :class:`ConsistencyRequest`, or its :class:`KeyRoster` riding on this round's
        :class:`UnmaskRequest`. ``riding_on`` is the first part of the same message,
        which :meth:`handle` must just have answered. A refusal leaves the round being
        set up (never the round in progress) and raises the typed error."""
        try:
            return self._handle_next(msg, riding_on)
        except (ProtocolError, ThresholdError):
            self.pending = None
            raise

    def _handle_next(self, msg: Message, riding_on: Message) -> Message:
        self.check_header(msg)
        if not isinstance(riding_on, Message) or riding_on.to_server:
            raise MalformedMessageError("a pipelined part must ride on a server-to-client message")
        run, rnd = riding_on.run_id, riding_on.round_id
        if self.answered != (run, rnd, int(riding_on.stage)):
            raise StaleMessageError(
                f"pipelined {type(msg).__name__} rides on a {type(riding_on).__name__} of run {run} round {rnd} "
                f"that node {self.node_id} did not just answer"
            )
        if msg.run_id != run or msg.round_id != rnd + 1:
            raise StaleMessageError(
                f"pipelined {type(msg).__name__} is for run {msg.run_id} round {msg.round_id}, but it rides on "
                f"run {run} round {rnd}: only round {rnd + 1} of the same run is set up ahead (replayed or stale)"
            )
        carrier = PIPELINED_STAGES.get(msg.stage)
        if carrier is None:
            raise StaleMessageError(
                f"{type(msg).__name__} (stage {msg.stage.name}) cannot ride on another round's message: only "
                "ADVERTISE_KEYS and SHARE_KEYS are pipelined"
            )
        if isinstance(msg, Setup) and self.pending_round == (msg.run_id, msg.round_id):
            raise StaleMessageError(
                f"setup for round {msg.round_id} of run {msg.run_id} arrived twice: node {self.node_id} is "
                "already setting that round up (replayed)"
            )
        if riding_on.stage != carrier:
            raise StaleMessageError(
                f"pipelined {type(msg).__name__} (stage {msg.stage.name}) must ride on a {carrier.name} "
                f"request, not on {riding_on.stage.name}"
            )
        if isinstance(msg, Setup):
            self._check_not_masked(msg)
            pending, advertise = AwaitingSetup(self.node_id).on_setup(msg, self.identity, self.policy)
            self.pending = pending
            return advertise
        assert isinstance(msg, KeyRoster)
        if not isinstance(self.pending, AwaitingRoster) or self.pending_round != (msg.run_id, msg.round_id):
            raise StaleMessageError(
                f"pipelined KeyRoster for round {msg.round_id} of run {msg.run_id} arrived, but node "
                f"{self.node_id} has not advertised keys for that round (stale, replayed or out of order)"
            )
        self.pending, share_keys = self.pending.on_roster(msg, self.identity, self.policy)
        return share_keys

    def check_header(self, msg: Message) -> None:
        """Version, direction and recipient: checked before any stage looks at a payload."""
        if not isinstance(msg, Message) or msg.to_server:
            raise MalformedMessageError(f"expected a server-to-client message, got {type(msg).__name__}")
        version = getattr(msg, "version", None)
        if version != PROTOCOL_VERSION:
            raise StaleMessageError(f"protocol version {version!r} is not {PROTOCOL_VERSION!r}")
        recipient = getattr(msg, "recipient", None)
        if recipient != self.node_id:
            raise UnknownSenderError(f"message addressed to node {recipient} reached node {self.node_id}")

    def expect_masked_input(self, msg: Message) -> None:
        """Check, before the site trains (and spends privacy budget), that ``msg`` is the
        masked-input request of the round in progress; raises what :meth:`handle` would."""
        try:
            self.check_header(msg)
            self._route(msg)
            self._check_round(msg)
            if not (isinstance(self.state, AwaitingShares) and isinstance(msg, ShareBundle)):
                raise StaleMessageError(
                    f"{type(msg).__name__} is not valid while node {self.node_id} is at stage "
                    f"{self.stage.name if self.stage else 'idle'}"
                )
        except ProtocolError:
            self.state = AwaitingSetup(self.node_id)
            raise

    def round_setup(self) -> Setup | None:
        """The Setup of the round awaiting its masked input, or None.

        The Flower glue checks the round's update spec against it (issue 21): a spec
        encoded at another width than the masking would wrap each word at the wrong
        modulus, and a spec sized for fewer clients than the cohort lets the sum wrap."""
        st = self.state
        return st.secrets.setup if isinstance(st, AwaitingShares) else None

    def expect_retry(self, msg: Message) -> Unmasked:
        """Check, before the site re-encodes anything, that ``msg`` is a retry request this
        client may answer: a :class:`RetryRequest` of the round it unmasked, for the set it
        signed, the next attempt, within ``MAX_RETRIES``; raises a typed error otherwise
        (and leaves the round)."""
        try:
            self.check_header(msg)
            if not isinstance(msg, RetryRequest):
                raise StaleMessageError(f"{type(msg).__name__} is not a retry request")
            self._check_round(msg)
            st = self.state
            if not isinstance(st, Unmasked):
                raise StaleMessageError(
                    f"retry request for round {msg.round_id} arrived while node {self.node_id} is at stage "
                    f"{self.stage.name if self.stage else 'idle'}: a retry comes only after this site unmasked"
                )
            st.check_retry(msg)
            return st
        except ProtocolError:
            self.state = AwaitingSetup(self.node_id)
            raise

    def _route(self, msg: Message) -> None:
        """A first-part message of the round set up ahead of time makes that round the
        one in progress (the previous round, if still open, is left)."""
        if self.pending is not None and self.pending_round == (msg.run_id, msg.round_id):
            self.state, self.pending = self.pending, None

    def _check_not_masked(self, msg: Setup) -> None:
        if msg.run_id == self.last_masked[0] and msg.round_id <= self.last_masked[1]:
            raise StaleMessageError(
                f"setup for round {msg.round_id} of run {msg.run_id} is stale or replayed: node "
                f"{self.node_id} already sent its input for round {self.last_masked[1]}"
            )

    def _check_round(self, msg: Message) -> Setup:
        st = self.state
        if isinstance(st, AwaitingSetup) or (isinstance(st, Unmasked) and not isinstance(msg, RetryRequest)):
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
        return setup

    def _handle(
        self, msg: Message, vector: np.ndarray | None, bound_digest: bytes, model_digest: bytes, min_survivors: int,
        near_sets: frozenset[str] = frozenset(), validation: iv.ValidationLayout | None = None,
    ) -> Message:
        self.check_header(msg)
        if isinstance(msg, Setup):
            # a full setup (the first round, or after an aborted one): it replaces any
            # round set up ahead of time, whose keys are then never used
            self._check_not_masked(msg)
            self.pending = None
            self.state, advertise = AwaitingSetup(self.node_id).on_setup(msg, self.identity, self.policy)
            return advertise
        self._route(msg)
        setup = self._check_round(msg)
        st = self.state
        if isinstance(st, AwaitingRoster) and isinstance(msg, KeyRoster):
            self.state, share_keys = st.on_roster(msg, self.identity, self.policy)
            return share_keys
        if isinstance(st, AwaitingShares) and isinstance(msg, ShareBundle):
            if vector is None:
                raise MalformedMessageError("the masked-input stage needs the client's input vector")
            self.policy.check_validation(validation is not None)
            self.state, masked = st.on_shares(msg, vector, bound_digest, model_digest, min_survivors, near_sets,
                                              validation)
            self.last_masked = (setup.run_id, setup.round_id)
            return masked
        if isinstance(st, AwaitingConsistency) and isinstance(msg, ConsistencyRequest):
            groups = self.group_rule(st.identities)
            self.state, signature = st.on_consistency(msg, self.identity, self.history, groups)
            return signature
        if isinstance(st, AwaitingUnmask) and isinstance(msg, UnmaskRequest):
            self.state, response = st.on_unmask(msg)
            return response
        if isinstance(st, Unmasked) and isinstance(msg, RetryRequest):
            if vector is None:
                raise MalformedMessageError("a retry needs the client's re-encoded input vector")
            self.state, retried = st.on_retry(msg, vector, bound_digest)
            return retried
        raise StaleMessageError(
            f"{type(msg).__name__} (stage {msg.stage.name}) is not valid while node {self.node_id} "
            f"is at stage {self.stage.name if self.stage else 'idle'}"
        )

    # ------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """Plain data (ints, str, bytes, lists) for a Flower ``ConfigRecord``.

        The identity key and policy are not in it: they are the site's, loaded from
        its node config (or, for a run-scoped identity, kept by the caller). A round
        set up ahead of time is kept under keys prefixed ``next.``."""
        out: dict[str, Any] = {
            "node_id": self.node_id,
            "last_masked": list(self.last_masked),
            "answered": list(self.answered),
            "history_models": list(self.history),
            "history_sets": list(self.history.values()),
        }
        out.update(_instance_dict(self.state, self.node_id, ""))
        if self.pending is not None:
            out.update(_instance_dict(self.pending, self.node_id, "next."))
        return out

    @classmethod
    def from_state_dict(
        cls, d: dict[str, Any], ident: bytes | None = None, policy: ClientPolicy | None = None
    ) -> SecAggClient:
        client = cls(int(d["node_id"]), policy=policy or ClientPolicy())
        if ident is not None:
            client.identity = ident
        client.last_masked = (int(d["last_masked"][0]), int(d["last_masked"][1]))
        answered = d.get("answered", [-1, -1, 0])
        client.answered = (int(answered[0]), int(answered[1]), int(answered[2]))
        client.history = dict(zip(d.get("history_models", []), d.get("history_sets", []), strict=True))
        client.state = _instance_from(d, client.node_id, "")
        if "next.state" in d:
            pending = _instance_from(d, client.node_id, "next.")
            if not isinstance(pending, AwaitingRoster | AwaitingShares):
                raise MalformedMessageError("saved client state holds a round set up ahead at an impossible stage")
            client.pending = pending
        return client


def _instance_dict(st: ClientState, node_id: int, prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {prefix + "state": type(st).__name__}
    if isinstance(st, AwaitingSetup):
        return out
    sec = st.secrets
    out.update({prefix + "c_sk": sec.c_sk, prefix + "s_sk": sec.s_sk, prefix + "b_u": sec.b_u,
                prefix + "bls_sk": sec.bls_sk})
    out.update(_parts(prefix + "setup", sec.setup, (sec.setup,)))
    if isinstance(st, AwaitingShares | AwaitingConsistency | AwaitingUnmask | Unmasked):
        def roster() -> KeyRoster:
            return KeyRoster(run_id=sec.setup.run_id, round_id=sec.setup.round_id, recipient=node_id,
                             keys=tuple(st.roster.values()),
                             identities=_sorted_items(getattr(st, "identities", {})),
                             bls_keys=tuple(getattr(st, "bls_keys", ())))
        objs = (st.roster, getattr(st, "identities", None), getattr(st, "bls_keys", None))
        out.update(_parts(prefix + "roster", roster, objs))
    if isinstance(st, AwaitingConsistency | AwaitingUnmask):
        out[prefix + "held_nodes"] = list(st.held)
        out[prefix + "held_shares"] = [a + b for a, b in st.held.values()]
    if isinstance(st, AwaitingConsistency):
        out[prefix + "model_digest"] = st.model_digest
        out[prefix + "min_survivors"] = st.min_survivors
        out[prefix + "near_sets"] = list(st.near_sets)
        if st.validation is not None:  # x travels with the state: see docs/validation.md, "Cost"
            out.update({f"{prefix}validation.{k}": v for k, v in st.validation.to_state().items()})
    if isinstance(st, AwaitingUnmask) and st.layout is not None:
        out[prefix + "validation.layout"] = st.layout.to_json()
        out[prefix + "validation.seed"] = st.seed
        out[prefix + "min_survivors"] = st.min_survivors
    if isinstance(st, Unmasked):
        out[prefix + "validated"] = st.validated
    if isinstance(st, AwaitingConsistency | AwaitingUnmask | Unmasked):
        out[prefix + "mask_context"] = st.mask_context
    if isinstance(st, AwaitingUnmask | Unmasked):
        out[prefix + "survivors"] = _packed_nodes(st.survivors)
    if isinstance(st, AwaitingUnmask):
        out[prefix + "cohort_signers"] = st.cohort_signers
    if isinstance(st, Unmasked):
        out[prefix + "attempts"] = st.attempts
    return out


#: The bytes a saved setup or roster was loaded from (or last saved as), by the identity
#: of the objects it became (newest first). Why: a site's protocol instance is loaded,
#: moved one stage on and saved at every message, and its setup and roster never change
#: after they arrive, so encoding them again at every save (~0.2 ms for k = 40
#: neighbours' keys) was a tenth of a simulated site's CPU. Matched by ``is``; the
#: entries hold the objects, so an id is never reused while it is here.
_SAVED_PARTS: list[tuple[tuple[object, ...], dict[str, bytes]]] = []
_SAVED_LIMIT = 16


def _remember_parts(objs: tuple[object, ...], parts: dict[str, bytes]) -> None:
    _SAVED_PARTS.insert(0, (objs, parts))
    del _SAVED_PARTS[_SAVED_LIMIT:]


def _parts(key: str, msg: Message | Callable[[], Message], objs: tuple[object, ...] = ()) -> dict[str, bytes]:
    """A saved message as its own part under ``key`` and its shared part (the cohort, the
    identity and BLS key tables) under ``key.shared``: why, :data:`wire.SHARED_FIELDS`.
    The shared part is the same bytes object for every instance built from the same
    objects, so saving n sites' states in one process encodes it once, not n times.
    ``objs``: the objects the message is made of; the bytes they were loaded from are
    reused (``msg`` may then be a function, called only when they are not known)."""
    for known, parts in _SAVED_PARTS if objs else ():
        if len(known) == len(objs) and all(a is b for a, b in zip(known, objs, strict=True)):
            return {key + suffix: blob for suffix, blob in parts.items()}
    own, shared = encode_parts(msg if isinstance(msg, Message) else msg())
    parts = {"": own} if shared is None else {"": own, ".shared": shared}
    if objs:
        _remember_parts(objs, parts)
    return {key + suffix: blob for suffix, blob in parts.items()}


def _saved(d: dict[str, Any], key: str) -> tuple[Message, dict[str, bytes]]:
    """A message saved by :func:`_parts` (or whole, by an earlier version), and its bytes."""
    shared = d.get(key + ".shared")
    parts = {"": bytes(d[key])} if shared is None else {"": bytes(d[key]), ".shared": bytes(shared)}
    return decode(parts[""], shared=parts.get(".shared")), parts


@memo_by_identity(8)
def _left_out(survivors: tuple[int, ...], identities: dict[int, bytes], rule: GroupRule) -> frozenset[int]:
    """:func:`left_out_members`, once per (survivor set, table, rule) objects: O(n) set
    work that every site of an in-process round would repeat on the same shared objects."""
    return frozenset(left_out_members(survivors, identities, rule))


@memo_by_identity(8)
def _check_whole_groups(u3: tuple[int, ...], identities: dict[int, bytes], rule: GroupRule) -> bool:
    """:func:`check_whole_groups` (raises on a split set), remembered only when it passes."""
    check_whole_groups(u3, identities, rule)
    return True


@memo_by_identity(8)
def _key_set(table: Mapping[int, bytes]) -> frozenset[bytes]:
    """The identity keys of a table, one set for the clients that share the table."""
    return frozenset(table.values())


@memo_by_identity(8)
def _sorted_items(table: dict[int, bytes]) -> tuple[tuple[int, bytes], ...]:
    return tuple(sorted(table.items()))


@memo_by_identity(8)
def _table_of(identities: tuple[tuple[int, bytes], ...]) -> dict[int, bytes]:
    """The identity table of a saved roster (checked when it arrived); read-only, shared."""
    return dict(identities)


@memo_by_identity(8)
def _packed_nodes(nodes: tuple[int, ...]) -> bytes:
    """A node list as 8-byte big-endian ids: saved as one bytes value, which a process
    packs (and :func:`_unpacked_nodes` unpacks) once for all the sites sharing the list."""
    return keys.pack_nodes(nodes)


@memo_by_identity(8)
def _unpacked_nodes(blob: bytes) -> tuple[int, ...]:
    return keys.unpack_nodes(blob)


def _nodes(value: Any) -> tuple[int, ...]:
    """A saved node list: packed bytes, or a list of ints (saved by an earlier version)."""
    if isinstance(value, bytes | bytearray):
        return _unpacked_nodes(bytes(value))
    return tuple(int(v) for v in value)


def _instance_from(d: dict[str, Any], node_id: int, prefix: str) -> ClientState:
    name = d[prefix + "state"]
    if name == "AwaitingSetup":
        return AwaitingSetup(node_id)
    setup, setup_parts = _saved(d, prefix + "setup")
    if not isinstance(setup, Setup):
        raise MalformedMessageError("saved client state holds no setup")
    _remember_parts((setup,), setup_parts)
    seed = graph_seed(setup.run_id, setup.round_id, setup.cohort)
    _, share_context = keys.round_contexts(setup, seed, b"")
    sec = _RoundSecrets(setup, seed, share_context, neighbours_of(setup.cohort, setup.degree, seed, node_id),
                        d[prefix + "c_sk"], d[prefix + "s_sk"], d[prefix + "b_u"], bytes(d.get(prefix + "bls_sk", b"")))
    if name == "AwaitingRoster":
        return AwaitingRoster(node_id, sec)
    roster_msg, roster_parts = _saved(d, prefix + "roster")
    if not isinstance(roster_msg, KeyRoster):
        raise MalformedMessageError("saved client state holds no roster")
    roster = {nk.node: nk for nk in roster_msg.keys}
    table = _table_of(roster_msg.identities)
    bls_entries = tuple(roster_msg.bls_keys)
    # the objects a state of this stage saves its roster from (an Unmasked one has no table)
    _remember_parts((roster, None, None) if name == "Unmasked" else (roster, table, bls_entries), roster_parts)
    if name == "AwaitingShares":
        return AwaitingShares(node_id, sec, roster, table, bls_keys=bls_entries)
    mask_context = bytes(d.get(prefix + "mask_context", b""))
    if name == "Unmasked":
        return Unmasked(node_id, sec, roster, _nodes(d[prefix + "survivors"]), mask_context,
                        int(d[prefix + "attempts"]), bool(d.get(prefix + "validated", False)))
    n = shamir.SHARE_BYTES
    held = {int(v): (bytes(s[:n]), bytes(s[n:]))
            for v, s in zip(d[prefix + "held_nodes"], d[prefix + "held_shares"], strict=True)}
    has_validation = prefix + "validation.layout" in d
    if name == "AwaitingConsistency":
        site = None
        if has_validation:
            n_prefix = len(prefix + "validation.")
            site = iv.SiteInput.from_state({k[n_prefix:]: v for k, v in d.items() if k.startswith(prefix + "validation.")})
        return AwaitingConsistency(node_id, sec, roster, table, held, bytes(d[prefix + "model_digest"]),
                                   int(d[prefix + "min_survivors"]),
                                   tuple(str(v) for v in d.get(prefix + "near_sets", [])), mask_context, bls_entries,
                                   site)
    if name != "AwaitingUnmask":
        raise MalformedMessageError("saved client state names an unknown stage")
    layout = iv.ValidationLayout.from_json(str(d[prefix + "validation.layout"])) if has_validation else None
    return AwaitingUnmask(node_id, sec, roster, table, held, _nodes(d[prefix + "survivors"]),
                          mask_context, bool(d.get(prefix + "cohort_signers", False)), bls_entries, layout,
                          bytes(d.get(prefix + "validation.seed", b"")), int(d.get(prefix + "min_survivors", 0)))
