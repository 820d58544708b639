"""Canary audit of a DP training run: an empirical lower bound on epsilon, from one run.

Why: an accountant's epsilon is only as true as the code it describes. If a refactor
drops the noise, or clips after summing, the ledger still says epsilon = 8. This audit
measures instead. It runs federated training with the DP aggregation (each update
clipped to ``clip_norm``, Gaussian noise of std ``z * clip_norm`` on the sum) and, as in
Steinke, Nasr, Jagielski 2023, inserts m *canary gradients* -- Dirac updates
``clip_norm * e_j`` on distinct random coordinates, the strongest canaries a clipped
client can send -- each present (in every round) with probability 1/2. The server-side
auditor scores canary j by coordinate j of the released sums and guesses; the number
of correct guesses gives a lower bound (confidence 1 - beta) on epsilon, reported
beside the accounted one. An honest run's bound is below the accounted epsilon; a run
whose noise was removed separates the canaries perfectly and the bound exceeds it.

Limit, stated plainly: the delta term of the one-run test caps what m canaries can
prove (``epsilon_ceiling``: about 7.5 for m = 10^4..3*10^4 at delta = 1e-5, beta =
0.05). A broken run claiming epsilon above the ceiling cannot be *proven* broken by
this bound; the GDP estimate still flags it (it reads hundreds).

Alongside, a Gaussian-DP *estimate* (Andrew et al. 2023 style): the in/out score gap
in noise units is mu of a mu-GDP mechanism, converted to epsilon at delta. It is an
estimate under a Gaussian assumption, not a proof, and is labelled so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from sgs_flower import digits as task
from sgs_flower.audit.calibrate import epsilon_for_noise, noise_multiplier_for_epsilon
from sgs_flower.audit.observe import client_update, clip, flat
from sgs_flower.audit.one_run import audit_scores, epsilon_lower_bound

#: Smallest noise multiplier the GDP estimate converts (PLD needs memory ~ 1/z^2);
#: a larger measured mu is reported as the epsilon at this cap, still a lower figure.
_MIN_Z = 0.05


@dataclass(frozen=True)
class CanaryAuditResult:
    """Outcome of one audited run (``epsilon_lower`` holds with confidence 1 - beta)."""

    epsilon_accounted: float
    epsilon_lower: float
    epsilon_gdp_estimate: float
    delta: float
    beta: float
    noise_multiplier: float
    noise_applied: bool
    rounds: int
    canaries: int
    guesses: int
    correct: int
    epsilon_ceiling: float

    def as_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


def _canary_scores(
    *,
    rounds: int,
    n_clients: int,
    canaries: int,
    clip_norm: float,
    noise_std: float,
    lr: float,
    seed: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Run DP FedAvg with canaries; return (scores, inclusion bits)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    weights = task.get_weights(task.Net())
    shapes = [w.shape for w in weights]
    dim = sum(int(np.prod(s)) for s in shapes)
    if canaries > dim:
        raise ValueError(
            f"{canaries} Dirac canaries need distinct coordinates, the model has {dim}"
        )
    coords = rng.choice(dim, size=canaries, replace=False)
    included = rng.random(canaries) < 0.5
    canary_sum = np.zeros(dim)
    canary_sum[coords[included]] = clip_norm
    parts = [task.load_partition(i, n_clients) for i in range(n_clients)]
    scores = np.zeros(canaries)
    for rnd in range(rounds):
        total = canary_sum.copy()
        for cid, part in enumerate(parts):
            upd = client_update(
                weights, part.x, part.y, epochs=1, lr=lr, batch_size=32, seed=rnd * 1000 + cid
            )
            total += clip(upd, clip_norm)
        total += rng.normal(0.0, noise_std, size=dim) if noise_std > 0 else 0.0
        scores += total[coords]  # what the server sees of each canary's coordinate
        # DP-FedAvg with a fixed denominator (the real cohort size), McMahan et al. 2018.
        new = flat(weights) + total / n_clients
        weights, i = [], 0
        for s in shapes:
            k = int(np.prod(s))
            weights.append(new[i : i + k].reshape(s).astype(np.float32))
            i += k
    return scores, included


def gdp_epsilon_estimate(scores: np.ndarray, included: np.ndarray, delta: float) -> float:
    """Epsilon of the mu-GDP mechanism whose mu is the lower 95 % confidence end of the
    standardised in/out score gap (an estimate that assumes Gaussian scores)."""
    s_in, s_out = scores[included], scores[~included]
    pooled = float(np.sqrt((s_in.var(ddof=1) + s_out.var(ddof=1)) / 2))
    gap = float(s_in.mean() - s_out.mean())
    se = pooled * float(np.sqrt(1 / len(s_in) + 1 / len(s_out)))
    mu = (gap - 1.645 * se) / max(pooled, 1e-300)
    if mu <= 0:
        return 0.0
    return epsilon_for_noise(max(1.0 / mu, _MIN_Z), delta, 1)


def run_canary_audit(
    *,
    epsilon: float = 8.0,
    delta: float = 1e-5,
    rounds: int = 3,
    n_clients: int = 10,
    canaries: int = 10_000,
    clip_norm: float = 1.0,
    lr: float = 0.05,
    remove_noise: bool = False,
    beta: float = 0.05,
    seed: int = 0,
) -> CanaryAuditResult:
    """Audit a DP run calibrated to (epsilon, delta) over ``rounds`` full-participation rounds.

    ``remove_noise=True`` is the deliberately broken run: the accountant still claims
    ``epsilon`` but no noise is added; the audit must catch it.
    """
    z = noise_multiplier_for_epsilon(epsilon, delta, rounds)
    scores, included = _canary_scores(
        rounds=rounds,
        n_clients=n_clients,
        canaries=canaries,
        clip_norm=clip_norm,
        noise_std=0.0 if remove_noise else z * clip_norm,
        lr=lr,
        seed=seed,
    )
    # Guess on 1 %, 10 % or all canaries (all: the most a perfect separation can
    # prove); three tries, Bonferroni-corrected inside audit_scores.
    counts = [canaries // 200, canaries // 20, canaries // 2]
    outcome = audit_scores(scores, included, delta, beta, guess_counts=counts)
    return CanaryAuditResult(
        epsilon_accounted=epsilon_for_noise(z, delta, rounds),
        epsilon_lower=outcome.epsilon_lower,
        epsilon_gdp_estimate=gdp_epsilon_estimate(scores, included, delta),
        delta=delta,
        beta=beta,
        noise_multiplier=z,
        noise_applied=not remove_noise,
        rounds=rounds,
        canaries=canaries,
        guesses=outcome.k_pos + outcome.k_neg,
        correct=outcome.correct,
        epsilon_ceiling=epsilon_lower_bound(
            canaries, canaries, canaries, delta, beta / len(counts)
        ),
    )
