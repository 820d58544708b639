"""Narrow fields (issue 21): the word width chosen per round, packed on the wire, and
what a malicious server can do with it.

The attacks use the real :class:`SecAggClient` and the real ``secagg_mod`` (through
``test_active_server.ModSite``); the malicious server is written here: it edits the
messages an honest :class:`SecAggServer` would send.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_active_server import MODEL, N_MOD, ModSite, _masked_extra, _reply, _spec, finish_mod_round

from sgs_flower.pipeline import (
    DEFAULT_WIDTH_ERROR,
    UpdateSpec,
    binding_digest,
    decode_update,
    encode_update,
    narrowest_field_bits,
)
from sgs_flower.secagg import prg, wire
from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.errors import (
    InconsistentAggregateError,
    MalformedMessageError,
    OverflowRiskError,
    PolicyError,
    ProtocolError,
    ThresholdError,
)
from sgs_flower.secagg.policy import ClientPolicy
from sgs_flower.secagg.quantize import QuantizationConfig
from sgs_flower.secagg.server import RoundParams, SecAggServer, decode_checked
from sgs_flower.secagg.simulate import run_protocol
from sgs_flower.secagg.wire import Setup, Stage

MODEL_SIZE = sum(v.size for v in MODEL.values())


# ---------------------------------------------------------------- the width rule
@pytest.mark.parametrize("n, bits", [(3, 11), (10, 13), (50, 15), (100, 16), (1000, 19)])
def test_the_default_width_holds_the_cohort_at_the_stated_bound(n, bits):
    assert narrowest_field_bits(n, 1_000_000) == bits
    spec = UpdateSpec(clip_range=1.0, max_cohort=n, max_weight=1_000_000, field_bits=bits)
    q = spec.quantization
    assert q.error_bound <= DEFAULT_WIDTH_ERROR * q.clip_range * q.weight_unit  # c / L per unit weight
    assert q.clip_range / q.levels <= DEFAULT_WIDTH_ERROR
    # one bit narrower cannot hold the same precision for this cohort
    with pytest.raises(OverflowRiskError):
        QuantizationConfig(clip_range=1.0, max_cohort=n, max_weight=1_000_000, field_bits=bits - 1,
                           bits_per_coordinate=q.bits_per_coordinate, weight_scaled=True)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(3, 60), weights=st.lists(st.integers(1, 1_000_000), min_size=60, max_size=60),
       seed=st.integers(0, 2**31))
def test_a_narrow_round_decodes_the_exact_weight_and_the_mean_within_its_bound(n, weights, seed):
    """The weight travels in limbs, so the weight sum is exact at any width; the mean is
    within the bound the server reports (``error_bound_for``)."""
    w = weights[:n]
    bits = narrowest_field_bits(n, 1_000_000)
    spec = UpdateSpec(clip_range=1.0, max_cohort=n, max_weight=1_000_000, field_bits=bits,
                      weight_scale=min(1 << (max(w) - 1).bit_length(), 1_000_000))
    rng = np.random.default_rng(seed)
    xs = [rng.uniform(-1, 1, 50) for _ in range(n)]
    dtype = prg.dtype_for_bits(bits)
    total = np.zeros(spec.vector_length(50), dtype=dtype)
    for x, wi in zip(xs, w, strict=True):
        enc = encode_update(x, {}, wi, spec, rng)
        assert enc.vector.dtype == dtype
        np.add(total, enc.vector, out=total)
    prg.reduce_mod(total, bits)
    dec = decode_update(total, spec, n)
    assert dec.total_weight == sum(w) and dec.count == n
    expect = np.sum([wi * x for x, wi in zip(xs, w, strict=True)], axis=0) / sum(w)
    assert np.max(np.abs(dec.mean_delta - expect)) <= dec.error_bound + 1e-12


@pytest.mark.parametrize("bits", [9, 12, 13, 16, 17, 20, 23, 24, 31, 40])
def test_packed_masked_vectors_travel_at_b_bits_and_sum_exactly(bits):
    """The real protocol at a narrow width: the vector on the wire is m * b / 8 bytes
    (plus a few), and the unmasked sum is exact mod 2^b."""
    n, m = 5, 1001
    params = RoundParams(run_id=1, round_id=1, cohort=tuple(range(1, n + 1)), vector_length=m, field_bits=bits)
    rng = np.random.default_rng(bits)
    dtype = prg.dtype_for_bits(bits)
    inputs = {u: rng.integers(0, 1 << bits, m, dtype=np.uint64).astype(dtype) for u in params.cohort}
    server = SecAggServer(params)
    clients = {u: SecAggClient(u) for u in params.cohort}
    adv = {u: clients[u].handle(msg) for u, msg in server.setup_messages().items()}
    shares = {u: clients[u].handle(r) for u, r in server.collect_keys(adv).items()}
    bundles = server.collect_shares(shares)
    masked = {u: clients[u].handle(b, vector=inputs[u]) for u, b in bundles.items()}
    for u, msg in masked.items():
        data = wire.encode(msg)
        assert len(data) - len(wire.encode(msg, detach_vector=True)) == wire.packed_size(m, bits) <= m * bits // 8 + 8
        masked[u] = wire.decode(data)
    signed = {u: clients[u].handle(r) for u, r in server.collect_masked(masked).items()}
    out = server.collect_unmask({u: clients[u].handle(r) for u, r in server.collect_consistency(signed).items()})
    expect = np.zeros(m, dtype=object)
    for x in inputs.values():
        expect = expect + x.astype(object)
    np.testing.assert_array_equal(out.total.astype(np.uint64), np.array([int(v) % (1 << bits) for v in expect],
                                                                        dtype=np.uint64))


def test_a_narrow_mask_expands_only_the_keystream_the_width_needs():
    assert [prg.keystream_bytes(b) for b in (8, 16, 17, 24, 25, 32, 33, 64)] == [2, 2, 4, 4, 4, 4, 8, 8]
    # uniform: every value of Z_{2^b} about equally often (b = 12: 4096 values, 2^22 draws)
    counts = np.bincount(prg.expand(bytes(range(32)), 1 << 22, 12), minlength=1 << 12)
    assert counts.size == 1 << 12 and abs(counts.mean() - 1024) < 1e-9 and counts.std() < 3 * 32


def test_packed_bytes_are_checked():
    x = np.arange(20, dtype=np.uint16)
    with pytest.raises(MalformedMessageError, match="not below 2"):
        wire.pack_words(x, 4)
    data = wire.pack_words(x, 5)
    with pytest.raises(MalformedMessageError, match="bytes, got"):
        wire.unpack_words(data[:-1], 20, 5)
    bad = bytearray(data)
    bad[-1] |= 0x80  # a padding bit (20 words: the last group holds 4 padded words)
    with pytest.raises(MalformedMessageError, match="padding"):
        wire.unpack_words(bytes(bad), 20, 5)


# ---------------------------------------------------------------- a malicious server
def _setups_through_shares(sites, params, edit_setup=None):
    """The honest server's setup, each site's Setup optionally edited by the attacker."""
    server = SecAggServer(params)
    setups = server.setup_messages()
    if edit_setup is not None:
        setups = {u: edit_setup(u, m) for u, m in setups.items()}
    adv = {u: sites[u].send(Stage.ADVERTISE_KEYS, m) for u, m in setups.items()}
    return server, adv


def _round_to_masked(sites, spec, specs_for=None, params=None):
    params = params or RoundParams(run_id=1, round_id=3, cohort=tuple(sorted(sites)),
                                   vector_length=spec.vector_length(MODEL_SIZE), field_bits=spec.field_bits)
    server = SecAggServer(params, bound_digest=binding_digest(list(MODEL.items()), {"lr": 0.1}, spec.to_config()))
    rosters = server.collect_keys({u: _reply(sites[u].send(Stage.ADVERTISE_KEYS, m))
                                   for u, m in server.setup_messages().items()})
    bundles = server.collect_shares({u: _reply(sites[u].send(Stage.SHARE_KEYS, m)) for u, m in rosters.items()})
    outs = {}
    for u, m in bundles.items():
        s = (specs_for or {}).get(u, spec)
        extra, fields = _masked_extra(s)
        outs[u] = sites[u].send(Stage.MASKED_INPUT, m, extra, fields)
    return server, outs


def test_a_spec_too_narrow_for_its_cohort_is_refused_by_every_site():
    """The server asks for more bits per coordinate than the width holds for the cohort
    (so the sum would wrap and reveal values mod the field): the spec does not even
    parse at the site (OverflowRiskError, a typed refusal), nothing is trained."""
    good = _spec(field_bits=16)
    cfg = good.to_config()
    cfg["bits_per_coordinate"] = 14  # 5 * (2^13 - 1) > 2^15
    sites = {u: ModSite(u) for u in range(1, N_MOD + 1)}
    server, outs = _round_to_masked(sites, good, specs_for={})
    assert not any(o.has_error() for o in outs.values())  # the honest round first: it works
    sites = {u: ModSite(u) for u in range(1, N_MOD + 1)}
    params = RoundParams(run_id=1, round_id=3, cohort=tuple(sorted(sites)),
                         vector_length=good.vector_length(MODEL_SIZE), field_bits=16)
    server = SecAggServer(params, bound_digest=None)
    rosters = server.collect_keys({u: _reply(sites[u].send(Stage.ADVERTISE_KEYS, m))
                                   for u, m in server.setup_messages().items()})
    bundles = server.collect_shares({u: _reply(sites[u].send(Stage.SHARE_KEYS, m)) for u, m in rosters.items()})
    extra, fields = _masked_extra(good)
    extra[wire.SPEC_KEY] = type(extra[wire.SPEC_KEY])(cfg)
    for u, m in bundles.items():
        out = sites[u].send(Stage.MASKED_INPUT, m, extra, fields)
        assert out.has_error() and "OverflowRiskError" in out.error.reason, out.error.reason
        assert "can overflow" in out.error.reason
    assert all(s.trained == 0 for s in sites.values())


def test_a_spec_that_understates_the_cohort_is_refused():
    """The width fits the cohort the spec claims (3), not the real one (5): refused,
    naming the cause, before training."""
    spec = _spec(n=3, field_bits=narrowest_field_bits(3, 1024))
    params = RoundParams(run_id=1, round_id=3, cohort=tuple(range(1, N_MOD + 1)),
                         vector_length=spec.vector_length(MODEL_SIZE), field_bits=spec.field_bits)
    sites = {u: ModSite(u) for u in range(1, N_MOD + 1)}
    _, outs = _round_to_masked(sites, spec, params=params)
    for out in outs.values():
        assert out.has_error() and "sized for 3 clients but the round's cohort has 5" in out.error.reason
    assert all(s.trained == 0 for s in sites.values())


def test_a_width_below_the_sites_floor_is_refused_before_training():
    floor = {"sgs-min-bits": 16}
    sites = {u: ModSite(u, floor if u == 1 else None) for u in range(1, N_MOD + 1)}
    params = RoundParams(run_id=1, round_id=3, cohort=tuple(sorted(sites)), vector_length=40, field_bits=12)
    server = SecAggServer(params)
    out = sites[1].send(Stage.ADVERTISE_KEYS, server.setup_messages()[1])
    assert out.has_error() and out.error.reason.startswith("PolicyError") and "sgs-min-bits" in out.error.reason
    assert ClientPolicy.from_node_config({"sgs-min-bits": "20"}).min_field_bits == 20
    with pytest.raises(PolicyError, match="below this site's minimum"):
        ClientPolicy(min_field_bits=20).check_width(19)


def test_a_spec_at_another_width_than_the_setup_is_refused():
    """The setup masks at 32 bits, the spec (sent to site 2 only) encodes at 16: the
    site would wrap its words at the wrong modulus; it refuses before training."""
    spec32, spec16 = _spec(field_bits=32), _spec(field_bits=16)
    sites = {u: ModSite(u) for u in range(1, N_MOD + 1)}
    _, outs = _round_to_masked(sites, spec32, specs_for={2: spec16})
    assert outs[2].has_error() and outs[2].error.reason.startswith("InconsistentRequestError")
    assert "16 bits" in outs[2].error.reason and sites[2].trained == 0
    assert all(not outs[u].has_error() for u in outs if u != 2)


def test_sites_set_up_at_different_widths_never_yield_a_wrong_sum():
    """A server gives site 1 a Setup at 16 bits and the others 32. The width is bound in
    the share and mask contexts (keys.round_contexts), so site 1's shares do not decrypt
    for its neighbours and its masks would not cancel: the others refuse its shares,
    the round aborts or goes on without site 1, and whatever is released is the honest
    sites' exact sum, never one with site 1's value mod 2^16 in it. A masked input that
    declares another width than the round's is refused by the server too."""
    n, m = 5, 64
    params = RoundParams(run_id=1, round_id=1, cohort=tuple(range(1, n + 1)), vector_length=m, field_bits=32)
    rng = np.random.default_rng(3)
    inputs = {u: rng.integers(0, 1 << 16, m, dtype=np.uint64).astype(prg.dtype_for_bits(16 if u == 1 else 32))
              for u in params.cohort}
    server = SecAggServer(params)
    clients = {u: SecAggClient(u) for u in params.cohort}
    setups = {u: dataclasses.replace(msg, field_bits=16) if u == 1 else msg
              for u, msg in server.setup_messages().items()}
    adv = {u: clients[u].handle(msg) for u, msg in setups.items()}
    rosters = server.collect_keys(adv)
    shares = {u: clients[u].handle(r) for u, r in rosters.items()}
    bundles = server.collect_shares(shares)
    masked, refused = {}, {}
    for u, b in bundles.items():
        try:
            masked[u] = clients[u].handle(b, vector=inputs[u])
        except ProtocolError as exc:
            refused[u] = exc
    try:
        requests = server.collect_masked(masked)
        signed = {}
        for u, r in requests.items():
            try:
                signed[u] = clients[u].handle(r)
            except ProtocolError as exc:
                refused[u] = exc
        unmask = server.collect_consistency(signed)
        responses = {}
        for u, r in unmask.items():
            try:
                responses[u] = clients[u].handle(r)
            except ProtocolError as exc:
                refused[u] = exc
        out = server.collect_unmask(responses)
    except (ThresholdError, InconsistentAggregateError, ProtocolError):
        return  # a clean abort: nothing released
    assert 1 not in out.survivors
    expect = sum(inputs[u].astype(np.uint64) for u in out.survivors) % (1 << 32)
    np.testing.assert_array_equal(out.total.astype(np.uint64), expect)


def test_a_masked_input_at_another_width_is_refused_by_the_server():
    n, m = 4, 16
    params = RoundParams(run_id=1, round_id=1, cohort=tuple(range(1, n + 1)), vector_length=m, field_bits=20)
    server = SecAggServer(params)
    clients = {u: SecAggClient(u) for u in params.cohort}
    inputs = {u: np.full(m, u, dtype=np.uint32) for u in params.cohort}
    drops: dict[Stage, set[int]] = {}
    out = run_protocol(server, clients, inputs, drops)
    assert out.total.tolist() == [10] * m  # the honest round
    server = SecAggServer(dataclasses.replace(params, round_id=2))
    clients = {u: SecAggClient(u) for u in params.cohort}
    adv = {u: clients[u].handle(msg) for u, msg in server.setup_messages().items()}
    bundles = server.collect_shares({u: clients[u].handle(r) for u, r in server.collect_keys(adv).items()})
    masked = {u: clients[u].handle(b, vector=inputs[u]) for u, b in bundles.items()}
    masked[4] = dataclasses.replace(masked[4], field_bits=32)
    server.collect_masked(masked)
    assert 4 in server.rejected and "masked at 32 bits" in str(server.rejected[4])


def test_an_honest_narrow_round_through_the_mod_matches_the_mean():
    spec = _spec(field_bits=narrowest_field_bits(N_MOD, 1024))
    assert spec.field_bits < 16
    sites = {u: ModSite(u) for u in range(1, N_MOD + 1)}
    server, outs = _round_to_masked(sites, spec)
    reqs = server.collect_masked({u: _reply(o) for u, o in outs.items()})
    total = finish_mod_round(sites, server, reqs)
    dec = decode_update(total, spec, N_MOD)
    w = np.array([10 + u for u in sites], dtype=np.float64)
    expect = float(np.sum(w * 0.01 * np.array(list(sites))) / w.sum())
    assert dec.total_weight == int(w.sum())
    assert np.max(np.abs(dec.mean_delta - expect)) <= dec.error_bound
    decode_checked(total, spec.quantization, N_MOD)  # the integrity check holds


def test_setup_field_bits_is_bound_in_the_round_contexts():
    """Why mismatched widths cannot cancel: the setup's width is in both contexts."""
    from sgs_flower.secagg import keys
    from sgs_flower.secagg.graph import graph_seed

    a = Setup(run_id=1, round_id=1, recipient=1, cohort=(1, 2, 3), degree=2, threshold=2, field_bits=16,
              vector_length=8)
    b = dataclasses.replace(a, field_bits=32)
    seed = graph_seed(1, 1, (1, 2, 3))
    ma, sa = keys.round_contexts(a, seed, b"")
    mb, sb = keys.round_contexts(b, seed, b"")
    assert ma != mb and sa != sb


# ---------------------------------------------------------------- distributed DP at a narrow width
@pytest.mark.parametrize("bits", [16, 20, 24])
def test_distributed_dp_at_a_narrow_width_keeps_its_noise_and_headroom(bits):
    """A distributed-DP spec at a fixed narrow width: the fixed point is chosen for the
    width (coarser levels, the same noise multiplier in real units), the headroom holds
    the cohort's sum plus its Skellam noise (12 sigma), the site's own DP check reads the
    encoder's levels, and the decoded sum is the true one plus noise of the planned size."""
    from sgs_flower.dp.aggregator import ddp_quantization

    n, min_surv, z, m = 20, 15, 1.0, 400
    q = ddp_quantization(z, 1.0, n, min_surv, bits)
    spec = UpdateSpec(clip_range=1.0, max_cohort=n, max_weight=1, field_bits=bits, metric_slots=0,
                      dp_mode="distributed", l2_clip=1.0, bits_per_coordinate=q.bits_per_coordinate,
                      noise_headroom=q.noise_headroom, noise_mu_share=q.mu_share, min_survivors=min_surv)
    contribution = spec.dp_contribution(m)
    assert contribution.levels == spec.quantization.levels == q.levels
    assert contribution.noise_multiplier == pytest.approx(z, rel=0.05)
    assert n * q.levels + q.noise_headroom < 1 << (bits - 1)
    rng = np.random.default_rng(bits)
    xs = [rng.normal(0, 1, m) for _ in range(n)]
    xs = [x / max(1.0, float(np.linalg.norm(x))) for x in xs]  # within the L2 clip
    dtype = prg.dtype_for_bits(bits)
    total = np.zeros(spec.vector_length(m), dtype=dtype)
    for x in xs:
        enc = encode_update(x, {}, 1, spec, rng)
        assert enc.vector.dtype == dtype
        np.add(total, enc.vector, out=total)
    prg.reduce_mod(total, bits)
    dec = decode_update(total, spec, n)
    assert dec.total_weight == n and dec.count == n
    err = dec.weighted_delta_sum - np.sum(xs, axis=0)
    sigma = z * np.sqrt(n / min_surv)  # the noise std of the sum of n shares, in real units
    assert abs(float(np.std(err)) - sigma) < 0.25 * sigma
    assert float(np.max(np.abs(err))) < 12 * sigma
