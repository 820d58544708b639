"""Issue 29 (core): participation in whole groups, against a server that lies.

Twelve sites pinned in a roster, groups of at least three (``sgs-min-group = 3``). The
partition is derived from the roster by a public rule; a site signs only survivor sets
that are unions of whole groups, before any share is revealed; the honest server leaves a
group with a missing member out of the sum whole. Each test compares the secure sum with
the plaintext sum of the sites it claims, and plays the server that lies.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest
from test_pipelined_rounds import task_identity  # noqa: F401 - the fixture is used by name

from sgs_flower.secagg import identity
from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.errors import (
    ConfigurationError,
    InconsistentRequestError,
    PolicyError,
    ThresholdError,
)
from sgs_flower.secagg.groups import GroupRule, check_whole_groups, partition, whole_group_members
from sgs_flower.secagg.identity import Roster
from sgs_flower.secagg.policy import ClientPolicy
from sgs_flower.secagg.prg import dtype_for_bits
from sgs_flower.secagg.server import RoundParams, SecAggServer
from sgs_flower.secagg.simulate import run_protocol
from sgs_flower.secagg.wire import Stage

N, G, M, BITS = 12, 3, 16, 24
SECRETS = {u: identity.generate_identity() for u in range(1, N + 1)}
PUBLIC = {u: identity.identity_public(k) for u, k in SECRETS.items()}
ROSTER = Roster(frozenset(PUBLIC.values()))
RULE = GroupRule(ROSTER.keys, G)
GROUP_OF_NODE = {u: RULE.group_of[PUBLIC[u]] for u in PUBLIC}


def _nodes_of(group: int) -> set[int]:
    return {u for u, g in GROUP_OF_NODE.items() if g == group}


def _clients(min_group: int = G) -> dict[int, SecAggClient]:
    policy = ClientPolicy(roster=ROSTER, min_group=min_group)
    return {u: SecAggClient(u, identity=SECRETS[u], policy=policy) for u in PUBLIC}


def _inputs(seed: int) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    dtype = dtype_for_bits(BITS)
    return {u: (rng.integers(0, 1 << BITS, M, dtype=np.uint64)).astype(dtype) for u in PUBLIC}


def _round(cohort: tuple[int, ...], round_id: int, groups: GroupRule | None, drops=None, clients=None):
    params = RoundParams(run_id=1, round_id=round_id, cohort=cohort, vector_length=M, field_bits=BITS)
    server = SecAggServer(params, groups=groups)
    clients = clients if clients is not None else _clients()
    vectors = _inputs(7)
    outcome = run_protocol(server, {u: clients[u] for u in cohort}, {u: vectors[u] for u in cohort}, drops)
    return server, outcome, vectors


def _plain_sum(vectors: dict[int, np.ndarray], nodes: set[int]) -> np.ndarray:
    total = np.zeros(M, dtype=np.uint64)
    for u in nodes:
        total = total + vectors[u].astype(np.uint64)
    return (total & np.uint64((1 << BITS) - 1)).astype(dtype_for_bits(BITS))


# ---------------------------------------------------------------- the public rule
def test_the_partition_is_a_public_function_of_the_roster_alone():
    keys = sorted(PUBLIC.values())
    groups = partition(keys, G)
    assert groups == partition(reversed(keys), G) == RULE.groups  # order of presentation is irrelevant
    assert sorted(len(g) for g in groups) == [3, 3, 3, 3] and frozenset().union(*groups) == frozenset(keys)
    more = [*keys, identity.identity_public(identity.generate_identity())]
    assert sorted(len(g) for g in partition(more, G)) == [3, 3, 3, 4]  # a remainder joins the last group
    with pytest.raises(ConfigurationError, match="cannot form a group of 3"):
        partition(keys[:2], G)


def test_a_site_policy_checks_its_group_size_and_roster():
    with pytest.raises(ConfigurationError, match="0 \\(off\\) or at least 2"):
        ClientPolicy(roster=ROSTER, min_group=1)
    with pytest.raises(ConfigurationError, match="no group could be whole"):
        ClientPolicy(roster=ROSTER, min_group=13)
    assert ClientPolicy(roster=ROSTER, min_group=3).group_rule == RULE
    # without a roster the groups are learnt at the first round (not from the policy alone)
    assert ClientPolicy(min_group=3).group_rule is None
    assert ClientPolicy.from_node_config({}).min_group == 3  # on by default


# ------------------------------------------------- no roster: the federation learnt on first use
def _unpinned(min_group: int = G) -> dict[int, SecAggClient]:
    policy = ClientPolicy(min_group=min_group)
    return {u: SecAggClient(u, identity=SECRETS[u], policy=policy) for u in PUBLIC}


def _learning_round(cohort, round_id, clients, drops=None, groups=None, min_group=G):
    """One round at its own global model (its digest), so no site's memory of the sets
    it signed refuses it: only the groups can."""
    params = RoundParams(run_id=1, round_id=round_id, cohort=cohort, vector_length=M, field_bits=BITS)
    digest = hashlib.sha256(b"model %d" % round_id).digest()
    server = SecAggServer(params, bound_digest=digest, groups=groups, min_group=min_group)
    vectors = _inputs(round_id)
    outcome = run_protocol(server, {u: clients[u] for u in cohort}, {u: vectors[u] for u in cohort}, drops,
                           bound_digests={u: digest for u in cohort})
    return server, outcome, vectors


def _asked_to_sign(cohort, round_id, clients, drop):
    """A lying server's round by hand, up to the consistency requests: it drops ``drop``
    at the masked input and asks the rest to sign (it claims no groups)."""
    params = RoundParams(run_id=1, round_id=round_id, cohort=cohort, vector_length=M, field_bits=BITS)
    digest = hashlib.sha256(b"model %d" % round_id).digest()
    server, vectors = SecAggServer(params, bound_digest=digest), _inputs(round_id)
    rosters = server.collect_keys({u: clients[u].handle(m) for u, m in server.setup_messages().items()})
    bundles = server.collect_shares({u: clients[u].handle(m) for u, m in rosters.items()})
    masked = {u: clients[u].handle(m, vector=vectors.get(u, vectors[1]), bound_digest=digest)
              for u, m in bundles.items() if u not in drop}
    return server.collect_masked(masked)


def test_without_a_roster_sites_and_server_learn_the_same_partition_at_the_first_round():
    """No roster: the first round's cohort is the federation, for the server and every
    site alike (the same public rule over the same signed identities); a later dropout
    takes its whole learnt group out of the sum, and the sum is the plaintext sum of the
    rest."""
    clients = _unpinned()
    cohort = tuple(sorted(PUBLIC))
    server, outcome, vectors = _learning_round(cohort, 1, clients)
    assert server.groups is not None and server.groups.groups == RULE.groups
    assert all(c.federation == ROSTER.keys for c in clients.values())
    np.testing.assert_array_equal(outcome.total, _plain_sum(vectors, set(cohort)))
    mates = _nodes_of(GROUP_OF_NODE[1]) - {1}
    server, outcome, vectors = _learning_round(cohort, 2, clients, {Stage.MASKED_INPUT: {1}}, groups=server.groups)
    assert server.group_excluded == mates
    np.testing.assert_array_equal(outcome.total, _plain_sum(vectors, set(cohort) - mates - {1}))


def test_without_a_roster_the_issues_attack_is_refused_after_the_first_round():
    """Round A over all twelve; round B, a lying server's, over all but site v (it drops v
    at the masked input, keeps v's group-mates and claims no groups). Every site checks
    against the partition it learnt in round A and refuses to sign, with the group
    check's PolicyError, before any share is revealed."""
    clients = _unpinned()
    cohort = tuple(sorted(PUBLIC))
    _learning_round(cohort, 1, clients)
    for u, req in _asked_to_sign(cohort, 2, clients, {4}).items():
        with pytest.raises(PolicyError, match="splits 1 of the federation's 4 groups"):
            clients[u].handle(req)


def test_without_a_roster_a_key_that_joins_later_is_never_in_a_whole_group():
    """A sybil (or a late site) of a key the sites did not see at their first round, in
    site v's place: every site refuses the survivor set that holds it (a key off the
    learnt federation is never a whole group), so the server cannot swap it in for v."""
    clients = _unpinned()
    cohort = tuple(sorted(PUBLIC))
    _learning_round(cohort, 1, clients)
    swapped = {**{u: c for u, c in clients.items() if u != 4}, 99: SecAggClient(99, policy=ClientPolicy(min_group=G))}
    requests = _asked_to_sign(tuple(sorted(swapped)), 2, swapped, set())
    for u, req in requests.items():
        if u == 99:
            continue
        with pytest.raises(PolicyError, match="splits 2 of the federation's 4 groups"):
            swapped[u].handle(req)


def test_without_a_roster_a_first_cohort_smaller_than_a_group_is_refused():
    policy = ClientPolicy(min_group=4)
    clients = {u: SecAggClient(u, identity=SECRETS[u], policy=policy) for u in (1, 2, 3)}
    params = RoundParams(run_id=1, round_id=1, cohort=(1, 2, 3), vector_length=M, field_bits=BITS)
    with pytest.raises(ThresholdError, match="fewer than one group of min_group = 4"):
        run_protocol(SecAggServer(params, min_group=4), clients, {u: _inputs(1)[u] for u in (1, 2, 3)})
    assert all(not c.federation for c in clients.values())


# ---------------------------------------------------------------- honest rounds
def test_a_round_of_whole_groups_sums_exactly():
    cohort = tuple(sorted(PUBLIC))
    server, outcome, vectors = _round(cohort, 1, RULE)
    assert set(outcome.survivors) == set(cohort) and not server.group_excluded
    np.testing.assert_array_equal(outcome.total, _plain_sum(vectors, set(cohort)))


def test_a_dropout_takes_its_whole_group_out_of_the_sum():
    """Site 1 drops before its masked input: its two group-mates' inputs stay out of the
    sum as dropouts' (their masks recovered, their self-masks hide them); the released
    sum is the plaintext sum of the three whole groups left (nine sites: the consistency
    quorum of a cohort of twelve, so a group costs no more than the round can give)."""
    cohort = tuple(sorted(PUBLIC))
    mates = _nodes_of(GROUP_OF_NODE[1]) - {1}
    server, outcome, vectors = _round(cohort, 2, RULE, {Stage.MASKED_INPUT: {1}})
    assert server.group_excluded == mates
    assert set(outcome.survivors) == set(cohort) - mates - {1}
    np.testing.assert_array_equal(outcome.total, _plain_sum(vectors, set(outcome.survivors)))


# ---------------------------------------------------------------- the lying server
def test_a_server_that_keeps_a_split_group_gets_no_signature():
    """The same dropout, but the server keeps site 1's group-mates in the sum (it ignores
    the groups): every site refuses to sign the survivor set, so no share is revealed
    and nothing is released."""
    cohort = tuple(sorted(PUBLIC))
    clients = _clients()
    with pytest.raises(ThresholdError):
        _round(cohort, 3, None, {Stage.MASKED_INPUT: {1}}, clients)
    # each refusal is the group check's, before signing: no site reached the unmask stage
    assert all(c.stage is None or c.stage < Stage.UNMASK for c in clients.values())


def test_the_issues_attack_two_cohorts_that_differ_by_one_site_is_refused():
    """Round A over all twelve sites; round B over a cohort without site v. A server that
    ignores the groups gets no signature in round B; one that follows them leaves v's
    group out whole, so the difference of the two sums is v's whole group, never v."""
    cohort = tuple(sorted(PUBLIC))
    v = 4
    without_v = tuple(u for u in cohort if u != v)
    _, a, vectors = _round(cohort, 10, RULE)
    with pytest.raises(ThresholdError):
        _round(without_v, 11, None)
    server, b, _ = _round(without_v, 12, RULE)
    group = _nodes_of(GROUP_OF_NODE[v])
    assert server.group_excluded == group - {v}
    diff = (a.total.astype(np.int64) - b.total.astype(np.int64)) % (1 << BITS)
    np.testing.assert_array_equal(diff, _plain_sum(vectors, group).astype(np.int64))
    assert not np.array_equal(diff, vectors[v].astype(np.int64))


def test_each_site_refuses_to_sign_a_split_group_with_a_policy_error():
    """Through the stages by hand: the lying server drops site 1 at the masked input but
    asks everyone to sign a set with its group-mates in it; every site's reply is the
    group check's PolicyError, before it signs (so before any share is revealed)."""
    cohort = tuple(sorted(PUBLIC))
    clients = _clients()
    params = RoundParams(run_id=1, round_id=20, cohort=cohort, vector_length=M, field_bits=BITS)
    server = SecAggServer(params)  # ignores the groups
    vectors = _inputs(5)
    rosters = server.collect_keys({u: clients[u].handle(m) for u, m in server.setup_messages().items()})
    bundles = server.collect_shares({u: clients[u].handle(m) for u, m in rosters.items()})
    masked = {u: clients[u].handle(m, vector=vectors[u]) for u, m in bundles.items() if u != 1}
    requests = server.collect_masked(masked)
    for u, req in requests.items():
        with pytest.raises(PolicyError, match="splits 1 of the federation's 4 groups"):
            clients[u].handle(req)


def test_a_site_checks_the_set_it_is_asked_to_sign_not_the_servers_word():
    """The check itself: a set that is a union of whole groups passes; one that lacks a
    single member of a group is a PolicyError naming the split."""
    everyone = set(PUBLIC)
    check_whole_groups(everyone, PUBLIC, RULE)
    check_whole_groups(everyone - _nodes_of(0), PUBLIC, RULE)
    with pytest.raises(PolicyError, match="splits 1 of the federation's 4 groups"):
        check_whole_groups(everyone - {next(iter(_nodes_of(0)))}, PUBLIC, RULE)
    stranger = identity.identity_public(identity.generate_identity())
    with pytest.raises(PolicyError, match="splits 1"):  # a key off the roster is never a whole group
        check_whole_groups(everyone | {99}, {**PUBLIC, 99: stranger}, RULE)


# ---------------------------------------------------------------- over many rounds
def _survivor_matrix(groups_on: bool, rounds: int = 20, seed: int = 3) -> np.ndarray:
    """Indicator rows of the released survivor sets of ``rounds`` honest rounds: random
    cohorts (whole groups sampled, 3 of 4, when ``groups_on``, else 9 random sites) and
    random dropouts before the masked input (1 in 10)."""
    rng = np.random.default_rng(seed)
    nodes = sorted(PUBLIC)
    rows = []
    for _ in range(rounds):
        if groups_on:
            picked = rng.choice(len(RULE.groups), size=3, replace=False)
            cohort = sorted(u for g in picked for u in _nodes_of(int(g)))
        else:
            cohort = sorted(int(u) for u in rng.choice(nodes, size=9, replace=False))
        drops = {int(u) for u in cohort if rng.random() < 0.1}
        survivors = set(cohort) - drops
        if groups_on:
            survivors = whole_group_members(survivors, PUBLIC, RULE)
        if len(survivors) < 3:
            continue
        rows.append([1.0 if u in survivors else 0.0 for u in nodes])
    return np.array(rows)


def _spans_a_single_site(matrix: np.ndarray) -> list[int]:
    """Sites v whose indicator e_v lies in the row span (rank does not grow with it)."""
    rank = np.linalg.matrix_rank(matrix)
    out = []
    for i in range(matrix.shape[1]):
        e = np.zeros((1, matrix.shape[1]))
        e[0, i] = 1.0
        if np.linalg.matrix_rank(np.vstack([matrix, e])) == rank:
            out.append(i)
    return out


def test_twenty_rounds_of_groups_span_no_vector_on_fewer_than_g_sites():
    """Issue 29's span test: every released set is a union of whole groups, so every
    vector of their span is constant on each group: its support is a union of groups (at
    least G sites). Random cohorts of single sites, the same number of rounds, do span a
    single site (what an honest-but-curious server collects by itself)."""
    with_groups = _survivor_matrix(groups_on=True)
    assert len(with_groups) >= 15
    nodes = sorted(PUBLIC)
    for g in range(len(RULE.groups)):
        cols = [nodes.index(u) for u in _nodes_of(g)]
        assert all(np.array_equal(with_groups[:, cols[0]], with_groups[:, c]) for c in cols[1:])
    assert _spans_a_single_site(with_groups) == []
    assert _spans_a_single_site(_survivor_matrix(groups_on=False)) != []


# ---------------------------------------------------------------- through the real mod
def test_through_the_mod_a_cohort_without_one_site_is_refused_before_any_share(tmp_path):
    """The issue's attack through ``secagg_mod``: sites configured as a deployment would be
    (``--node-config sgs-identity-key=... sgs-roster=... sgs-min-group=3``), a round over
    the roster's sites but one. Every site trains (its update stays masked) and then
    answers the consistency request with the group check's error: no signature, so no
    share, so the server never gets the sum that differs from a full round's by one site."""
    from test_active_server import ModSite, _spec, finish_mod_round, mod_round_to_consistency

    from sgs_flower.pipeline import decode_update
    from sgs_flower.secagg.wire import Stage as WireStage

    n = 6
    publics = {u: identity.write_identity(tmp_path / f"site{u}.key") for u in range(1, n + 1)}
    roster = tmp_path / "roster.txt"
    roster.write_text("".join(f"{k.hex()} site{u}\n" for u, k in publics.items()))
    rule = GroupRule(frozenset(publics.values()), 3)
    v = 6
    mates = {u for u in publics if rule.group_of[publics[u]] == rule.group_of[publics[v]]} - {v}

    def site(u: int) -> ModSite:
        return ModSite(u, {"sgs-identity-key": str(tmp_path / f"site{u}.key"), "sgs-roster": str(roster),
                           "sgs-min-group": "3"})

    sites = {u: site(u) for u in publics if u != v}
    server, reqs = mod_round_to_consistency(sites, _spec(n=n - 1))
    assert all(s.trained == 1 for s in sites.values())
    for u, req in reqs.items():
        out = sites[u].send(WireStage.CONSISTENCY, req)
        assert out.has_error() and out.error.reason.startswith("PolicyError"), out.error.reason
        assert "splits 1 of the federation's 2 groups" in out.error.reason
    # the same sites sign a round over whole groups: the check is not a blanket refusal
    whole = {u: site(u) for u in publics if u != v and u not in mates}
    spec = _spec(n=len(whole))
    server, reqs = mod_round_to_consistency(whole, spec, round_id=4)
    total = finish_mod_round(whole, server, reqs)
    decoded = decode_update(total, spec, len(whole), 15, ["train_loss"])
    assert decoded.count == len(whole) and decoded.total_weight == sum(10 + u for u in whole)


# ---------------------------------------------------------------- through the strategy
class _GroupSite:
    """An in-process SuperNode behind the real mod, configured with its identity, the
    roster and ``sgs-min-group``; ``x -> x + 0.01 * node``; ``crash`` = the rounds in which
    its ClientApp crashes at the masked input (an error reply: a dropout)."""

    def __init__(self, node: int, config: dict, crash: tuple[int, ...] = ()) -> None:
        from flwr.app import Context, RecordDict

        self.node, self.crash = node, crash
        self.context = Context(run_id=1, node_id=node, node_config=config, state=RecordDict(), run_config={})

    def train(self, msg, context):
        from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

        new = ArrayRecord({k: Array((a.numpy() + 0.01 * self.node).astype(np.float32))
                           for k, a in msg.content["arrays"].items()})
        return Message(RecordDict({"arrays": new, "metrics": MetricRecord({"num-examples": 10 + self.node})}),
                       reply_to=msg)

    def handle(self, msg):
        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode

        from clients.secagg_mod import secagg_mod
        from sgs_flower.secagg import wire

        rec = msg.content.config_records.get(wire.RECORD_KEY)
        if (rec is not None and rec.get(wire.FIELD_STAGE) == int(Stage.MASKED_INPUT)
                and int(msg.metadata.group_id) in self.crash):
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason="crashed"), reply_to=msg)
        return secagg_mod(msg, self.context, self.train)


def _group_run(tmp_path, server_groups: bool, crash_node: int, rounds: int = 3, fraction: float = 1.0,
               evaluate: bool = False):
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
    from flwr.serverapp.strategy import FedAvg
    from test_pipelined_rounds import _local_grid

    from strategies import SecAggConfig, SecAggStrategy

    roster = tmp_path / "roster.txt"
    for u, key in SECRETS.items():
        (tmp_path / f"site{u}.key").write_text(key.hex() + "\n")
    roster.write_text("".join(f"{PUBLIC[u].hex()} site{u}\n" for u in sorted(PUBLIC)))
    sites = {u: _GroupSite(u, {"sgs-identity-key": str(tmp_path / f"site{u}.key"), "sgs-roster": str(roster),
                               "sgs-min-group": str(G)}, crash=(2,) if u == crash_node else ())
             for u in PUBLIC}
    config = SecAggConfig(min_group=G, roster=str(roster)) if server_groups else SecAggConfig(min_group=0)
    inner = FedAvg(fraction_train=fraction, fraction_evaluate=fraction if evaluate else 0.0,
                   min_train_nodes=int(N * fraction), min_evaluate_nodes=int(N * fraction), min_available_nodes=N)
    strategy = SecAggStrategy(inner, config)
    models = {}

    def keep(rnd, arrays):
        models[rnd] = arrays["w"].numpy().copy()
        return MetricRecord({"round": rnd})

    strategy.start(grid=_local_grid(sites), initial_arrays=ArrayRecord({"w": Array(np.zeros(4, np.float32))}),
                   num_rounds=rounds, train_config=ConfigRecord({"lr": 1.0}), evaluate_fn=keep)
    if evaluate:
        return strategy.eval_reports, models
    return strategy.reports, models


def test_the_strategy_with_groups_releases_fedavg_over_whole_groups_only(task_identity, tmp_path):  # noqa: F811
    """Site 1 crashes at round 2's masked input: the server (SecAggConfig(min_group=3,
    roster=...)) leaves its two group-mates out with it, and round 2's model is FedAvg's
    over the nine sites of the three whole groups left, within the round's bound."""
    reports, models = _group_run(tmp_path, server_groups=True, crash_node=1)
    assert [r.status for r in reports] == ["ok", "ok", "ok"]
    mates = _nodes_of(GROUP_OF_NODE[1]) - {1}
    r2 = reports[1]
    assert r2.group_excluded == len(mates) and set(r2.survivors) == set(PUBLIC) - mates - {1}
    w = {u: 10 + u for u in r2.survivors}
    step = sum(w[u] * 0.01 * u for u in w) / sum(w.values())
    np.testing.assert_allclose(models[2] - models[1], step, atol=r2.error_bound + 1e-6)
    assert reports[0].group_excluded == reports[2].group_excluded == 0


def test_at_default_settings_the_groups_are_learnt_and_a_crash_takes_its_group_out(task_identity):  # noqa: F811
    """Nothing configured on either side (no roster, no identity key, no sgs-min-group,
    SecAggConfig()): the federation is learnt at round 1, and site 1's crash at round 2's
    masked input takes its learnt group out of the sum whole; round 2 is FedAvg over the
    whole groups left, and the difference of rounds 1 and 2 is never one site's."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord
    from flwr.serverapp.strategy import FedAvg
    from test_pipelined_rounds import _local_grid

    from strategies import SecAggStrategy

    sites = {u: _GroupSite(u, {}, crash=(2,) if u == 1 else ()) for u in PUBLIC}
    strategy = SecAggStrategy(FedAvg(fraction_evaluate=0.0, min_available_nodes=N))
    models = {}

    def keep(rnd, arrays):
        models[rnd] = arrays["w"].numpy().copy()
        return MetricRecord({"round": rnd})

    strategy.start(grid=_local_grid(sites), initial_arrays=ArrayRecord({"w": Array(np.zeros(4, np.float32))}),
                   num_rounds=3, train_config=ConfigRecord({"lr": 1.0}), evaluate_fn=keep)
    reports, rule = strategy.reports, strategy.groups
    assert rule is not None and rule.min_group == 3 and len(rule.roster) == N
    assert [r.status for r in reports] == ["ok", "ok", "ok"]
    node_of = {k: v for v, k in strategy.driver.cohorts.identities.items()}
    mates = {node_of[k] for k in rule.groups[rule.group_of[strategy.driver.cohorts.identities[1]]]} - {1}
    r2 = reports[1]
    assert len(mates) >= 2 and r2.group_excluded == len(mates)
    assert set(r2.survivors) == set(PUBLIC) - mates - {1}
    w = {u: 10 + u for u in r2.survivors}
    step = sum(w[u] * 0.01 * u for u in w) / sum(w.values())
    np.testing.assert_allclose(models[2] - models[1], step, atol=r2.error_bound + 1e-6)


def test_a_server_without_the_groups_gets_no_sum_over_a_split_group(task_identity, tmp_path):  # noqa: F811
    """The same crash with a server that ignores the groups (a lying or misconfigured
    one): every site refuses to sign a survivor set that splits site 1's group, so round 2
    aborts with the sites' reason and the global model does not move."""
    reports, models = _group_run(tmp_path, server_groups=False, crash_node=1)
    r2 = reports[1]
    assert r2.status == "aborted"
    assert "splits 1 of the federation's 4 groups" in r2.reason
    assert "give the server the roster file the sites pin" in r2.reason  # the fix, server-side
    np.testing.assert_array_equal(models[2], models[1])


def test_a_group_left_out_whole_still_signs_so_nine_sites_survive_one_dropout():
    """Nine sites in three groups: one dropout leaves six survivors, below the consistency
    quorum of seven; the two left-out group-mates sign the survivor set too (they sent
    their masked inputs; their self-masks keep them hidden), so the round completes, with
    the exact sum of the six. Neither of them is asked for, or answers, a retry."""
    nine = {u: SECRETS[u] for u in range(1, 10)}
    roster9 = Roster(frozenset(identity.identity_public(k) for k in nine.values()))
    rule9 = GroupRule(roster9.keys, G)
    policy = ClientPolicy(roster=roster9, min_group=G)
    clients = {u: SecAggClient(u, identity=k, policy=policy) for u, k in nine.items()}
    cohort = tuple(sorted(nine))
    params = RoundParams(run_id=1, round_id=30, cohort=cohort, vector_length=M, field_bits=BITS)
    server = SecAggServer(params, groups=rule9)
    vectors = _inputs(11)
    publics = {u: identity.identity_public(k) for u, k in nine.items()}
    mates = {u for u in nine if rule9.group_of[publics[u]] == rule9.group_of[publics[1]]} - {1}
    outcome = run_protocol(server, clients, {u: vectors[u] for u in cohort}, {Stage.MASKED_INPUT: {1}})
    assert server.group_excluded == mates and mates <= server.u4  # they signed
    assert set(outcome.survivors) == set(cohort) - mates - {1}
    np.testing.assert_array_equal(outcome.total, _plain_sum(vectors, set(outcome.survivors)))
    retry = server.retry_messages()
    assert set(retry) == set(outcome.survivors)
    forged = dataclasses.replace(next(iter(retry.values())), recipient=min(mates))
    with pytest.raises(PolicyError, match="not among the survivors it signed for"):
        clients[min(mates)].handle(forged, vector=vectors[min(mates)])


def test_a_site_left_out_of_a_split_group_does_not_sign():
    """A lying server leaves site u out of the survivor set but keeps one of u's
    group-mates in it: u's group is not left out whole, so u refuses to sign (its input
    was dropped while its group is split), as every other site does."""
    cohort = tuple(sorted(PUBLIC))
    clients = _clients()
    params = RoundParams(run_id=1, round_id=31, cohort=cohort, vector_length=M, field_bits=BITS)
    server = SecAggServer(params)
    vectors = _inputs(13)
    rosters = server.collect_keys({u: clients[u].handle(m) for u, m in server.setup_messages().items()})
    bundles = server.collect_shares({u: clients[u].handle(m) for u, m in rosters.items()})
    requests = server.collect_masked({u: clients[u].handle(m, vector=vectors[u]) for u, m in bundles.items()})
    u = 1
    keep_one = min(_nodes_of(GROUP_OF_NODE[u]) - {u})
    survivors = tuple(v for v in cohort if v != u)
    assert keep_one in survivors
    req = dataclasses.replace(requests[keep_one], recipient=u, survivors=survivors)
    with pytest.raises(InconsistentRequestError, match="says node 1 dropped"):
        clients[u].handle(req)


def test_the_strategy_samples_whole_groups(task_identity, tmp_path):  # noqa: F811
    """fraction_train applies to groups: with half of the four groups per round, once the
    sites' identities are known (after round 1's advertisements; round 2 was drawn during
    round 1) every cohort is two whole groups, every sum is over whole groups (the report
    names them), and the rounds still release FedAvg's model."""
    reports, models = _group_run(tmp_path, server_groups=True, crash_node=0, rounds=5, fraction=0.5)
    assert [r.status for r in reports] == ["ok"] * 5
    for r in reports:
        assert set(r.survivors) == {u for g in r.groups for u in _nodes_of(g)}  # whole groups, named
    for r in reports[2:]:
        assert len(r.cohort) == 2 * G and len(r.groups) == 2
    models[0] = np.zeros(4, np.float32)
    for r in reports:  # FedAvg over the round's survivors (weights 10 + node), within the bound
        step = sum((10 + u) * 0.01 * u for u in r.survivors) / sum(10 + u for u in r.survivors)
        np.testing.assert_allclose(models[r.server_round] - models[r.server_round - 1], step,
                                   atol=r.error_bound + 1e-6)


def test_evaluation_rounds_sample_and_sum_whole_groups(task_identity, tmp_path):  # noqa: F811
    """Differences over evaluation rounds: a secure evaluation round samples whole groups
    too (fraction_evaluate of them, once the identities are known), and its sum is over
    whole groups, so two evaluations never differ by one site's metrics."""
    reports, _ = _group_run(tmp_path, server_groups=True, crash_node=0, rounds=4, fraction=0.5, evaluate=True)
    assert [r.status for r in reports] == ["ok"] * 4
    for r in reports:
        assert set(r.survivors) == {u for g in r.groups for u in _nodes_of(g)}
    assert all(len(r.cohort) == 2 * G for r in reports[1:])  # identities known after round 1's training


# ---------------------------------------------------------------- a roster change: epochs and revocations
def _roster_text(epochs: list[list[int]], revoked: frozenset[int] = frozenset(), keys=None) -> str:
    keys = keys or PUBLIC
    blocks = ["".join(f"{'revoked ' if u in revoked else ''}{keys[u].hex()} site{u}\n" for u in e) for e in epochs]
    return "epoch\n".join(blocks)


def test_a_roster_file_parses_epochs_and_revoked_keys_in_place():
    r = Roster.parse(_roster_text([[1, 2, 3, 4, 5, 6], [7, 8, 9]], revoked=frozenset({2})))
    assert r.epochs == (frozenset(PUBLIC[u] for u in range(1, 7)), frozenset(PUBLIC[u] for u in (7, 8, 9)))
    assert PUBLIC[2] not in r and r.revoked == {PUBLIC[2]} and len(r.keys) == 8
    for text, why in ((_roster_text([[1, 2], []]), "lists no identity keys"),
                      ("epoch\n" + _roster_text([[1, 2, 3]]), "an epoch lists no identity keys"),
                      (_roster_text([[1, 2, 3]]) + f"revoked {PUBLIC[1].hex()}\n", "key listed twice")):
        with pytest.raises(ConfigurationError, match=why):
            Roster.parse(text)
    with pytest.raises(ConfigurationError, match="roster epoch 2 holds 2 keys, fewer than one group of 3"):
        _ = GroupRule.of(Roster.parse(_roster_text([[1, 2, 3, 4, 5, 6], [7, 8]])), G).groups


def test_adding_sites_as_an_epoch_or_revoking_one_never_regroups_anyone():
    """Nine sites, then three more as a new epoch, then site 1 revoked: the first nine's
    groups are the same in all three rosters (a regrouping is what a re-partition of the
    twelve by the hash rule alone would do); site 1's group keeps its place, never whole."""
    old = GroupRule.of(Roster.parse(_roster_text([list(range(1, 10))])), G)
    grown = GroupRule.of(Roster.parse(_roster_text([list(range(1, 10)), [10, 11, 12]])), G)
    revoked = GroupRule.of(Roster.parse(_roster_text([list(range(1, 10)), [10, 11, 12]], frozenset({1}))), G)
    assert grown.groups[:3] == old.groups == revoked.groups[:3]
    assert grown.groups[3] == revoked.groups[3] == frozenset(PUBLIC[u] for u in (10, 11, 12))
    assert set(partition([PUBLIC[u] for u in range(1, 13)], G)) != set(grown.groups)  # what epochs avoid
    ident = {u: PUBLIC[u] for u in range(2, 13)}  # site 1 can never be in a cohort again
    mates = {u for u in ident if revoked.group_of[PUBLIC[u]] == revoked.group_of[PUBLIC[1]]}
    assert len(mates) == 2 and whole_group_members(ident, ident, revoked) == set(ident) - mates


def test_sums_before_and_after_a_roster_change_span_no_vector_on_fewer_than_g_sites():
    """Twenty rounds under the first roster (nine sites) and twenty after sites 10-12
    joined as an epoch and site 1 was revoked, random whole groups and 10 % dropout, plus
    every group summed alone under each roster: every one of the survivor sets is constant
    on each group of the final rule (which holds the first roster's groups unchanged), so
    no single site is in their span."""
    rng = np.random.default_rng(29)
    rosters = [Roster.parse(_roster_text([list(range(1, 10))])),
               Roster.parse(_roster_text([list(range(1, 10)), [10, 11, 12]], frozenset({1})))]
    nodes = list(range(1, 13))
    rows = []
    for roster in rosters:
        rule = GroupRule.of(roster, G)
        ident = {u: PUBLIC[u] for u in nodes if PUBLIC[u] in roster}
        draws = [{u for u in ident if rng.random() < 0.9} for _ in range(20)]
        draws += [{u for u in ident if PUBLIC[u] in g} for g in rule.groups]
        for sampled in draws:
            keep = whole_group_members(sampled, ident, rule)
            if keep:
                rows.append([1.0 if u in keep else 0.0 for u in nodes])
    matrix = np.array(rows)
    final = GroupRule.of(rosters[1], G)
    for g in final.groups:
        cols = [nodes.index(u) for u in nodes if PUBLIC[u] in g]
        assert all(np.array_equal(matrix[:, cols[0]], matrix[:, c]) for c in cols[1:])
    assert len(matrix) >= 30 and _spans_a_single_site(matrix) == []


def test_a_site_refuses_a_roster_whose_signed_epoch_changed_and_accepts_a_new_epoch(tmp_path):
    """Through the mod, with a state file: the site signs a round under a roster of nine;
    the operator then edits that epoch (site 9 swapped for site 10: a regrouping) and the
    site refuses the next round with a PolicyError before it signs; the same nine plus a new
    epoch of three is accepted, and survives a new process (the state file)."""
    from test_active_server import MODEL, ModSite, _spec, finish_mod_round, mod_round_to_consistency

    roster = tmp_path / "roster.txt"
    for u, key in SECRETS.items():
        (tmp_path / f"site{u}.key").write_text(key.hex() + "\n")

    def site(u: int) -> ModSite:
        return ModSite(u, {"sgs-identity-key": str(tmp_path / f"site{u}.key"), "sgs-roster": str(roster),
                           "sgs-min-group": "3", "sgs-state-file": str(tmp_path / f"state{u}.json")})

    nine = list(range(1, 10))
    roster.write_text(_roster_text([nine]))
    sites = {u: site(u) for u in nine}
    server, reqs = mod_round_to_consistency(sites, _spec(n=9), round_id=3)
    finish_mod_round(sites, server, reqs)
    edited = [*range(1, 9), 10]
    roster.write_text(_roster_text([edited]))
    sites = {u: site(u) for u in edited}
    _server, reqs = mod_round_to_consistency(sites, _spec(n=9), round_id=4)
    for u in range(1, 9):
        out = sites[u].send(Stage.CONSISTENCY, reqs[u])
        assert out.has_error() and "PolicyError: the roster's epoch 1 is not the one this site signed" in out.error.reason
    roster.write_text(_roster_text([nine, [10, 11, 12]]))
    sites = {u: site(u) for u in range(1, 13)}
    moved = {k: v + 0.5 for k, v in MODEL.items()}  # another model (the sites remember what they signed for)
    server, reqs = mod_round_to_consistency(sites, _spec(n=12), round_id=5, model=moved)
    total = finish_mod_round(sites, server, reqs)
    assert total is not None and len(server.u3) == 12


@pytest.mark.parametrize("dropped", [{1}, {1, 2, 3, 4, 5}])
def test_the_neighbourhood_quorum_counts_the_members_of_a_group_left_out_whole(dropped):
    """The opt-in neighbourhood quorum with groups of 3 (learnt), 60 sites: sites that
    drop at the masked input take their groups out (about 10 % of the cohort with the 5
    %-like drop here); those members still sign the one survivor set, and their
    neighbours count them, so every neighbourhood keeps its quorum and the round releases
    the plaintext sum of the whole groups left (before, the server did not ask them and
    such a round aborted with a ThresholdError)."""
    n = 60
    policy = ClientPolicy(consistency="neighbourhood", min_group=G, max_cohort=n)
    clients = {u: SecAggClient(u, policy=policy) for u in range(1, n + 1)}
    params = RoundParams(run_id=1, round_id=1, cohort=tuple(range(1, n + 1)), vector_length=M, field_bits=BITS,
                         consistency="neighbourhood")
    server = SecAggServer(params, min_group=G)
    rng = np.random.default_rng(3)
    vectors = {u: rng.integers(0, 1 << BITS, M, dtype=np.uint64).astype(dtype_for_bits(BITS)) for u in clients}
    outcome = run_protocol(server, clients, vectors, {Stage.MASKED_INPUT: dropped})
    assert server.group_excluded and not server.group_excluded & set(outcome.survivors)
    assert set(outcome.survivors) == set(clients) - dropped - server.group_excluded
    assert server.group_excluded <= server.u4  # the left-out members signed and were counted
    np.testing.assert_array_equal(outcome.total, _plain_sum(vectors, set(outcome.survivors)))
