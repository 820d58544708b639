"""Immutable descriptions of privacy mechanisms ("events"), dp-accounting style.

Why events and not numbers: an accountant consumes *what happened* (a Gaussian with
noise multiplier z, sampled with probability q, ten times), never an epsilon someone
computed elsewhere. The ledger stores these events as JSON, so a restarted server, an
auditor, or a different accountant can replay the exact history and recompute the
spent budget instead of trusting a stored total.

Sensitivity conventions (all events describe ONE release of a sum over clients):

* ``GaussianEvent.noise_multiplier`` = noise standard deviation / L2 sensitivity.
* ``SkellamEvent`` describes the *aggregate* integer noise actually present in the
  released sum: per coordinate Sk(mu, mu) = Poisson(mu) - Poisson(mu), variance 2*mu,
  with the L1 and L2 sensitivities of the integer-valued sum (after scaling and
  rounding, see :func:`sgs_flower.dp.noise.skellam_sensitivities`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # loaded by to_dp_accounting only: see sgs_flower.dp's docstring
    import dp_accounting

EVENT_SCHEMA = 1


class EventError(ValueError):
    """An event is malformed or cannot be decoded."""


@dataclass(frozen=True)
class GaussianEvent:
    """One release of a sum with Gaussian noise of std ``noise_multiplier`` x sensitivity."""

    noise_multiplier: float

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise EventError(
                f"GaussianEvent.noise_multiplier must be finite and > 0, got {self.noise_multiplier}"
            )


@dataclass(frozen=True)
class SkellamEvent:
    """One release of an integer sum carrying Skellam noise Sk(mu, mu) per coordinate."""

    mu: float
    l1_sensitivity: float
    l2_sensitivity: float

    def __post_init__(self) -> None:
        for name in ("mu", "l1_sensitivity", "l2_sensitivity"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise EventError(f"SkellamEvent.{name} must be finite and > 0, got {value}")

    @property
    def variance(self) -> float:
        """Per-coordinate variance of the aggregate noise (2 * mu)."""
        return 2.0 * self.mu


@dataclass(frozen=True)
class NonPrivateEvent:
    """A release with no protection against this observer (epsilon = infinity).

    Used for the server view in central DP: the server adds the noise itself, so it
    has seen the noiseless sum.
    """


@dataclass(frozen=True)
class PoissonSampled:
    """``event`` run on a cohort where each client was included independently w.p. ``q``."""

    q: float
    event: Event

    def __post_init__(self) -> None:
        if not 0.0 < self.q <= 1.0:
            raise EventError(f"PoissonSampled.q must be in (0, 1], got {self.q}")


@dataclass(frozen=True)
class SampledWithoutReplacement:
    """``event`` run on a uniformly random cohort of exactly ``sample_size`` of ``population``.

    The matching neighbouring relation is *replace one* (the population size is
    public); see :mod:`sgs_flower.dp.accounting` for how the sensitivity changes.
    """

    population: int
    sample_size: int
    event: Event

    def __post_init__(self) -> None:
        if not 1 <= self.sample_size <= self.population:
            raise EventError(
                f"SampledWithoutReplacement needs 1 <= sample_size <= population, got "
                f"{self.sample_size} of {self.population}"
            )


@dataclass(frozen=True)
class Composed:
    """``event`` repeated ``count`` times (adaptive composition)."""

    event: Event
    count: int

    def __post_init__(self) -> None:
        if self.count < 1:
            raise EventError(f"Composed.count must be >= 1, got {self.count}")


Event = (
    GaussianEvent
    | SkellamEvent
    | NonPrivateEvent
    | PoissonSampled
    | SampledWithoutReplacement
    | Composed
)


def event_to_dict(event: Event) -> dict[str, Any]:
    """A JSON-able dict for ``event`` (nested events are nested dicts)."""
    match event:
        case GaussianEvent(noise_multiplier=z):
            return {"type": "gaussian", "noise_multiplier": float(z)}
        case SkellamEvent(mu=mu, l1_sensitivity=l1, l2_sensitivity=l2):
            return {
                "type": "skellam",
                "mu": float(mu),
                "l1_sensitivity": float(l1),
                "l2_sensitivity": float(l2),
            }
        case NonPrivateEvent():
            return {"type": "non_private"}
        case PoissonSampled(q=q, event=inner):
            return {"type": "poisson_sampled", "q": float(q), "event": event_to_dict(inner)}
        case SampledWithoutReplacement(population=n, sample_size=m, event=inner):
            return {
                "type": "sampled_without_replacement",
                "population": int(n),
                "sample_size": int(m),
                "event": event_to_dict(inner),
            }
        case Composed(event=inner, count=count):
            return {"type": "composed", "count": int(count), "event": event_to_dict(inner)}
    raise EventError(f"not an event: {event!r}")


def event_from_dict(data: dict[str, Any]) -> Event:
    """Inverse of :func:`event_to_dict`; raises :class:`EventError` naming what is wrong."""
    if not isinstance(data, dict) or "type" not in data:
        raise EventError(f"an event must be a dict with a 'type', got {data!r}")
    kind = data["type"]
    try:
        if kind == "gaussian":
            return GaussianEvent(float(data["noise_multiplier"]))
        if kind == "skellam":
            return SkellamEvent(
                float(data["mu"]), float(data["l1_sensitivity"]), float(data["l2_sensitivity"])
            )
        if kind == "non_private":
            return NonPrivateEvent()
        if kind == "poisson_sampled":
            return PoissonSampled(float(data["q"]), event_from_dict(data["event"]))
        if kind == "sampled_without_replacement":
            return SampledWithoutReplacement(
                int(data["population"]), int(data["sample_size"]), event_from_dict(data["event"])
            )
        if kind == "composed":
            return Composed(event_from_dict(data["event"]), int(data["count"]))
    except KeyError as exc:
        raise EventError(f"event of type {kind!r} is missing field {exc}") from exc
    raise EventError(f"unknown event type {kind!r}")


def to_dp_accounting(event: Event) -> dp_accounting.DpEvent:
    """The equivalent dp-accounting event, for events the library knows.

    Skellam has no dp-accounting event; accountants that support it handle it
    themselves, so asking for it here is an error.
    """
    import dp_accounting

    match event:
        case GaussianEvent(noise_multiplier=z):
            return dp_accounting.GaussianDpEvent(z)
        case NonPrivateEvent():
            return dp_accounting.NonPrivateDpEvent()
        case PoissonSampled(q=q, event=inner):
            return dp_accounting.PoissonSampledDpEvent(q, to_dp_accounting(inner))
        case SampledWithoutReplacement(population=n, sample_size=m, event=inner):
            return dp_accounting.SampledWithoutReplacementDpEvent(n, m, to_dp_accounting(inner))
        case Composed(event=inner, count=count):
            return dp_accounting.SelfComposedDpEvent(to_dp_accounting(inner), count)
    raise EventError(f"dp-accounting has no event for {event!r}")


def contains_skellam(event: Event) -> bool:
    """Whether ``event`` has a Skellam mechanism anywhere inside it."""
    match event:
        case SkellamEvent():
            return True
        case PoissonSampled(event=inner) | SampledWithoutReplacement(event=inner) | Composed(
            event=inner
        ):
            return contains_skellam(inner)
    return False
