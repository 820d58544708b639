"""Protocol parameters of the secure-aggregation strategy, validated up front."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sgs_flower.pipeline import DEFAULT_MAX_WEIGHT, MAX_METRIC_SLOTS


@dataclass(frozen=True)
class SecAggConfig:
    """Knobs of :class:`~strategies.SecAggStrategy`; every default is safe.

    ``degree``, ``threshold`` and ``min_clients`` left as ``None`` are derived from each
    round's cohort size (see :mod:`sgs_flower.secagg.graph`): complete graph up to 10
    clients, k = 2 * ceil(1.5 * log2 n) neighbours beyond; threshold a strict majority
    of the neighbours; never fewer than 3 clients in a sum.

    - ``clip_range`` / ``int_clip_range``: round 1's per-coordinate ranges of the float
      and integer parts of the model delta. With ``adaptive_range`` (the default) each
      later round's ranges come from the previous round's securely summed magnitude
      histograms, so that at most ``target_clipped_fraction`` would have been clipped,
      with a factor 2 of headroom. Round 1 clips whatever lies beyond the initial ranges
      (counted, logged and in the round's report).
    - ``max_weight``: the largest ``num-examples`` a client may report (default 10^6);
      it costs no precision bits, see the README's quantization bound.
    - ``metric_slots``: how many numeric train metrics are aggregated (their weighted
      mean, as FedAvg computes it); ``metric_range`` bounds each one unless
      ``metric_ranges`` gives its own (a value beyond is clipped and counted).
    - ``max_poll_interval``: the longest wait (seconds) between two pulls of replies
      while an exchange is under way; pulls start at 5 ms and grow 1.2x per pull up to
      it (:mod:`strategies.exchange`), instead of Flower's fixed 3 s in a deployment.
      On Flower's in-memory simulation grid, where a pull is a local call, the waits
      stay at 5 ms.
    - ``max_consecutive_aborts``: this many aborted rounds in a row stop the run with
      :class:`~strategies.SecureAggregationFailed` (a run whose rounds all abort stops
      with it too).
    """

    clip_range: float = 1.0
    field_bits: int = 32
    max_weight: int = DEFAULT_MAX_WEIGHT
    degree: int | None = None
    threshold: int | None = None
    min_clients: int | None = None
    stage_timeout: float = 600.0
    node_wait_timeout: float = 120.0
    metric_slots: int = 8
    metric_range: float = 100.0
    metric_ranges: Mapping[str, float] = field(default_factory=dict)
    int_clip_range: float = 1024.0
    adaptive_range: bool = True
    target_clipped_fraction: float = 1e-5
    max_consecutive_aborts: int = 3
    max_poll_interval: float = 0.5

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SecAggConfig.{name}: {why}")

        if not self.clip_range > 0:
            raise bad("clip_range", f"must be > 0 (per-coordinate bound on the model delta), got {self.clip_range}")
        if not self.int_clip_range > 0:
            raise bad("int_clip_range", f"must be > 0 (bound on integer entries' change), got {self.int_clip_range}")
        if not 16 <= self.field_bits <= 64:
            raise bad("field_bits", f"must be in 16..64, got {self.field_bits}")
        if self.max_weight < 1:
            raise bad("max_weight", f"must be >= 1 (largest num-examples a client may report), got {self.max_weight}")
        if self.min_clients is not None and self.min_clients < 2:
            raise bad("min_clients", f"must be >= 2: the sum of one client is its update, got {self.min_clients}")
        if self.degree is not None and self.degree < 1:
            raise bad("degree", f"must be >= 1, got {self.degree}")
        if self.threshold is not None and self.threshold < 1:
            raise bad("threshold", f"must be >= 1, got {self.threshold}")
        if not self.stage_timeout > 0:
            raise bad("stage_timeout", f"must be > 0 seconds, got {self.stage_timeout}")
        if not self.node_wait_timeout >= 0:
            raise bad("node_wait_timeout", f"must be >= 0 seconds, got {self.node_wait_timeout}")
        if not 0 <= self.metric_slots <= MAX_METRIC_SLOTS:
            raise bad("metric_slots", f"must be in 0..{MAX_METRIC_SLOTS}, got {self.metric_slots}")
        if not self.metric_range > 0:
            raise bad("metric_range", f"must be > 0, got {self.metric_range}")
        for name, r in self.metric_ranges.items():
            if not r > 0:
                raise bad("metric_ranges", f"the range of {name!r} must be > 0, got {r}")
        if not 0 <= self.target_clipped_fraction < 1:
            raise bad("target_clipped_fraction", f"must be in [0, 1), got {self.target_clipped_fraction}")
        if not 0.005 <= self.max_poll_interval <= 10.0:
            raise bad("max_poll_interval", f"must be in 0.005..10 seconds, got {self.max_poll_interval}")
        if self.max_consecutive_aborts < 1:
            raise bad("max_consecutive_aborts", f"must be >= 1, got {self.max_consecutive_aborts}")
