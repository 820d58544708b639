"""A site's own distributed-DP floor and privacy budget against the server.

Why: under distributed DP the noise that protects a site's update from the server is
the noise the *clients* add. If a client simply added what the server's update spec
asked for, a lying server could ask for none. So each site checks the spec's noise
against its own floor, accounts its own spend against the server with a real
accountant (dp-accounting RDP over the Skellam mechanism, the same events the server's
ledger uses), and refuses to contribute once its own budget would be exceeded. The
server may ask for more noise, never less.

The noise of a spec is read back as a noise multiplier: with fixed point
``levels = 2^(p-1) - 1`` per clip norm and ``m`` minimum survivors each adding a
Skellam share of parameter ``mu``, the sum's noise std in clip-norm units is
``sqrt(2 m mu) / levels``. The client enforces ``m`` itself: it signs no survivor set
smaller than that (see the consistency check), so the noise it counted on is present.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sgs_flower.dp.events import event_from_dict, event_to_dict
from sgs_flower.dp.noise import noise_present, skellam_event


class SiteBudgetError(ValueError):
    """The spec's noise is below this site's floor, or contributing would spend more
    than its budget. The message names the rule, not the site's spend."""


def spec_noise_multiplier(mu_share: float, min_survivors: int, bits_per_coordinate: int) -> float:
    """Noise multiplier of the sum of ``min_survivors`` Skellam shares of ``mu_share``
    at a fixed point of ``bits_per_coordinate`` bits per clip norm."""
    if mu_share <= 0 or min_survivors < 1 or not 2 <= bits_per_coordinate <= 64:
        return 0.0
    levels = (1 << (bits_per_coordinate - 1)) - 1
    return math.sqrt(2.0 * min_survivors * mu_share) / levels


@dataclass
class SiteAccountant:
    """This site's spend against the server, replayed from recorded events.

    ``events`` are event dicts (:func:`sgs_flower.dp.events.event_to_dict`), one per
    masked input the site sent under distributed DP, so any accountant can replay them.
    """

    min_noise_multiplier: float
    max_epsilon: float  # 0: account and report only
    delta: float
    events: list[dict[str, Any]] = field(default_factory=list)

    def epsilon(self, extra: dict[str, Any] | None = None) -> float:
        # imported here: dp-accounting (and SciPy) load only when a site accounts a
        # DP contribution, not in every client process that answers a protocol message
        from sgs_flower.dp.accounting import make_accountant

        acct = make_accountant("rdp")
        for e in [*self.events, *([extra] if extra else [])]:
            acct.compose(event_from_dict(e))
        return float(acct.get_epsilon(self.delta)) if self.events or extra else 0.0

    def admit(
        self, mu_share: float, min_survivors: int, bits_per_coordinate: int, dim: int, cohort: int
    ) -> float:
        """Check one contribution against the floor and the budget and record it;
        returns the site's epsilon against the server after it. Raises
        :class:`SiteBudgetError` without recording anything when it refuses."""
        z = spec_noise_multiplier(mu_share, min_survivors, bits_per_coordinate)
        if z < self.min_noise_multiplier:
            raise SiteBudgetError(
                "the server's distributed-DP noise is below this site's noise floor (sgs-dp-min-noise); "
                "the site does not contribute"
            )
        from sgs_flower.dp.accounting import round_events

        levels = (1 << (bits_per_coordinate - 1)) - 1
        mech = skellam_event(noise_present(mu_share, min_survivors, min_survivors), float(levels), dim)
        server_event = round_events(
            mech, server_adds_noise=False, sampling="fixed", population=cohort, cohort_size=cohort
        ).server
        record = event_to_dict(server_event)
        eps = self.epsilon(record)
        if self.max_epsilon and eps > self.max_epsilon:
            raise SiteBudgetError(
                "contributing would exceed this site's privacy budget against the server "
                "(sgs-dp-max-epsilon); the site does not contribute"
            )
        self.events.append(record)
        return eps


@dataclass
class SiteState:
    """What a site remembers across rounds and runs: the survivor set it signed per
    global model (so one model is never aggregated twice over different sets) and its
    distributed-DP events. Kept in a JSON file when the site names one
    (``sgs-state-file``), else only for the current run."""

    history: dict[str, str] = field(default_factory=dict)
    dp_events: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"version": 1, "history": self.history, "dp_events": self.dp_events})

    @classmethod
    def from_json(cls, text: str) -> SiteState:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != 1:
            raise ValueError("site state file has an unknown format")
        return cls(dict(data["history"]), list(data["dp_events"]))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SiteState:
        p = Path(path)
        return cls.from_json(p.read_text()) if p.exists() else cls()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically (a crash leaves the old file, never half of one)."""
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(p.name + ".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, p)
