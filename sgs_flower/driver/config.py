"""Protocol parameters of a secure run (the round driver, and the strategy over it), validated up front."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from sgs_flower.pipeline import (
    DEFAULT_MAX_WEIGHT,
    DEFAULT_MODEL_ERROR,
    DEFAULT_WIDTH_ERROR,
    MAX_METRIC_SLOTS,
)
from sgs_flower.secagg.graph import CONSISTENCY_MODES
from sgs_flower.secagg.groups import DEFAULT_MIN_GROUP


@dataclass(frozen=True)
class SecAggConfig:
    """Knobs of a secure run (:class:`~sgs_flower.driver.RoundDriver`, which
    :class:`~strategies.SecAggStrategy` drives through Flower); every default is safe.

    ``degree``, ``threshold`` and ``min_clients`` left as ``None`` are derived from each
    round's cohort size (see :mod:`sgs_flower.secagg.graph`): complete graph up to 10
    clients, k = 2 * ceil(1.5 * log2 n) neighbours beyond; threshold a strict majority
    of the neighbours; never fewer than 3 clients in a sum.

    - ``clip_range`` / ``int_clip_range``: round 1's per-coordinate ranges of the float
      and integer parts of the model delta. Nothing is ever clipped silently: a round
      whose unmasked sum counts values beyond the range retries its masked input at a
      range that covers them (one exchange, the same updates re-encoded; at most
      ``wire.MAX_RETRIES``), and is not released otherwise. With ``adaptive_range`` (the
      default) each later round's ranges are ``range_margin`` times the largest range the
      last ``range_memory`` rounds needed (from their securely summed magnitude
      histograms), so a quiet round never narrows the range below what the rounds
      before it needed.
    - ``max_weight``: the largest ``num-examples`` a client may report (default 10^6).
      ``weight_scale`` is round 1's weight scale S (coordinates carry ``(w / S) * x``;
      ``None``: 2^13 = 8,192, or ``max_weight`` if smaller); later rounds take the smallest power of two above the
      last rounds' weights (a securely summed weight histogram). A round retries when a
      survivor's weight is above its S, or when its quantization bound is above
      ``target_error`` times the range (default 2^-14) while a finer S covers every
      weight: whatever ``num-examples`` is next to ``max_weight``, a released bound is
      at most ``target_error`` times the range (round 1 at the initial S) and from round
      2 on, in the steady state, ``2 n c / L`` (docs/protocol.md, "The weight scale").
    - ``field_bits``: the masked vector's word width b. 0 (the default): chosen per
      round outside DP as the narrowest width that holds the cohort's sum at a bound of
      ``width_error`` times the range (default 4e-3) and at most ``model_error`` in the
      model's own units (default 2^-15 ~ 3.1e-5, issue 28), whichever is finer
      (:func:`sgs_flower.pipeline.width_error_for`): at the default range 1.0, 16 bits
      of precision; b = 21 for 10 clients, 23 for 50, 24 for 100 (upload about b / 32 of
      float32); a range of +-0.01 needs 10 bits (b = 15 for 10 clients),
      :func:`sgs_flower.pipeline.narrowest_field_bits`. The model-confidential
      mode takes the same rule (its range bounds model coordinates, so its stated bound
      is c / 255 of the model; the `confidential` preset reached the same accuracy as at
      32 bits, docs/benchmarks.md). Distributed-DP rounds take the narrowest width that
      holds the clipped sum *and* its Skellam noise, at a fixed point whose rounding
      costs at most 1 % of the sensitivity (:func:`sgs_flower.dp.aggregator.ddp_narrow_quantization`:
      21 bits for the `distributed-dp` preset at 100 SuperNodes, 23 for the app's CNN);
      central DP keeps 32. A fixed value in 8..64 is used for every
      round (refused where it cannot hold the cohort); 32 is the old fixed layout
      (upload 1.0x float32). A site refuses a width below its ``sgs-min-bits``.
    - ``metric_slots``: how many numeric train metrics are aggregated (their weighted
      mean, as FedAvg computes it, exact to 2^-53: each slot carries ``round(m * 2^52) *
      num-examples`` in limbs, :data:`sgs_flower.pipeline.METRIC_FRACTION_BITS`);
      ``metric_range`` (default 10^9) bounds each one unless ``metric_ranges`` gives its
      own (a value beyond is clipped, counted and logged with its name); a wider range
      costs a few bits of the slot's words, never precision.
    - ``max_poll_interval``: the longest wait (seconds) between two pulls of replies
      while an exchange is under way; pulls start at 5 ms and grow 1.2x per pull up to
      it (:mod:`strategies.exchange`), instead of Flower's fixed 3 s in a deployment.
      On Flower's in-memory simulation grid, where a pull is a local call, the waits
      stay at 5 ms.
    - ``confidential``: the model-confidential mode (:mod:`sgs_flower.confidential`): the
      sites agree on a model key the server never learns; the global model exists on the
      server only masked under it, ``clip_range`` then bounds the model's coordinates
      (not its change). Only FedAvg's rule (the identity on the masked sum) is possible.
    - ``consistency``: the consistency quorum of every round, announced in its setup
      and bound into the round context its sites sign. ``"global"`` (the default):
      a site reveals shares only once floor(2n/3) + 1 of the cohort signed the
      identical survivor set (secure against fewer than n/3 colluding clients
      anywhere; proven by one BLS aggregate signature, one verification per site per
      round, each peer's key checked once per run). ``"neighbourhood"`` (opt-in):
      two thirds of each site's closed neighbourhood (O(k) Ed25519 verifications; at
      most floor(k/3) colluders per neighbourhood). Only sites whose policy sets ``sgs-consistency=neighbourhood``
      join such a round; the others refuse it with a ``PolicyError``.
    - ``min_group`` / ``roster`` (issue 29): participation in whole groups. With
      ``min_group = G`` (0: off) and the federation's roster file, the server derives the
      sites' groups of at least G (:mod:`sgs_flower.secagg.groups`, the rule the sites
      apply with ``sgs-min-group``) and leaves a group with a member missing at the
      masked input out of the sum whole (``RoundReport.group_excluded``), so no two
      released sums differ by fewer than G sites. Sites that require it refuse to sign any
      other survivor set. ``fraction_train`` and ``min_train_nodes`` then apply to whole
      groups (once the sites' identities are known from their first advertisements: the
      first two rounds take every connected node), and ``RoundReport.groups`` names the
      groups each sum is over. The default is ``DEFAULT_MIN_GROUP`` (3, the sites' default
      too). Without a ``roster``, the federation is learnt on first use: the identities
      that advertised keys in the run's first round, as each site learns them at its first
      round; later keys are never in a whole group (pin a roster to add sites). A
      wrapped ``configure_train`` that picks its own nodes has its pick rounded up to the
      whole groups of the picked nodes (said once).
    - ``validate`` (issue 31, docs/validation.md): ``"l2"`` makes every site prove in
      zero knowledge that its encoded update's L2 norm is bounded, and the server check
      after unmask that what was summed is what was proven: a site whose proof fails is
      left out like a dropout (``RoundReport.cheaters``, ``rejected``), and a site that
      proves one vector and masks another makes the round abort before anything is
      released. The bound is the DP clip norm under central or distributed DP, and
      ``validation_norm`` (in the model's units; honest sites clip their update to it
      and log it) outside DP. A site gets past the check with an update at most
      ``gamma`` (~17) times the bound, except with probability
      ``2^-validation_soundness_bits`` per challenge (default 40). ``"linf"`` is refused:
      the proof checks L2 norms, and the L2 norm a per-coordinate range implies (sqrt(d)
      times it) is met by random words of the round's width
      (``tests/test_validation_protocol.py::test_the_linf_bound_lets_random_words_through``).
      Costs: no extra exchange; per site and round one aggregated range proof (~2 s of CPU),
      per survivor ~0.1 s of server CPU. A validated round is never retried (a value beyond
      the range aborts it; the next round starts at the wider range), and outside DP its
      weight scale is fixed at ``max_weight``, its words at most 40 bits.
    - ``max_consecutive_aborts``: this many aborted rounds in a row stop the run with
      :class:`~strategies.SecureAggregationFailed` (a run whose rounds all abort stops
      with it too).
    """

    clip_range: float = 1.0
    field_bits: int = 0  # 0: chosen per round (narrowest_field_bits); else fixed in 8..64
    width_error: float = DEFAULT_WIDTH_ERROR
    model_error: float = DEFAULT_MODEL_ERROR
    max_weight: int = DEFAULT_MAX_WEIGHT
    degree: int | None = None
    threshold: int | None = None
    min_clients: int | None = None
    stage_timeout: float = 600.0
    node_wait_timeout: float = 120.0
    metric_slots: int = 8
    metric_range: float = 1e9
    metric_ranges: Mapping[str, float] = field(default_factory=dict)
    int_clip_range: float = 1024.0
    adaptive_range: bool = True
    range_memory: int = 3
    range_margin: float = 2.0
    weight_scale: int | None = None
    target_error: float = 2.0**-14
    max_consecutive_aborts: int = 3
    max_poll_interval: float = 0.5
    confidential: bool = False
    consistency: str = "global"
    min_group: int = DEFAULT_MIN_GROUP
    roster: str | None = None
    validate: str | None = None
    validation_norm: float | None = None
    validation_soundness_bits: int = 40

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SecAggConfig.{name}: {why}")

        if not self.clip_range > 0:
            raise bad("clip_range", f"must be > 0 (per-coordinate bound on the model delta), got {self.clip_range}")
        if not self.int_clip_range > 0:
            raise bad("int_clip_range", f"must be > 0 (bound on integer entries' change), got {self.int_clip_range}")
        if self.field_bits != 0 and not 8 <= self.field_bits <= 64:
            raise bad("field_bits", f"must be 0 (chosen per round) or in 8..64, got {self.field_bits}")
        if not 0 < self.width_error < 1:
            raise bad("width_error", f"must be in (0, 1) (a fraction of the range), got {self.width_error}")
        if not 0 < self.model_error < 1:
            raise bad("model_error", f"must be in (0, 1) (a bound in the model's units), got {self.model_error}")
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
        if not (self.metric_range > 0 and math.isfinite(self.metric_range)):
            raise bad("metric_range", f"must be a positive finite number, got {self.metric_range}")
        for name, r in self.metric_ranges.items():
            if not r > 0:
                raise bad("metric_ranges", f"the range of {name!r} must be > 0, got {r}")
        if self.range_memory < 1:
            raise bad("range_memory", f"must be >= 1 round, got {self.range_memory}")
        if not self.range_margin >= 1:
            raise bad("range_margin", f"must be >= 1 (a range below what a round needed would retry), got "
                      f"{self.range_margin}")
        ws = self.weight_scale
        if ws is not None and not (1 <= ws <= self.max_weight and (ws & (ws - 1) == 0 or ws == self.max_weight)):
            raise bad("weight_scale", f"must be a power of two in 1..max_weight={self.max_weight} or max_weight, "
                      f"got {ws}")
        if not 0 < self.target_error < 1:
            raise bad("target_error", f"must be in (0, 1) (a fraction of the range), got {self.target_error}")
        if not 0.005 <= self.max_poll_interval <= 10.0:
            raise bad("max_poll_interval", f"must be in 0.005..10 seconds, got {self.max_poll_interval}")
        if self.consistency not in CONSISTENCY_MODES:
            raise bad("consistency", f"must be one of {', '.join(map(repr, CONSISTENCY_MODES))}, got "
                      f"{self.consistency!r}")
        if self.min_group == 1 or self.min_group < 0:
            raise bad("min_group", f"must be 0 (off) or at least 2, got {self.min_group}")
        if self.validate == "linf":
            raise bad("validate", "'linf' is not offered: the proof checks L2 norms, and the L2 norm a range per "
                      "coordinate implies (sqrt(d) times it) is met by random words of the round's width; use 'l2' "
                      "(under DP the clip norm is the bound, outside DP set validation_norm)")
        if self.validate not in (None, "l2"):
            raise bad("validate", f"must be None or 'l2', got {self.validate!r}")
        if self.validation_norm is not None and not (self.validation_norm > 0 and math.isfinite(self.validation_norm)):
            raise bad("validation_norm", f"must be a positive finite L2 norm (model units), got {self.validation_norm}")
        if self.validation_norm is not None and not self.validate:
            raise bad("validation_norm", "is the norm bound of validate='l2' outside DP: set validate='l2' too")
        if not 40 <= self.validation_soundness_bits <= 128:
            raise bad("validation_soundness_bits", f"must be in 40..128 (sites refuse less than 40), got "
                      f"{self.validation_soundness_bits}")
        if self.validate and self.field_bits > 40:
            raise bad("field_bits", f"a validated round's words are at most 40 bits (the proof's domain), got "
                      f"{self.field_bits}")
        if self.validate and self.weight_scale not in (None, self.max_weight):
            raise bad("weight_scale", "a validated round is never retried, so its weight scale is max_weight "
                      f"(leave weight_scale unset), got {self.weight_scale}")
        if self.max_consecutive_aborts < 1:
            raise bad("max_consecutive_aborts", f"must be >= 1, got {self.max_consecutive_aborts}")
