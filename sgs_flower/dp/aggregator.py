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

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sgs_flower.dp.accounting import EpsilonPair, PrivacyAccountant, RoundEvents, round_events
from sgs_flower.dp.budget import PrivacyBudget
from sgs_flower.dp.calibrate import calibrate_noise
from sgs_flower.dp.config import DPConfig
from sgs_flower.dp.events import GaussianEvent
from sgs_flower.dp.ledger_accounting import record_abort, record_round, resume_accountant
from sgs_flower.dp.noise import (
    noise_headroom,
    noise_present,
    secure_rng,
    skellam_event,
    skellam_share_mu,
)
from sgs_flower.dp.site import dp_dimension
from sgs_flower.ledger.ledger import Ledger, RoundEntry
from sgs_flower.secagg.errors import OverflowRiskError
from sgs_flower.secagg.quantize import MAX_FIELD_BITS, MIN_FIELD_BITS
from sgs_flower.secagg.wire import CRYPTO_SUITE, PROTOCOL_VERSION

# numpy's Poisson sampler loses accuracy for very large means (measured here: variance
# 1.2x too large at 2.8e14, exact to 0.5 % up to 1e11). The fixed point is therefore no
# finer than needed to keep each client's Skellam parameter at or below this.
MAX_MU_SHARE = 1e10
#: Central DP's word width unless fixed: the sum is released in real units with the
#: server's Gaussian noise, so its fixed point only needs to be far finer than that noise.
CENTRAL_FIELD_BITS = 32


#: Under a per-round width, the fixed point is the coarsest whose stochastic rounding
#: adds at most this fraction to the L2 sensitivity (``sqrt(dim) / levels``, see
#: :func:`sgs_flower.dp.noise.rounded_l2_bound`): the noise calibrated for a target epsilon
#: grows with the sensitivity, so 1 % here is at most 1 % more noise than at 32 bits.
DDP_ROUNDING_OVERHEAD = 0.01
#: ... and whose rounding error on the sum has at most this fraction of the noise's std
#: (so at most 0.5 % more error than the noise alone; binds only for a tiny noise multiplier).
DDP_ROUNDING_NOISE_FRACTION = 0.1


@dataclass(frozen=True)
class DDPQuantization:
    bits_per_coordinate: int
    levels: int
    scale: float
    noise_headroom: int
    mu_share: float


def _ddp_at(
    precision: int, noise_multiplier: float, clip_norm: float, cohort: int, min_survivors: int
) -> tuple[DDPQuantization, int]:
    """The fixed point of ``precision`` bits and the largest magnitude the cohort's sum
    plus its noise reaches (12 sigma of all ``cohort`` shares, each calibrated so that
    ``min_survivors`` of them carry the target std ``z * levels``)."""
    levels = (1 << (precision - 1)) - 1
    mu = skellam_share_mu((noise_multiplier * levels) ** 2, min_survivors)
    headroom = noise_headroom(mu, cohort)  # what every site re-derives from the spec
    return DDPQuantization(precision, levels, levels / clip_norm, headroom, mu), cohort * levels + headroom


def ddp_quantization(
    noise_multiplier: float, clip_norm: float, cohort: int, min_survivors: int, field_bits: int
) -> DDPQuantization:
    """The finest fixed point at which the cohort's sum plus its noise cannot wrap
    (and each share's Skellam parameter stays where numpy samples it exactly), for a
    word width fixed by the configuration.

    The target noise std of the sum is ``z * clip_norm`` in real units, i.e. ``z * L``
    in integer units at scale ``L / clip_norm``. All ``cohort`` shares could survive,
    so the headroom covers ``cohort / min_survivors`` times the target variance.
    """
    half = 1 << (field_bits - 1)
    for p in range(min(field_bits, 53), 1, -1):
        q, reach = _ddp_at(p, noise_multiplier, clip_norm, cohort, min_survivors)
        if reach < half and q.mu_share <= MAX_MU_SHARE:
            return q
    raise OverflowRiskError(
        f"a {field_bits}-bit field cannot hold {cohort} clipped updates plus noise "
        f"(z={noise_multiplier}); raise field_bits"
    )


def ddp_narrow_quantization(
    noise_multiplier: float, clip_norm: float, cohort: int, min_survivors: int, dim: int,
    overhead: float = DDP_ROUNDING_OVERHEAD,
) -> tuple[int, DDPQuantization]:
    """The word width and fixed point of a distributed-DP round whose width is chosen
    per round (issue 21.2): the coarsest fixed point whose rounding costs at most
    ``overhead`` of the sensitivity, in the narrowest word that holds the cohort's sum
    *and its noise* (``NOISE_SIGMAS`` standard deviations of all ``cohort`` shares).

    Why the precision follows the dimension and not the width: the released sum carries
    noise of std ``z * levels`` in integer units, far above the rounding's own error
    (at most 1/4 per share and coordinate), so extra fixed-point bits buy no accuracy;
    what rounding does cost is the sensitivity the accountant must assume,
    ``levels + sqrt(dim)`` instead of ``levels``. The precision is therefore fixed by
    ``dim`` (by ``z`` only for a tiny ``z``, whose noise would not drown the rounding
    error, ``DDP_ROUNDING_NOISE_FRACTION``, or a huge one whose share would leave numpy's
    exact range, ``MAX_MU_SHARE``), and
    the width by the cohort and the noise: both sides re-derive the overflow bound from
    the spec, and a site checks the headroom against the noise its shares carry
    (:class:`~sgs_flower.pipeline.UpdateSpec`), so a width that wraps is refused, never
    released. Nothing wraps here (Kairouz et al. 2021's modular clipping is not needed:
    the headroom is sized for the noise, not gambled on it).
    """
    if not 0 < overhead < 1:
        raise ValueError(f"overhead must be in (0, 1), got {overhead}")
    if noise_multiplier <= 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    # rounding: at most `overhead` of the sensitivity, and its error on the sum (std at
    # most sqrt(cohort) / 2 integer units) at most DDP_ROUNDING_NOISE_FRACTION of the
    # noise's std (z * levels) -- the second binds only for a tiny z (a near-noiseless run)
    need = max(math.sqrt(dim) / overhead, math.sqrt(cohort) / (2 * DDP_ROUNDING_NOISE_FRACTION * noise_multiplier))
    precision = 2
    while (1 << (precision - 1)) - 1 < need and precision < 53:
        precision += 1
    # A very large noise multiplier (the calibration's upper bracket) would ask numpy for
    # shares it cannot sample exactly: coarsen the fixed point instead. The accountant
    # charges the larger rounding term of the coarser point, so epsilon stays exact.
    for p in range(precision, 1, -1):
        q, reach = _ddp_at(p, noise_multiplier, clip_norm, cohort, min_survivors)
        if q.mu_share <= MAX_MU_SHARE:
            break
    else:
        raise OverflowRiskError(
            f"no fixed point keeps the noise share of z={noise_multiplier} below mu={MAX_MU_SHARE:g} "
            "(numpy's exact range); lower the noise multiplier"
        )
    for bits in range(MIN_FIELD_BITS, MAX_FIELD_BITS + 1):
        if reach < 1 << (bits - 1):
            return bits, q
    raise OverflowRiskError(
        f"no field up to {MAX_FIELD_BITS} bits holds {cohort} clipped updates plus noise (z={noise_multiplier}) at "
        f"{q.bits_per_coordinate} bits of fixed point; lower the cohort or the noise"
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
    field_bits: int  # the round's word width (chosen per round unless the configuration fixes it)


class DPAggregator:
    """See the module docstring. ``mode`` is ``central-dp`` or ``distributed-dp``.

    ``field_bits``: the word width of every round, or 0 (the default) for the
    narrowest per round (:func:`ddp_narrow_quantization` under distributed DP; central
    DP releases a real-valued sum: 32 bits, as its clip needs no fixed point finer)."""

    def __init__(
        self,
        dp: DPConfig,
        *,
        field_bits: int = 0,
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

    def _events(
        self, z: float, cohort: int, population: int, model_size: int
    ) -> tuple[RoundEvents, dict[str, Any], float, int]:
        dp = self.dp
        assert dp.clip_norm is not None
        if self.central:
            fields: dict[str, Any] = dict(dp_mode="central", l2_clip=dp.clip_norm, clip_range=dp.clip_norm)
            events = round_events(
                GaussianEvent(z), server_adds_noise=True, sampling=dp.sampling, population=population, cohort_size=cohort
            )
            return events, fields, 0.0, self.field_bits or CENTRAL_FIELD_BITS
        min_surv = self.min_survivors(cohort)
        dim = dp_dimension(model_size, dp.rotate)
        if self.field_bits:
            bits, q = self.field_bits, ddp_quantization(z, dp.clip_norm, cohort, min_surv, self.field_bits)
        else:
            bits, q = ddp_narrow_quantization(z, dp.clip_norm, cohort, min_surv, dim)
        noise = noise_present(q.mu_share, min_surv, min_surv)
        mech = skellam_event(noise, dp.clip_norm * q.scale, dim)
        fields = dict(
            dp_mode="distributed", l2_clip=dp.clip_norm, clip_range=dp.clip_norm,
            bits_per_coordinate=q.bits_per_coordinate, noise_headroom=q.noise_headroom, noise_mu_share=q.mu_share,
            min_survivors=min_surv,
        )
        events = round_events(mech, server_adds_noise=False, sampling=dp.sampling, population=population, cohort_size=cohort)
        return events, fields, q.scale, bits

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
        events, fields, scale, bits = self._events(z, cohort, population, model_size)
        if not self.central and self.dp.rotate:
            fields["rotation_seed"] = int.from_bytes(os.urandom(4), "big")
        if self.budget is not None:
            self.budget.check_round(self.accountant, events)
        return RoundPlan(server_round, cohort, population, model_size, z, self.min_survivors(cohort), fields, events, scale,
                         bits)

    # ------------------------------------------------------------ release
    def release(
        self,
        plan: RoundPlan,
        summed: np.ndarray,
        survivors: int,
        dropouts: int,
        rng: np.random.Generator | None = None,
        groups: Mapping[str, Any] | None = None,
    ) -> np.ndarray:
        """Noise (central), account, write the ledger, then return the mean delta.

        ``summed`` is the decoded sum of the survivors' clipped updates (with their
        noise shares in distributed DP), in model coordinates. ``groups``: under
        participation in whole groups, which groups the sum is over and how many updates
        partial groups cost (kept in the ledger entry's ``extra``, so the hash chain
        covers it: a later claim about which groups were summed can be checked).
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
                "field_bits": plan.field_bits, "bits_per_coordinate": plan.spec_fields["bits_per_coordinate"],
            }
        self.accountant.compose_round(events)
        if self.ledger is not None:
            entry = self._entry(plan, survivors, dropouts, noise_rec, events)
            if groups is not None:
                entry = dataclasses.replace(entry, extra={**entry.extra, "groups": dict(groups)})
            record_round(self.ledger, entry, self.accountant)
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
