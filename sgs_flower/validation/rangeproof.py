"""Aggregated Bulletproofs range proof (Bünz, Bootle, Boneh, Poelstra, Wuille, Maxwell 2018).

Statement: for Pedersen commitments ``V_j = v_j*G + s_j*H`` (j < m), the prover knows
openings with every ``v_j`` in ``[0, 2^n)``. One proof covers all m values (section 4.3
of the paper, "aggregating logarithmic proofs"); its size is
``(4 + 2*log2(n*m))`` points and 5 scalars whatever the values are.

Protocol (paper notation, 0-indexed blocks, N = n*m a power of two), made
non-interactive with :class:`~sgs_flower.validation.transcript.Transcript`:

1. a_L = bits of every v_j (block j holds v_j's n bits), a_R = a_L - 1.
   A = alpha*H + <a_L, g> + <a_R, h>;  S = rho*H + <s_L, g> + <s_R, h>.  -> y, z
2. l(X) = a_L - z + s_L X;  r(X) = y^N o (a_R + z + s_R X) + sum_j z^(2+j) 2^n|_block j.
   t(X) = <l(X), r(X)> = t0 + t1 X + t2 X^2;  T1 = t1 G + tau1 H, T2 = t2 G + tau2 H.  -> x
3. l = l(x), r = r(x), t_hat = <l, r>, tau_x = tau2 x^2 + tau1 x + sum_j z^(2+j) s_j,
   mu = alpha + rho x.  -> w, Q = w*U
4. Inner-product argument (protocol 2 of the paper, logarithmic) that l, r open
   P = A + xS - z<1,g> + <z y^N + z^(2+j) 2^n, h'> - mu H + t_hat Q over (g, h' = y^-i h_i).

Verification is ONE multi-scalar multiplication: the inner-product check
``P + sum(u_k^2 L_k + u_k^-2 R_k) == a<s, g> + b<s^-1, h'> + ab Q`` and the polynomial
check ``t_hat G + tau_x H == sum z^(2+j) V_j + delta(y,z) G + x T1 + x^2 T2`` (the second
weighted by a fresh random c from the verifier) are moved to one side and summed; the
sum is the identity only if both hold, except with probability 1/R over c.

Prover cost: folding the generators of the inner-product argument explicitly costs
one scalar multiplication per generator per round (~0.2 ms each through the Python
binding): seconds for N = 4096. Instead the prover keeps, for each original generator,
its coefficient in the folded one (a product of round challenges) and computes every
L_k, R_k as one MSM over the original generators; once the vectors are short it folds
the generators explicitly (one small MSM per folded generator), which is then cheaper.

Everything secret (alpha, rho, s_L, s_R, tau1, tau2) comes from :mod:`secrets`.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from sgs_flower.validation import group
from sgs_flower.validation.errors import ProofError
from sgs_flower.validation.group import POINT_BYTES, SCALAR_BYTES, G1Point, R
from sgs_flower.validation.transcript import Transcript

LABEL_G = b"bulletproofs/g"
LABEL_H = b"bulletproofs/h"
LABEL_PEDERSEN = b"pedersen/H"
LABEL_IPA = b"bulletproofs/U"
DOMAIN = b"sgs-flower/validation/rangeproof/v1"
#: When the inner-product vectors are this long (or shorter), fold the generators explicitly.
EXPLICIT_FOLD_AT = 64


def pedersen_g() -> G1Point:
    """G: the standard generator of G1 (values are committed on it)."""
    return G1Point()


def pedersen_h() -> G1Point:
    """H: a hash-to-curve point (blinds), with no known discrete log to G."""
    return group.generators(LABEL_PEDERSEN, 1)[0]


def commit(value: int, blind: int) -> bytes:
    """The Pedersen commitment ``value*G + blind*H`` (both mod R), compressed."""
    return group.point_bytes(group.msm([pedersen_g(), pedersen_h()], [value % R, blind % R]))


def proof_size(bits: int, count: int) -> int:
    """Bytes of a proof for ``count`` values of ``bits`` bits."""
    rounds = _check_shape(bits, count)
    return (4 + 2 * rounds) * POINT_BYTES + 5 * SCALAR_BYTES


def _check_shape(bits: int, count: int) -> int:
    """log2(bits*count); ProofError unless bits*count is a power of two."""
    if bits < 1 or bits > 128 or count < 1:
        raise ProofError(f"a range proof needs 1 <= bits <= 128 and >= 1 value, got bits={bits}, count={count}")
    total = bits * count
    if total & (total - 1):
        raise ProofError(
            f"bits*count = {bits}*{count} = {total} is not a power of two "
            "(the inner-product argument halves its vectors); pad the values"
        )
    return total.bit_length() - 1


def _rand() -> int:
    return secrets.randbelow(R - 1) + 1


def _inner(a: Sequence[int], b: Sequence[int]) -> int:
    return sum(x * y for x, y in zip(a, b, strict=True)) % R


def _powers(base: int, count: int) -> list[int]:
    out = [1] * count
    for i in range(1, count):
        out[i] = out[i - 1] * base % R
    return out


def _start(transcript: Transcript, bits: int, commitments: Sequence[bytes]) -> None:
    transcript.append(b"dom-sep", DOMAIN)
    transcript.append(b"bits", bits.to_bytes(4, "big"))
    transcript.append(b"count", len(commitments).to_bytes(4, "big"))
    for c in commitments:
        transcript.append(b"V", c)


def prove(
    values: Sequence[int], blinds: Sequence[int], bits: int, transcript: Transcript
) -> tuple[list[bytes], bytes]:
    """Commit to ``values`` under ``blinds`` and prove each is in [0, 2^bits).

    Refuses (ProofError) a value outside the range: an honest prover never makes a proof
    that cannot verify. Returns (commitments in order, proof bytes).
    """
    for j, v in enumerate(values):
        if not 0 <= v < 1 << bits:
            raise ProofError(f"value {j} is outside [0, 2^{bits}): no valid range proof exists for it")
    return _prove(values, blinds, bits, transcript)


def _prove(
    values: Sequence[int], blinds: Sequence[int], bits: int, transcript: Transcript
) -> tuple[list[bytes], bytes]:
    """The prover without the range check. For a value outside the range it still
    runs (decomposing the value's low bits), as a cheater's prover would; the proof then
    fails verification. Kept separate so tests can exercise exactly that."""
    m = len(values)
    if len(blinds) != m:
        raise ProofError(f"{m} values but {len(blinds)} blinds")
    _check_shape(bits, m)
    n_total = bits * m
    g_vec = group.generators(LABEL_G, n_total)
    h_vec = group.generators(LABEL_H, n_total)
    g_ped, h_ped = pedersen_g(), pedersen_h()
    u_base = group.generators(LABEL_IPA, 1)[0]

    commitments = [commit(v, s) for v, s in zip(values, blinds, strict=True)]
    _start(transcript, bits, commitments)

    a_l = [((v % R) >> i) & 1 for v in values for i in range(bits)]
    a_r = [(b - 1) % R for b in a_l]
    alpha, rho = _rand(), _rand()
    a_point = group.msm([h_ped], [alpha])
    for i, b in enumerate(a_l):
        a_point = a_point + g_vec[i] if b else a_point - h_vec[i]
    s_l = [_rand() for _ in range(n_total)]
    s_r = [_rand() for _ in range(n_total)]
    s_point = group.msm([h_ped, *g_vec, *h_vec], [rho, *s_l, *s_r])
    a_bytes, s_bytes = group.point_bytes(a_point), group.point_bytes(s_point)
    transcript.append(b"A", a_bytes)
    transcript.append(b"S", s_bytes)
    y = transcript.challenge(b"y")
    z = transcript.challenge(b"z")

    y_pow = _powers(y, n_total)
    two_pow = _powers(2, bits)
    z_block = [pow(z, 2 + j, R) for j in range(m)]
    l0 = [(b - z) % R for b in a_l]
    l1 = s_l
    r0 = [
        (y_pow[i] * (a_r[i] + z) + z_block[i // bits] * two_pow[i % bits]) % R for i in range(n_total)
    ]
    r1 = [y_pow[i] * s_r[i] % R for i in range(n_total)]
    t1 = (_inner(l0, r1) + _inner(l1, r0)) % R
    t2 = _inner(l1, r1)
    tau1, tau2 = _rand(), _rand()
    t1_bytes = group.point_bytes(group.msm([g_ped, h_ped], [t1, tau1]))
    t2_bytes = group.point_bytes(group.msm([g_ped, h_ped], [t2, tau2]))
    transcript.append(b"T1", t1_bytes)
    transcript.append(b"T2", t2_bytes)
    x = transcript.challenge(b"x")

    l_vec = [(a + x * b) % R for a, b in zip(l0, l1, strict=True)]
    r_vec = [(a + x * b) % R for a, b in zip(r0, r1, strict=True)]
    t_hat = _inner(l_vec, r_vec)
    tau_x = (tau2 * x * x + tau1 * x + sum(zb * s for zb, s in zip(z_block, blinds, strict=True))) % R
    mu = (alpha + rho * x) % R
    transcript.append(b"tau_x", group.scalar_bytes(tau_x))
    transcript.append(b"mu", group.scalar_bytes(mu))
    transcript.append(b"t_hat", group.scalar_bytes(t_hat))
    w = transcript.challenge(b"w")
    q_point = group.msm([u_base], [w])

    y_inv = pow(y, -1, R)
    h_coef = _powers(y_inv, n_total)  # h'_i = y^-i h_i
    ls, rs, a_fin, b_fin = _ipa_prove(transcript, g_vec, h_vec, [1] * n_total, h_coef, q_point, l_vec, r_vec)
    parts = [a_bytes, s_bytes, t1_bytes, t2_bytes]
    parts += [group.scalar_bytes(v) for v in (tau_x, mu, t_hat)]
    parts += ls + rs
    parts += [group.scalar_bytes(a_fin), group.scalar_bytes(b_fin)]
    return commitments, b"".join(parts)


def _ipa_prove(
    transcript: Transcript,
    g_orig: list[G1Point],
    h_orig: list[G1Point],
    g_coef: list[int],
    h_coef: list[int],
    q_point: G1Point,
    a: list[int],
    b: list[int],
) -> tuple[list[bytes], list[bytes], int, int]:
    """Protocol 2 of the paper: prove <a, g'> + <b, h'> + <a,b> Q for the folded bases.

    While the vectors are long, the folded generator at position p is
    sum over originals t = p (mod n) of coef[t] * orig[t]: each L, R is an MSM over the
    originals with coefficient-weighted scalars. When n <= EXPLICIT_FOLD_AT the current
    generators are materialised (one MSM each) and folded explicitly from then on.
    """
    n_orig = len(a)
    n = n_orig
    ls: list[bytes] = []
    rs: list[bytes] = []
    g_cur: list[G1Point] | None = None  # explicit generators, once materialised
    h_cur: list[G1Point] | None = None
    while n > 1:
        if g_cur is None and n <= EXPLICIT_FOLD_AT:
            g_cur = [group.msm(g_orig[p::n], g_coef[p::n]) for p in range(n)]
            h_cur = [group.msm(h_orig[p::n], h_coef[p::n]) for p in range(n)]
        half = n // 2
        a_lo, a_hi, b_lo, b_hi = a[:half], a[half:], b[:half], b[half:]
        c_l, c_r = _inner(a_lo, b_hi), _inner(a_hi, b_lo)
        if g_cur is not None and h_cur is not None:
            l_pt = group.msm([*g_cur[half:], *h_cur[:half], q_point], [*a_lo, *b_hi, c_l])
            r_pt = group.msm([*g_cur[:half], *h_cur[half:], q_point], [*a_hi, *b_lo, c_r])
        else:
            # originals t with t mod n >= half feed g'_hi; those with t mod n < half feed g'_lo
            hi_idx = [t for t in range(n_orig) if t % n >= half]
            lo_idx = [t for t in range(n_orig) if t % n < half]
            l_pt = group.msm(
                [*(g_orig[t] for t in hi_idx), *(h_orig[t] for t in lo_idx), q_point],
                [
                    *(a_lo[t % n - half] * g_coef[t] for t in hi_idx),
                    *(b_hi[t % n] * h_coef[t] for t in lo_idx),
                    c_l,
                ],
            )
            r_pt = group.msm(
                [*(g_orig[t] for t in lo_idx), *(h_orig[t] for t in hi_idx), q_point],
                [
                    *(a_hi[t % n] * g_coef[t] for t in lo_idx),
                    *(b_lo[t % n - half] * h_coef[t] for t in hi_idx),
                    c_r,
                ],
            )
        l_bytes, r_bytes = group.point_bytes(l_pt), group.point_bytes(r_pt)
        ls.append(l_bytes)
        rs.append(r_bytes)
        transcript.append(b"L", l_bytes)
        transcript.append(b"R", r_bytes)
        u = transcript.challenge(b"u")
        u_inv = pow(u, -1, R)
        a = [(lo * u + hi * u_inv) % R for lo, hi in zip(a_lo, a_hi, strict=True)]
        b = [(lo * u_inv + hi * u) % R for lo, hi in zip(b_lo, b_hi, strict=True)]
        if g_cur is not None and h_cur is not None:
            g_cur = [
                group.msm([gl, gh], [u_inv, u]) for gl, gh in zip(g_cur[:half], g_cur[half:], strict=True)
            ]
            h_cur = [
                group.msm([hl, hh], [u, u_inv]) for hl, hh in zip(h_cur[:half], h_cur[half:], strict=True)
            ]
        else:
            g_coef = [c * (u_inv if t % n < half else u) % R for t, c in enumerate(g_coef)]
            h_coef = [c * (u if t % n < half else u_inv) % R for t, c in enumerate(h_coef)]
        n = half
    return ls, rs, a[0], b[0]


def _parse(proof: bytes, rounds: int) -> tuple[list[G1Point], list[int], list[G1Point], list[G1Point], int, int, list[bytes]]:
    """Split proof bytes into points and scalars, every one validated."""
    expected = (4 + 2 * rounds) * POINT_BYTES + 5 * SCALAR_BYTES
    if len(proof) != expected:
        raise ProofError(f"range proof has {len(proof)} bytes, expected {expected} for {rounds} rounds")
    off = 0

    def take(size: int) -> bytes:
        nonlocal off
        chunk = proof[off : off + size]
        off += size
        return chunk

    raw_points = [take(POINT_BYTES) for _ in range(4)]
    firsts = [group.point_from(p) for p in raw_points]
    scalars = [group.scalar_from(take(SCALAR_BYTES)) for _ in range(3)]
    raw_l = [take(POINT_BYTES) for _ in range(rounds)]
    raw_r = [take(POINT_BYTES) for _ in range(rounds)]
    l_pts = [group.point_from(p) for p in raw_l]
    r_pts = [group.point_from(p) for p in raw_r]
    a_fin = group.scalar_from(take(SCALAR_BYTES))
    b_fin = group.scalar_from(take(SCALAR_BYTES))
    return firsts, scalars, l_pts, r_pts, a_fin, b_fin, [*raw_points, *raw_l, *raw_r]


_FAIL = (
    "range proof does not verify: a value is outside the range, the proof was "
    "tampered with, or it was made for other commitments or another context"
)


def _terms(
    commitments: Sequence[bytes], proof: bytes, bits: int, transcript: Transcript, weight: int
) -> tuple[list[int], list[int], list[G1Point], list[int]]:
    """The verification equation of one proof, times ``weight``, as MSM terms:
    (scalars on g, scalars on h, the proof's own points, their scalars), where the
    sum is the identity iff the proof verifies (but for probability 1/R over the
    verifier's random c). G, H and U come first among the own points."""
    m = len(commitments)
    rounds = _check_shape(bits, m)
    n_total = bits * m
    v_pts = [group.point_from(c) for c in commitments]
    firsts, (tau_x, mu, t_hat), l_pts, r_pts, a_fin, b_fin, raw = _parse(bytes(proof), rounds)
    a_pt, s_pt, t1_pt, t2_pt = firsts
    raw_a, raw_s, raw_t1, raw_t2 = raw[:4]
    raw_l, raw_r = raw[4 : 4 + rounds], raw[4 + rounds :]

    _start(transcript, bits, [bytes(c) for c in commitments])
    transcript.append(b"A", raw_a)
    transcript.append(b"S", raw_s)
    y = transcript.challenge(b"y")
    z = transcript.challenge(b"z")
    transcript.append(b"T1", raw_t1)
    transcript.append(b"T2", raw_t2)
    x = transcript.challenge(b"x")
    transcript.append(b"tau_x", group.scalar_bytes(tau_x))
    transcript.append(b"mu", group.scalar_bytes(mu))
    transcript.append(b"t_hat", group.scalar_bytes(t_hat))
    w = transcript.challenge(b"w")
    us: list[int] = []
    for lb, rb in zip(raw_l, raw_r, strict=True):
        transcript.append(b"L", lb)
        transcript.append(b"R", rb)
        us.append(transcript.challenge(b"u"))

    # s_i = prod_k u_k^(+1 if bit (rounds-1-k) of i is set else -1): round k splits on that bit
    u_inv = [pow(u, -1, R) for u in us]
    s = [1] * n_total
    first = 1
    for ui in u_inv:
        first = first * ui % R
    s[0] = first
    u_sq = [u * u % R for u in us]
    for i in range(1, n_total):
        # i = prefix + 2^j with j its highest set bit: flip round (rounds-1-j) from u^-1 to u
        j = i.bit_length() - 1
        s[i] = s[i - (1 << j)] * u_sq[rounds - 1 - j] % R
    # s_i^-1 = s_(N-1-i): complementing every bit of i inverts every factor

    y_inv = pow(y, -1, R)
    y_inv_pow = _powers(y_inv, n_total)
    two_pow = _powers(2, bits)
    z_block = [pow(z, 2 + j, R) for j in range(m)]
    sum_y = sum(_powers(y, n_total)) % R
    sum_two = (1 << bits) - 1
    delta = ((z - z * z) * sum_y - sum(zb * z for zb in z_block) * sum_two) % R
    c = _rand()  # verifier's own randomness: weight of the polynomial check

    e = weight
    g_scalars = [e * (a_fin * s[i] + z) % R for i in range(n_total)]
    h_scalars = [
        e * (y_inv_pow[i] * (b_fin * s[n_total - 1 - i] - z_block[i // bits] * two_pow[i % bits]) - z) % R
        for i in range(n_total)
    ]
    points: list[G1Point] = [
        pedersen_g(),
        pedersen_h(),
        group.generators(LABEL_IPA, 1)[0],
        a_pt,
        s_pt,
        t1_pt,
        t2_pt,
        *l_pts,
        *r_pts,
        *v_pts,
    ]
    scalars: list[int] = [
        c * (t_hat - delta),
        mu + c * tau_x,
        w * (a_fin * b_fin - t_hat),
        -1,
        -x,
        -c * x,
        -c * x * x,
        *(-u2 for u2 in u_sq),
        *(-ui * ui for ui in u_inv),
        *(-c * zb for zb in z_block),
    ]
    return g_scalars, h_scalars, points, [e * v % R for v in scalars]


def verify(commitments: Sequence[bytes], proof: bytes, bits: int, transcript: Transcript) -> None:
    """Check a proof that every committed value is in [0, 2^bits); ProofError if not.

    The transcript must be in the state the prover's was in when it called :func:`prove`
    (same label, same context appended), or the challenges differ and the proof fails.
    """
    g_sc, h_sc, own, own_sc = _terms(commitments, proof, bits, transcript, 1)
    n_total = len(g_sc)
    points = [*group.generators(LABEL_G, n_total), *group.generators(LABEL_H, n_total), *own]
    if group.msm(points, [*g_sc, *h_sc, *own_sc]) != G1Point.identity():
        raise ProofError(_FAIL)


def verify_many(
    statements: Sequence[tuple[Sequence[bytes], bytes, Transcript]], bits: int
) -> dict[int, ProofError]:
    """Verify many proofs with one MSM; returns {index: error} for those that fail.

    Each proof's equation is multiplied by a fresh random weight and all are summed:
    the g and h generators are shared, so their scalars add up and the MSM has
    2N + (own points per proof) terms instead of (2N + ...) per proof. If the sum is
    not the identity (some proof fails; a false pass has probability 1/R), the proofs
    are checked one by one to name the failing ones. Every statement must have the
    same number of commitments.
    """
    failures: dict[int, ProofError] = {}
    g_tot: list[int] | None = None
    h_tot: list[int] = []
    own_pts: list[G1Point] = []
    own_sc: list[int] = []
    kept: list[int] = []
    clones = [t.clone() for _, _, t in statements]  # for the one-by-one pass
    for idx, (commitments, proof, transcript) in enumerate(statements):
        try:
            g_sc, h_sc, pts, sc = _terms(commitments, proof, bits, transcript, _rand())
        except ProofError as exc:
            failures[idx] = exc
            continue
        if g_tot is None:
            g_tot, h_tot = g_sc, h_sc
        elif len(g_sc) != len(g_tot):
            failures[idx] = ProofError(f"statement {idx} has another number of commitments")
            continue
        else:
            g_tot = [(a + b) % R for a, b in zip(g_tot, g_sc, strict=True)]
            h_tot = [(a + b) % R for a, b in zip(h_tot, h_sc, strict=True)]
        own_pts += pts
        own_sc += sc
        kept.append(idx)
    if g_tot is None:
        return failures
    n_total = len(g_tot)
    points = [*group.generators(LABEL_G, n_total), *group.generators(LABEL_H, n_total), *own_pts]
    if group.msm(points, [*g_tot, *h_tot, *own_sc]) == G1Point.identity():
        return failures
    for idx in kept:
        commitments, proof, _ = statements[idx]
        try:
            verify(commitments, proof, bits, clones[idx])
        except ProofError as exc:
            failures[idx] = exc
    return failures


def warm_up(bits: int, count: int) -> None:
    """Derive (and cache) every generator a proof for ``count`` values of ``bits`` needs."""
    _check_shape(bits, count)
    group.generators(LABEL_G, bits * count)
    group.generators(LABEL_H, bits * count)
    pedersen_h()
    group.generators(LABEL_IPA, 1)
