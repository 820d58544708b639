"""Distributed DP at a per-round narrow word width (issue 21.2).

The width of a distributed-DP round is the narrowest that holds the cohort's clipped
sum *and its Skellam noise*; these tests check that the chosen width is that narrowest
one, that the secure sum at it equals the plaintext sum (nothing wraps), that the
narrow fixed point costs at most ~1 % of epsilon, that the ledger still re-derives its
epsilon, and, as the attacker, that a server announcing too little noise headroom
for the width, or a width below a site's floor, is refused before training.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_active_server import N_MOD, ModSite, _masked_extra, _through_shares

from sgs_flower.dp.aggregator import (
    DDP_ROUNDING_OVERHEAD,
    DPAggregator,
    ddp_narrow_quantization,
)
from sgs_flower.dp.config import DPConfig
from sgs_flower.dp.ledger_accounting import verify
from sgs_flower.dp.noise import noise_headroom
from sgs_flower.ledger.ledger import Ledger
from sgs_flower.pipeline import UpdateSpec, decode_update, encode_update
from sgs_flower.secagg import wire
from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.errors import MalformedMessageError
from sgs_flower.secagg.quantize import from_field
from sgs_flower.secagg.server import RoundParams, SecAggServer
from sgs_flower.secagg.simulate import run_protocol
from sgs_flower.secagg.wire import Stage

DIM_LOGREG = 650  # the digits logistic regression: 64 x 10 + 10


def _ddp(z: float = 1.0, **kw) -> DPConfig:
    base = dict(mode="distributed-dp", clip_norm=1.0, noise_multiplier=z, rotate=False)
    base.update(kw)
    return DPConfig(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize("cohort", [10, 100])
@pytest.mark.parametrize("z", [0.5, 1.0, 4.0])
def test_the_round_gets_the_narrowest_width_that_holds_the_sum_and_its_noise(cohort, z):
    agg = DPAggregator(_ddp(z, min_survivors=max(1, 2 * cohort // 3)))
    plan = agg.plan(1, cohort, cohort, DIM_LOGREG)
    f = plan.spec_fields
    levels = (1 << (f["bits_per_coordinate"] - 1)) - 1
    # the fixed point: the coarsest whose rounding adds at most 1 % to the sensitivity
    assert np.sqrt(DIM_LOGREG) / levels <= DDP_ROUNDING_OVERHEAD < np.sqrt(DIM_LOGREG) / (levels // 2)
    # the headroom is what a site re-derives from the spec, and the width the narrowest holding both
    assert f["noise_headroom"] == noise_headroom(f["noise_mu_share"], cohort)
    reach = cohort * levels + f["noise_headroom"]
    assert reach < 1 << (plan.field_bits - 1) and reach >= 1 << (plan.field_bits - 2)
    assert plan.field_bits <= 21  # vs 32 before: upload ~0.66x of the old DP rounds
    UpdateSpec(max_cohort=cohort, max_weight=1, field_bits=plan.field_bits, **f)  # a site admits it


def test_a_fixed_width_is_kept_and_central_dp_stays_at_32_bits():
    assert DPAggregator(_ddp(), field_bits=32).plan(1, 10, 10, DIM_LOGREG).field_bits == 32
    central = DPAggregator(DPConfig(mode="central-dp", clip_norm=1.0, noise_multiplier=1.0))
    assert central.plan(1, 10, 10, DIM_LOGREG).field_bits == 32


def test_a_tiny_noise_multiplier_keeps_the_rounding_error_below_a_tenth_of_the_noise():
    """z = 1e-5 (a near-noiseless run, as in the deployment comparison with plaintext):
    the dimension alone would allow a fixed point whose rounding error on the sum
    (std up to sqrt(n) / 2) dwarfs the noise; the width grows instead."""
    n = 3
    bits, q = ddp_narrow_quantization(1e-5, 2.0, n, n, 38_000)
    assert np.sqrt(n) / 2 <= 0.1 * 1e-5 * q.levels < np.sqrt(n) / 2 * 2
    assert bits > ddp_narrow_quantization(1.0, 2.0, n, n, 38_000)[0]


def test_a_huge_noise_multiplier_coarsens_the_fixed_point_instead_of_failing():
    """The calibration brackets z up to 500: numpy cannot sample such shares exactly at
    the fine fixed point, so it is coarsened (and accounted at its rounding)."""
    bits, q = ddp_narrow_quantization(500.0, 1.0, 10, 7, DIM_LOGREG)
    assert q.mu_share <= 1e10 and q.bits_per_coordinate < 12 and bits <= 64
    with pytest.raises(ValueError, match="overhead must be in"):
        ddp_narrow_quantization(1.0, 1.0, 10, 7, DIM_LOGREG, overhead=0.0)


def test_the_secure_sum_at_the_narrow_width_is_the_plaintext_noisy_sum(tmp_path):
    """Real SecAgg+ at the plan's width, 2 of 12 dropping: the unmasked words are exactly
    the survivors' encoded (clipped, rounded, noised) integers summed, so nothing
    wrapped; and the released mean is the clipped mean within the noise."""
    n, m = 12, DIM_LOGREG
    agg = DPAggregator(_ddp(z=0.05, min_survivors=10), ledger_path=tmp_path / "l.jsonl")
    plan = agg.plan(1, n, n, m)
    assert plan.field_bits < 32
    spec = UpdateSpec(max_cohort=n, max_weight=1, field_bits=plan.field_bits, **plan.spec_fields)
    rng = np.random.default_rng(3)
    deltas = [rng.normal(0, 0.05, m) for _ in range(n)]
    ids = list(range(1, n + 1))
    vectors = {u: encode_update(d, {}, 1, spec).vector for u, d in zip(ids, deltas, strict=True)}
    params = RoundParams(run_id=1, round_id=1, cohort=tuple(ids), vector_length=spec.vector_length(m),
                         field_bits=spec.field_bits, min_clients=plan.min_survivors)
    outcome = run_protocol(SecAggServer(params), {u: SecAggClient(u) for u in ids}, vectors,
                           {Stage.MASKED_INPUT: {1, 2}})
    survivors = sorted(outcome.survivors)
    assert survivors == ids[2:]
    plain = sum(from_field(vectors[u], spec.field_bits).astype(np.int64) for u in survivors)
    assert np.array_equal(from_field(outcome.total, spec.field_bits).astype(np.int64), plain)
    dec = decode_update(outcome.total, spec, len(survivors), m)
    mean = agg.release(plan, dec.weighted_delta_sum, dec.count, n - dec.count)
    want = np.mean([d * min(1.0, 1.0 / np.linalg.norm(d)) for d in deltas[2:]], axis=0)
    std = Ledger.open(tmp_path / "l.jsonl").round_records()[0]["noise"]["std_real"] / len(survivors)
    assert np.max(np.abs(mean - want)) < 6 * std + 2 / (plan.scale * len(survivors))
    assert Ledger.open(tmp_path / "l.jsonl").round_records()[0]["noise"]["field_bits"] == plan.field_bits


def test_the_narrow_fixed_point_costs_at_most_one_percent_and_the_ledger_re_derives_it(tmp_path):
    """Same z: epsilon at the narrow fixed point vs the 32-bit layout's finest one
    (an independent accounting of the same noise at another width); the ledger's
    stated epsilon replays from its events."""
    eps = {}
    for bits in (0, 32):
        path = tmp_path / f"l{bits}.jsonl"
        agg = DPAggregator(_ddp(z=1.0, min_survivors=70), field_bits=bits, ledger_path=path)
        for r in (1, 2, 3):
            plan = agg.plan(r, 100, 100, DIM_LOGREG)
            agg.release(plan, np.zeros(DIM_LOGREG), 100, 0)
        eps[bits] = agg.spent().consumer
        assert verify(path).ok, verify(path).summary()
        assert Ledger.open(path).round_records()[-1]["noise"]["field_bits"] == (plan.field_bits if bits == 0 else 32)
    assert eps[32] <= eps[0] <= eps[32] * (1 + 3 * DDP_ROUNDING_OVERHEAD)


# ------------------------------------------------------------------ the server lies


def _narrow_dp_spec(n: int = N_MOD) -> UpdateSpec:
    plan = DPAggregator(_ddp(z=1.0, min_survivors=n)).plan(1, n, n, 15)
    return UpdateSpec(max_cohort=n, max_weight=1, field_bits=plan.field_bits, metric_slots=0, **plan.spec_fields)


def test_a_server_that_reserves_too_little_noise_headroom_for_the_width_is_refused():
    """The attack: announce a width that holds the clipped sum but not the noise, by
    under-stating the noise headroom, so that the noisy sum wraps mod 2^b (a wrong
    model, or a victim's value learned modulo the field). The site re-derives the
    headroom from the spec's own noise and refuses before training."""
    honest = _narrow_dp_spec()
    sites = {u: ModSite(u) for u in range(1, N_MOD + 1)}
    bundles = _through_shares(sites, honest)
    extra, fields = _masked_extra(honest)
    extra[wire.SPEC_KEY]["noise_headroom"] = 1  # the sum fits; its noise would not
    out = sites[1].send(Stage.MASKED_INPUT, bundles[1], extra, fields)
    assert out.has_error() and "OverflowRiskError" in out.error.reason
    assert "for the noise" in out.error.reason and "could wrap" in out.error.reason
    assert sites[1].trained == 0
    with pytest.raises(MalformedMessageError, match=r"OverflowRiskError.*reserves 1 for the noise"):
        UpdateSpec.from_config({**honest.to_config(), "noise_headroom": 1})


def test_a_server_that_shrinks_the_width_under_honest_headroom_is_refused():
    """The width itself too narrow for sum plus noise (the headroom honest): refused by
    the site's overflow check of the spec."""
    honest = _narrow_dp_spec()
    with pytest.raises(MalformedMessageError, match="OverflowRiskError"):
        UpdateSpec.from_config({**honest.to_config(), "field_bits": honest.field_bits - 2})


def test_a_dp_width_below_the_sites_floor_is_refused_at_setup():
    spec = _narrow_dp_spec()
    floor = {"sgs-min-bits": spec.field_bits + 1}
    sites = {u: ModSite(u, floor if u == 1 else None) for u in range(1, N_MOD + 1)}
    params = RoundParams(run_id=1, round_id=3, cohort=tuple(sorted(sites)), vector_length=spec.vector_length(15),
                         field_bits=spec.field_bits)
    out = sites[1].send(Stage.ADVERTISE_KEYS, SecAggServer(params).setup_messages()[1])
    assert out.has_error() and out.error.reason.startswith("PolicyError") and "sgs-min-bits" in out.error.reason
    assert sites[1].trained == 0
