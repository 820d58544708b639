"""What one secure round reports, and how a stopped run says why (no round logic here).

Why a module of its own: the training rounds (:mod:`sgs_flower.driver.rounds`) and the
evaluation rounds (:mod:`sgs_flower.driver.evaluation`) both fill a :class:`RoundReport`,
group the clients' error replies and raise the same stops, and the Flower strategy
(``strategies``) re-exports them to its users; keeping these here lets each import them
without importing the others (no import cycle).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass
class RoundReport:
    """What happened in one secure round (also logged)."""

    server_round: int
    status: str  # "ok", "aborted", "inconsistent", "budget-exhausted"
    cohort: list[int] = field(default_factory=list)
    survivors: list[int] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    client_errors: dict[int, str] = field(default_factory=dict)
    reason: str = ""
    seconds: float = 0.0
    total_weight: int = 0
    stage_seconds: dict[str, float] = field(default_factory=dict)  # per exchange, server side included
    exchanges: int = 0  # server -> clients -> server exchanges this round made (5 in full, 3 pipelined)
    pipelined: bool = False  # its keys and shares travelled on the previous round's exchanges
    next_round_set_up: bool = False  # the next round's keys and shares travelled on this round's exchanges
    clip_range: float = 0.0  # the round's ranges (float and integer parts of the delta)
    int_clip_range: float = 0.0
    clipped: int = 0  # delta coordinates clipped, summed securely over the survivors
    clipped_fraction: float = 0.0
    metric_clipped: dict[str, int] = field(default_factory=dict)  # clients whose metric was clipped
    update_rms: float = 0.0  # RMS of the released mean update's float part (the bound's scale)
    metrics_dropped: str = ""  # why train metrics were not released, if they were not
    error_bound: float = 0.0  # quantization bound on the released mean, per float coordinate
    # survivors whose update could not be used (the reason is counted inside the masked
    # vector, never sent as an error reply): by reason outside DP; under DP a noisy count
    failures: dict[str, int] = field(default_factory=dict)
    failed_estimate: float = 0.0
    # retries of the masked input (docs/protocol.md, "Retry"): out-of-range values or a
    # weight scale that did not fit the cohort's weights; the released aggregate is the
    # last attempt's (clip_range, int_clip_range and weight_scale are its)
    retries: int = 0
    retry_reasons: list[str] = field(default_factory=list)
    weight_scale: int = 0  # S: coordinates carried (w / S) * x (outside DP)
    field_bits: int = 0  # the masked vector's word width b (chosen per round unless fixed)
    group_excluded: int = 0  # updates left out with their group (SecAggConfig.min_group), issue 29
    groups: list[int] = field(default_factory=list)  # the groups (roster partition indices) whose sum it is
    # survivors left out of the sum because their bound proof failed (issue 31, SecAggConfig.validate)
    cheaters: list[int] = field(default_factory=list)


class SecureAggregationFailed(RuntimeError):
    """The run stopped: too many secure rounds in a row aborted (or all of them did).

    The message names the last round's cause, with the clients' own error replies."""


class SecureEvaluationUnavailable(SecureAggregationFailed):
    """The run stopped at its first federated evaluation that no site could answer: every
    site's ClientApp raised on the secure evaluation's first message, because
    ``secagg_mod`` does not wrap its evaluate function (the client line
    ``@app.train(mods=[secagg_mod])`` wraps train only). The message names the fix."""


def group_client_errors(errors: Mapping[int, str]) -> str:
    """Clients' error replies grouped by reason: '3 x stage MASKED_INPUT: EncodingError: ...'."""
    counts = Counter(errors.values())
    return "; ".join(f"{n} x {reason}" for reason, n in counts.most_common())
