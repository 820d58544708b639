"""The cryptographic core of input validation (issue 31), without Flower.

Range proofs (aggregated Bulletproofs) as the attacker would try them: out-of-range
values, flipped bytes, reordered or swapped commitments, replays under another context,
malformed encodings. The soundness parameters against an independent recomputation,
and empirically. The aggregate opening against a site that proves one vector and masks
another. Privacy: the bytes a site sends do not depend on its update.

Small k and bit widths keep this file fast; the full-size costs are in
``scripts/bench_validation.py``.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Callable

import numpy as np
import pytest
from py_arkworks_bls12381 import G1Point
from scipy import optimize, stats

from sgs_flower.secagg.errors import ConfigurationError, EncodingError, SecAggError
from sgs_flower.validation import group, projection, rangeproof
from sgs_flower.validation.errors import OpeningError, ProofError
from sgs_flower.validation.group import POINT_BYTES, SCALAR_BYTES, R
from sgs_flower.validation.opening import check_opening
from sgs_flower.validation.projection import BoundParams, params_for, project, rademacher
from sgs_flower.validation.proof import BoundProof, prove_bound, random_blinds, verify_bound
from sgs_flower.validation.transcript import Transcript

RNG = np.random.default_rng(31)


def _t(ctx: bytes = b"round=1/node=7") -> Transcript:
    t = Transcript(b"test")
    t.append(b"context", ctx)
    return t


def _blinds(m: int) -> list[int]:
    return [secrets.randbelow(R) for _ in range(m)]


def _proof_sections(bits: int, m: int) -> dict[str, tuple[int, int]]:
    """Byte ranges of each part of a range proof (A, S, T1, T2, tau_x, mu, t_hat, L, R, a, b)."""
    rounds = (bits * m).bit_length() - 1
    out: dict[str, tuple[int, int]] = {}
    off = 0
    for name, size in [
        ("A", POINT_BYTES), ("S", POINT_BYTES), ("T1", POINT_BYTES), ("T2", POINT_BYTES),
        ("tau_x", SCALAR_BYTES), ("mu", SCALAR_BYTES), ("t_hat", SCALAR_BYTES),
        ("L", rounds * POINT_BYTES), ("R", rounds * POINT_BYTES),
        ("a", SCALAR_BYTES), ("b", SCALAR_BYTES),
    ]:
        out[name] = (off, off + size)
        off += size
    assert off == rangeproof.proof_size(bits, m)
    return out


# ---------------------------------------------------------------- group and transcript
def test_generators_are_deterministic_distinct_and_domain_separated():
    a = group.generators(b"test/a", 8)
    assert group.generators(b"test/a", 4) == a[:4]  # a prefix never changes
    b = group.generators(b"test/b", 8)
    encoded = {group.point_bytes(p) for p in a + b}
    assert len(encoded) == 16
    assert all(p.is_in_subgroup() for p in a)


def test_transcript_challenges_depend_on_everything_appended():
    def run(label: bytes, data: bytes) -> list[int]:
        t = Transcript(label)
        t.append(b"m", data)
        return [t.challenge(b"c"), t.challenge(b"c")]

    first = run(b"L", b"x")
    assert first == run(b"L", b"x")  # deterministic
    assert first[0] != first[1]  # the state ratchets
    assert first != run(b"L", b"y") and first != run(b"M", b"x")
    assert all(0 < c < R for c in first)
    # framing: moving a byte between label and data changes the challenge
    t1, t2 = Transcript(b"L"), Transcript(b"L")
    t1.append(b"ab", b"c")
    t2.append(b"a", b"bc")
    assert t1.challenge(b"c") != t2.challenge(b"c")


# ---------------------------------------------------------------- range proofs
@pytest.mark.parametrize("bits, values", [(8, [0, 255]), (16, [0, 65535, 1, 40000]), (8, [7])])
def test_honest_range_proofs_verify_at_the_edges(bits, values):
    blinds = _blinds(len(values))
    commitments, proof = rangeproof.prove(values, blinds, bits, _t())
    assert commitments == [rangeproof.commit(v, s) for v, s in zip(values, blinds, strict=True)]
    assert len(proof) == rangeproof.proof_size(bits, len(values))
    rangeproof.verify(commitments, proof, bits, _t())


@pytest.mark.parametrize("bad", [256, -1, R - 1, 1 << 9])
def test_out_of_range_value_is_refused_and_a_forced_proof_fails(bad):
    values, blinds = [5, bad], _blinds(2)
    with pytest.raises(ProofError, match="outside"):
        rangeproof.prove(values, blinds, 8, _t())
    commitments, proof = rangeproof._prove(values, blinds, 8, _t())  # a cheater's prover
    with pytest.raises(ProofError, match="does not verify"):
        rangeproof.verify(commitments, proof, 8, _t())


def test_a_forced_proof_fails_for_many_out_of_range_values():
    """The wrap-around values a cheater would like: 2^bits + small, R - small."""
    for bad in [1 << 8, (1 << 8) + 3, R - 2, R - (1 << 8), 1 << 20]:
        commitments, proof = rangeproof._prove([bad, 0], _blinds(2), 8, _t())
        with pytest.raises(ProofError):
            rangeproof.verify(commitments, proof, 8, _t())


@pytest.fixture(scope="module")
def honest_proof():
    values, blinds = [0, 255, 17, 200], _blinds(4)
    commitments, proof = rangeproof.prove(values, blinds, 8, _t())
    rangeproof.verify(commitments, proof, 8, _t())
    return commitments, proof


def test_every_flipped_byte_section_fails(honest_proof):
    commitments, proof = honest_proof
    for name, (lo, hi) in _proof_sections(8, 4).items():
        for pos in sorted({lo + 1, (lo + hi) // 2, hi - 1}):
            bad = bytearray(proof)
            bad[pos] ^= 0x01
            with pytest.raises(ProofError):
                rangeproof.verify(commitments, bytes(bad), 8, _t())
                pytest.fail(f"flipped byte {pos} of {name} verified")
    for j in range(len(commitments)):
        bad_c = list(commitments)
        flipped = bytearray(bad_c[j])
        flipped[-1] ^= 0x01
        bad_c[j] = bytes(flipped)
        with pytest.raises(ProofError):
            rangeproof.verify(bad_c, proof, 8, _t())


def test_reordered_or_swapped_in_commitments_fail(honest_proof):
    commitments, proof = honest_proof
    with pytest.raises(ProofError):
        rangeproof.verify([commitments[1], commitments[0], *commitments[2:]], proof, 8, _t())
    other_c, _ = rangeproof.prove([1, 2, 3, 4], _blinds(4), 8, _t())
    for j in range(4):
        swapped = list(commitments)
        swapped[j] = other_c[j]
        with pytest.raises(ProofError):
            rangeproof.verify(swapped, proof, 8, _t())


def test_replay_under_another_context_fails(honest_proof):
    commitments, proof = honest_proof
    for ctx in [b"round=2/node=7", b"round=1/node=8", b""]:
        with pytest.raises(ProofError, match="does not verify"):
            rangeproof.verify(commitments, proof, 8, _t(ctx))
    with pytest.raises(ProofError, match="does not verify"):
        rangeproof.verify(commitments, proof, 8, Transcript(b"another protocol"))


def test_wrong_bit_width_or_count_fails(honest_proof):
    commitments, proof = honest_proof
    with pytest.raises(ProofError, match="bytes"):
        rangeproof.verify(commitments, proof, 16, _t())  # another length
    with pytest.raises(ProofError, match="power of two"):
        rangeproof.verify(commitments[:3], proof, 8, _t())
    with pytest.raises(ProofError, match="bytes"):
        rangeproof.verify(commitments[:2], proof, 8, _t())


def _not_on_curve() -> bytes:
    while True:
        b = bytearray(secrets.token_bytes(POINT_BYTES))
        b[0] = (b[0] & 0x1F) | 0x80  # compressed flag, not infinity
        try:
            G1Point.from_compressed_bytes_unchecked(bytes(b))
        except ValueError:
            return bytes(b)


def _off_subgroup() -> bytes:
    while True:
        b = bytearray(secrets.token_bytes(POINT_BYTES))
        b[0] = (b[0] & 0x1F) | 0x80
        try:
            p = G1Point.from_compressed_bytes_unchecked(bytes(b))
        except ValueError:
            continue
        if not p.is_in_subgroup():
            return bytes(b)


def test_malformed_bytes_give_clear_proof_errors(honest_proof):
    commitments, proof = honest_proof
    sections = _proof_sections(8, 4)
    with pytest.raises(ProofError, match=r"has \d+ bytes, expected"):
        rangeproof.verify(commitments, proof[:-1], 8, _t())
    with pytest.raises(ProofError, match="48 compressed bytes"):
        rangeproof.verify([commitments[0][:47], *commitments[1:]], proof, 8, _t())
    for bad_point, why in [(_not_on_curve(), "on the curve"), (_off_subgroup(), "not in the prime-order subgroup")]:
        lo, hi = sections["A"]
        with pytest.raises(ProofError, match=why):
            rangeproof.verify(commitments, proof[:lo] + bad_point + proof[hi:], 8, _t())
        with pytest.raises(ProofError, match=why):
            rangeproof.verify([bad_point, *commitments[1:]], proof, 8, _t())
    for name in ["tau_x", "a"]:
        lo, hi = sections[name]
        for big in [R, (1 << 256) - 1]:
            with pytest.raises(ProofError, match="not canonical"):
                rangeproof.verify(commitments, proof[:lo] + big.to_bytes(32, "big") + proof[hi:], 8, _t())
    with pytest.raises(ProofError, match="48 compressed bytes"):
        group.point_from(b"")


# ---------------------------------------------------------------- soundness parameters
def _independent(bound: int, sb: int = 40, cb: int = 40) -> dict[str, float]:
    """The numbers of docs/validation.md, recomputed without projection.py's helpers."""
    k = 1
    while not (2 / 3) ** k < 2.0**-sb:
        k *= 2
    k = max(k, 8)
    theta = optimize.brentq(lambda t: k * math.log2(1 - (1 - t) ** 2 / 3) + sb, 1e-12, 1 - 1e-12, xtol=1e-15)
    tau = optimize.brentq(lambda t: math.log(2 * k) - t * t / 2 + cb * math.log(2), 0.1, 100, xtol=1e-13)
    need = math.ceil(tau * bound)
    bits = next(b for b in (8, 16, 32, 64) if 2 ** (b - 1) - 1 >= need)
    scale = (2 ** (bits - 1) - 1) // need
    accept = 2 ** (bits - 1) / scale
    return {"k": k, "theta": theta, "tau": tau, "bits": bits, "scale": scale,
            "gamma": accept / (bound * math.sqrt(theta))}


@pytest.mark.parametrize("bound", [10, 1000, 65536, 3 * 10**7, 2**40])
def test_params_match_an_independent_recomputation(bound):
    p = params_for(bound)
    ref = _independent(bound)
    assert p.k == ref["k"] == 128  # (2/3)^64 = 2^-37.4 misses 2^-40
    assert p.bits == ref["bits"] and p.scale == ref["scale"] and p.shift == 2 ** (p.bits - 1)
    assert p.tau == pytest.approx(ref["tau"], rel=1e-9)
    assert p.gamma == pytest.approx(ref["gamma"], rel=1e-6)
    # the stated soundness holds at gamma; the completeness error is at most 2^-40
    theta = (p.accept / (p.gamma * bound)) ** 2
    assert p.k * math.log2(1 - (1 - theta) ** 2 / 3) <= -40 + 1e-6
    assert p.completeness_error <= 2.0**-40
    assert p.completeness_error == pytest.approx(
        2 * p.k * math.exp(-(((p.shift - 1) / p.scale / bound) ** 2) / 2), rel=1e-9)
    # honest values hold: scale*ceil(tau B) + shift fits, and -shift/scale is accepted
    assert p.committed_value(math.ceil(p.tau * bound)) < 2**p.bits
    assert p.committed_value(-math.ceil(p.tau * bound)) >= 0
    assert BoundParams.from_config(p.to_config()) == p


def test_weaker_targets_and_larger_k():
    small = params_for(1000, soundness_bits=8, completeness_bits=8)
    assert small.k == _independent(1000, 8, 8)["k"] == 16
    assert small.gamma == pytest.approx(_independent(1000, 8, 8)["gamma"], rel=1e-6)
    big = params_for(1000, k=256)
    assert big.k == 256 and big.gamma < params_for(1000).gamma
    with pytest.raises(ConfigurationError, match="power of two"):
        params_for(1000, k=64)  # cannot reach 2^-40
    with pytest.raises(ConfigurationError):
        params_for(0)
    with pytest.raises(ConfigurationError, match="64-bit"):
        params_for(2**62)


def test_from_config_rejects_bad_or_inconsistent_params():
    good = params_for(1000).to_config()
    for key, value, why in [
        ("gamma", good["gamma"] / 2, "gamma"),  # a server claiming a tighter bound
        ("completeness_error", 0.0, "completeness"),
        ("k", 100, "power of two"),
        ("k", 64, "cannot reach"),
        ("bits", 12, "bits"),
        ("shift", 5, "shift"),
        ("scale", good["scale"] * 4, "tau"),  # honest sites would fail
        ("k", "128", "int"),
        ("tau", float("nan"), "finite"),
        ("bound", True, "int"),
    ]:
        with pytest.raises(ConfigurationError, match=why):
            BoundParams.from_config({**good, key: value})
    with pytest.raises(ConfigurationError, match="lack"):
        BoundParams.from_config({k: v for k, v in good.items() if k != "tau"})
    with pytest.raises(ConfigurationError, match="unknown"):
        BoundParams.from_config({**good, "extra": 1})


def test_paley_zygmund_bound_holds_empirically():
    """For sparse and dense vectors the fraction of short projections is below the bound."""
    seed = secrets.token_bytes(32)
    a = rademacher(seed, 4096, 64).astype(np.float64)
    for delta in [np.eye(64)[0] + np.eye(64)[1], np.ones(64), RNG.normal(size=64)]:
        v = a @ delta
        length = np.linalg.norm(delta)
        for theta in [0.1, 0.25, 0.5]:
            frac = float(np.mean(v**2 <= theta * length**2))
            assert frac <= 1 - (1 - theta) ** 2 / 3 + 0.03, (theta, frac)


def _passes(x: np.ndarray, p: BoundParams, seed: bytes) -> bool:
    v = project(x, seed, p.k)
    return all(0 <= p.committed_value(vj) < 2**p.bits for vj in v)


def test_a_vector_far_beyond_the_bound_fails_and_one_at_the_bound_passes():
    bound = 50_000
    p = params_for(bound)
    m = 2000
    shapes = {
        "dense": RNG.normal(size=m),
        "sparse": np.eye(m)[3] + np.eye(m)[900],
        "one-hot": np.eye(m)[17],
        "few": np.where(RNG.random(m) < 0.01, 1.0, 0.0),
    }
    for name, direction in shapes.items():
        unit = direction / np.linalg.norm(direction)
        far = np.rint(unit * 2 * p.gamma * bound).astype(np.int64)
        near = np.trunc(unit * bound).astype(np.int64)  # ||near|| <= B
        for _ in range(5):
            seed = secrets.token_bytes(32)
            assert not _passes(far, p, seed), name
            assert _passes(near, p, seed), name


def test_a_huge_entry_fails_every_projection_set():
    """|delta_i| > accept: each projection passes with probability <= 1/2."""
    p = params_for(1000, soundness_bits=8, completeness_bits=8)
    x = np.zeros(100, dtype=np.int64)
    x[5] = int(p.accept) + 1
    for _ in range(20):
        assert not _passes(x, p, secrets.token_bytes(32))


# ---------------------------------------------------------------- projections
def test_projection_is_exact_across_chunks(monkeypatch):
    monkeypatch.setattr(projection, "CHUNK_COORDINATES", 48)
    m, k = 200, 24
    x = RNG.integers(-(2**40) + 1, 2**40, size=m, dtype=np.int64)
    x[:3] = [2**40 - 1, -(2**40) + 1, 0]
    seed = secrets.token_bytes(32)
    a = rademacher(seed, k, m)
    want = [sum(int(a[j, i]) * int(x[i]) for i in range(m)) for j in range(k)]
    assert project(x, seed, k) == want
    monkeypatch.setattr(projection, "CHUNK_COORDINATES", 1 << 15)
    assert project(x, seed, k) == want
    assert project(x, secrets.token_bytes(32), k) != want  # another seed, other vectors


def test_rademacher_signs_are_balanced_and_seed_bound():
    seed = secrets.token_bytes(32)
    a = rademacher(seed, 128, 4096)
    assert set(np.unique(a)) == {-1, 1}
    assert abs(float(a.mean())) < 0.01  # 524288 signs: std 0.0014
    assert abs(float(np.corrcoef(a[0], a[1])[0, 1])) < 0.08
    assert (rademacher(seed, 128, 4096) == a).all()


def test_projection_rejects_bad_vectors():
    seed = secrets.token_bytes(32)
    with pytest.raises(EncodingError, match="2\\^40"):
        project(np.array([2**40], dtype=np.int64), seed, 8)
    for wraps in [np.array([0, 2**64 - 1], dtype=np.uint64), np.array([np.iinfo(np.int64).min, 3])]:
        with pytest.raises(EncodingError, match="2\\^40"):
            project(wraps, seed, 8)  # would wrap to a small value in a careless cast
    with pytest.raises(EncodingError, match="integer"):
        project(np.array([1.0, 2.0]), seed, 8)
    with pytest.raises(EncodingError, match="1-D"):
        project(np.zeros((2, 2), dtype=np.int64), seed, 8)
    with pytest.raises(ConfigurationError, match="32 bytes"):
        project(np.zeros(4, dtype=np.int64), b"short", 8)


# ---------------------------------------------------------------- the site's bound proof
SMALL = params_for(1000, soundness_bits=8, completeness_bits=8)  # k=16, bits=16: fast


def _at_norm(norm: float, m: int = 300) -> np.ndarray:
    d = RNG.normal(size=m)
    return np.trunc(d / np.linalg.norm(d) * norm).astype(np.int64)


def test_bound_proof_round_trip_and_context_binding():
    x, seed = _at_norm(1000), secrets.token_bytes(32)
    blinds = random_blinds(SMALL.k)
    proof = prove_bound(x, blinds, SMALL, seed, b"run=1/round=3/node=5")
    again = BoundProof.from_bytes(proof.to_bytes(), SMALL)
    assert again == proof
    verify_bound(again, SMALL, b"run=1/round=3/node=5")
    for ctx in [b"run=1/round=4/node=5", b"run=1/round=3/node=6", b"run=2/round=3/node=5"]:
        with pytest.raises(ProofError):
            verify_bound(proof, SMALL, ctx)  # replayed in another round / copied by another site
    other = params_for(2000, soundness_bits=8, completeness_bits=8)
    assert (other.k, other.bits) == (SMALL.k, SMALL.bits)
    with pytest.raises(ProofError):
        verify_bound(proof, other, b"run=1/round=3/node=5")  # params are bound too
    with pytest.raises(ProofError, match="bytes"):
        BoundProof.from_bytes(proof.to_bytes()[:-1], SMALL)
    with pytest.raises(ProofError, match="commitments"):
        verify_bound(BoundProof(proof.commitments[:-1], proof.proof), SMALL, b"run=1/round=3/node=5")
    assert isinstance(ProofError("x"), SecAggError) and isinstance(OpeningError("x"), SecAggError)


def test_an_out_of_bound_update_still_gets_a_proof_that_fails():
    x = _at_norm(2 * SMALL.gamma * SMALL.bound)
    for _ in range(3):
        proof = prove_bound(x, random_blinds(SMALL.k), SMALL, secrets.token_bytes(32), b"ctx")
        with pytest.raises(ProofError, match="does not verify"):
            verify_bound(proof, SMALL, b"ctx")


def test_a_proof_copied_with_another_sites_commitment_fails():
    seed = secrets.token_bytes(32)
    p1 = prove_bound(_at_norm(500), random_blinds(SMALL.k), SMALL, seed, b"ctx")
    p2 = prove_bound(_at_norm(500), random_blinds(SMALL.k), SMALL, seed, b"ctx")
    mixed = BoundProof([p2.commitments[0], *p1.commitments[1:]], p1.proof)
    with pytest.raises(ProofError):
        verify_bound(mixed, SMALL, b"ctx")
    with pytest.raises(ProofError):
        verify_bound(BoundProof(p1.commitments, p2.proof), SMALL, b"ctx")


# ---------------------------------------------------------------- aggregate opening
def _sites(n: int, seed: bytes) -> tuple[list[np.ndarray], list[list[int]], list[BoundProof]]:
    xs = [_at_norm(RNG.uniform(0.2, 1.0) * SMALL.bound) for _ in range(n)]
    blinds = [random_blinds(SMALL.k) for _ in range(n)]
    proofs = [prove_bound(x, b, SMALL, seed, b"node=%d" % i) for i, (x, b) in enumerate(zip(xs, blinds, strict=True))]
    for i, pr in enumerate(proofs):
        verify_bound(pr, SMALL, b"node=%d" % i)
    return xs, blinds, proofs


def _summed(blinds: list[list[int]]) -> list[int]:
    return [sum(b[j] for b in blinds) for j in range(SMALL.k)]  # plain integers, not reduced


def test_honest_survivors_open_against_the_true_sum():
    seed = secrets.token_bytes(32)
    xs, blinds, proofs = _sites(3, seed)
    total = np.sum(xs, axis=0)
    check_opening(proofs, project(total, seed, SMALL.k), 3, _summed(blinds), SMALL)
    # numpy integers for the projections are accepted (and not multiplied in int64)
    check_opening(proofs, np.array(project(total, seed, SMALL.k), dtype=np.int64), 3, _summed(blinds), SMALL)
    # a subset of survivors opens against its own sum
    check_opening(proofs[:2], project(xs[0] + xs[1], seed, SMALL.k), 2, _summed(blinds[:2]), SMALL)


def test_proving_small_and_masking_large_fails_the_opening():
    seed = secrets.token_bytes(32)
    xs, blinds, proofs = _sites(3, seed)
    masked = list(xs)
    masked[1] = xs[1] + _at_norm(100 * SMALL.bound)  # proved xs[1], summed something else
    total = np.sum(masked, axis=0)
    with pytest.raises(OpeningError, match="do not open"):
        check_opening(proofs, project(total, seed, SMALL.k), 3, _summed(blinds), SMALL)
    # even a one-unit change in one coordinate is caught
    masked[1] = xs[1].copy()
    masked[1][7] += 1
    with pytest.raises(OpeningError):
        check_opening(proofs, project(np.sum(masked, axis=0), seed, SMALL.k), 3, _summed(blinds), SMALL)


def test_opening_fails_on_wrong_blinds_count_or_survivors():
    seed = secrets.token_bytes(32)
    xs, blinds, proofs = _sites(2, seed)
    proj = project(xs[0] + xs[1], seed, SMALL.k)
    wrong = _summed(blinds)
    wrong[3] += 1
    with pytest.raises(OpeningError, match="do not open"):
        check_opening(proofs, proj, 2, wrong, SMALL)
    with pytest.raises(OpeningError, match="count"):
        check_opening(proofs, proj, 3, _summed(blinds), SMALL)
    with pytest.raises(OpeningError, match="do not open"):
        check_opening(proofs[:1], proj, 1, _summed(blinds), SMALL)  # a dropped site's proof left out
    with pytest.raises(OpeningError, match="expected"):
        check_opening(proofs, proj[:-1], 2, _summed(blinds), SMALL)


# ---------------------------------------------------------------- privacy
def _field_bytes(data: bytes, size: int) -> np.ndarray:
    """Every byte of ``data`` split into ``size``-byte fields except each field's first
    (it carries flags / the modulus' top bits, the same for every update)."""
    arr = np.frombuffer(data, dtype=np.uint8).reshape(-1, size)
    return arr[:, 1:].ravel()


def _sent_bytes(x: np.ndarray, blinds_fn: Callable[[], list[int]]) -> np.ndarray:
    proof = prove_bound(x, blinds_fn(), SMALL, secrets.token_bytes(32), b"ctx")
    parts = [_field_bytes(b"".join(proof.commitments), POINT_BYTES)]
    sections = _proof_sections(SMALL.bits, SMALL.k)
    for name, (lo, hi) in sections.items():
        size = SCALAR_BYTES if name in ("tau_x", "mu", "t_hat", "a", "b") else POINT_BYTES
        parts.append(_field_bytes(proof.proof[lo:hi], size))
    return np.concatenate(parts)


def test_what_a_site_sends_is_independent_of_its_update():
    """Byte distributions of commitments and proofs for a zero update and for one at the
    bound are indistinguishable (chi-square on byte histograms); the control, without
    fresh blinds, is told apart at once."""
    zero = np.zeros(300, dtype=np.int64)
    large = _at_norm(SMALL.bound)
    trials = 8

    def histogram(x: np.ndarray, blinds_fn: Callable[[], list[int]]) -> np.ndarray:
        return np.bincount(np.concatenate([_sent_bytes(x, blinds_fn) for _ in range(trials)]), minlength=256)

    fresh = lambda: random_blinds(SMALL.k)  # noqa: E731
    h0, h1 = histogram(zero, fresh), histogram(large, fresh)
    p_value = stats.chi2_contingency(np.stack([h0, h1]))[1]
    assert p_value > 1e-4, p_value
    # every histogram is also consistent with uniform bytes
    for h in (h0, h1):
        assert stats.chisquare(h)[1] > 1e-4
    # the commitments of the same update under fresh blinds are all different points
    seed = secrets.token_bytes(32)
    seen = {c for _ in range(3) for c in prove_bound(large, fresh(), SMALL, seed, b"c").commitments}
    assert len(seen) == 3 * SMALL.k

    # control: with zero blinds the commitments are a function of the update: the same
    # test on the commitment bytes alone separates the two updates
    def commitment_hist(x: np.ndarray) -> np.ndarray:
        seed = b"\x01" * 32
        cs = prove_bound(x, [0] * SMALL.k, SMALL, seed, b"ctx").commitments
        return np.bincount(np.concatenate([_field_bytes(b"".join(cs), POINT_BYTES)] * trials), minlength=256)

    table = np.stack([commitment_hist(zero), commitment_hist(large)])
    p_control = stats.chi2_contingency(table[:, table.sum(axis=0) > 0])[1]
    assert p_control < 1e-6, p_control


def test_batch_verification_names_exactly_the_failing_proofs():
    from sgs_flower.validation.proof import verify_bounds

    seed = secrets.token_bytes(32)
    good = [prove_bound(_at_norm(800), random_blinds(SMALL.k), SMALL, seed, b"node=%d" % i) for i in range(4)]
    items = [(p, b"node=%d" % i) for i, p in enumerate(good)]
    assert verify_bounds(items, SMALL) == {}
    far = prove_bound(_at_norm(2 * SMALL.gamma * SMALL.bound), random_blinds(SMALL.k), SMALL, seed, b"node=4")
    tampered = bytearray(good[1].proof)
    tampered[-5] ^= 1
    bad_items = [
        *items,
        (far, b"node=4"),  # out of bound
        (BoundProof(good[1].commitments, bytes(tampered)), b"node=1"),  # tampered
        (good[2], b"node=9"),  # copied by another site
        (BoundProof(good[0].commitments[:3], good[0].proof), b"node=0"),  # malformed
        (BoundProof(good[0].commitments, good[0].proof[:-1]), b"node=0"),  # short
    ]
    failures = verify_bounds(bad_items, SMALL)
    assert sorted(failures) == [4, 5, 6, 7, 8]
    assert all(isinstance(e, ProofError) for e in failures.values())
    assert verify_bounds(bad_items[:4] + bad_items[6:7], SMALL).keys() == {4}


def test_the_pinned_generator_blocks_are_hash_to_curve():
    """Every pinned block is the SHA-256 of exactly the generators hash-to-curve gives (so
    a cached block that matches its pin is the derived one, for verifiers too)."""
    import hashlib

    from py_arkworks_bls12381 import G1Point

    from sgs_flower.validation.group import DST_PREFIX
    from sgs_flower.validation.pins import BLOCK, PINNED

    assert set(PINNED) == {rangeproof.LABEL_G, rangeproof.LABEL_H}
    for label, pins in PINNED.items():
        for block, pin in enumerate(pins):
            data = b"".join(
                bytes(G1Point.hash_to_curve(i.to_bytes(8, "big"), DST_PREFIX + label).to_xy_bytes_be())
                for i in range(block * BLOCK, (block + 1) * BLOCK)
            )
            assert hashlib.sha256(data).hexdigest() == pin, (label, block)


def test_a_tampered_generator_cache_is_not_loaded(tmp_path, monkeypatch):
    """The disk cache is read back only block by block against the pins: a block with one
    point swapped (a prover who knows a discrete log between generators could forge) is
    derived again, and the cache is rewritten with the true points."""
    from sgs_flower.validation import group
    from sgs_flower.validation.pins import BLOCK

    monkeypatch.setenv("SGS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(group, "_generators", {})
    label = rangeproof.LABEL_G
    true = [group.point_bytes(p) for p in group.generators(label, 2 * BLOCK)]
    path = group.cache_file(label)
    data = bytearray(path.read_bytes())
    assert len(data) == 2 * BLOCK * group.XY_BYTES
    swapped = bytes(group.G1Point.hash_to_curve(b"evil", b"x").to_xy_bytes_be())
    data[BLOCK * group.XY_BYTES + 5 * group.XY_BYTES:BLOCK * group.XY_BYTES + 6 * group.XY_BYTES] = swapped
    path.write_bytes(bytes(data))
    monkeypatch.setattr(group, "_generators", {})
    loaded = [group.point_bytes(p) for p in group.generators(label, 2 * BLOCK)]
    assert loaded == true
    assert group.point_bytes(group.G1Point.from_xy_bytes_unchecked_be(swapped)) not in loaded
    assert path.read_bytes()[: BLOCK * group.XY_BYTES] == bytes(data[: BLOCK * group.XY_BYTES])
    assert bytes(data) != path.read_bytes()  # the damaged block was written again, true
