"""The aggregate opening, checked by the server after unmask.

Every survivor i committed V_ij = u_ij G + s_ij H with u_ij = scale*<a_j, x_i> + shift,
and put its blinds s_ij into its masked vector (in limbs, summed exactly by the
protocol). After unmask the server knows the sum X = sum_i x_i and sum_i s_ij, and
computes P_j = <a_j, X>. If every site masked the x_i it proved,

    sum_i V_ij == (scale*P_j + n*shift) G + (sum_i s_ij) H     for every j.

Binding of Pedersen commitments makes this fail when some site proved x' but masked
x != x' (unless <a_j, x - x'> = 0 for every j, probability <= 2^-k with the seed
drawn after x is fixed). The k equations are checked at once: with fresh random
weights rho_j, sum_j rho_j (lhs_j - rhs_j) is the identity only if every one holds,
except with probability 1/R. The per-j sums over sites are point additions (~1 us);
the weighted check is one small multi-scalar multiplication.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from sgs_flower.validation import group
from sgs_flower.validation.errors import OpeningError, ProofError
from sgs_flower.validation.group import G1Point, R
from sgs_flower.validation.projection import BoundParams
from sgs_flower.validation.proof import BoundProof
from sgs_flower.validation.rangeproof import pedersen_g, pedersen_h


def check_opening(
    proofs: Sequence[BoundProof],
    projected_sum: Sequence[int],
    count: int,
    summed_blinds: Sequence[int],
    params: BoundParams,
) -> None:
    """OpeningError unless the survivors' commitments open to the unmasked sum.

    ``proofs``: the survivors' (verified) proofs; ``projected_sum``: <a_j, sum x> for
    j < k; ``count``: the number of survivors n; ``summed_blinds``: sum_i s_ij as
    integers (reduced mod R here).
    """
    k = params.k
    if count != len(proofs) or count < 1:
        raise OpeningError(f"count {count} does not match the {len(proofs)} survivors' proofs")
    if len(projected_sum) != k or len(summed_blinds) != k:
        raise OpeningError(
            f"expected {k} projections and {k} summed blinds, got {len(projected_sum)} and {len(summed_blinds)}"
        )
    sums = [G1Point.identity() for _ in range(k)]
    for i, p in enumerate(proofs):
        if len(p.commitments) != k:
            raise OpeningError(f"survivor {i} has {len(p.commitments)} commitments, expected {k}")
        try:
            pts = [group.point_from(c) for c in p.commitments]
        except ProofError as exc:
            raise OpeningError(f"survivor {i}: {exc}") from exc
        sums = [s + q for s, q in zip(sums, pts, strict=True)]
    rho = [secrets.randbelow(R - 1) + 1 for _ in range(k)]
    # int(): numpy integers would overflow silently in these products
    g_coef = sum(
        r * (params.scale * int(pj) + count * params.shift) for r, pj in zip(rho, projected_sum, strict=True)
    )
    h_coef = sum(r * int(sb) for r, sb in zip(rho, summed_blinds, strict=True))
    total = group.msm([*sums, pedersen_g(), pedersen_h()], [*rho, -g_coef % R, -h_coef % R])
    if total != G1Point.identity():
        raise OpeningError(
            "aggregate opening failed: the survivors' commitments do not open to the unmasked "
            "sum (a site masked a vector other than the one it proved, or sent wrong blinds); "
            "release nothing from this round"
        )
