"""Server-side user-level DP around secure aggregation, with no Flower.

:class:`DPAggregator` decides each round's DP parameters (the :class:`RoundPlan`:
clip norm, fixed-point scale, noise shares, rotation seed), refuses a round that would
exceed the budget *before* it runs, and at release time adds the central noise (if
any), accounts the noise actually present, and writes the ledger record before the
aggregate is returned. The Flower strategy and the in-process study
(``scripts/dp_utility.py``) both use it, so they cannot disagree.

Weights: under DP every client counts once. The server releases ``(sum + noise) / n``
where ``sum`` is the sum of clipped deltas and ``n`` the number of survivors, so one
client changes the sum by at most ``clip_norm`` (add/remove) whatever its
``num-examples``, which is the sensitivity the accountant assumes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from sgs_flower.dp.accounting import EpsilonPair, PrivacyAccountant, RoundEvents, round_events
from sgs_flower.dp.budget import PrivacyBudget
from sgs_flower.dp.calibrate import calibrate_noise
from sgs_flower.dp.config import DPConfig
from sgs_flower.dp.events import GaussianEvent
from sgs_flower.dp.ledger_accounting import record_abort, record_round, resume_accountant
from sgs_flower.dp.noise import noise_present, secure_rng, skellam_event, skellam_share_mu
from sgs_flower.dp.site import dp_dimension
from sgs_flower.ledger.ledger import Ledger, RoundEntry
from sgs_flower.secagg.errors import OverflowRiskError
from sgs_flower.secagg.wire import CRYPTO_SUITE, PROTOCOL_VERSION

# Integer-domain noise is kept within this many standard deviations of the field's
# range: the probability that it wraps around mod 2^b is below 1e-30 per coordinate.
NOISE_SIGMAS = 12.0
# numpy's Poisson sampler loses accuracy for very large means (measured here: variance
# 1.2x too large at 2.8e14, exact to 0.5 % up to 1e11). The fixed point is therefore no
# finer than needed to keep each client's Skellam parameter at or below this.
MAX_MU_SHARE = 1e10


@dataclass(frozen=True)
class DDPQuantization:
    bits_per_coordinate: int
    levels: int
    scale: float
    noise_headroom: int
    mu_share: float


def ddp_quantization(
    noise_multiplier: float, clip_norm: float, cohort: int, min_survivors: int, field_bits: int
) -> DDPQuantization:
    """The finest fixed point at which the cohort's sum plus its noise cannot wrap
    (and each share's Skellam parameter stays where numpy samples it exactly).

    The target noise std of the sum is ``z * clip_norm`` in real units, i.e. ``z * L``
    in integer units at scale ``L / clip_norm``. All ``cohort`` shares could survive,
    so the headroom covers ``cohort / min_survivors`` times the target variance.
    """
    half = 1 << (field_bits - 1)
    for p in range(min(field_bits, 53), 1, -1):
        levels = (1 << (p - 1)) - 1
        sigma_max = noise_multiplier * levels * math.sqrt(cohort / min_survivors)
        headroom = math.ceil(NOISE_SIGMAS * sigma_max)
        mu = skellam_share_mu((noise_multiplier * levels) ** 2, min_survivors)
        if cohort * levels + headroom < half and mu <= MAX_MU_SHARE:
            return DDPQuantization(p, levels, levels / clip_norm, headroom, mu)
    raise OverflowRiskError(
        f"a {field_bits}-bit field cannot hold {cohort} clipped updates plus noise "
        f"(z={noise_multiplier}); raise field_bits"
    )


@dataclass(frozen=True)
class RoundPlan:
    """One round's DP parameters, fixed before the round runs."""

    server_round: int
    cohort: int
    population: int
    model_size: int
    noise_multiplier: float
    min_survivors: int
    spec_fields: dict[str, Any]
    planned: RoundEvents
    scale: float


class DPAggregator:
    """See the module docstring. ``mode`` is ``central-dp`` or ``distributed-dp``."""

    def __init__(
        self,
        dp: DPConfig,
        *,
        field_bits: int = 32,
        ledger_path: str | os.PathLike[str] | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        if dp.mode not in ("central-dp", "distributed-dp"):
            raise ValueError(f"DPAggregator handles central-dp and distributed-dp, not {dp.mode!r}")
        self.dp = dp
        self.field_bits = field_bits
        self.config_hash = hashlib.sha256(
            json.dumps({"dp": dp.to_dict(), "config": config or {}}, sort_keys=True, default=str).encode()
        ).hexdigest()
        self.ledger = Ledger.open(ledger_path) if ledger_path else None
        if self.ledger is not None and self.ledger.round_records():
            self.accountant = resume_accountant(self.ledger, dp.accountant, dp.sampling)
        else:
            self.accountant = PrivacyAccountant(dp.accountant, dp.sampling)
        self.round_offset = self.ledger.last_round if self.ledger is not None else 0
        self.budget = PrivacyBudget(dp.max_epsilon, dp.delta, dp.budget_view) if dp.max_epsilon else None
        self._z: dict[tuple[int, int, int], float] = {}

    # ------------------------------------------------------------ planning
    @property
    def central(self) -> bool:
        return self.dp.mode == "central-dp"

    def spent(self) -> EpsilonPair:
        return self.accountant.epsilons(self.dp.delta)

    def _events(self, z: float, cohort: int, population: int, model_size: int) -> tuple[RoundEvents, dict[str, Any], float]:
        dp = self.dp
        assert dp.clip_norm is not None
        if self.central:
            fields: dict[str, Any] = dict(dp_mode="central", l2_clip=dp.clip_norm, clip_range=dp.clip_norm)
            scale = 0.0
            events = round_events(
                GaussianEvent(z), server_adds_noise=True, sampling=dp.sampling, population=population, cohort_size=cohort
            )
            return events, fields, scale
        min_surv = self.min_survivors(cohort)
        q = ddp_quantization(z, dp.clip_norm, cohort, min_surv, self.field_bits)
        dim = dp_dimension(model_size, dp.rotate)
        noise = noise_present(q.mu_share, min_surv, min_surv)
        mech = skellam_event(noise, dp.clip_norm * q.scale, dim)
        fields = dict(
            dp_mode="distributed", l2_clip=dp.clip_norm, clip_range=dp.clip_norm,
            bits_per_coordinate=q.bits_per_coordinate, noise_headroom=q.noise_headroom, noise_mu_share=q.mu_share,
            min_survivors=min_surv,
        )
        events = round_events(mech, server_adds_noise=False, sampling=dp.sampling, population=population, cohort_size=cohort)
        return events, fields, q.scale

    def min_survivors(self, cohort: int) -> int:
        m = self.dp.min_survivors or cohort
        if m > cohort:
            raise ValueError(f"min_survivors={m} exceeds the cohort of {cohort}: every round would abort")
        return m

    def noise_multiplier(self, cohort: int, population: int, model_size: int) -> float:
        """The configured z, or the one calibrated so ``rounds`` rounds reach the target."""
        dp = self.dp
        if dp.noise_multiplier is not None:
            return dp.noise_multiplier
        key = (cohort, population, model_size)
        if key not in self._z:
            assert dp.target_epsilon is not None and dp.rounds is not None
            neighbouring = "replace_one" if dp.sampling == "fixed" else "add_remove"
            kind = "rdp" if dp.sampling == "fixed" else dp.accountant
            self._z[key] = calibrate_noise(
                lambda z: self._events(z, cohort, population, model_size)[0].consumer,
                dp.target_epsilon, dp.delta, dp.rounds, kind, neighbouring,  # type: ignore[arg-type]
                low=0.05, high=500.0,
            )
        return self._z[key]

    def plan(self, server_round: int, cohort: int, population: int, model_size: int) -> RoundPlan:
        """Fix the round's DP parameters; raises BudgetExhaustedError if it would overspend."""
        z = self.noise_multiplier(cohort, population, model_size)
        events, fields, scale = self._events(z, cohort, population, model_size)
        if not self.central and self.dp.rotate:
            fields["rotation_seed"] = int.from_bytes(os.urandom(4), "big")
        if self.budget is not None:
            self.budget.check_round(self.accountant, events)
        return RoundPlan(server_round, cohort, population, model_size, z, self.min_survivors(cohort), fields, events, scale)

    # ------------------------------------------------------------ release
    def release(
        self,
        plan: RoundPlan,
        summed: np.ndarray,
        survivors: int,
        dropouts: int,
        rng: np.random.Generator | None = None,
    ) -> np.ndarray:
        """Noise (central), account, write the ledger, then return the mean delta.

        ``summed`` is the decoded sum of the survivors' clipped updates (with their
        noise shares in distributed DP), in model coordinates.
        """
        dp = self.dp
        assert dp.clip_norm is not None
        if self.central:
            std = plan.noise_multiplier * dp.clip_norm
            noisy = summed + (rng or secure_rng()).normal(0.0, std, size=summed.shape)
            events = plan.planned
            noise_rec: dict[str, Any] = {"mechanism": "gaussian", "noise_multiplier": plan.noise_multiplier, "std": std}
        else:
            present = noise_present(plan.spec_fields["noise_mu_share"], survivors, plan.min_survivors)
            mech = skellam_event(present, dp.clip_norm * plan.scale, dp_dimension(plan.model_size, dp.rotate))
            events = round_events(mech, server_adds_noise=False, sampling=dp.sampling,
                                  population=plan.population, cohort_size=plan.cohort)
            noisy = summed
            noise_rec = {
                "mechanism": "skellam", "survivors": survivors, "min_survivors": plan.min_survivors,
                "mu_share": present.mu_share, "total_mu": present.total_mu,
                "variance_integer": present.variance, "std_real": math.sqrt(present.variance) / plan.scale,
                "scale": plan.scale, "target_noise_multiplier": plan.noise_multiplier,
            }
        self.accountant.compose_round(events)
        if self.ledger is not None:
            record_round(self.ledger, self._entry(plan, survivors, dropouts, noise_rec, events), self.accountant)
        return noisy / survivors

    def abort(self, plan: RoundPlan | None, server_round: int, cohort: int, survivors: int, reason: str) -> None:
        """Record a round that released nothing (and spent nothing)."""
        if self.ledger is None:
            return
        entry = RoundEntry(
            round=self.round_offset + server_round, config_hash=self.config_hash, protocol_version=PROTOCOL_VERSION,
            crypto_suite=CRYPTO_SUITE, mode=self.dp.mode, cohort=cohort, survivors=survivors,
            dropouts=cohort - survivors, clip_norm=self.dp.clip_norm, noise={}, delta=self.dp.delta,
            aborted=True, abort_reason=reason,
        )
        record_abort(self.ledger, entry, self.accountant)

    def record_evaluation(self, server_round: int, metrics: dict[str, float]) -> None:
        if self.ledger is not None:
            self.ledger.append_evaluation(self.round_offset + server_round, metrics)

    def _entry(self, plan: RoundPlan, survivors: int, dropouts: int, noise: dict[str, Any], events: RoundEvents) -> RoundEntry:
        return RoundEntry(
            round=self.round_offset + plan.server_round, config_hash=self.config_hash,
            protocol_version=PROTOCOL_VERSION, crypto_suite=CRYPTO_SUITE, mode=self.dp.mode, cohort=plan.cohort,
            survivors=survivors, dropouts=dropouts, clip_norm=self.dp.clip_norm, noise=noise, delta=self.dp.delta,
            events=events.to_dict(), extra={"population": plan.population, "sampling": self.dp.sampling},
        )
