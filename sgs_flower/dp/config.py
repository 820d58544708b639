"""Validated DP configuration (frozen; errors name the field and say why).

A config that cannot give the promised guarantee is refused at construction, not
discovered mid-run.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

DPMode = Literal["none", "sample-dp", "central-dp", "distributed-dp"]
MODES: tuple[str, ...] = ("none", "sample-dp", "central-dp", "distributed-dp")


class DPConfigError(ValueError):
    """A DP configuration field is invalid; the message names it."""


def _positive(name: str, value: float | None, allow_none: bool = True) -> None:
    if value is None:
        if not allow_none:
            raise DPConfigError(f"DPConfig.{name} is required for this mode")
        return
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise DPConfigError(f"DPConfig.{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True)
class DPConfig:
    """How a run is protected.

    * ``clip_norm``: L2 bound of each client's update (central/distributed) or of
      each example's gradient (sample-dp, Opacus ``max_grad_norm``).
    * ``noise_multiplier`` or ``target_epsilon`` (+ ``rounds`` to calibrate over):
      noise std of the released sum divided by ``clip_norm``.
    * ``max_epsilon``/``delta``: the budget; a round that would exceed it is not run.
    * ``min_survivors`` (distributed-dp): shares are calibrated so this many
      survivors carry the full noise; fewer survivors abort the round. ``None``: the
      whole sampled cohort (no dropout tolerated, the least noise per share).
    * ``sampling``: how the strategy really picks cohorts ("fixed" size, as Flower's
      samplers do, or "poisson"); it decides the amplification analysis.
    * ``accountant``: "pld" (tighter for Gaussians) or "rdp" (needed for Skellam).
    """

    mode: DPMode = "none"
    clip_norm: float | None = None
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    rounds: int | None = None
    delta: float = 1e-5
    max_epsilon: float | None = None
    min_survivors: int | None = None
    sampling: Literal["poisson", "fixed"] = "fixed"
    accountant: Literal["rdp", "pld"] = "rdp"
    budget_view: Literal["consumer", "server", "both"] = "consumer"
    rotate: bool = True

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise DPConfigError(f"DPConfig.mode must be one of {MODES}, got {self.mode!r}")
        if not 0 < self.delta < 1:
            raise DPConfigError(f"DPConfig.delta must be in (0, 1), got {self.delta!r}")
        if self.sampling not in ("poisson", "fixed"):
            raise DPConfigError(f"DPConfig.sampling must be 'poisson' or 'fixed', got {self.sampling!r}")
        if self.accountant not in ("rdp", "pld"):
            raise DPConfigError(f"DPConfig.accountant must be 'rdp' or 'pld', got {self.accountant!r}")
        if self.budget_view not in ("consumer", "server", "both"):
            raise DPConfigError(f"DPConfig.budget_view must be consumer/server/both, got {self.budget_view!r}")
        _positive("max_epsilon", self.max_epsilon)
        if self.mode == "none":
            return
        _positive("clip_norm", self.clip_norm, allow_none=False)
        _positive("noise_multiplier", self.noise_multiplier)
        _positive("target_epsilon", self.target_epsilon)
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise DPConfigError(
                "DPConfig needs exactly one of noise_multiplier and target_epsilon "
                f"(got noise_multiplier={self.noise_multiplier}, target_epsilon={self.target_epsilon})"
            )
        if self.target_epsilon is not None and (self.rounds is None or self.rounds < 1):
            raise DPConfigError(
                "DPConfig.rounds must be >= 1 when target_epsilon is given: the noise is "
                "calibrated so that all rounds together reach it"
            )
        if self.mode == "distributed-dp":
            if self.min_survivors is not None and self.min_survivors < 1:
                raise DPConfigError(
                    "DPConfig.min_survivors must be >= 1 (or None: the whole cohort) for distributed-dp: noise shares are "
                    f"calibrated for that many survivors, got {self.min_survivors!r}"
                )
            if self.accountant != "rdp":
                raise DPConfigError(
                    "DPConfig.accountant must be 'rdp' for distributed-dp: the PLD accountant "
                    "has no Skellam mechanism"
                )
        if self.mode == "central-dp" and self.budget_view != "consumer":
            raise DPConfigError(
                "DPConfig.budget_view must be 'consumer' for central-dp: the server adds the "
                "noise itself, so its epsilon is infinite and every round would be refused"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DPConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise DPConfigError(f"unknown DPConfig field(s): {sorted(unknown)}")
        return cls(**data)
