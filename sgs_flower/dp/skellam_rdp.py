"""Published RDP bounds for the Skellam mechanism, which no library accountant covers.

* Skellam mechanism: Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially
  Private Federated Learning", NeurIPS 2021 (arXiv:2110.04995), Theorem 3.5. For an
  integer-valued query with L1 sensitivity D1 and L2 sensitivity D2 and independent
  Sk(mu, mu) noise on every coordinate, for every order alpha > 1:

      eps(alpha) <= alpha*D2^2/(4*mu)
                    + min( ((2*alpha - 1)*D2^2 + 6*D1) / (16*mu^2),  3*D1/(4*mu) )

  The first term is exactly the RDP of a Gaussian with the same variance (2*mu), so
  the bound tends to the Gaussian one as mu grows; tests check that.

* Poisson subsampling of a *generic* mechanism: Zhu & Wang, "Poisson Subsampled
  Renyi Differential Privacy", ICML 2019, Theorem 6 (integer alpha >= 2, add/remove
  neighbours). It is an upper bound for any mechanism given its RDP curve, so it is
  valid for Skellam (and, being generic, looser than the tight Gaussian analysis the
  libraries use for Gaussians).

Composition and the RDP-to-(epsilon, delta) conversion are left to dp-accounting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.special import gammaln, logsumexp


def skellam_rdp(orders: Sequence[float] | np.ndarray, mu: float, l1: float, l2: float) -> np.ndarray:
    """RDP of one Skellam release at each order (Agarwal et al. 2021, Thm 3.5).

    Orders below 2 or not integral get +inf: the subsampling bound below only exists
    at integer orders and we keep one order grid for both, which only costs tightness.
    """
    out = np.full(len(orders), np.inf)
    for i, alpha in enumerate(orders):
        if alpha >= 2 and float(alpha).is_integer():
            gaussian_part = alpha * l2 * l2 / (4.0 * mu)
            correction = min(
                ((2 * alpha - 1) * l2 * l2 + 6 * l1) / (16.0 * mu * mu),
                3.0 * l1 / (4.0 * mu),
            )
            out[i] = gaussian_part + correction
    return out


def _log_comb(n: int, k: np.ndarray) -> np.ndarray:
    return gammaln(n + 1) - gammaln(k + 1) - gammaln(n - k + 1)


def poisson_subsampled_rdp(
    orders: Sequence[float] | np.ndarray, q: float, base_rdp: np.ndarray
) -> np.ndarray:
    """Zhu & Wang (2019) Thm 6 upper bound on the RDP of a Poisson-subsampled mechanism.

    ``base_rdp[i]`` is the mechanism's RDP at ``orders[i]``. The bound at order alpha
    needs the base RDP at every integer order 2..alpha, so those must be on the grid;
    orders where they are not (or are infinite) get +inf, which is safe.
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"q must be in (0, 1], got {q}")
    base = {float(a): float(r) for a, r in zip(orders, base_rdp, strict=True)}
    if q == 1.0:
        return np.asarray(base_rdp, dtype=float).copy()
    log_q, log_1mq = math.log(q), math.log1p(-q)
    out = np.full(len(orders), np.inf)
    for i, alpha in enumerate(orders):
        if alpha < 2 or not float(alpha).is_integer():
            continue
        a = int(alpha)
        eps_at = [base.get(float(j), math.inf) for j in range(2, a + 1)]
        if not all(math.isfinite(e) for e in eps_at):
            continue
        terms = [(a - 1) * log_1mq + math.log(a * q - q + 1)]
        terms.append(float(_log_comb(a, np.array(2))) + 2 * log_q + (a - 2) * log_1mq + eps_at[0])
        if a >= 3:
            ell = np.arange(3, a + 1)
            eps_l = np.array(eps_at[1:])
            terms.extend(
                (
                    math.log(3.0)
                    + _log_comb(a, ell)
                    + ell * log_q
                    + (a - ell) * log_1mq
                    + (ell - 1) * eps_l
                ).tolist()
            )
        bound = float(logsumexp(terms)) / (a - 1)
        # Subsampling never hurts: keep the unsampled value if it is smaller.
        out[i] = min(bound, base[float(alpha)])
    return out
