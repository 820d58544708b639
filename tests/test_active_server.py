"""A lying server against the real client and the real mod (issue: active server).

Each test plays an attack an active server could try, written here (not the project's
``SecAggServer`` unless a stage is honest), and checks it is refused with a typed
error naming the check. Where refusal is impossible without a pinned roster, the test
shows the documented limit. Attacks, numbered as in the README's threat model:

1. split the dropout story (tell W's neighbours W survived, W's neighbours' neighbours
   that they dropped); 2. downgrade to a plain train message; 3. sybils, a tiny cohort,
   a sparse graph, a low threshold, a chosen graph seed; 4. turn the DP noise off;
5. read values from error replies; 6. aggregate one model twice; 7. malformed input.
"""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lying_server import aggregate, aggregate_request

from clients.secagg_mod import secagg_mod
from sgs_flower.pipeline import (
    UpdateSpec,
    binding_digest,
    decode_update,
    validation_layout,
    with_validation,
)
from sgs_flower.secagg import bls, identity, keys, wire
from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.errors import (
    InconsistentRequestError,
    MalformedMessageError,
    PolicyError,
    ProtocolError,
    SignatureError,
    StaleMessageError,
)
from sgs_flower.secagg.graph import consistency_quorum, graph_seed, neighbours, neighbours_of
from sgs_flower.secagg.identity import Roster
from sgs_flower.secagg.policy import ClientPolicy
from sgs_flower.secagg.server import RoundParams, SecAggServer
from sgs_flower.secagg.wire import ConsistencyRequest, Setup, Stage
from strategies.secagg_strategy import parse_reply

TaskIdentity.run_id = 1  # Flower messages built outside a running app need a task identity
TaskIdentity.node_id = 0
TaskIdentity.task_id = 1


# ---------------------------------------------------------------- helpers
def honest_until_consistency(n: int, m: int = 8, **kw):
    """Run stages 1-3 honestly; return server, clients, inputs, consistency requests."""
    ids = tuple(range(1, n + 1))
    params = RoundParams(run_id=7, round_id=3, cohort=ids, vector_length=m, **kw)
    server = SecAggServer(params)
    clients = {u: SecAggClient(u) for u in ids}
    rng = np.random.default_rng(n)
    inputs = {u: rng.integers(0, 1 << 32, m, dtype=np.uint64).astype(np.uint32) for u in ids}
    rosters = server.collect_keys({u: clients[u].handle(s) for u, s in server.setup_messages().items()})
    bundles = server.collect_shares({u: clients[u].handle(r) for u, r in rosters.items()})
    reqs = server.collect_masked({u: clients[u].handle(b, vector=inputs[u]) for u, b in bundles.items()})
    return server, clients, inputs, reqs


def split_attack(n: int):
    """The server wants victim W = 1's input: some clients must reveal W's self-mask
    seed (W "survived") while others reveal the masking key of W's neighbour v = 2
    (v "dropped"), which removes the pairwise mask between them. It tells one half of
    the survivors the full set, the other half the set without v, collects their
    signatures and forwards whatever it has to everyone."""
    server, clients, _inputs, reqs = honest_until_consistency(n)
    everyone = tuple(sorted(server.u3))
    v = 2
    half = len(everyone) // 2
    sigs: dict[tuple[int, ...], dict[int, bytes]] = {}
    told: dict[int, tuple[int, ...]] = {}
    refusals: list[Exception] = []
    for i, u in enumerate(everyone):
        survivors = everyone if i < half else tuple(x for x in everyone if x != v)
        told[u] = survivors
        try:
            reply = clients[u].handle(dataclasses.replace(reqs[u], survivors=survivors))
            sigs.setdefault(survivors, {})[u] = reply.signature  # type: ignore[attr-defined]
        except ProtocolError as exc:
            refusals.append(exc)
    revealed: dict[int, list] = {}
    for u, survivors in told.items():
        if clients[u].stage != Stage.UNMASK:
            continue
        # forward every signature the server holds, on any set (it hopes the count suffices):
        # in a global round, added into one aggregate over every signer
        forwarded = tuple(sorted((s, sig) for group in sigs.values() for s, sig in group.items()))
        req = aggregate_request(7, 3, u, survivors, forwarded)
        try:
            revealed[u] = [clients[u].handle(req)]
        except ProtocolError as exc:
            refusals.append(exc)
    return server, clients, revealed, refusals, sigs


@pytest.mark.parametrize("n", [4, 5, 7, 10, 20, 40])
def test_split_dropout_story_is_refused(n):
    """Attack 1, every client honest, default graph and threshold (complete up to 10,
    Harary beyond): no client reveals a share, because no survivor set gathers the
    quorum of signatures, and signatures on one set do not verify on another."""
    _server, _clients, revealed, refusals, sigs = split_attack(n)
    assert revealed == {}
    assert refusals and all(isinstance(e, InconsistentRequestError | SignatureError) for e in refusals)
    assert any(isinstance(e, SignatureError) or "signed the survivor set" in str(e) for e in refusals)
    # and no set could have reached the quorum: honest clients signed one set each
    assert len(sigs) == 2
    assert all(len(group) < consistency_quorum(n) for group in sigs.values())


def test_split_with_only_matching_signatures_is_refused_for_lack_of_quorum():
    server, clients, _inputs, reqs = honest_until_consistency(7)
    everyone = tuple(sorted(server.u3))
    a = everyone
    b = tuple(v for v in everyone if v != 2)
    sig = {}
    for u in everyone:
        s = a if u in (1, 3, 4) else b
        if u == 2:
            s = a
        sig[u] = (s, clients[u].handle(dataclasses.replace(reqs[u], survivors=s)).signature)  # type: ignore[attr-defined]
    for u in (1, 3):
        mine = tuple((v, sg) for v, (s, sg) in sig.items() if s == a)
        req = aggregate_request(7, 3, u, a, mine)
        with pytest.raises(InconsistentRequestError, match=r"only 4 survivors signed the survivor set, 5 are needed"):
            clients[u].handle(req)


def test_forged_consistency_signature_is_refused():
    server, clients, _inputs, reqs = honest_until_consistency(5)
    replies = {u: clients[u].handle(r) for u, r in reqs.items()}
    unmask = server.collect_consistency(replies)
    req = unmask[1]
    # a global round's request carries one aggregate: node 3's part of it is forged
    # (another key's signature on the same statement), the signer list unchanged
    forger = SecAggClient(99)
    statement = keys.consistency_statement(server.share_context, req.survivors)
    fake = bls.sign(bls.run_secret(forger.identity, 7), statement)
    forged = aggregate(fake if v == 3 else replies[v].signature for v in req.signers)  # type: ignore[attr-defined]
    with pytest.raises(SignatureError, match="aggregate consistency signature of the 5 listed signers does not verify"):
        clients[1].handle(dataclasses.replace(req, aggregate=forged))


def test_honest_round_unmasks_after_consistency():
    server, clients, inputs, reqs = honest_until_consistency(6)
    unmask = server.collect_consistency({u: clients[u].handle(r) for u, r in reqs.items() if u != 6})
    out = server.collect_unmask({u: clients[u].handle(r) for u, r in unmask.items()})
    assert out.survivors == (1, 2, 3, 4, 5, 6)  # 6 masked, then dropped at the consistency stage
    total = sum(inputs.values()).astype(np.uint32)
    np.testing.assert_array_equal(out.total, total)


# ---------------------------------------------------------------- 3: cohort, graph, identities
@pytest.mark.parametrize(
    ("cohort", "degree", "threshold", "why"),
    [
        ((1, 2), 1, 1, "cohort of 2 is below this site's minimum cohort"),
        (tuple(range(1, 1001)), 2, 2, "degree 2 is below this site's minimum"),
        ((1, 2, 3, 4, 5), 4, 1, "threshold 1 is below the active-server bound"),
        (tuple(range(1, 5001)), 4999, 4000, "cohort of 5000 exceeds this site's maximum cohort"),
    ],
)
def test_client_refuses_weak_round_parameters(cohort, degree, threshold, why):
    setup = Setup(run_id=1, round_id=1, recipient=1, cohort=cohort, degree=degree, threshold=threshold,
                  field_bits=32, vector_length=10)
    client = SecAggClient(1)
    with pytest.raises(PolicyError, match=why):
        client.handle(setup)
    assert client.stage is None


def test_graph_seed_is_derived_not_chosen():
    """There is no seed in the setup: the client derives it, so the server cannot grind
    one; the neighbours it uses are those of the derived seed."""
    assert "graph_seed" not in {f.name for f in dataclasses.fields(Setup)}
    cohort = tuple(range(1, 41))
    params = RoundParams(run_id=9, round_id=4, cohort=cohort, vector_length=4)
    client = SecAggClient(5)
    client.handle(SecAggServer(params).setup_messages()[5])
    seed = graph_seed(9, 4, cohort)
    assert client.state.secrets.neighbours == neighbours_of(cohort, params.degree, seed, 5)  # type: ignore[union-attr]
    assert client.state.secrets.neighbours == neighbours(cohort, params.degree, seed)[5]  # type: ignore[union-attr]


def _roster_for(clients) -> Roster:
    return Roster(frozenset(identity.identity_public(c.identity) for c in clients.values()))


def test_roster_refuses_a_server_made_node():
    """With a pinned roster, a node the server made (its own identity key) is refused
    before any secret is shared."""
    ids = (1, 2, 3, 4, 5)
    params = RoundParams(run_id=1, round_id=1, cohort=ids, vector_length=4)
    server = SecAggServer(params)
    clients = {u: SecAggClient(u) for u in ids}
    roster = _roster_for({u: c for u, c in clients.items() if u != 5})  # site 5 is not in the federation
    for c in clients.values():
        c.policy = ClientPolicy(roster=roster)
    rosters = server.collect_keys({u: clients[u].handle(s) for u, s in server.setup_messages().items()})
    with pytest.raises(PolicyError, match="node 5's identity key is not on this site's roster"):
        clients[1].handle(rosters[1])


def test_without_a_roster_a_server_made_node_is_accepted_documented_limit():
    """The documented limit: without a roster the client cannot tell a sybil from a
    site. The server's own node (5) takes part and its shares are accepted."""
    ids = (1, 2, 3, 4, 5)
    params = RoundParams(run_id=1, round_id=1, cohort=ids, vector_length=4)
    server = SecAggServer(params)
    clients = {u: SecAggClient(u) for u in ids}  # 5 is the server's
    rosters = server.collect_keys({u: clients[u].handle(s) for u, s in server.setup_messages().items()})
    reply = clients[1].handle(rosters[1])
    assert 5 in {v for v, _ in reply.ciphertexts}  # type: ignore[attr-defined]


def test_swapped_neighbour_key_breaks_its_signature():
    ids = (1, 2, 3, 4)
    server = SecAggServer(RoundParams(run_id=1, round_id=1, cohort=ids, vector_length=4))
    clients = {u: SecAggClient(u) for u in ids}
    rosters = server.collect_keys({u: clients[u].handle(s) for u, s in server.setup_messages().items()})
    r = rosters[1]
    evil_key = keys.public_bytes(keys.generate_private_key())
    swapped = tuple(dataclasses.replace(nk, s_pk=evil_key) if nk.node == 2 else nk for nk in r.keys)
    with pytest.raises(SignatureError, match="node 2's advertised keys do not carry its valid signature"):
        clients[1].handle(dataclasses.replace(r, keys=swapped))


def test_identity_table_cannot_count_one_site_twice():
    ids = (1, 2, 3, 4)
    server = SecAggServer(RoundParams(run_id=1, round_id=1, cohort=ids, vector_length=4))
    clients = {u: SecAggClient(u) for u in ids}
    rosters = server.collect_keys({u: clients[u].handle(s) for u, s in server.setup_messages().items()})
    r = rosters[1]
    table = dict(r.identities)
    table[4] = table[3]
    with pytest.raises(MalformedMessageError, match="nodes 3 and 4 present the same identity key"):
        clients[1].handle(dataclasses.replace(r, identities=tuple(table.items())))


# ---------------------------------------------------------------- the mod, driven like Flower does
N_MOD = 5
MODEL = {"w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4), "b": np.zeros(3, dtype=np.float32)}


class ModSite:
    """One SuperNode: a Context and the user's unchanged train function behind the mod.

    Whole-group participation is off here (``sgs-min-group = 0``) unless a test sets it:
    these tests isolate the single-round checks (quorum, signatures, stale messages),
    and at the default (3) a split survivor set is refused by the group check first
    (``test_split_attack_at_default_settings_is_refused_by_the_group_check``,
    tests/test_groups.py)."""

    def __init__(self, node: int, node_config: dict | None = None) -> None:
        config = {"sgs-min-group": "0", **(node_config or {})}
        self.context = Context(run_id=1, node_id=node, node_config=config, state=RecordDict(), run_config={})
        self.trained = 0
        self.loss = 0.123456789 + node

    def train(self, msg: Message, context: Context) -> Message:
        self.trained += 1
        arrays = msg.content.array_records["arrays"]
        new = ArrayRecord({k: Array(v.numpy() + 0.01 * context.node_id) for k, v in arrays.items()})
        metrics = MetricRecord({"num-examples": 10 + context.node_id, "train_loss": self.loss})
        return Message(RecordDict({"arrays": new, "metrics": metrics}), reply_to=msg)

    def send(self, stage: Stage, payload: wire.Message, extra: dict | None = None, fields: dict | None = None):
        rec = ConfigRecord({wire.FIELD_STAGE: int(stage), wire.FIELD_PAYLOAD: wire.encode(payload), **(fields or {})})
        msg = Message(RecordDict({wire.RECORD_KEY: rec, **(extra or {})}), dst_node_id=self.context.node_id,
                      message_type=MessageType.TRAIN, group_id="1")
        return secagg_mod(msg, self.context, self.train)


def _masked_extra(spec: UpdateSpec, model=MODEL):
    return (
        {"arrays": ArrayRecord({k: Array(v) for k, v in model.items()}), "config": ConfigRecord({"lr": 0.1}),
         wire.SPEC_KEY: ConfigRecord(spec.to_config())},
        {"arrays-key": "arrays", "config-key": "config", "weight-key": "num-examples"},
    )


def _spec(n=N_MOD, **kw) -> UpdateSpec:
    base = dict(clip_range=1.0, max_cohort=n, max_weight=1024, field_bits=32, metric_slots=1)
    base.update(kw)
    return UpdateSpec(**base)  # type: ignore[arg-type]


def _reply(site_reply: Message) -> wire.Message:
    assert not site_reply.has_error(), site_reply.error.reason if site_reply.has_error() else ""
    return parse_reply(site_reply)


def mod_round_to_consistency(sites: dict[int, ModSite], spec: UpdateSpec, round_id: int = 3, model=MODEL):
    ids = tuple(sorted(sites))
    model_size = sum(v.size for v in model.values())
    params = RoundParams(run_id=1, round_id=round_id, cohort=ids, vector_length=spec.vector_length(model_size),
                         validation=validation_layout(spec, model_size))  # None unless the spec validates
    server = SecAggServer(params, bound_digest=binding_digest(list(model.items()), {"lr": 0.1}, spec.to_config()))
    rosters = server.collect_keys({u: _reply(sites[u].send(Stage.ADVERTISE_KEYS, m)) for u, m in server.setup_messages().items()})
    bundles = server.collect_shares({u: _reply(sites[u].send(Stage.SHARE_KEYS, m)) for u, m in rosters.items()})
    extra, fields = _masked_extra(spec, model)
    reqs = server.collect_masked(
        {u: _reply(sites[u].send(Stage.MASKED_INPUT, m, extra, fields)) for u, m in bundles.items()}
    )
    return server, reqs


def test_split_attack_through_the_mod_is_refused():
    """Attack 1 end to end through ``secagg_mod``: the error replies name the check."""
    sites = {u: ModSite(u) for u in range(1, N_MOD + 1)}
    server, reqs = mod_round_to_consistency(sites, _spec())
    everyone = tuple(sorted(server.u3))
    without_2 = tuple(v for v in everyone if v != 2)
    sigs: dict[tuple[int, ...], dict[int, bytes]] = {}
    for u in everyone:
        s = everyone if u in (1, 2, 3) else without_2
        reply = _reply(sites[u].send(Stage.CONSISTENCY, dataclasses.replace(reqs[u], survivors=s)))
        sigs.setdefault(s, {})[u] = reply.signature  # type: ignore[attr-defined]
    for u, s in ((1, everyone), (4, without_2)):
        forwarded = tuple(sorted((v, sg) for group in sigs.values() for v, sg in group.items()))
        out = sites[u].send(Stage.UNMASK, aggregate_request(1, 3, u, s, forwarded))
        assert out.has_error()
        assert out.error.reason.startswith(("SignatureError", "InconsistentRequestError"))


def test_split_attack_at_default_settings_is_refused_by_the_group_check():
    """The same split at the sites' default policy (groups of 3, learnt at the first
    round): no site signs either half, each with the group check's PolicyError, so not
    even a signature leaves a site."""
    sites = {u: ModSite(u, {"sgs-min-group": "3"}) for u in range(1, N_MOD + 1)}
    server, reqs = mod_round_to_consistency(sites, _spec())
    everyone = tuple(sorted(server.u3))
    without_2 = tuple(v for v in everyone if v != 2)
    for u in everyone:
        if u == 2:
            continue
        out = sites[u].send(Stage.CONSISTENCY, dataclasses.replace(reqs[u], survivors=without_2))
        assert out.has_error() and out.error.reason.startswith("PolicyError: the survivor set splits 1 of")


def test_honest_round_through_the_mod_is_exact():
    sites = {u: ModSite(u) for u in range(1, N_MOD + 1)}
    spec = _spec()
    server, reqs = mod_round_to_consistency(sites, spec)
    unmask = server.collect_consistency({u: _reply(sites[u].send(Stage.CONSISTENCY, r)) for u, r in reqs.items()})
    out = server.collect_unmask({u: _reply(sites[u].send(Stage.UNMASK, r)) for u, r in unmask.items()})
    dec = decode_update(out.total, spec, len(out.survivors))
    w = np.array([10 + u for u in sites], dtype=np.float64)
    expect = float(np.sum(w * 0.01 * np.array(list(sites))) / w.sum())
    np.testing.assert_allclose(dec.mean_delta, expect, atol=spec.quantization.error_bound * 2)
    assert dec.total_weight == int(w.sum())


def _validated_spec() -> UpdateSpec:
    """A validated round outside DP (issue 31): every site proves its update's L2 norm
    is at most 1 (the sites' updates here have norm ~0.04-0.06)."""
    model_size = sum(v.size for v in MODEL.values())
    return with_validation(_spec(weight_scale=1024, l2_clip=1.0), "l2", model_size)


def test_a_validated_round_through_the_mod_is_exact():
    sites = {u: ModSite(u) for u in range(1, N_MOD + 1)}
    spec = _validated_spec()
    server, reqs = mod_round_to_consistency(sites, spec)
    out = server.collect_unmask({u: _reply(sites[u].send(Stage.UNMASK, r)) for u, r in server.collect_consistency(
        {u: _reply(sites[u].send(Stage.CONSISTENCY, r)) for u, r in reqs.items()}).items()})
    assert out.cheaters == () and len(out.survivors) == N_MOD
    dec = decode_update(out.total[: spec.vector_length(15)], spec, len(out.survivors))
    w = np.array([10 + u for u in sites], dtype=np.float64)
    np.testing.assert_allclose(dec.mean_delta, float(np.sum(w * 0.01 * np.array(list(sites))) / w.sum()),
                               atol=spec.quantization.error_bound * 2)


def test_a_lying_server_cannot_frame_an_honest_site_through_the_mod():
    """Issue 31 through ``secagg_mod``: in a validated round the server claims that site
    2's (valid) proof failed, to get its masking-key shares beside its self-mask shares
    and unmask it alone. Every other site's mod checks the evidence itself (the proof
    verifies) and answers an error naming the check: no share leaves a site."""
    from sgs_flower.secagg import input_validation as iv

    sites = {u: ModSite(u) for u in range(1, N_MOD + 1)}
    server, reqs = mod_round_to_consistency(sites, _validated_spec())
    replies = {u: _reply(sites[u].send(Stage.CONSISTENCY, r)) for u, r in reqs.items()}
    unmask = server.collect_consistency(replies)
    assert all(not m.evidence for m in unmask.values())  # the honest server excludes no one
    framed = iv.evidence_blob(replies[2].proof_signature, replies[2].proof)  # type: ignore[attr-defined]
    for u in (1, 3, 4, 5):
        out = sites[u].send(Stage.UNMASK, dataclasses.replace(unmask[u], evidence=((2, framed),)))
        assert out.has_error() and out.error.reason.startswith("InconsistentRequestError"), out.error.reason
        assert "proof" in out.error.reason


def test_plain_train_message_is_refused_and_training_never_runs():
    """Attack 2: a TRAIN message without the protocol record (a downgrade)."""
    site = ModSite(1)
    msg = Message(RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in MODEL.items()}),
                              "config": ConfigRecord({"lr": 0.1})}),
                  dst_node_id=1, message_type=MessageType.TRAIN, group_id="1")
    out = secagg_mod(msg, site.context, site.train)
    assert out.has_error()
    assert "PolicyError: this site requires secure aggregation" in out.error.reason
    assert site.trained == 0
    opted_out = ModSite(2, {"sgs-require-secagg": False})  # a site may opt in to plain rounds
    assert not secagg_mod(msg, opted_out.context, opted_out.train).has_error()
    assert opted_out.trained == 1


def _through_shares(sites, spec):
    ids = tuple(sorted(sites))
    model_size = sum(v.size for v in MODEL.values())
    params = RoundParams(run_id=1, round_id=3, cohort=ids, vector_length=spec.vector_length(model_size),
                         field_bits=spec.field_bits)
    server = SecAggServer(params)
    rosters = server.collect_keys({u: _reply(sites[u].send(Stage.ADVERTISE_KEYS, m)) for u, m in server.setup_messages().items()})
    return server.collect_shares({u: _reply(sites[u].send(Stage.SHARE_KEYS, m)) for u, m in rosters.items()})


def test_negligible_distributed_dp_noise_is_refused_before_training():
    """Attack 4: a spec asking for (almost) no noise under distributed DP."""
    sites = {u: ModSite(u) for u in range(1, N_MOD + 1)}
    spec = _spec(max_weight=1, metric_slots=0, dp_mode="distributed", l2_clip=1.0, noise_mu_share=1e-6,
                 bits_per_coordinate=16, noise_headroom=1000, min_survivors=N_MOD)
    bundles = _through_shares(sites, spec)
    extra, fields = _masked_extra(spec)
    out = sites[1].send(Stage.MASKED_INPUT, bundles[1], extra, fields)
    assert out.has_error()
    assert "below this site's noise floor" in out.error.reason
    assert sites[1].trained == 0


def test_site_budget_refuses_past_its_epsilon(tmp_path):
    """Attack 4, continued: enough noise per round, but the site's own budget against
    the server (kept in its state file, across rounds and runs) runs out."""
    state = tmp_path / "site.json"
    sites = {u: ModSite(u, {"sgs-dp-max-epsilon": 12.0, "sgs-state-file": str(state)} if u == 1 else None)
             for u in range(1, N_MOD + 1)}
    levels = (1 << 15) - 1
    mu = (2.0 * levels) ** 2 / (2 * N_MOD)  # noise multiplier 2 on the sum of N_MOD shares
    spec = _spec(max_weight=1, metric_slots=0, dp_mode="distributed", l2_clip=1.0, noise_mu_share=mu,
                 bits_per_coordinate=16, noise_headroom=int(12 * 2 * levels * 2), min_survivors=N_MOD)
    extra, fields = _masked_extra(spec)
    refused_at = None
    for attempt in range(1, 30):
        for s in sites.values():
            s.context.state = RecordDict()
        bundles = _through_shares(sites, spec)
        out = sites[1].send(Stage.MASKED_INPUT, bundles[1], extra, fields)
        if out.has_error():
            refused_at = attempt
            assert "exceed this site's privacy budget" in out.error.reason
            break
    assert refused_at is not None and refused_at > 1
    spent = json.loads(state.read_text())["dp_events"]
    assert len(spent) == refused_at - 1  # recorded before each masked input left, never after a refusal
    assert sites[1].trained == refused_at - 1


def finish_mod_round(sites: dict[int, ModSite], server: SecAggServer, reqs) -> np.ndarray:
    unmask = server.collect_consistency({u: _reply(sites[u].send(Stage.CONSISTENCY, r)) for u, r in reqs.items()})
    return server.collect_unmask({u: _reply(sites[u].send(Stage.UNMASK, r)) for u, r in unmask.items()}).total


def test_a_server_chosen_weight_key_gives_an_unusable_vector_never_an_error():
    """Attack 5: a server-chosen weight key makes the weight the train loss. Whether a
    loss is a whole number is the site's data, so no site answers with an error (one bit
    per site): each sends a masked vector of the usual length, and the server's sum says
    only that 5 updates were unusable and why; the mean is over none of them."""
    sites = {u: ModSite(u) for u in range(1, N_MOD + 1)}
    spec = _spec()
    ids = tuple(sorted(sites))
    params = RoundParams(run_id=1, round_id=3, cohort=ids, vector_length=spec.vector_length(15))
    extra, fields = _masked_extra(spec)
    fields["weight-key"] = "train_loss"
    server = SecAggServer(params, bound_digest=binding_digest(list(MODEL.items()), {"lr": 0.1}, spec.to_config()))
    rosters = server.collect_keys({u: _reply(sites[u].send(Stage.ADVERTISE_KEYS, m)) for u, m in server.setup_messages().items()})
    bundles = server.collect_shares({u: _reply(sites[u].send(Stage.SHARE_KEYS, m)) for u, m in rosters.items()})
    replies = {u: sites[u].send(Stage.MASKED_INPUT, m, extra, fields) for u, m in bundles.items()}
    assert not any(r.has_error() for r in replies.values())
    assert {len(_reply(r).vector) for r in replies.values()} == {spec.vector_length(15)}  # type: ignore[attr-defined]
    reqs = server.collect_masked({u: _reply(r) for u, r in replies.items()})
    dec = decode_update(finish_mod_round(sites, server, reqs), spec, N_MOD, 15, ["train_loss"])
    assert dec.total_weight == 0 and dec.failures == (("train reply malformed", N_MOD),)
    assert all(s.trained == 1 for s in sites.values())


def test_max_weight_probe_gets_the_same_reply_from_every_site():
    """A max_weight below some sites' num-examples: no site refuses (the answer would be
    one bit of its data); sites of 11..15 examples at max_weight 13 all send masked
    vectors, and the sum counts two unusable updates (weights 14 and 15), not whose."""
    sites = {u: ModSite(u) for u in range(1, N_MOD + 1)}
    spec = _spec(max_weight=13)
    server, reqs = mod_round_to_consistency(sites, spec)
    dec = decode_update(finish_mod_round(sites, server, reqs), spec, N_MOD, 15, ["train_loss"])
    assert dec.failures == (("weight outside 1..max_weight", 2),)
    assert dec.total_weight == 11 + 12 + 13
    np.testing.assert_allclose(dec.mean_delta, (11 * 0.01 + 12 * 0.02 + 13 * 0.03) / 36,
                               atol=2 * spec.quantization.error_bound_for(36, 5) + 1e-7)  # float32 deltas


def test_one_model_is_not_aggregated_over_two_survivor_sets(tmp_path):
    """Attack 6: the same global model in two rounds whose survivor sets differ by one
    node; the second consistency signature is refused. With a state file the memory
    holds across runs too."""
    state = {u: tmp_path / f"site{u}.json" for u in range(1, 7)}
    sites = {u: ModSite(u, {"sgs-state-file": str(state[u])}) for u in range(1, 7)}
    spec = _spec(n=6)
    server, reqs = mod_round_to_consistency(sites, spec, round_id=3)
    unmask = server.collect_consistency({u: _reply(sites[u].send(Stage.CONSISTENCY, r)) for u, r in reqs.items()})
    server.collect_unmask({u: _reply(sites[u].send(Stage.UNMASK, r)) for u, r in unmask.items()})
    # round 4, same model, site 6 left out: the difference would be site 6's update
    five = {u: sites[u] for u in range(1, 6)}
    _server2, reqs2 = mod_round_to_consistency(five, _spec(n=5), round_id=4)
    out = five[1].send(Stage.CONSISTENCY, reqs2[1])
    assert out.has_error()
    assert "already aggregated over another survivor set" in out.error.reason
    # a new run (fresh Context) of the same sites: the state file remembers
    fresh = {u: ModSite(u, {"sgs-state-file": str(state[u])}) for u in range(1, 6)}
    _server3, reqs3 = mod_round_to_consistency(fresh, _spec(n=5), round_id=1)
    out = fresh[2].send(Stage.CONSISTENCY, reqs3[2])
    assert out.has_error() and "already aggregated" in out.error.reason


def test_same_round_twice_in_one_run_is_refused():
    server, clients, _inputs, _reqs = honest_until_consistency(5)
    setup = server.setup_messages()[1]
    with pytest.raises(StaleMessageError, match="stale or replayed"):
        clients[1].handle(setup)
    assert clients[1].stage is None


# ---------------------------------------------------------------- 7: malformed input
def _raw(header: bytes) -> bytes:
    return wire.MAGIC + struct.pack(">I", len(header)) + header


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (_raw(b"[" * 100_000 + b"]" * 100_000), "not valid JSON"),
        (_raw(b'{"type":"Setup","run_id":' + b"9" * 5000 + b"}"), "not valid JSON"),
        (_raw(b'{"type":["Setup"]}'), "unknown message type"),
        (_raw(b'{"type":{"a":1}}'), "unknown message type"),
    ],
)
def test_hostile_headers_are_typed_errors(data, why):
    with pytest.raises(MalformedMessageError, match=why):
        wire.decode(data)


def test_vector_length_of_two_to_the_32_is_refused_before_allocation():
    setup = Setup(run_id=1, round_id=1, recipient=1, cohort=(1, 2, 3), degree=2, threshold=2,
                  field_bits=32, vector_length=(1 << 31) - 1)
    blob = wire.encode(setup).replace(b'"vector_length":2147483647', b'"vector_length":4294967296')
    with pytest.raises(MalformedMessageError, match="vector_length must be an integer"):
        wire.decode(blob)
    with pytest.raises(PolicyError, match="exceeds this site's limit"):
        SecAggClient(1).handle(setup)


def test_huge_complete_graph_setup_is_refused_cheaply():
    cohort = tuple(range(1, 200_001))
    setup = Setup(run_id=1, round_id=1, recipient=1, cohort=cohort, degree=len(cohort) - 1,
                  threshold=len(cohort) - 1, field_bits=32, vector_length=10)
    decoded = wire.decode(wire.encode(setup))
    with pytest.raises(PolicyError, match="exceeds this site's maximum cohort"):
        SecAggClient(1).handle(decoded)


def _valid_messages() -> list[bytes]:
    server, _clients, _inputs, reqs = honest_until_consistency(4, m=4)
    out = [wire.encode(m) for m in reqs.values()]
    out += [wire.encode(m) for m in server.setup_messages().values()]
    return out


VALID = _valid_messages()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_bytes_only_ever_raise_malformed_message_error(data):
    base = data.draw(st.sampled_from(VALID))
    kind = data.draw(st.integers(0, 3))
    if kind == 0:
        blob = data.draw(st.binary(max_size=300))
    elif kind == 1:  # flip bytes of a valid message
        b = bytearray(base)
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(b) - 1))
            b[i] = data.draw(st.integers(0, 255))
        blob = bytes(b)
    elif kind == 2:  # truncate or extend
        cut = data.draw(st.integers(0, len(base)))
        blob = base[:cut] + data.draw(st.binary(max_size=20))
    else:  # a JSON header of any shape
        header = data.draw(st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=8),
            lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=20,
        ))
        if isinstance(header, dict) and data.draw(st.booleans()):
            header["type"] = data.draw(st.sampled_from(sorted(wire.MESSAGE_TYPES)))
        blob = _raw(json.dumps(header).encode())
    try:
        msg = wire.decode(blob)
    except MalformedMessageError:
        return
    assert isinstance(msg, wire.Message)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stage=st.one_of(st.integers(-3, 9), st.text(max_size=4), st.booleans()), payload=st.binary(max_size=64),
       pick=st.integers(0, len(VALID) - 1), use_valid=st.booleans())
def test_fuzzed_mod_input_is_always_an_error_reply(stage, payload, pick, use_valid):
    """The mod's entry point: whatever the record holds, the reply is a Flower error
    message (the node never crashes, the user's code never runs)."""
    site = ModSite(1)
    rec = ConfigRecord({wire.FIELD_STAGE: stage, wire.FIELD_PAYLOAD: VALID[pick] if use_valid else payload})
    msg = Message(RecordDict({wire.RECORD_KEY: rec}), dst_node_id=1, message_type=MessageType.TRAIN, group_id="1")
    out = secagg_mod(msg, site.context, site.train)
    if not out.has_error():  # only a well-formed setup for this very node may be answered
        assert isinstance(parse_reply(out), wire.AdvertiseKeys)
    assert site.trained == 0


def test_consistency_request_before_masking_is_stale():
    c = SecAggClient(1)
    with pytest.raises(StaleMessageError, match="no round in progress"):
        c.handle(ConsistencyRequest(run_id=7, round_id=3, recipient=1, survivors=(1, 2, 3, 4)))


def test_unreadable_site_state_is_refused_not_reset(tmp_path):
    """A corrupt state file must not silently reset the site's privacy spend."""
    state = tmp_path / "site.json"
    state.write_text("{not json")
    site = ModSite(1, {"sgs-state-file": str(state)})
    setup = Setup(run_id=1, round_id=1, recipient=1, cohort=(1, 2, 3), degree=2, threshold=2,
                  field_bits=32, vector_length=10)
    out = site.send(Stage.ADVERTISE_KEYS, setup)
    assert out.has_error() and "sgs-state-file) is unreadable" in out.error.reason
    assert state.read_text() == "{not json"  # left for the operator, not overwritten


def test_a_lying_server_misplacing_shared_parts_through_the_mod_gets_error_replies():
    """sgs-secagg+/8 through the real ClientApp mod: the honest split setup is answered;
    a shared part of another message type, the shared fields both inline and shared,
    an own part without its shared part, or junk bytes as the shared part each get an
    error reply naming the problem, and the user's code never runs."""
    from sgs_flower.secagg.wire import KeyRoster

    setup = Setup(run_id=1, round_id=1, recipient=1, cohort=(1, 2, 3), degree=2, threshold=2, field_bits=32,
                  vector_length=10)
    own, shared = wire.encode_parts(setup)
    _, roster_shared = wire.encode_parts(KeyRoster(run_id=1, round_id=1, recipient=1, keys=(),
                                                   identities=((1, b"a" * 32),), bls_keys=()))

    def send(payload: bytes, shared_part: bytes | None) -> tuple[ModSite, Message]:
        site = ModSite(1)
        fields = {} if shared_part is None else {wire.FIELD_SHARED: shared_part}
        rec = ConfigRecord({wire.FIELD_STAGE: int(Stage.ADVERTISE_KEYS), wire.FIELD_PAYLOAD: payload, **fields})
        msg = Message(RecordDict({wire.RECORD_KEY: rec}), dst_node_id=1, message_type=MessageType.TRAIN,
                      group_id="1")
        return site, secagg_mod(msg, site.context, site.train)

    site, out = send(own, shared)
    assert isinstance(_reply(out), wire.AdvertiseKeys)
    for payload, shared_part, why in [
        (own, roster_shared, "the shared part is not Setup's"),
        (wire.encode(setup), shared, "Setup fields differ (missing [], unexpected ['cohort'])"),
        (own, None, "Setup fields differ (missing ['cohort']"),
        (own, b"junk", "not an sgs-flower secagg shared part"),
    ]:
        site, out = send(payload, shared_part)
        assert out.has_error() and why in out.error.reason, (why, out.error.reason if out.has_error() else "")
        assert site.trained == 0
