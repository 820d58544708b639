"""Adversarial inputs on both sides: each asserts the typed error and its message, and
that the server keeps going with a correct aggregate of the honest clients."""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.errors import (
    InconsistentAggregateError,
    InconsistentRequestError,
    MalformedMessageError,
    OverflowRiskError,
    ShareDecryptionError,
    StaleMessageError,
    UnknownSenderError,
)
from sgs_flower.secagg.quantize import QuantizationConfig, encode
from sgs_flower.secagg.server import RoundParams, SecAggServer, decode_checked
from sgs_flower.secagg.simulate import run_protocol
from sgs_flower.secagg.wire import MaskedInput, Stage
from sgs_flower.secagg.wire import encode as encode_message


def plain_sum(inputs, nodes, bits=32):
    total = np.zeros_like(next(iter(inputs.values())))
    for u in nodes:
        total = total + inputs[u]
    return total


# ---------------------------------------------------------------- client refuses the server
def test_client_unmasks_only_the_survivor_set_it_signed(cohort_factory):
    c = cohort_factory(6)
    reqs = c.to_unmask_requests(skip={4})
    req = reqs[1]
    # the server now tells node 1 that node 4 survived, to collect 4's self-mask shares
    evil = dataclasses.replace(req, survivors=tuple(sorted({*req.survivors, 4})))
    with pytest.raises(InconsistentRequestError, match="another survivor set than the one node 1 signed"):
        c.clients[1].handle(evil)


def test_client_answers_only_one_unmask_request(cohort_factory):
    c = cohort_factory(6)
    reqs = c.to_unmask_requests(skip={4})
    c.clients[2].handle(reqs[2])
    with pytest.raises(StaleMessageError, match="has no round in progress"):
        c.clients[2].handle(reqs[2])


def test_client_refuses_undersized_survivor_set(cohort_factory):
    c = cohort_factory(7, threshold=5)
    reqs = c.to_requests()
    small = dataclasses.replace(reqs[1], survivors=(1, 2, 3, 4))
    with pytest.raises(InconsistentRequestError, match="has 4 nodes, fewer than the 5 this round needs"):
        c.clients[1].handle(small)


def test_client_refuses_set_naming_nodes_it_never_heard_of(cohort_factory):
    c = cohort_factory(6)
    reqs = c.to_requests()
    evil = dataclasses.replace(reqs[1], survivors=(*reqs[1].survivors, 9))
    with pytest.raises(InconsistentRequestError, match=r"names nodes \[9\] that did not advertise keys"):
        c.clients[1].handle(evil)


def test_client_refuses_request_that_says_it_dropped(cohort_factory):
    c = cohort_factory(5)
    reqs = c.to_requests()
    req = reqs[2]
    evil = dataclasses.replace(req, survivors=tuple(v for v in req.survivors if v != 2))
    with pytest.raises(InconsistentRequestError, match="says node 2 dropped"):
        c.clients[2].handle(evil)


def test_client_rejects_replay_from_earlier_round_and_other_run(cohort_factory):
    c = cohort_factory(5)
    rosters = c.to_rosters()
    old = dataclasses.replace(rosters[1], round_id=2)
    with pytest.raises(StaleMessageError, match="run 7 round 2, but the round in progress is run 7 round 3"):
        c.clients[1].handle(old)
    # after refusing, node 1 has left the round: nothing more of this round is answered
    assert c.clients[1].stage is None
    other_run = dataclasses.replace(rosters[2], run_id=8)
    with pytest.raises(StaleMessageError, match="is for run 8 round 3, but the round in progress is run 7 round 3"):
        c.clients[2].handle(other_run)


def test_client_refuses_replayed_setup_after_masking(cohort_factory):
    c = cohort_factory(5)
    setups = c.server.setup_messages()
    c.to_requests()
    with pytest.raises(StaleMessageError, match="stale or replayed: node 1 already sent its input for round 3"):
        c.clients[1].handle(setups[1])


def test_tampered_share_ciphertext_is_detected(cohort_factory):
    c = cohort_factory(5)
    bundles = c.to_bundles()
    b = bundles[3]
    sender, ct = b.ciphertexts[0]
    bad = bytearray(ct)
    bad[20] ^= 1
    tampered = dataclasses.replace(b, ciphertexts=((sender, bytes(bad)), *b.ciphertexts[1:]))
    with pytest.raises(ShareDecryptionError, match=f"from node {sender} to node 3 failed authentication"):
        c.clients[3].handle(tampered, vector=c.inputs[3])


def test_rerouted_share_is_detected(cohort_factory):
    c = cohort_factory(5)
    bundles = c.to_bundles()
    # give node 3 the share that node 1 encrypted for node 2
    ct_for_2 = dict(bundles[2].ciphertexts)[1]
    rerouted = dataclasses.replace(bundles[3], ciphertexts=tuple((s, ct_for_2 if s == 1 else ct) for s, ct in bundles[3].ciphertexts))
    with pytest.raises(ShareDecryptionError, match="failed authentication"):
        c.clients[3].handle(rerouted, vector=c.inputs[3])


def test_message_addressed_to_another_node_is_refused(cohort_factory):
    c = cohort_factory(4)
    setups = c.server.setup_messages()
    with pytest.raises(UnknownSenderError, match="addressed to node 2 reached node 1"):
        c.clients[1].handle(setups[2])


# ---------------------------------------------------------------- server rejects clients
@pytest.mark.parametrize(
    ("vector", "why"),
    [
        (np.zeros(15, dtype=np.uint32), r"must be uint32 of shape \(16,\), got uint32 \(15,\)"),
        (np.zeros(16, dtype=np.uint64), r"must be uint32 of shape \(16,\), got uint64 \(16,\)"),
        (np.zeros(16, dtype=np.float32), r"got float32"),
    ],
)
def test_wrong_length_or_dtype_is_excluded_and_round_still_correct(cohort_factory, vector, why):
    c = cohort_factory(6)
    bundles = c.to_bundles()
    replies = {u: c.clients[u].handle(b, vector=c.inputs[u]) for u, b in bundles.items()}
    replies[4] = MaskedInput(run_id=7, round_id=3, sender=4, vector=vector)
    reqs = c.server.collect_masked(replies)
    err = c.server.rejected[4]
    assert isinstance(err, MalformedMessageError)
    assert re.search(why, str(err))
    outcome = c.finish(reqs)
    assert outcome.survivors == (1, 2, 3, 5, 6)
    np.testing.assert_array_equal(outcome.total, plain_sum(c.inputs, outcome.survivors))


def test_replayed_message_from_earlier_round_is_rejected_by_server(cohort_factory):
    c = cohort_factory(5)
    replies = c.advertise()
    replies[2] = dataclasses.replace(replies[2], round_id=2)
    c.server.collect_keys(replies)
    err = c.server.rejected[2]
    assert isinstance(err, StaleMessageError)
    assert "node 2 sent a message for run 7 round 2; this is run 7 round 3" in str(err)
    assert c.server.dropped[2] == Stage.ADVERTISE_KEYS


def test_sender_outside_cohort_and_impersonation_are_rejected(cohort_factory):
    c = cohort_factory(5)
    replies = c.advertise()
    outsider = SecAggClient(99)
    replies[99] = dataclasses.replace(replies[1], sender=99)
    replies[3] = dataclasses.replace(replies[3], sender=4)
    c.server.collect_keys(replies)
    assert isinstance(c.server.rejected[99], UnknownSenderError)
    assert "node 99 is not in the cohort of round 3" in str(c.server.rejected[99])
    assert isinstance(c.server.rejected[3], UnknownSenderError)
    assert "message from node 3 claims to come from node 4" in str(c.server.rejected[3])
    assert outsider.node_id == 99


def test_malformed_bytes_never_crash_the_server(cohort_factory):
    c = cohort_factory(6, min_clients=3)
    replies = {u: encode_message(m) for u, m in c.advertise().items()}
    replies[1] = b"garbage"
    replies[2] = replies[2][:30]
    replies[3] = replies[3] + b"trailing"
    c.server.collect_keys(replies)
    assert "bad magic" in str(c.server.rejected[1])
    assert isinstance(c.server.rejected[2], MalformedMessageError)
    assert "unexpected trailing bytes" in str(c.server.rejected[3])
    assert set(c.server.advertised) == {4, 5, 6}


def test_late_masked_input_after_unmask_started_is_rejected(cohort_factory):
    c = cohort_factory(5)
    bundles = c.to_bundles()
    late = c.clients[5].handle(bundles[5], vector=c.inputs[5])
    replies = {u: c.clients[u].handle(b, vector=c.inputs[u]) for u, b in bundles.items() if u != 5}
    reqs = c.server.collect_masked(replies)
    with pytest.raises(StaleMessageError, match="server is at stage CONSISTENCY, not MASKED_INPUT"):
        c.server.collect_masked({5: late})
    outcome = c.finish(reqs)
    np.testing.assert_array_equal(outcome.total, plain_sum(c.inputs, (1, 2, 3, 4)))


def test_overflowing_modulus_is_refused_at_configuration():
    with pytest.raises(OverflowRiskError, match="bits_per_coordinate=24 can overflow"):
        QuantizationConfig(clip_range=1.0, max_cohort=1000, max_weight=100, field_bits=32, bits_per_coordinate=24)
    with pytest.raises(OverflowRiskError, match="16-bit field"):
        QuantizationConfig(clip_range=1.0, max_cohort=1000, max_weight=100, field_bits=16)


def test_inconsistent_model_gives_garbage_not_an_update():
    """A server that sends node 2 a different model: masks do not cancel, the integrity
    check fires, and node 2's update is nowhere in what the server decodes."""
    n, m = 5, 2048
    cfg = QuantizationConfig(clip_range=1.0, max_cohort=n)
    rng = np.random.default_rng(1)
    xs = {u: rng.uniform(-1, 1, m) for u in range(1, n + 1)}
    vectors = {u: encode(xs[u], 1, cfg, rng).vector for u in xs}
    params = RoundParams(run_id=1, round_id=1, cohort=tuple(xs), vector_length=m + 2)
    server = SecAggServer(params, bound_digest=b"model-A")
    clients = {u: SecAggClient(u) for u in xs}
    digests = {u: (b"model-B" if u == 2 else b"model-A") for u in xs}
    outcome = run_protocol(server, clients, vectors, bound_digests=digests)
    with pytest.raises(InconsistentAggregateError, match="masked under different contexts"):
        decode_checked(outcome.total, cfg, len(outcome.survivors))
    # the raw total is uniform noise over the whole field: uncorrelated with the true
    # sum and with node 2's own update (a consistent round is within 1e-7 of the sum)
    from sgs_flower.secagg.quantize import from_field

    garbage = from_field(outcome.total, 32)[:m] / cfg.scale
    true_sum = sum(xs.values())
    assert np.mean(np.abs(garbage - true_sum)) > 1.0
    assert abs(np.corrcoef(garbage, true_sum)[0, 1]) < 0.1
    assert abs(np.corrcoef(garbage, xs[2])[0, 1]) < 0.1


def test_low_order_public_key_is_rejected_at_advertise(cohort_factory):
    """An all-zero X25519 key (a low-order point) would make every agreement with it
    fail later; the server refuses it up front and the round goes on without it."""
    c = cohort_factory(5)
    replies = c.advertise()
    replies[2] = dataclasses.replace(replies[2], s_pk=bytes(32))
    c.server.collect_keys(replies)
    assert isinstance(c.server.rejected[2], MalformedMessageError)
    assert "public key of node 2 is invalid" in str(c.server.rejected[2])
    assert 2 not in c.server.advertised
