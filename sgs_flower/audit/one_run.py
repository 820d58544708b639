"""The statistics of a one-run privacy audit (Steinke, Nasr, Jagielski 2023).

Why this test: m canaries are each put into the training run with probability 1/2,
independently; afterwards the auditor guesses, for r of them, whether they were in.
If the run is (epsilon, delta)-DP, the number of correct guesses is (up to a delta
term) stochastically dominated by Binomial(r, e^eps / (1 + e^eps)) -- each guess is no
better than randomized response. So many correct guesses *refute* small epsilons,
and the largest epsilon refuted at confidence 1 - beta is a valid lower bound on the
true epsilon, from a single training run.

Implemented from the paper's Theorem 3.1/Appendix D (our own code): the p-value of
"v or more correct out of r, from m canaries" under (eps, delta)-DP is
P[Binomial(r, q) >= v] + 2 m delta max_{1<=i<=v} P[v - i <= Binomial(r, q) < v] / i,
with q = 1 / (1 + e^-eps).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of >= v correct guesses out of r under an (epsilon, delta)-DP null."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(tail, 1.0)
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, q)  # P[B = v-1], P[B = v-2], ...
    alpha = float(np.max(np.cumsum(below) / np.arange(1, v + 1)))
    return min(tail + 2.0 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float = 0.05) -> float:
    """Largest epsilon that v correct guesses out of r refute at confidence 1 - beta (0 if none)."""
    if not 0 < beta < 1:
        raise ValueError(f"beta must be in (0, 1), got {beta}")
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, 2 * hi
        if hi > 1e3:
            return lo
    for _ in range(50):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class GuessOutcome:
    """The best abstaining guess found: k_pos 'in' and k_neg 'out' guesses, v correct."""

    epsilon_lower: float
    k_pos: int
    k_neg: int
    correct: int


def audit_scores(
    scores: np.ndarray,
    included: np.ndarray,
    delta: float,
    beta: float = 0.05,
    guess_counts: Sequence[int] | None = None,
) -> GuessOutcome:
    """Guess 'in' for the k highest scores and 'out' for the k lowest; best k wins.

    Trying several k and keeping the best is a multiple comparison, so each try is
    tested at beta / (number of tries) (Bonferroni): the reported bound stays valid.
    """
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    if m == 0 or included.shape != scores.shape:
        raise ValueError("scores and included must be non-empty and of equal length")
    ks = sorted({k for k in (guess_counts or _default_counts(m)) if 1 <= k <= m // 2})
    if not ks:
        raise ValueError(f"no usable guess count for m={m}")
    order = np.argsort(scores)
    best = GuessOutcome(0.0, 0, 0, 0)
    for k in ks:
        correct = int(included[order[-k:]].sum() + (~included[order[:k]]).sum())
        eps = epsilon_lower_bound(m, 2 * k, correct, delta, beta / len(ks))
        if eps > best.epsilon_lower:
            best = GuessOutcome(eps, k, k, correct)
    return best


def _default_counts(m: int) -> list[int]:
    return [max(1, int(m * f)) for f in (0.005, 0.02, 0.05, 0.1, 0.25, 0.5)]
