"""Building blocks: Shamir sharing, quantization, the neighbour graph, the wire codec
and client state persistence."""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sgs_flower.secagg import shamir, wire
from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.errors import (
    ConfigurationError,
    EncodingError,
    MalformedMessageError,
    ReconstructionError,
)
from sgs_flower.secagg.graph import default_degree, default_threshold, neighbours, validate
from sgs_flower.secagg.quantize import (
    QuantizationConfig,
    decode,
    encode,
    from_field,
    stochastic_round,
    to_field,
)
from sgs_flower.secagg.wire import decode as decode_message
from sgs_flower.secagg.wire import encode as encode_message


# ---------------------------------------------------------------- Shamir
@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 12), data=st.data())
def test_any_t_shares_rebuild_the_secret(k, data):
    t = data.draw(st.integers(1, k))
    secret = os.urandom(32)
    xs = data.draw(st.lists(st.integers(1, 10_000), min_size=k, max_size=k, unique=True))
    shares = list(zip(xs, shamir.split(secret, xs, t), strict=True))
    subset = data.draw(st.permutations(shares))[:t]
    assert shamir.combine(subset, t) == secret


def test_fewer_than_t_shares_do_not_rebuild():
    secret = os.urandom(32)
    shares = list(zip(range(1, 6), shamir.split(secret, range(1, 6), 3), strict=True))
    with pytest.raises(ReconstructionError, match="2 shares given, 3 needed"):
        shamir.combine(shares[:2], 3)
    # pretending t = 2 with two shares of a degree-2 polynomial gives a wrong value
    wrong = 0
    for pair in itertools.combinations(shares, 2):
        try:
            wrong += shamir.combine(list(pair), 2) != secret
        except ReconstructionError:
            wrong += 1
    assert wrong == 10


def test_corrupt_share_is_refused():
    shares = shamir.split(os.urandom(32), [1, 2, 3], 2)
    with pytest.raises(MalformedMessageError, match="must be 44 bytes"):
        shamir.combine([(1, shares[0][:-1]), (2, shares[1])], 2)
    with pytest.raises(MalformedMessageError, match="outside the field"):
        shamir.combine([(1, b"\xff" * 44), (2, shares[1])], 2)


# ---------------------------------------------------------------- quantization
def test_stochastic_rounding_is_unbiased():
    rng = np.random.default_rng(0)
    x = np.full(200_000, 0.3)
    r = stochastic_round(x, rng)
    assert set(np.unique(r)) == {0, 1}
    # mean of Bernoulli(0.3) over 2e5 draws: std 0.001; 5 sigma
    assert abs(r.mean() - 0.3) < 0.005


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_stochastic_rounding_is_unbiased_at_every_fraction(seed):
    """E[round(y)] = y for fractions across [0, 1), signs and magnitudes (up to 2^20, the
    scale of real levels): the mean error of n draws per value is tested against
    5 standard errors (sqrt(f (1 - f) / n)). It fails for a rounding that treats
    negative values differently (e.g. truncation), and for any bias at fractions near
    0 or 1, where the standard error is tiny (a 2^-10 bias fails; checked by mutation)."""
    rng = np.random.default_rng(seed)
    n = 20_000
    base = rng.uniform(-(2.0**20), 2.0**20, 64)
    base[:8] = [0.0, -1.0, 0.5, -0.5, 1e-9, -1e-9, 0.999999, -0.999999]
    y = np.repeat(base, n)
    r = stochastic_round(y, rng)
    assert r.dtype == np.int64
    assert np.all((r == np.floor(y)) | (r == np.ceil(y)))
    err = (r - y).reshape(-1, n).mean(axis=1)
    frac = base - np.floor(base)
    se = np.sqrt(np.maximum(frac * (1 - frac), 1e-12) / n)
    assert np.all(np.abs(err) <= 5 * se + 1e-9), np.max(np.abs(err) / (se + 1e-12))


def test_encode_is_unbiased_in_the_field():
    """The fused encoder (clip, scale, round, weight, wrap) keeps E[q] = x * s: over many
    encodings of one float32 update, the mean error of the coordinates in each group
    (sign x quarter of the fraction of x * s) stays within 5 of its standard errors.
    Groups, not single coordinates: a sum over thousands of Bernoulli draws is normal,
    a single coordinate with a fraction near 0 is not. Fails for a constant bias of
    2^-9 of a level, or one that differs by sign (checked by mutation)."""
    cfg = QuantizationConfig(clip_range=0.5, max_cohort=10, max_weight=7)
    rng = np.random.default_rng(11)
    x = rng.uniform(-0.5, 0.5, 20_000).astype(np.float32)
    reps = 500
    total = np.zeros(x.size, dtype=np.float64)
    for _ in range(reps):
        q = from_field(encode(x, 7, cfg, rng).vector, cfg.field_bits)
        assert q[-2] == 7 and q[-1] == 1
        total += q[:-2] / 7
    y = x.astype(np.float64) * cfg.scale
    frac = y - np.floor(y)
    var = frac * (1 - frac) / reps
    err = total / reps - y
    for sign in (x > 0, x < 0):
        for quarter in range(4):
            group = sign & (np.floor(frac * 4) == quarter)
            se = np.sqrt(var[group].sum()) / group.sum()
            assert abs(err[group].mean()) < 5 * se, (quarter, err[group].mean(), se)


def test_encode_never_exceeds_the_levels_and_counts_clipping_in_float64():
    """Values exactly at +-c map to +-L (never L + 1, whatever L / c * c rounds to);
    a float32 value just above c (0.1 as float32 > 0.1) is counted as clipped, as the
    float64 comparison |x| > c says."""
    for c in (0.1, 1 / 3, 7.0, 1e-3):
        cfg = QuantizationConfig(clip_range=c, max_cohort=19)
        for sign in (1, -1):
            q = from_field(encode(np.full(5000, sign * c), 1, cfg).vector, 32)[:-2]
            assert np.all(q == sign * cfg.levels)
    cfg = QuantizationConfig(clip_range=0.1, max_cohort=19)
    enc = encode(np.array([0.1, -0.1, 0.05], dtype=np.float32), 1, cfg)
    assert enc.clipped == 2
    assert np.all(np.abs(from_field(enc.vector, 32)[:-2]) <= cfg.levels)


def test_encode_parts_equals_encode_of_the_concatenation():
    from sgs_flower.secagg.quantize import encode_parts

    cfg = QuantizationConfig(clip_range=1.0, max_cohort=4, max_weight=3)
    a = np.random.default_rng(0).uniform(-2, 2, 70_001).astype(np.float32)
    b = np.array([0.25, -3.0])
    noise = np.arange(a.size) % 11 - 5
    one = encode(np.concatenate([a, b]), 3, cfg, np.random.default_rng(5),
                 np.concatenate([noise, np.zeros(2, dtype=np.int64)]))
    two = encode_parts([a, b], 3, cfg, np.random.default_rng(5), [noise, None])
    np.testing.assert_array_equal(one.vector, two.vector)
    assert one.clipped == two.clipped == np.count_nonzero(np.abs(a) > 1) + 1


def test_field_round_trip_signed():
    ints = np.array([-5, 0, 7, -(1 << 30), (1 << 30)], dtype=np.int64)
    for bits in (32, 40, 64):
        np.testing.assert_array_equal(from_field(to_field(ints, bits), bits), ints)


def test_clipping_is_counted_and_nonfinite_refused():
    cfg = QuantizationConfig(clip_range=1.0, max_cohort=4)
    enc = encode(np.array([0.5, 2.0, -3.0, 0.1]), 1, cfg)
    assert enc.clipped == 2
    dec = decode(enc.vector, cfg)
    np.testing.assert_allclose(dec.mean, [0.5, 1.0, -1.0, 0.1], atol=cfg.error_bound)
    with pytest.raises(EncodingError, match="2 non-finite values"):
        encode(np.array([np.nan, np.inf, 1.0]), 1, cfg)
    with pytest.raises(EncodingError, match=r"weight must be an integer in 1\.\.1"):
        encode(np.zeros(3), 2, cfg)


def test_quantization_config_validation_names_the_field():
    with pytest.raises(ConfigurationError, match="clip_range must be a positive finite number"):
        QuantizationConfig(clip_range=0.0, max_cohort=3)
    with pytest.raises(ConfigurationError, match=r"field_bits must be in 8\.\.64"):
        QuantizationConfig(clip_range=1.0, max_cohort=3, field_bits=4)
    cfg = QuantizationConfig(clip_range=1.0, max_cohort=1000, max_weight=1)
    assert cfg.bits_per_coordinate == 22  # 1000 * (2^21 - 1) < 2^31
    assert cfg.error_bound == pytest.approx(1 / ((1 << 21) - 1))


# ---------------------------------------------------------------- graph
@pytest.mark.parametrize("n", [3, 10, 11, 50, 333])
def test_graph_is_regular_symmetric_and_seeded(n):
    k = default_degree(n)
    cohort = list(range(100, 100 + n))
    g = neighbours(cohort, k, b"seed")
    assert all(len(vs) == k and u not in vs for u, vs in g.items())
    assert all(u in g[v] for u, vs in g.items() for v in vs)
    assert g == neighbours(list(reversed(cohort)), k, b"seed")
    if k < n - 1:
        assert g != neighbours(cohort, k, b"other")
    validate(n, k, default_threshold(k))


def test_default_degree_is_logarithmic():
    assert default_degree(10) == 9
    assert default_degree(100) == 20
    assert default_degree(1000) == 30
    assert default_threshold(20) == 14  # floor(2k/3) + 1: the active-server bound


def test_insecure_threshold_and_odd_degree_refused():
    with pytest.raises(ConfigurationError, match="below two thirds of the neighbours"):
        validate(20, 10, 6)  # 6 < floor(2 * 10 / 3) + 1 = 7
    validate(20, 10, 7)
    with pytest.raises(ConfigurationError, match="must be even"):
        validate(20, 7, 5)


# ---------------------------------------------------------------- wire and persistence
def test_wire_rejects_malformed_bytes():
    for bad, why in [
        (b"", "bad magic"),
        (b"SGS2\x00\x00\x00\x05{bad}", "not valid JSON"),
        (b"SGS2\x00\x00\x00\x0f{\"type\":\"Nope\"}", "unknown message type"),
        (b"SGS2\x00\x00\x10\x00", "exceeds the message"),
        (b"SGS2\xff\xff\xff\xff", "exceeds the 16777216-byte limit"),
        (b"SGS1\x00\x00\x00\x02{}", "bad magic or protocol version"),
    ]:
        with pytest.raises(MalformedMessageError, match=why):
            decode_message(bad)


def _shared_messages(recipient: int, big: dict) -> list:
    from sgs_flower.secagg import wire as w

    return [
        w.Setup(run_id=1, round_id=2, recipient=recipient, cohort=big["cohort"], degree=4, threshold=3,
                field_bits=32, vector_length=10),
        w.KeyRoster(run_id=1, round_id=2, recipient=recipient, keys=(), identities=big["identities"],
                    bls_keys=big["bls"]),
        w.ConsistencyRequest(run_id=1, round_id=2, recipient=recipient, survivors=big["cohort"]),
        w.UnmaskRequest(run_id=1, round_id=2, recipient=recipient, survivors=big["cohort"], aggregate=b"a" * 96,
                        signers=big["signers"]),
        w.RetryRequest(run_id=1, round_id=2, recipient=recipient, survivors=big["cohort"], attempt=1),
    ]


def test_shared_parts_round_trip_once_per_stage_and_are_refused_when_misplaced():
    """sgs-secagg+/8: the fields every recipient gets alike travel in one shared part,
    encoded once per stage (one bytes object for all recipients) and decoded into the
    same message; a process decoding equal shared bytes again reuses the tuples. A
    shared part where none belongs, beside the same fields inline, of another message
    type, or malformed, is a MalformedMessageError naming the problem."""
    from sgs_flower.secagg import wire as w

    big = {"cohort": tuple(range(1, 101)), "identities": tuple((v, bytes([v]) * 32) for v in range(1, 101)),
           "bls": tuple((v, bytes([v]) * 208) for v in range(1, 101)), "signers": (1, 2, 3)}
    first, second = _shared_messages(1, big), _shared_messages(2, big)
    for a, b in zip(first, second, strict=True):
        own_a, shared_a = w.encode_parts(a)
        own_b, shared_b = w.encode_parts(b)
        assert shared_a is shared_b and own_a != own_b  # encoded once, each recipient its own part
        assert len(own_a) < 260 < len(shared_a)
        got_a, got_b = w.decode(own_a, shared=shared_a), w.decode(own_b, shared=bytes(bytearray(shared_b)))
        assert got_a == a and got_b == b and w.decode(w.encode(a)) == a  # whole messages still decode
        for name in w.SHARED_FIELDS[type(a)]:
            if isinstance(getattr(a, name), tuple) and getattr(a, name):
                assert getattr(got_a, name) is getattr(got_b, name)  # equal shared bytes: the same tuples
    setup_own, setup_shared = w.encode_parts(first[0])
    roster_own, roster_shared = w.encode_parts(first[1])
    share_keys = w.ShareKeys(run_id=1, round_id=2, sender=1, ciphertexts=())
    assert w.encode_parts(share_keys) == (w.encode(share_keys), None)
    for data, shared, why in [
        (w.encode(share_keys), setup_shared, "ShareKeys has no shared part"),
        (w.encode(first[0]), setup_shared, r"Setup fields differ \(missing \[\], unexpected \['cohort'\]\)"),
        (setup_own, None, r"Setup fields differ \(missing \['cohort'\]"),
        (setup_own, roster_shared, "the shared part is not Setup's"),
        (roster_own, b"SGS2" + roster_shared[4:], "not an sgs-flower secagg shared part"),
        (roster_own, roster_shared + b"x", "unexpected trailing bytes"),
        (setup_own, setup_shared.replace(b'[1,2,', b'["a",'), "Setup.cohort must be an integer"),
    ]:
        with pytest.raises(MalformedMessageError, match=why):
            w.decode(data, shared=shared)


def test_packed_key_lists_round_trip_and_malformed_packings_are_typed_errors():
    """/8 packs a list of honest advertisements (fixed field lengths) and (node, bytes)
    pairs of one length into one base64 string each; odd lengths travel as a list, so a
    lying server's 31-byte key still reaches the check that names it; a packing whose
    sizes do not add up is a MalformedMessageError."""
    import json as _json
    import struct as _struct

    from sgs_flower.secagg import wire as w

    nks = tuple(w.NeighbourKeys(v, os.urandom(32), os.urandom(32), os.urandom(32), os.urandom(32), os.urandom(64))
                for v in (3, 9, 27))
    pairs = tuple((v, os.urandom(48)) for v in (2, 4, 8))
    roster = w.KeyRoster(run_id=1, round_id=2, recipient=5, keys=nks, identities=pairs, bls_keys=())
    raw = encode_message(roster)
    header = _json.loads(raw[8:])
    assert set(header["keys"]) == {"nk"} and set(header["identities"]) == {"w", "n", "b"}
    assert decode_message(raw) == roster
    odd = w.KeyRoster(run_id=1, round_id=2, recipient=5, keys=(nks[0], w.NeighbourKeys(4, b"x" * 31, nks[1].s_pk, nks[1].identity_key,
                                                           nks[1].self_mask_commitment, nks[1].signature)),
                      identities=((2, b"a" * 32), (4, b"b" * 31)), bls_keys=())
    odd_header = _json.loads(encode_message(odd)[8:])
    assert isinstance(odd_header["keys"], list) and isinstance(odd_header["identities"], list)
    assert decode_message(encode_message(odd)) == odd

    def with_header(**changes):
        h = dict(header, **changes)
        body = _json.dumps(h).encode()
        return w.MAGIC + _struct.pack(">I", len(body)) + body

    for bad, why in [
        (with_header(keys={"nk": header["keys"]["nk"][:-4]}), "whole 200-byte entries"),
        (with_header(keys={"nk": header["keys"]["nk"], "x": 1}), "or their packed form"),
        (with_header(identities=dict(header["identities"], w=47)), "not 3 entries of 47"),
        (with_header(identities=dict(header["identities"], n=[2, 4])), "not 2 entries of 48"),
        (with_header(identities={"w": 48, "n": [2, 4, 8]}), "or their packed form"),
    ]:
        with pytest.raises(MalformedMessageError, match=why):
            decode_message(bad)


def test_a_client_state_saved_whole_by_an_earlier_version_still_loads(cohort_factory):
    """States saved before /8 hold the setup and roster whole and survivor lists as
    ints: a site upgraded mid-run reads them to the same instance."""
    c = cohort_factory(4)
    replies = {u: c.clients[u].handle(msg) for u, msg in c.server.setup_messages().items()}
    rosters = c.server.collect_keys(replies)
    for u, msg in rosters.items():
        c.clients[u].handle(msg)
    u = 1
    orig = c.clients[u]
    new = orig.state_dict()
    old = {k: v for k, v in new.items() if not k.endswith(".shared")}
    old["setup"] = encode_message(orig.state.secrets.setup)
    old["roster"] = encode_message(wire.KeyRoster(
        run_id=orig.state.secrets.setup.run_id, round_id=orig.state.secrets.setup.round_id, recipient=u,
        keys=tuple(orig.state.roster.values()), identities=tuple(sorted(orig.state.identities.items())),
        bls_keys=orig.state.bls_keys))
    restored = SecAggClient.from_state_dict(old, orig.identity, orig.policy)
    assert type(restored.state) is type(orig.state)
    assert restored.state.secrets.setup == orig.state.secrets.setup
    assert restored.state.roster == orig.state.roster and restored.state.identities == orig.state.identities
    assert restored.state.bls_keys == orig.state.bls_keys


def test_client_state_survives_a_restart_between_every_stage(cohort_factory):
    """A Flower client keeps protocol state in Context.state between messages; restoring
    from ``state_dict`` at every stage must give the same exact sum."""
    c = cohort_factory(5)

    def reload(u):
        old = c.clients[u]
        c.clients[u] = SecAggClient.from_state_dict(old.state_dict(), old.identity, old.policy)

    replies = {}
    for u, msg in c.server.setup_messages().items():
        replies[u] = c.clients[u].handle(msg)
        reload(u)
    rosters = c.server.collect_keys(replies)
    replies = {}
    for u, r in rosters.items():
        replies[u] = c.clients[u].handle(r)
        reload(u)
    bundles = c.server.collect_shares(replies)
    replies = {}
    for u, b in bundles.items():
        replies[u] = c.clients[u].handle(b, vector=c.inputs[u])
        reload(u)
    reqs = c.server.collect_masked(replies)
    replies = {}
    for u, r in reqs.items():
        replies[u] = c.clients[u].handle(r)
        reload(u)
    unmask = c.server.collect_consistency(replies)
    out = c.server.collect_unmask({u: c.clients[u].handle(r) for u, r in unmask.items()})
    np.testing.assert_array_equal(out.total, sum(c.inputs.values()))
    state = c.clients[1].state_dict()
    # after unmasking a site holds the round only for a retry of its masked input
    assert state["state"] == "Unmasked" and state["last_masked"] == [7, 3]
    assert SecAggClient.from_state_dict(state).state_dict() == state


def test_every_message_type_round_trips(cohort_factory):
    c = cohort_factory(4)
    msgs = list(c.server.setup_messages().values()) + list(c.advertise().values())
    for m in msgs:
        assert decode_message(encode_message(m)) == m


def test_derive_binds_label_context_and_nodes_as_before():
    """derive's info is label || context || the node ids as 8-byte big-endian words
    (the node ids are packed by precompiled structs: the bytes must not change)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    from sgs_flower.secagg import keys

    secret, ctx = os.urandom(32), os.urandom(32)
    for parts in [(), (7,), (3, 2**64 - 1), (1, 2, 3)]:
        info = keys.LABEL_SHARE + ctx + b"".join(p.to_bytes(8, "big") for p in parts)
        ref = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)
        assert keys.derive(secret, keys.LABEL_SHARE, ctx, *parts) == ref
    assert keys.pairwise_mask_key(secret, ctx, 5, 2) == keys.pairwise_mask_key(secret, ctx, 2, 5)


def test_identity_verify_by_libsodium_agrees_with_openssl_and_refuses_small_order_keys():
    """identity.verify runs libsodium (half OpenSSL's CPU); it must accept exactly the
    signatures OpenSSL accepts for honest keys, refuse every tampered one, and refuse a
    small-order public key (the identity point encodes as 1 followed by zeros), with
    which any message 'verifies' under a lax check."""
    import os

    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from sgs_flower.secagg import identity

    def verify_openssl(public: bytes, signature: bytes, message: bytes) -> bool:
        if len(public) != 32 or len(signature) != 64:
            return False
        try:
            Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True

    for i in range(40):
        sk = identity.generate_identity()
        pk = identity.identity_public(sk)
        msg = os.urandom(i * 37)
        sig = identity.sign(sk, msg)
        assert identity.verify(pk, sig, msg) and verify_openssl(pk, sig, msg)
        bad_sig = bytes([sig[0] ^ (1 << (i % 8))]) + sig[1:]
        bad_msg = msg + b"x"
        other = identity.identity_public(identity.generate_identity())
        for args in ((pk, bad_sig, msg), (pk, sig, bad_msg), (other, sig, msg), (pk, sig[:63], msg), (pk[:31], sig, msg)):
            assert identity.verify(*args) is False
            assert verify_openssl(*args) is False
    small_order = b"\x01" + bytes(31)  # the identity point
    forged = small_order + bytes(32)  # R = identity, S = 0: [0]B == R + [h]A for A of order 1
    assert identity.verify(small_order, forged, b"any message") is False
