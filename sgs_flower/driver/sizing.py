"""Each round's ranges, weight scale and word width, learnt from the rounds before it.

Why a module of its own: every round outside DP is sized from what earlier rounds'
securely summed histograms showed (the range each needed, the weights it carried), and
a round set up ahead is sized one round early. This state and its rules are all here;
the round itself (:mod:`sgs_flower.driver.rounds`) only asks for a spec and reports
what the released sum showed.
"""

from __future__ import annotations

import logging
from logging import INFO, WARNING

import numpy as np

from sgs_flower.dp.aggregator import RoundPlan
from sgs_flower.driver.config import SecAggConfig
from sgs_flower.driver.report import RoundReport
from sgs_flower.pipeline import (
    DEFAULT_WEIGHT_SCALE,
    DecodedUpdate,
    UpdateSpec,
    adapted_range,
    covering_range,
    covering_weight_scale,
    int_size_of,
    narrowest_field_bits,
    width_error_for,
    with_validation,
)
from sgs_flower.secagg.errors import OverflowRiskError

#: Bits a round set up ahead may lack at its actual range before it sets up in full
#: (see :meth:`Sizing.ahead_width`).
AHEAD_SLACK_BITS = 2
#: How much wider than round 1's configured range (times range_margin) round 2's width
#: is sized for (it is set up during round 1, before any range was measured): 4 bits,
#: once per run, so a round 1 whose retries widened the range up to 16x still pipelines
#: round 2 (3 exchanges) at the model_error bound.
UNMEASURED_RANGE_GROWTH = 16.0


class Sizing:
    """The next round's ranges and weight scale, and how rounds are sized from them."""

    def __init__(self, config: SecAggConfig, logger: logging.Logger) -> None:
        self.config, self.logger = config, logger
        c = config
        self.ranges = (c.clip_range, c.int_clip_range)  # the next round's; adapted after each round
        # the next round's weight scale; from the weight histogram after each round
        # a validated round is never retried, so no weight may be above its scale
        self.weight_scale = c.weight_scale or (c.max_weight if c.validate else min(DEFAULT_WEIGHT_SCALE, c.max_weight))
        self.needed: list[tuple[float, float]] = []  # the ranges each recent round needed (covering ranges)
        self.weights_needed: list[int] = []  # the covering weight scale of each recent round

    @property
    def retry_error(self) -> float:
        """The quantization bound (fraction of the range) above which a round retries at a
        finer weight scale: ``target_error``, or with a width chosen per round the
        ``width_error`` it was chosen for (a finer bound than the width holds would
        retry every round for nothing)."""
        c = self.config
        return c.target_error if c.field_bits else max(c.target_error, c.width_error)

    def field_bits_for(self, cohort_size: int, ahead: bool = False) -> int:
        """The word width of a round outside DP (``field_bits``, else chosen).

        Before any round has measured the weights (no weight histogram yet, no
        configured ``weight_scale``), the sites' weights may lie far below the initial
        weight scale S, and the bound grows as S / weight: that round is sized for
        weight 1 (``width_error / S``), so it needs no retry at a finer scale; later
        rounds know S within a factor 2 of the largest weight. A round set up ahead
        (``ahead``) is used only if the current round succeeds, which measures them.
        The bound is also at most ``model_error`` in the model's units at the next
        round's range (:func:`~sgs_flower.pipeline.width_error_for`)."""
        c = self.config
        if c.field_bits:
            return c.field_bits
        # a round set up ahead takes its width before this round's range adapts. Once a
        # round has measured the range it is sized for this range (in the steady state the
        # range stays; a doubling costs that one round a bound of 2x model_error, within
        # AHEAD_SLACK_BITS, rather than a bit in every round); while none has (round 1's
        # range is a guess, which a retry may widen many times over) for
        # UNMEASURED_RANGE_GROWTH times range_margin times it
        grow = 1.0
        if ahead and c.adaptive_range and not self.needed:
            grow = c.range_margin * UNMEASURED_RANGE_GROWTH
        scale = 1.0
        # (under validation the scale stays max_weight and the weights are never measured:
        # every round, set up ahead or not, is sized for it, so the rounds stay pipelined)
        if c.max_weight > 1 and not self.weights_needed and c.weight_scale is None and (not ahead or c.validate):
            scale = float(min(self.weight_scale, c.max_weight))
        try:
            return narrowest_field_bits(
                cohort_size, c.max_weight, width_error_for(grow * self.ranges[0], c.width_error, c.model_error) / scale)
        except OverflowRiskError:
            # a range so wide (a huge outlier widened it) that model_error needs more than
            # 64-bit words: the round keeps width_error of the range, and says so
            self.logger.log(WARNING, "a range of +-%g needs more than 64-bit words to hold model_error=%g; this "
                            "round is sized for width_error=%g of the range instead", grow * self.ranges[0],
                            c.model_error, c.width_error)
            return narrowest_field_bits(cohort_size, c.max_weight, c.width_error / scale)

    def ahead_width(self, ahead_bits: int | None, cohort_size: int, plan: RoundPlan | None) -> int | None:
        """The width of a round set up ahead (``ahead_bits``; None: none was), kept while it
        holds this round's bound within :data:`AHEAD_SLACK_BITS` bits at the range this
        round now has; None: the width is chosen afresh (the round then sets up in full
        if that changes its parameters).

        Why a slack: the setup fixed the width one round early, before that round's range
        adapted (and before any retry widened it), and setting up again costs two more
        exchanges, which a deployment feels far more than one round's bound at up to 4x
        the target (reported as it is; the next round is sized from the new range)."""
        if ahead_bits is None or plan is not None or self.config.field_bits:
            return None
        return ahead_bits if ahead_bits + AHEAD_SLACK_BITS >= self.field_bits_for(cohort_size) else None

    def make_spec(
        self, cohort_size: int, plan: RoundPlan | None, like: list[np.ndarray] | None = None, ahead: bool = False,
        field_bits: int | None = None, model_key: str = "",
    ) -> UpdateSpec:
        """The round's spec. Outside DP its word width is the narrowest that holds the
        cohort's sum at ``width_error`` times the range (unless ``field_bits`` fixes it):
        the cohort size is known here, before the round's setup carries the width. Under
        DP the width is the plan's (:class:`~sgs_flower.dp.aggregator.DPAggregator`: the
        narrowest that holds the sum and its noise, unless ``field_bits`` fixes it)."""
        c = self.config
        if plan is None:
            spec = UpdateSpec(
                clip_range=self.ranges[0], int_clip_range=self.ranges[1], max_cohort=cohort_size,
                max_weight=c.max_weight, weight_scale=min(self.weight_scale, c.max_weight),
                field_bits=field_bits or self.field_bits_for(cohort_size, ahead),
                metric_slots=0 if c.confidential else c.metric_slots,
                metric_range=c.metric_range, metric_ranges=tuple(sorted(c.metric_ranges.items())),
                int_size=int_size_of(like) if like is not None else 0, model_key=model_key,
                l2_clip=(c.validation_norm or 0.0) if c.validate else 0.0,
            )
        else:  # under DP: unweighted, no released metrics or counters, the DP plan's clip and fixed point
            spec = UpdateSpec(max_cohort=cohort_size, max_weight=1, field_bits=plan.field_bits, metric_slots=0,
                              **plan.spec_fields)
        if c.validate and like is not None:  # the bound the sites prove (issue 31), in the spec's units
            spec = with_validation(spec, c.validate, int(sum(a.size for a in like)), c.validation_soundness_bits)
        return spec

    def range_report(self, report: RoundReport, spec: UpdateSpec, decoded: DecodedUpdate,
                     like: list[np.ndarray]) -> None:
        """Log what clipping did this round and adapt the ranges for the next one."""
        log = self.logger.log
        n = len(report.survivors)
        int_size = spec.int_size
        float_size = int(sum(a.size for a in like)) - int_size
        report.clipped = sum(decoded.clipped)
        report.clipped_fraction = report.clipped / max(1, n * (float_size + int_size))
        report.error_bound = decoded.error_bound
        report.metric_clipped = {
            name: decoded.metric_clipped[i] for i, name in enumerate(decoded.metrics) if decoded.metric_clipped[i]
        }
        # the bound next to the scale of what it bounds: the released mean update's RMS
        # (the server holds it anyway), so a user reads how coarse the round really was
        rms = float(np.sqrt(np.mean(np.square(decoded.mean_delta[:float_size])))) if float_size else 0.0
        report.update_rms = rms
        log(INFO, "secure round %s: %d of %d coordinates beyond the range +-%g (integer entries +-%g), weight "
            "scale %d, %d retries, %d-bit words; quantization error <= %.3g per coordinate (%.2g of the mean "
            "update's RMS %.3g)", report.server_round, report.clipped, n * (float_size + int_size), spec.clip_range,
            spec.int_clip_range, spec.weight_unit, report.retries, spec.field_bits, decoded.error_bound,
            decoded.error_bound / rms if rms > 0 else float("inf"), rms)
        if report.clipped:
            log(WARNING, "secure round %s: %d coordinates lay beyond the range even after %d retries: nothing is "
                "released this round", report.server_round, report.clipped, report.retries)
        for name, k in report.metric_clipped.items():
            log(WARNING, "secure round %s: train metric %r of %d clients lay beyond +-%g and was clipped; set "
                "SecAggConfig(metric_ranges={%r: ...})", report.server_round, name, k, spec.range_of(name), name)
        report.weight_scale = spec.weight_unit
        report.field_bits = spec.field_bits
        if decoded.total_weight > 0 and not self.config.validate:  # the histogram counts only usable updates
            self.weights_needed.append(covering_weight_scale(spec.max_weight, decoded.weight_histogram))
            self.weight_scale = max(self.weights_needed[-self.config.range_memory:])
        if self.config.adaptive_range:
            self._adapt(report, spec, decoded, float_size, int_size)

    def _adapt(self, report: RoundReport, spec: UpdateSpec, decoded: DecodedUpdate, float_size: int,
               int_size: int) -> None:
        """What this round needed (every summed value below it), then the next round's
        range: a margin over the largest need of the last ``range_memory`` rounds, so one
        quiet round never narrows the range below what the rounds before it needed."""
        self.needed.append((
            covering_range(spec.clip_range, decoded.histograms[0]) if float_size else spec.clip_range,
            covering_range(spec.int_clip_range, decoded.histograms[1]) if int_size else spec.int_clip_range,
        ))
        recent = self.needed[-self.config.range_memory:]
        # model-confidential: the in-range bins are masked, so a need is never below the
        # range: the range only widens (no margin, else it would double every round)
        margin = 1.0 if self.config.confidential else self.config.range_margin
        # a part the model does not have keeps its range: its "need" is the range itself,
        # which the margin would otherwise double every round (+-1024 became +-524288
        # over the app's 10 rounds, which has no integer entries)
        self.ranges = (
            adapted_range([f for f, _ in recent], spec.clip_range, margin) if float_size else spec.clip_range,
            adapted_range([i for _, i in recent], spec.int_clip_range, margin) if int_size else spec.int_clip_range,
        )
        self.logger.log(INFO, "secure round %s: next round's range +-%g (integer entries +-%g), weight scale %d",
                        report.server_round, *self.ranges, self.weight_scale or spec.max_weight)
