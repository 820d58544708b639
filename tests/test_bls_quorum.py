"""The global consistency quorum as one BLS aggregate signature (issue 30, point 3).

A lying server, written here, against real :class:`SecAggClient` objects (the project's
server runs the honest stages). The guarantee under test: a site reveals a share only
once floor(2n/3) + 1 of the cohort signed the identical survivor set, now proven by one
aggregate signature over the listed signers' PoP-checked, identity-bound BLS keys.

(a) rogue keys are refused at advertisement (server) and at the roster (sites);
(b) the split-survivor-set attack cannot reach the quorum on either set;
(c) an aggregate that omits, adds, invents or duplicates a signer is refused;
(d) an aggregate replayed from another round does not verify.
Every refusal comes before any share is revealed, and an honest round still sums exactly.
"""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest
from blspy import G1Element, PopSchemeMPL
from lying_server import aggregate, aggregate_request

from sgs_flower.secagg import bls, identity, keys
from sgs_flower.secagg.client import AwaitingConsistency, AwaitingUnmask, SecAggClient
from sgs_flower.secagg.errors import (
    InconsistentRequestError,
    MalformedMessageError,
    SignatureError,
    ThresholdError,
)
from sgs_flower.secagg.graph import consistency_quorum
from sgs_flower.secagg.server import RoundParams, SecAggServer
from sgs_flower.secagg.simulate import run_protocol
from sgs_flower.secagg.wire import (
    AdvertiseKeys,
    KeyRoster,
    NeighbourKeys,
    Stage,
    UnmaskRequest,
    UnmaskResponse,
    decode,
    encode,
)

RUN = 11
M = 6


def _inputs(ids, seed=0):
    rng = np.random.default_rng(seed)
    return {u: rng.integers(0, 1 << 32, M, dtype=np.uint64).astype(np.uint32) for u in ids}


def _until_consistency(clients, round_id=3, inputs=None):
    """Stages 1-3 run honestly by the project's server; returns server, requests, inputs."""
    ids = tuple(sorted(clients))
    server = SecAggServer(RoundParams(run_id=RUN, round_id=round_id, cohort=ids, vector_length=M))
    inputs = inputs or _inputs(ids, round_id)
    rosters = server.collect_keys({u: clients[u].handle(s) for u, s in server.setup_messages().items()})
    bundles = server.collect_shares({u: clients[u].handle(r) for u, r in rosters.items()})
    reqs = server.collect_masked({u: clients[u].handle(b, vector=inputs[u]) for u, b in bundles.items()})
    return server, reqs, inputs


def _cohort(n):
    return {u: SecAggClient(u) for u in range(1, n + 1)}


# ---------------------------------------------------------------- honest rounds
def test_honest_round_sends_one_aggregate_and_sums_exactly():
    clients = _cohort(9)
    server, reqs, inputs = _until_consistency(clients)
    replies = {u: clients[u].handle(r) for u, r in reqs.items()}
    assert all(len(r.signature) == bls.SIGNATURE_BYTES for r in replies.values())  # type: ignore[attr-defined]
    unmask = server.collect_consistency(replies)
    for r in unmask.values():
        assert r.signatures == () and len(r.aggregate) == bls.SIGNATURE_BYTES
        assert r.signers == tuple(range(1, 10))
    out = server.collect_unmask({u: clients[u].handle(r) for u, r in unmask.items()})
    np.testing.assert_array_equal(out.total, sum(inputs.values()).astype(np.uint32))


def test_honest_round_in_process_with_dropouts_over_the_wire_bytes():
    ids = tuple(range(1, 13))
    clients = {u: SecAggClient(u) for u in ids}
    server = SecAggServer(RoundParams(run_id=RUN, round_id=5, cohort=ids, vector_length=M))
    inputs = _inputs(ids, 5)
    out = run_protocol(server, clients, inputs, dropouts={Stage.CONSISTENCY: [12]}, wire=True)
    assert 12 not in server.u4 and len(server.u4) >= consistency_quorum(12)
    np.testing.assert_array_equal(out.total, sum(inputs.values()).astype(np.uint32))


def test_server_excludes_a_bad_signature_and_still_aggregates():
    """A client whose consistency signature is on something else is found (each
    signature checked alone only after the aggregate failed) and left out; the
    round goes on with the others."""
    clients = _cohort(9)
    server, reqs, inputs = _until_consistency(clients)
    replies = {u: clients[u].handle(r) for u, r in reqs.items()}
    other = bls.sign(bls.run_secret(clients[4].identity, RUN), b"another statement")
    replies[4] = dataclasses.replace(replies[4], signature=other)
    replies[5] = dataclasses.replace(replies[5], signature=b"\x01" * 96)  # not a point
    unmask = server.collect_consistency(replies)
    assert isinstance(server.rejected[4], SignatureError) and isinstance(server.rejected[5], MalformedMessageError)
    assert set(unmask) == set(range(1, 10)) - {4, 5}
    assert all(r.signers == (1, 2, 3, 6, 7, 8, 9) for r in unmask.values())
    out = server.collect_unmask({u: clients[u].handle(r) for u, r in unmask.items()})
    np.testing.assert_array_equal(out.total, sum(inputs.values()).astype(np.uint32))


# ---------------------------------------------------------------- (a) rogue keys
def _rogue_advertisement(adverts, target: int, colluder: int, colluder_ident: bytes, pop_of=None):
    """The colluder's advertisement with pk_rogue = g^x - pk_target (so that
    pk_target + pk_rogue = g^x, which the colluder alone can sign for), properly bound
    to the colluder's own identity; it cannot prove possession of pk_rogue."""
    x = PopSchemeMPL.key_gen(b"\x07" * 32)
    pk_target = G1Element.from_bytes(adverts[target].bls_key)
    rogue = x.get_g1() + pk_target.negate()
    public = bytes(rogue)
    pop = bytes(PopSchemeMPL.pop_prove(x)) if pop_of is None else pop_of
    binding = identity.sign(colluder_ident, bls.binding_statement(RUN, public))
    return x, dataclasses.replace(adverts[colluder], bls_key=public, bls_pop=pop, bls_binding=binding)


def test_the_rogue_key_attack_is_real_without_proofs_of_possession():
    """Why the PoP is checked: without it, the colluder signs alone for both."""
    clients = _cohort(5)
    server = SecAggServer(RoundParams(run_id=RUN, round_id=3, cohort=tuple(clients), vector_length=M))
    adverts = {u: clients[u].handle(s) for u, s in server.setup_messages().items()}
    x, forged = _rogue_advertisement(adverts, 1, 5, clients[5].identity)
    statement = b"any survivor set"
    keys_ = [G1Element.from_bytes(adverts[1].bls_key), G1Element.from_bytes(forged.bls_key)]
    assert PopSchemeMPL.fast_aggregate_verify(keys_, statement, PopSchemeMPL.sign(x, statement))


@pytest.mark.parametrize("pop", ["x's own", "target's", "none"])
def test_rogue_key_is_refused_at_advertisement_and_at_the_roster(pop):
    clients = _cohort(7)
    server = SecAggServer(RoundParams(run_id=RUN, round_id=3, cohort=tuple(clients), vector_length=M))
    adverts = {u: clients[u].handle(s) for u, s in server.setup_messages().items()}
    pop_of = {"x's own": None, "target's": adverts[1].bls_pop, "none": bytes(PopSchemeMPL.aggregate([]))}[pop]
    _x, forged = _rogue_advertisement(adverts, 1, 7, clients[7].identity, pop_of)
    adverts[7] = forged
    # the honest server refuses it at advertisement
    honest = SecAggServer(RoundParams(run_id=RUN, round_id=3, cohort=tuple(clients), vector_length=M))
    honest.collect_keys(adverts)
    assert 7 not in honest.advertised
    assert isinstance(honest.rejected[7], SignatureError)
    assert "proof of possession" in str(honest.rejected[7])
    # a lying server forwards it: every site refuses the roster before making a share
    rosters = _forward_everything(adverts)
    for u in range(1, 7):
        with pytest.raises(SignatureError, match="node 7's BLS key carries no valid proof of possession"):
            clients[u].handle(rosters[u])
        assert clients[u].stage is None


def _forward_everything(adverts):
    """A lying server's rosters: every advertisement as given, neighbours = everyone."""
    identities = tuple((v, a.identity_key) for v, a in sorted(adverts.items()))
    entries = tuple((v, bls.entry(a.bls_key, a.bls_pop, a.bls_binding)) for v, a in sorted(adverts.items()))
    out = {}
    for u in adverts:
        nks = tuple(
            keys_of(v, a) for v, a in sorted(adverts.items()) if v != u
        )
        out[u] = KeyRoster(run_id=RUN, round_id=3, recipient=u, keys=nks, identities=identities, bls_keys=entries)
    return out


def keys_of(v, a: AdvertiseKeys) -> NeighbourKeys:
    return NeighbourKeys(v, a.c_pk, a.s_pk, a.identity_key, a.self_mask_commitment, a.signature)


def test_a_copied_key_cannot_count_one_signature_twice():
    """A colluder binds an honest site's BLS key (and its public PoP) to its own
    identity, hoping the honest signature counts for both nodes: one key under two
    nodes is refused by the server and by every site."""
    clients = _cohort(7)
    server = SecAggServer(RoundParams(run_id=RUN, round_id=3, cohort=tuple(clients), vector_length=M))
    adverts = {u: clients[u].handle(s) for u, s in server.setup_messages().items()}
    binding = identity.sign(clients[7].identity, bls.binding_statement(RUN, adverts[1].bls_key))
    adverts[7] = dataclasses.replace(adverts[7], bls_key=adverts[1].bls_key, bls_pop=adverts[1].bls_pop,
                                     bls_binding=binding)
    server.collect_keys(adverts)
    assert "presents the BLS key of node 1" in str(server.rejected[7])
    rosters = _forward_everything(adverts)
    with pytest.raises(MalformedMessageError, match="nodes 1 and 7 present the same BLS key"):
        clients[2].handle(rosters[2])


def test_a_key_bound_to_another_identity_or_run_is_refused():
    clients = _cohort(6)
    server = SecAggServer(RoundParams(run_id=RUN, round_id=3, cohort=tuple(clients), vector_length=M))
    adverts = {u: clients[u].handle(s) for u, s in server.setup_messages().items()}
    # node 2's BLS key and PoP, but node 3's binding (for node 3's key): not bound to node 2
    swapped = dict(adverts)
    swapped[2] = dataclasses.replace(adverts[2], bls_binding=adverts[3].bls_binding)
    with pytest.raises(SignatureError, match="node 2's BLS key is not bound to its identity key for this run"):
        clients[1].handle(_forward_everything(swapped)[1])
    # a binding made for another run (a key leaked from an old run is worthless now)
    old = identity.sign(clients[4].identity, bls.binding_statement(RUN - 1, adverts[4].bls_key))
    stale = dict(adverts)
    stale[4] = dataclasses.replace(adverts[4], bls_binding=old)
    server.collect_keys(stale)
    assert isinstance(server.rejected[4], SignatureError) and "not bound" in str(server.rejected[4])


# ---------------------------------------------------------------- (b) split survivor sets
def test_split_survivor_sets_cannot_reach_the_quorum_on_either_set():
    """Two halves of honest sites asked to sign different survivor sets (with and
    without node 2). Each site signs one; whatever aggregate the server builds, either
    set falls short of the quorum or the aggregate does not verify. No share leaves."""
    n = 9
    clients = _cohort(n)
    server, reqs, _inputs = _until_consistency(clients)
    everyone = tuple(sorted(server.u3))
    without = tuple(v for v in everyone if v != 2)
    told = {u: everyone if u <= 5 else without for u in everyone}
    sigs = {u: clients[u].handle(dataclasses.replace(reqs[u], survivors=told[u])).signature for u in everyone}
    q = consistency_quorum(n)
    assert q == 7 and sum(s == everyone for s in told.values()) == 5
    revealed = []
    for u in everyone:
        mine = told[u]
        same = tuple((v, sigs[v]) for v in everyone if told[v] == mine)
        attempts = [
            # only the matching signatures: too few
            aggregate_request(RUN, 3, u, mine, same),
            # every signature, every signer listed: the other half signed another statement
            aggregate_request(RUN, 3, u, mine, tuple(sigs.items())),
            # the matching ones, the others listed as if they had signed
            aggregate_request(RUN, 3, u, mine, same, signers=tuple(v for v in everyone if v in mine)),
        ]
        for req in attempts:
            st = clients[u].state
            try:
                revealed.append(clients[u].handle(req))
            except (InconsistentRequestError, SignatureError) as exc:
                assert ("survivors signed the survivor set" in str(exc) or "does not verify" in str(exc)
                        or "which is not a survivor" in str(exc))
            clients[u].state = st  # the attacker tries again on the same site (a refusal ends its round)
    assert revealed == []


# ---------------------------------------------------------------- (c) the signer list
@pytest.fixture()
def signed_round():
    clients = _cohort(9)
    server, reqs, _inputs = _until_consistency(clients)
    replies = {u: clients[u].handle(r) for u, r in reqs.items() if u != 9}  # 9 never signs
    unmask = server.collect_consistency(replies)
    sigs = {u: r.signature for u, r in replies.items()}  # type: ignore[attr-defined]
    return server, clients, unmask, sigs


def _refused(client: SecAggClient, req: UnmaskRequest, error: type[Exception], match: str) -> None:
    assert isinstance(client.state, AwaitingUnmask)
    with pytest.raises(error, match=match):
        client.handle(req)
    assert client.stage is None  # the round is over for it; nothing was revealed


def test_an_aggregate_that_omits_a_listed_signer_is_refused(signed_round):
    _server, clients, unmask, sigs = signed_round
    req = unmask[1]
    short = aggregate(sigs[v] for v in req.signers if v != 3)
    _refused(clients[1], dataclasses.replace(req, aggregate=short), SignatureError,
             "aggregate consistency signature of the 8 listed signers does not verify")


def test_an_aggregate_that_adds_an_unlisted_signer_is_refused(signed_round):
    _server, clients, unmask, _sigs = signed_round
    req = unmask[2]
    listed = tuple(v for v in req.signers if v != 3)
    _refused(clients[2], dataclasses.replace(req, signers=listed), SignatureError, "of the 7 listed signers does not verify")


def test_a_signer_who_did_not_sign_cannot_be_claimed(signed_round):
    """Node 9 sent its masked input but never signed: listing it (to reach the count
    without someone else) fails the aggregate."""
    _server, clients, unmask, sigs = signed_round
    req = unmask[3]
    assert 9 not in req.signers
    signers = (*tuple(v for v in req.signers if v not in (1, 2)), 9)
    req = aggregate_request(RUN, 3, 3, req.survivors, {v: sigs[v] for v in signers if v != 9}, signers=signers)
    _refused(clients[3], req, SignatureError, "of the 7 listed signers does not verify")


def test_a_duplicated_signer_is_refused(signed_round):
    _server, clients, unmask, sigs = signed_round
    req = unmask[4]
    # the quorum is 7: six real signers and one of them twice, its signature added twice
    signers = (1, 2, 3, 4, 5, 6, 6)
    doubled = aggregate_request(RUN, 3, 4, req.survivors, [(v, sigs[v]) for v in signers])
    _refused(clients[4], doubled, MalformedMessageError, "two consistency signatures from node 6")


def test_a_signer_outside_the_survivor_set_or_too_few_signers_is_refused(signed_round):
    _server, clients, unmask, sigs = signed_round
    _refused(clients[5], dataclasses.replace(unmask[5], signers=(*unmask[5].signers, 42)),
             InconsistentRequestError, "consistency signature from node 42, which is not a survivor")
    few = aggregate_request(RUN, 3, 6, unmask[6].survivors, {v: sigs[v] for v in (1, 2, 3, 4, 5, 6)})
    _refused(clients[6], few, InconsistentRequestError, "only 6 survivors signed the survivor set, 7 are needed")


def test_malformed_aggregates_are_typed_errors(signed_round):
    _server, clients, unmask, sigs = signed_round
    _refused(clients[1], dataclasses.replace(unmask[1], aggregate=unmask[1].aggregate[:-1]), MalformedMessageError,
             "aggregate consistency signature must be 96 bytes")
    _refused(clients[2], dataclasses.replace(unmask[2], aggregate=b"\xff" * 96), MalformedMessageError,
             "is not a valid G2 point")
    _refused(clients[3], dataclasses.replace(unmask[3], signatures=((1, sigs[1]),)), MalformedMessageError,
             "one aggregate signature and its signers, not per-signer signatures")
    # and over the wire: an aggregate that is not base64, signers that are not node ids
    raw = encode(unmask[4])
    assert decode(raw) == unmask[4]
    for bad in ({"aggregate": {"b": "!!"}}, {"signers": ["x"]}, {"signers": 7}, {"aggregate": 5}):
        with pytest.raises(MalformedMessageError):
            decode(_tamper(raw, bad))


def _tamper(raw: bytes, fields: dict) -> bytes:
    """The message with some header fields replaced (the byte format of wire.encode)."""
    (hlen,) = struct.unpack(">I", raw[4:8])
    header = json.loads(raw[8 : 8 + hlen])
    header.update(fields)
    head = json.dumps(header).encode()
    return raw[:4] + struct.pack(">I", len(head)) + head + raw[8 + hlen :]


# ---------------------------------------------------------------- (d) replay
def test_an_aggregate_replayed_from_another_round_does_not_verify():
    """Round 3's valid aggregate (same run, same keys, same survivors) sent in round 4:
    the statement binds the round's context, so it does not verify there."""
    clients = _cohort(7)
    server3, reqs3, inputs3 = _until_consistency(clients, round_id=3)
    unmask3 = server3.collect_consistency({u: clients[u].handle(r) for u, r in reqs3.items()})
    out3 = server3.collect_unmask({u: clients[u].handle(r) for u, r in unmask3.items()})
    np.testing.assert_array_equal(out3.total, sum(inputs3.values()).astype(np.uint32))
    _server4, reqs4, _ = _until_consistency(clients, round_id=4)
    for u, r in reqs4.items():
        clients[u].handle(r)
    old = unmask3[1]
    replay = UnmaskRequest(run_id=RUN, round_id=4, recipient=1, survivors=old.survivors, aggregate=old.aggregate,
                           signers=old.signers)
    _refused(clients[1], replay, SignatureError, "aggregate consistency signature of the 7 listed signers does not verify")


# ---------------------------------------------------------------- persistence
def test_the_round_keeps_its_bls_key_and_the_roster_keys_in_its_saved_state():
    """A site restored from its saved state (the Flower mod's ``Context.state``) signs
    with the key it advertised and checks the aggregate against the keys its roster
    carried, even in a fresh process (cache cleared)."""
    clients = _cohort(6)
    server, reqs, inputs = _until_consistency(clients)
    saved = clients[1].state_dict()
    assert saved["bls_sk"] == bls.run_secret(clients[1].identity, RUN)
    bls.clear_cache()
    restored = SecAggClient.from_state_dict(saved, clients[1].identity)
    assert isinstance(restored.state, AwaitingConsistency) and restored.state.bls_keys
    clients[1] = restored
    replies = {u: clients[u].handle(r) for u, r in reqs.items()}
    unmask = server.collect_consistency(replies)
    bls.clear_cache()
    again = SecAggClient.from_state_dict(clients[2].state_dict(), clients[2].identity)
    assert isinstance(again.state, AwaitingUnmask)
    clients[2] = again
    answers = {u: clients[u].handle(r) for u, r in unmask.items()}
    assert all(isinstance(a, UnmaskResponse) for a in answers.values())
    out = server.collect_unmask(answers)
    np.testing.assert_array_equal(out.total, sum(inputs.values()).astype(np.uint32))


def test_neighbourhood_rounds_keep_ed25519_and_carry_no_bls():
    from sgs_flower.secagg.policy import ClientPolicy

    opted = ClientPolicy(consistency="neighbourhood")
    ids = tuple(range(1, 8))
    clients = {u: SecAggClient(u, policy=opted) for u in ids}
    server = SecAggServer(RoundParams(run_id=RUN, round_id=3, cohort=ids, vector_length=M, consistency="neighbourhood"))
    adverts = {u: clients[u].handle(s) for u, s in server.setup_messages().items()}
    assert all(a.bls_key == a.bls_pop == a.bls_binding == b"" for a in adverts.values())
    rosters = server.collect_keys(adverts)
    assert all(r.bls_keys == () for r in rosters.values())
    inputs = _inputs(ids)
    bundles = server.collect_shares({u: clients[u].handle(r) for u, r in rosters.items()})
    reqs = server.collect_masked({u: clients[u].handle(b, vector=inputs[u]) for u, b in bundles.items()})
    replies = {u: clients[u].handle(r) for u, r in reqs.items()}
    assert all(len(r.signature) == identity.SIGNATURE_BYTES for r in replies.values())  # type: ignore[attr-defined]
    unmask = server.collect_consistency(replies)
    assert all(r.aggregate == b"" and r.signers == () and r.signatures for r in unmask.values())
    out = server.collect_unmask({u: clients[u].handle(r) for u, r in unmask.items()})
    np.testing.assert_array_equal(out.total, sum(inputs.values()).astype(np.uint32))


def test_below_the_quorum_of_valid_signers_the_server_aborts():
    clients = _cohort(9)
    server, reqs, _ = _until_consistency(clients)
    replies = {u: clients[u].handle(r) for u, r in reqs.items()}
    for u in (1, 2, 3):  # three bad signatures leave 6 < 7
        replies[u] = dataclasses.replace(replies[u], signature=replies[4].signature)
    with pytest.raises(ThresholdError, match="6 clients signed the survivor set"):
        server.collect_consistency(replies)


def test_the_bls_signature_covers_the_statement_the_ed25519_path_signs():
    """One statement for both modes (round context + the whole survivor set): the BLS
    signature of a global round verifies on exactly the bytes of keys.consistency_statement."""
    clients = _cohort(5)
    server, reqs, _ = _until_consistency(clients)
    reply = clients[1].handle(reqs[1])
    statement = keys.consistency_statement(server.share_context, reqs[1].survivors)
    assert bls.verify(server._bls_table[1], statement, bls.parse_signature(reply.signature, "sig"))  # type: ignore[attr-defined]
    assert not bls.verify(server._bls_table[2], statement, bls.parse_signature(reply.signature, "sig"))  # type: ignore[attr-defined]


class _CountingPop:
    """blspy's PopSchemeMPL with its pop_verify calls counted (the costly per-peer check)."""

    calls = 0

    def __getattr__(self, name):
        return getattr(PopSchemeMPL, name)

    def pop_verify(self, pk, proof):
        _CountingPop.calls += 1
        return PopSchemeMPL.pop_verify(pk, proof)


@pytest.mark.parametrize("keep_state", [True, False])
def test_a_deployed_site_checks_each_peer_key_once_per_run_across_processes(monkeypatch, keep_state):
    """Through the Flower mod: a deployed site runs each message in a new process (here:
    the process cache cleared between stages). With the digests of the keys it checked
    kept in its own Context.state, its unmask stage checks no proof of possession again;
    without them (the control) it checks every peer's again."""
    from test_active_server import ModSite, _spec, finish_mod_round, mod_round_to_consistency

    from clients.secagg_mod import BLS_VERIFIED_KEY

    bls.clear_cache()
    sites = {u: ModSite(u) for u in range(1, 6)}
    server, reqs = mod_round_to_consistency(sites, _spec(n=5))
    assert all(len(bytes(s.context.state.config_records[BLS_VERIFIED_KEY]["digests"])) == 5 * bls.DIGEST_BYTES
               for s in sites.values())
    bls.clear_cache()  # a new process
    if not keep_state:
        for s in sites.values():
            del s.context.state.config_records[BLS_VERIFIED_KEY]
    monkeypatch.setattr(bls, "PopSchemeMPL", _CountingPop())
    _CountingPop.calls = 0
    total = finish_mod_round(sites, server, reqs)
    assert total is not None
    assert _CountingPop.calls == (0 if keep_state else 5)  # the in-process cache then serves the 4 other sites


def test_the_signers_key_from_the_table_total_matches_fast_aggregate_verify():
    """A site sums the signers' keys as the table's total minus the non-signers' keys
    (:func:`bls.signers_key`): it must accept exactly what ``FastAggregateVerify`` over the
    listed keys accepts, for a quorum, for a set that omits or adds one signer, and for a
    minority (summed directly)."""
    sks = [PopSchemeMPL.key_gen(bytes([i, 7]) * 16) for i in range(12)]
    table = {i: sk.get_g1() for i, sk in enumerate(sks)}
    statement = b"survivor set"
    signed = frozenset(range(2, 12))
    aggregate_sig = PopSchemeMPL.aggregate([PopSchemeMPL.sign(sks[i], statement) for i in sorted(signed)])
    for claim in (signed, signed - {5}, signed | {1}, frozenset(range(4)), frozenset()):
        expected = bool(claim) and bls.fast_aggregate_verify([table[v] for v in claim], statement, aggregate_sig)
        assert bls.verify_signers(table, claim, statement, aggregate_sig) is expected
        assert expected is (claim == signed)
    assert bytes(bls.signers_key(table, signed)) == bytes(sum((table[v] for v in signed), G1Element()))


def test_prefetch_checks_keys_in_parallel_caches_only_valid_ones_and_leaves_refusals_to_bound_key(monkeypatch):
    """bls.prefetch checks a run's new keys on every core (blspy and libsodium release
    the GIL). It must cache exactly the entries bound_key would accept: a rogue key
    (no valid PoP) and a key bound to another identity among 80 honest ones stay out of
    the cache, and bound_key then refuses them with the node named."""
    import os as _os

    monkeypatch.setattr(_os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    bls.clear_cache()
    run_id = 77
    idents = [identity.generate_identity() for _ in range(82)]
    entries = []
    for ident in idents:
        public, pop, binding = bls.advertisement(ident, run_id, bls.run_secret(ident, run_id))
        entries.append([identity.identity_public(ident), public, pop, binding])
    entries[5][2] = entries[6][2]  # node 5: another key's PoP (no proof for its own key)
    entries[9][3] = entries[10][3]  # node 9: a binding by another identity
    triples = [(ik, run_id, bls.entry(pk, pop, b)) for ik, pk, pop, b in entries]
    assert bls.prefetch(triples) == 82
    assert bls.verified_count() == 80
    for i, (ik, run, blob) in enumerate(triples):
        if i == 5:
            with pytest.raises(SignatureError, match="node 5's BLS key carries no valid proof of possession"):
                bls.bound_key(ik, run, blob, 5)
        elif i == 9:
            with pytest.raises(SignatureError, match="node 9's BLS key is not bound to its identity"):
                bls.bound_key(ik, run, blob, 9)
        else:
            assert bls.bound_key(ik, run, blob, i) == G1Element.from_bytes(entries[i][1])
    # the two refused ones are all that is left: too few for threads, so left to bound_key
    assert bls.prefetch(triples) == 0 and bls.verified_count() == 80
    bls.clear_cache()
