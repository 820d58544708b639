"""Privacy accountants with one small interface, backed by well-kept libraries.

Every accountant consumes :mod:`sgs_flower.dp.events` and answers ``get_epsilon``;
it knows nothing about models or rounds (Opacus style). Its ``state_dict`` is just
the event history plus how to interpret it, and ``load_state_dict`` *replays* the
events, so a stored state can never claim less spending than its history implies.

* :class:`RdpAccountant`: dp-accounting's RDP analysis for Gaussian events
  (Poisson or without-replacement sampling); the published Skellam bound
  (:mod:`sgs_flower.dp.skellam_rdp`) for the discrete mechanism; conversion to
  (epsilon, delta) by dp-accounting's ``compute_epsilon``.
* :class:`PldAccountant`: dp-accounting's privacy-loss-distribution accountant,
  tighter for Gaussians; it does not support Skellam and says so.

:class:`PrivacyAccountant` keeps the two views the project reports per round:
against the model's consumers (client sampling amplifies) and against the server
(it knows who was sampled: no amplification; in central DP it saw the noiseless sum).
"""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import dp_accounting
import numpy as np
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from sgs_flower.dp.events import (
    Composed,
    Event,
    EventError,
    GaussianEvent,
    NonPrivateEvent,
    PoissonSampled,
    SampledWithoutReplacement,
    SkellamEvent,
    contains_skellam,
    event_from_dict,
    event_to_dict,
    to_dp_accounting,
)
from sgs_flower.dp.skellam_rdp import poisson_subsampled_rdp, skellam_rdp

STATE_SCHEMA = 1
Neighboring = Literal["add_remove", "replace_one"]
AccountantKind = Literal["rdp", "pld"]
Sampling = Literal["poisson", "fixed"]

_RELATIONS = {
    "add_remove": dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
    "replace_one": dp_accounting.NeighboringRelation.REPLACE_ONE,
}


class UnsupportedEventError(ValueError):
    """This accountant has no sound analysis for the event (nothing was composed)."""


class AccountantStateError(ValueError):
    """A state dict has the wrong schema or kind, or cannot be replayed."""


def group_events(events: Iterable[Event]) -> list[Event]:
    """Merge runs of equal consecutive events into ``Composed`` (same privacy, faster replay)."""
    grouped: list[tuple[Event, int]] = []
    for ev in events:
        if grouped and grouped[-1][0] == ev:
            grouped[-1] = (ev, grouped[-1][1] + 1)
        else:
            grouped.append((ev, 1))
    return [ev if n == 1 else Composed(ev, n) for ev, n in grouped]


class Accountant(ABC):
    """Tiny interface: ``compose``, ``get_epsilon``, ``state_dict``/``load_state_dict``."""

    kind: ClassVar[str]

    def __init__(self, neighboring: Neighboring = "add_remove") -> None:
        if neighboring not in _RELATIONS:
            raise ValueError(f"neighboring must be one of {sorted(_RELATIONS)}, got {neighboring!r}")
        self.neighboring: Neighboring = neighboring
        self._events: list[Event] = []

    @property
    def events(self) -> tuple[Event, ...]:
        """Every event composed so far, in order."""
        return tuple(self._events)

    def supports(self, event: Event) -> bool:
        """Whether :meth:`compose` would accept ``event``."""
        try:
            self._check(event)
        except UnsupportedEventError:
            return False
        return True

    def compose(self, event: Event, count: int = 1) -> None:
        """Record ``event`` (``count`` times); refuses unsupported events before changing state."""
        ev = event if count == 1 else Composed(event, count)
        self._check(ev)
        self._apply(ev)
        self._events.append(ev)

    def epsilon_after(self, event: Event, delta: float) -> float:
        """Epsilon if ``event`` were composed next, leaving this accountant unchanged."""
        trial = self.fork()
        trial.compose(event)
        return trial.get_epsilon(delta)

    def fork(self) -> Accountant:
        """An independent copy (used to ask "what if" without spending)."""
        return copy.deepcopy(self)

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: schema, kind, neighbouring relation and the event history."""
        return {
            "schema": STATE_SCHEMA,
            "kind": self.kind,
            "neighboring": self.neighboring,
            "events": [event_to_dict(e) for e in self._events],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this accountant's history by replaying ``state``'s events."""
        if state.get("schema") != STATE_SCHEMA:
            raise AccountantStateError(
                f"accountant state schema {state.get('schema')!r} is not {STATE_SCHEMA}"
            )
        if state.get("kind") != self.kind or state.get("neighboring") != self.neighboring:
            raise AccountantStateError(
                f"state is for a {state.get('kind')}/{state.get('neighboring')} accountant, "
                f"this one is {self.kind}/{self.neighboring}"
            )
        try:
            events = [event_from_dict(e) for e in state.get("events", [])]
        except EventError as exc:
            raise AccountantStateError(f"cannot decode accountant events: {exc}") from exc
        self._reset()
        self._events = []
        for ev in group_events(events):
            self._check(ev)
            self._apply(ev)
        self._events = events

    @abstractmethod
    def get_epsilon(self, delta: float) -> float:
        """Smallest epsilon such that the history is (epsilon, delta)-DP."""

    @abstractmethod
    def _check(self, event: Event) -> None:
        """Raise :class:`UnsupportedEventError` if ``event`` cannot be accounted."""

    @abstractmethod
    def _apply(self, event: Event) -> None:
        """Compose an already checked event into the internal state."""

    @abstractmethod
    def _reset(self) -> None:
        """Forget all composed events."""


_RDP_CACHE: dict[tuple[Any, ...], np.ndarray] = {}


class RdpAccountant(Accountant):
    """Renyi-DP accountant: dp-accounting's analyses plus the published Skellam bound."""

    kind: ClassVar[str] = "rdp"

    def __init__(
        self, neighboring: Neighboring = "add_remove", orders: Sequence[float] | None = None
    ) -> None:
        super().__init__(neighboring)
        self.orders = np.array(
            orders if orders is not None else rdp_privacy_accountant.DEFAULT_RDP_ORDERS,
            dtype=float,
        )
        self._rdp = np.zeros_like(self.orders)

    @property
    def rdp(self) -> np.ndarray:
        """Current RDP curve (one value per entry of ``orders``)."""
        return self._rdp.copy()

    def event_rdp(self, event: Event) -> np.ndarray:
        """RDP curve of a single event (raises :class:`UnsupportedEventError`).

        Cached per (event, orders, relation): a run repeats the same round event many
        times and the subsampled-Gaussian analysis is not cheap.
        """
        key = (event, tuple(self.orders.tolist()), self.neighboring)
        cached = _RDP_CACHE.get(key)
        if cached is None:
            cached = self._event_rdp_uncached(event)
            if len(_RDP_CACHE) > 4096:
                _RDP_CACHE.clear()
            _RDP_CACHE[key] = cached
        return cached.copy()

    def _event_rdp_uncached(self, event: Event) -> np.ndarray:
        match event:
            case Composed(event=inner, count=count):
                return count * self.event_rdp(inner)
            case SkellamEvent(mu=mu, l1_sensitivity=l1, l2_sensitivity=l2):
                return skellam_rdp(self.orders, mu, l1, l2)
            case PoissonSampled(q=q, event=inner) if contains_skellam(inner):
                if self.neighboring != "add_remove":
                    raise UnsupportedEventError(
                        "Poisson subsampling of Skellam is analysed for add/remove neighbours only"
                    )
                return poisson_subsampled_rdp(self.orders, q, self.event_rdp(inner))
            case SampledWithoutReplacement(event=inner) if contains_skellam(inner):
                raise UnsupportedEventError(
                    "no published bound is implemented for Skellam under sampling without "
                    "replacement; account it without amplification"
                )
        try:
            lib_event = to_dp_accounting(event)
        except EventError as exc:
            raise UnsupportedEventError(str(exc)) from exc
        lib = dp_accounting.rdp.RdpAccountant(self.orders, _RELATIONS[self.neighboring])
        if not lib.supports(lib_event):
            raise UnsupportedEventError(
                f"dp-accounting's RDP accountant ({self.neighboring}) does not support {event!r}"
            )
        lib.compose(lib_event)
        return lib.rdp

    def _check(self, event: Event) -> None:
        self.event_rdp(event)

    def _apply(self, event: Event) -> None:
        self._rdp = self._rdp + self.event_rdp(event)

    def _reset(self) -> None:
        self._rdp = np.zeros_like(self.orders)

    def get_epsilon(self, delta: float) -> float:
        if not self._events:
            return 0.0
        eps, _ = rdp_privacy_accountant.compute_epsilon(self.orders, self._rdp, delta)
        return float(eps)


class PldAccountant(Accountant):
    """Privacy-loss-distribution accountant (dp-accounting); tighter for Gaussians.

    The library PLD is rebuilt lazily from the grouped history, so repeated rounds
    with the same parameters cost one self-composition, not one composition each.
    """

    kind: ClassVar[str] = "pld"

    def __init__(
        self, neighboring: Neighboring = "add_remove", value_discretization_interval: float = 1e-4
    ) -> None:
        super().__init__(neighboring)
        self.value_discretization_interval = value_discretization_interval
        self._cache: dict[float, float] = {}

    def _library(self) -> pld_privacy_accountant.PLDAccountant:
        return pld_privacy_accountant.PLDAccountant(
            _RELATIONS[self.neighboring], self.value_discretization_interval
        )

    def _check(self, event: Event) -> None:
        if contains_skellam(event):
            raise UnsupportedEventError("the PLD accountant has no Skellam mechanism; use 'rdp'")
        try:
            lib_event = to_dp_accounting(event)
        except EventError as exc:
            raise UnsupportedEventError(str(exc)) from exc
        if not self._library().supports(lib_event):
            raise UnsupportedEventError(
                f"dp-accounting's PLD accountant ({self.neighboring}) does not support {event!r}"
            )

    def _apply(self, event: Event) -> None:
        self._cache.clear()

    def _reset(self) -> None:
        self._cache.clear()

    def get_epsilon(self, delta: float) -> float:
        if not self._events:
            return 0.0
        if delta not in self._cache:
            lib = self._library()
            for ev in group_events(self._events):
                lib.compose(to_dp_accounting(ev))
            self._cache[delta] = float(lib.get_epsilon(delta))
        return self._cache[delta]


def make_accountant(kind: AccountantKind, neighboring: Neighboring = "add_remove") -> Accountant:
    """Factory by name, so configs and ledgers can name the accountant."""
    if kind == "rdp":
        return RdpAccountant(neighboring)
    if kind == "pld":
        return PldAccountant(neighboring)
    raise ValueError(f"accountant kind must be 'rdp' or 'pld', got {kind!r}")


def accountant_from_state(state: dict[str, Any]) -> Accountant:
    """Build the right accountant for ``state`` and replay it."""
    acct = make_accountant(state.get("kind"), state.get("neighboring", "add_remove"))  # type: ignore[arg-type]
    acct.load_state_dict(state)
    return acct


# --------------------------------------------------------------------------- two views


@dataclass(frozen=True)
class RoundEvents:
    """What one released aggregate costs, as seen by the consumers and by the server."""

    consumer: Event
    server: Event

    def to_dict(self) -> dict[str, Any]:
        return {"consumer": event_to_dict(self.consumer), "server": event_to_dict(self.server)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RoundEvents:
        return cls(event_from_dict(data["consumer"]), event_from_dict(data["server"]))


@dataclass(frozen=True)
class EpsilonPair:
    """Cumulative epsilon against the model's consumers and against the server."""

    consumer: float
    server: float


def _replace_one(mechanism: Event) -> Event:
    """The same mechanism analysed under replace-one neighbours.

    Swapping one client's clipped update for another's moves the sum by up to twice
    the add/remove sensitivity, so the noise is worth half as much.
    """
    match mechanism:
        case GaussianEvent(noise_multiplier=z):
            return GaussianEvent(z / 2.0)
        case SkellamEvent(mu=mu, l1_sensitivity=l1, l2_sensitivity=l2):
            return SkellamEvent(mu, 2.0 * l1, 2.0 * l2)
    raise ValueError(f"expected a Gaussian or Skellam mechanism, got {mechanism!r}")


def round_events(
    mechanism: GaussianEvent | SkellamEvent,
    *,
    server_adds_noise: bool,
    sampling: Sampling,
    population: int,
    cohort_size: int,
    poisson_rate: float | None = None,
) -> RoundEvents:
    """The consumer and server events of one released aggregate.

    ``mechanism`` is the noise *present in the released sum* with add/remove
    sensitivity (for distributed DP: the survivors' Skellam shares).

    Consumers: client sampling amplifies.
      * ``sampling="poisson"``: each client joins independently with probability
        ``poisson_rate`` (default ``cohort_size / population``): ``PoissonSampled``.
      * ``sampling="fixed"``: a uniformly random cohort of exactly ``cohort_size``
        (what Flower's ``fraction_train``/``min_train_nodes`` sampling does). The
        Poisson bound is NOT valid for that; we use sampling without replacement under
        replace-one neighbours (Wang, Balle, Kasiviswanathan 2019, via dp-accounting)
        with the doubled replace-one sensitivity. For Skellam no such bound is
        implemented, so consumers get no amplification (conservative).
    Server: it chose the cohort, so no amplification; in central DP
    (``server_adds_noise``) it saw the noiseless sum, so the event is non-private.
    """
    if not 1 <= cohort_size <= population:
        raise ValueError(f"cohort_size must be in 1..population={population}, got {cohort_size}")
    # The server knows who was sampled, so it gets no amplification; with fixed-size
    # cohorts it also knows the client took part, so what is protected from it is the
    # content of the update: replace-one, the same relation as the consumers' view
    # (never a smaller epsilon than the consumers get).
    server: Event
    if server_adds_noise:
        server = NonPrivateEvent()
    else:
        server = _replace_one(mechanism) if sampling == "fixed" else mechanism
    consumer: Event
    if sampling == "poisson":
        q = poisson_rate if poisson_rate is not None else cohort_size / population
        consumer = mechanism if q >= 1.0 else PoissonSampled(q, mechanism)
    elif sampling == "fixed":
        replaced = _replace_one(mechanism)
        if cohort_size == population or isinstance(mechanism, SkellamEvent):
            consumer = replaced
        else:
            consumer = SampledWithoutReplacement(population, cohort_size, replaced)
    else:
        raise ValueError(f"sampling must be 'poisson' or 'fixed', got {sampling!r}")
    return RoundEvents(consumer=consumer, server=server)


class PrivacyAccountant:
    """Both views of the spent budget for one training run.

    ``kind`` picks the accountant ("pld" is tighter for Gaussians, "rdp" is needed
    for Skellam). With ``sampling="fixed"`` the consumer view uses the replace-one
    relation, which only the RDP accountant supports, so it is RDP whatever ``kind``.
    """

    def __init__(self, kind: AccountantKind = "rdp", sampling: Sampling = "poisson") -> None:
        if sampling not in ("poisson", "fixed"):
            raise ValueError(f"sampling must be 'poisson' or 'fixed', got {sampling!r}")
        self.kind: AccountantKind = kind
        self.sampling: Sampling = sampling
        if sampling == "fixed":
            self.consumer = make_accountant("rdp", "replace_one")
            self.server = make_accountant("rdp", "replace_one")
        else:
            self.consumer = make_accountant(kind, "add_remove")
            self.server = make_accountant(kind, "add_remove")

    @property
    def rounds(self) -> int:
        """How many released aggregates have been accounted."""
        return len(self.consumer.events)

    def check_supported(self, events: RoundEvents) -> None:
        """Raise :class:`UnsupportedEventError` if either view cannot account ``events``."""
        self.consumer._check(events.consumer)
        self.server._check(events.server)

    def compose_round(self, events: RoundEvents) -> None:
        """Spend one released aggregate in both views (both checked first)."""
        self.check_supported(events)
        self.consumer.compose(events.consumer)
        self.server.compose(events.server)

    def epsilons(self, delta: float) -> EpsilonPair:
        """Cumulative epsilons so far."""
        return EpsilonPair(self.consumer.get_epsilon(delta), self.server.get_epsilon(delta))

    def epsilons_after(self, events: RoundEvents, delta: float) -> EpsilonPair:
        """Cumulative epsilons if ``events`` were spent next (no state change)."""
        return EpsilonPair(
            self.consumer.epsilon_after(events.consumer, delta),
            self.server.epsilon_after(events.server, delta),
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "schema": STATE_SCHEMA,
            "kind": self.kind,
            "sampling": self.sampling,
            "consumer": self.consumer.state_dict(),
            "server": self.server.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("schema") != STATE_SCHEMA:
            raise AccountantStateError(f"schema {state.get('schema')!r} is not {STATE_SCHEMA}")
        if state.get("kind") != self.kind or state.get("sampling") != self.sampling:
            raise AccountantStateError(
                f"state is for kind={state.get('kind')}/sampling={state.get('sampling')}, "
                f"this accountant is kind={self.kind}/sampling={self.sampling}"
            )
        self.consumer.load_state_dict(state["consumer"])
        self.server.load_state_dict(state["server"])

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PrivacyAccountant:
        acct = cls(state.get("kind", "rdp"), state.get("sampling", "poisson"))
        acct.load_state_dict(state)
        return acct


def is_finite(x: float) -> bool:
    """Tiny helper for callers that store epsilons in JSON (inf is not JSON)."""
    return math.isfinite(x)
