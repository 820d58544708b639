"""A site's own distributed-DP floor and privacy budget against the server.

Why: under distributed DP the noise that protects a site's update from the server is
the noise the *clients* add. If a client simply added what the server's update spec
asked for, a lying server could ask for none. So each site checks the spec's noise
against its own floor, accounts its own spend against the server with a real
accountant (dp-accounting RDP over the Skellam mechanism, the same events the server's
ledger uses), and refuses to contribute once its own budget would be exceeded. The
server may ask for more noise, never less.

The site computes the guarantee itself, in its own units, from every field of the
round's spec that changes it (:class:`DPContribution`, built by
``UpdateSpec.dp_contribution``): the fixed point the encoder will really use (its
levels, from the field width, the word width and the cohort bounds: a spec that says
"as many bits as fit" gets the levels that fit, not an assumed 32), the per-coordinate
range *and* the L2 clip (a range far above the clip lets a site send more than the clip:
the sensitivity is ``scale * min(l2_clip, clip_range * sqrt(d))``), the stochastic
rounding (``+ sqrt(d)``), and the ``m`` minimum survivors whose Skellam shares of
parameter ``mu`` make up the noise. The effective noise multiplier of the released sum
is ``sqrt(2 m mu) / sensitivity``. The client enforces ``m`` itself: it signs no survivor
set smaller than that (see the consistency check), so the noise it counted on is present
(as long as the other survivors add their shares: colluding sites that add none lower it,
the usual assumption of distributed DP).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sgs_flower.dp.events import event_from_dict, event_to_dict
from sgs_flower.dp.noise import noise_present, rounded_l2_bound, skellam_event
from sgs_flower.dp.rotation import padded_length


class SiteBudgetError(ValueError):
    """The spec's noise is below this site's floor, or contributing would spend more
    than its budget. The message names the rule, not the site's spend."""


# The DP vector's coordinates after the (padded) delta: the flag a site whose update could
# not be used sets (``UpdateSpec.flag_words``). Sites and server count it in ``dim``.
DP_FLAG_WORDS = 1


def dp_dimension(model_size: int, rotate: bool) -> int:
    """Coordinates of the DP vector that carry noise: the (padded) delta and the flag."""
    return (padded_length(model_size) if rotate else model_size) + DP_FLAG_WORDS


@dataclass(frozen=True)
class DPContribution:
    """What one distributed-DP contribution of this site carries, in integer units."""

    levels: int  # the encoder's fixed-point levels per clip_range
    clip_range: float  # per-coordinate range of the encoder
    l2_clip: float  # L2 clip of the (rotated) delta
    dim: int  # coordinates that carry noise (padded delta and flag)
    mu_share: float  # this site's Skellam parameter
    min_survivors: int  # fewest survivors whose shares make up the noise
    cohort: int

    @property
    def scaled_clip(self) -> float:
        """The largest L2 norm of one contribution before rounding, in integer units."""
        scale = self.levels / self.clip_range
        return scale * min(self.l2_clip, self.clip_range * math.sqrt(self.dim))

    @property
    def sensitivity(self) -> float:
        """... and after stochastic rounding (each coordinate moves by less than 1)."""
        return rounded_l2_bound(self.scaled_clip, self.dim)

    @property
    def noise_multiplier(self) -> float:
        """Std of the noise in the sum of ``min_survivors`` shares over the sensitivity."""
        if self.mu_share <= 0 or self.min_survivors < 1 or self.levels < 1 or self.dim < 1:
            return 0.0
        return math.sqrt(2.0 * self.min_survivors * self.mu_share) / self.sensitivity


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

    def admit(self, contribution: DPContribution) -> float:
        """Check one contribution against the floor and the budget and record it;
        returns the site's epsilon against the server after it. Raises
        :class:`SiteBudgetError` without recording anything when it refuses."""
        c = contribution
        if c.noise_multiplier < self.min_noise_multiplier:
            raise SiteBudgetError(
                "the server's distributed-DP noise is below this site's noise floor (sgs-dp-min-noise), "
                "computed from the whole update spec (range, clip, widths, rounding, survivors); "
                "the site does not contribute"
            )
        from sgs_flower.dp.accounting import round_events

        mech = skellam_event(noise_present(c.mu_share, c.min_survivors, c.min_survivors), c.scaled_clip, c.dim)
        server_event = round_events(
            mech, server_adds_noise=False, sampling="fixed", population=c.cohort, cohort_size=c.cohort
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
    global model (so one model is never aggregated twice over different sets), a sketch
    of each such model (so a near copy of one is not either: see
    :mod:`sgs_flower.secagg.model_memory`, and ``sketch_key``, the site's secret for
    those sketches) and its distributed-DP events. Kept in a JSON file: by default
    :func:`default_state_file`, or the site's ``sgs-state-file``; only for the current
    run when the site sets ``sgs-state-file=memory``."""

    history: dict[str, str] = field(default_factory=dict)
    dp_events: list[dict[str, Any]] = field(default_factory=list)
    models: list[dict[str, Any]] = field(default_factory=list)
    sketch_key: str = field(default_factory=lambda: os.urandom(32).hex())
    # the digests of the pinned roster's epochs the site signed sums under (whole-group
    # participation: a changed epoch would regroup sites; sgs_flower.secagg.groups)
    roster_epochs: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"version": 2, "history": self.history, "dp_events": self.dp_events,
                           "models": self.models, "sketch_key": self.sketch_key,
                           "roster_epochs": self.roster_epochs})

    @classmethod
    def from_json(cls, text: str) -> SiteState:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") not in (1, 2):
            raise ValueError("site state file has an unknown format")
        if data["version"] == 1:  # before model sketches: a new sketch key, nothing remembered yet
            return cls(dict(data["history"]), list(data["dp_events"]))
        key = str(data["sketch_key"])
        if len(bytes.fromhex(key)) != 32:
            raise ValueError("site state file holds a malformed sketch key")
        return cls(dict(data["history"]), list(data["dp_events"]), list(data["models"]), key,
                   [str(d) for d in data.get("roster_epochs", [])])

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


STATE_DIR_VAR = "SGS_STATE_DIR"


def default_state_file(site_name: str, environ: Mapping[str, str] | None = None) -> Path:
    """Where a site keeps its state when its policy names no file: ``$SGS_STATE_DIR``,
    else ``$FLWR_HOME/sgs-flower/sites``, else ``~/.flwr/sgs-flower/sites``, one file per
    site (``site_name``: its identity key's fingerprint, or its node id).

    Why a default on disk: kept only in the run's ``Context.state``, the memory of what a
    site signed and spent is gone in the next run, and the same model under a new run id
    could be aggregated again over another cohort (issue 18)."""
    env = os.environ if environ is None else environ
    if env.get(STATE_DIR_VAR):
        base = Path(env[STATE_DIR_VAR])
    else:
        base = Path(env.get("FLWR_HOME") or Path.home() / ".flwr") / "sgs-flower" / "sites"
    return base / f"{site_name}.json"
