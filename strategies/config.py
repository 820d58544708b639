"""Protocol parameters of the secure-aggregation strategy, validated up front."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SecAggConfig:
    """Knobs of :class:`~strategies.SecAggStrategy`; every default is safe.

    ``degree``, ``threshold`` and ``min_clients`` left as ``None`` are derived from each
    round's cohort size (see :mod:`sgs_flower.secagg.graph`): complete graph up to 10
    clients, k = 2 * ceil(1.5 * log2 n) neighbours beyond; threshold a strict majority
    of the neighbours; never fewer than 3 clients in a sum.
    """

    clip_range: float = 1.0
    field_bits: int = 32
    max_weight: int = 1024
    degree: int | None = None
    threshold: int | None = None
    min_clients: int | None = None
    stage_timeout: float = 600.0
    node_wait_timeout: float = 120.0
    secure_metrics: tuple[str, ...] = ("train_loss",)
    metric_range: float = 100.0

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SecAggConfig.{name}: {why}")

        if not self.clip_range > 0:
            raise bad("clip_range", f"must be > 0 (per-coordinate bound on the model delta), got {self.clip_range}")
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
        if not self.metric_range > 0:
            raise bad("metric_range", f"must be > 0, got {self.metric_range}")
