"""A lying server against the Flower glue (issue 18): what it still learned through the
real ``secagg_mod`` at default settings, and that it learns it no more.

1. DP noise below the site's floor through the spec's units (an L2 clip far above the
   range; "as many bits as fit" in a 64-bit field); a spec field the site does not know.
2. A one-bit oracle in the existence of an error reply (a binary search over
   ``max_weight``, ranges or metric slots).
3. Differencing two rounds over (nearly) the same model whose cohorts differ by one site
   (a one-ulp perturbation; the same model under a new run id).
4. Server-chosen record names that make the user's train step fail.

Each attack is played through the real mod with the user's unchanged train function
(``ModSite`` of ``test_active_server``); the honest stages use the project's server.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_active_server import (
    MODEL,
    N_MOD,
    ModSite,
    _masked_extra,
    _reply,
    _spec,
    _through_shares,
    finish_mod_round,
    mod_round_to_consistency,
)

from sgs_flower.dp.noise import noise_headroom, secure_rng, skellam_share
from sgs_flower.dp.site import SiteAccountant, SiteBudgetError
from sgs_flower.pipeline import (
    FAILURE_REASONS,
    UpdateSpec,
    decode_update,
    encode_failure,
    encode_update,
)
from sgs_flower.secagg import wire
from sgs_flower.secagg.errors import ConfigurationError, MalformedMessageError
from sgs_flower.secagg.quantize import from_field
from sgs_flower.secagg.wire import Stage

MODEL_SIZE = 15
FLOOR = 0.5  # the default sgs-dp-min-noise


def _old_reading(spec: UpdateSpec, assumed_bits: int = 32) -> float:
    """What the site used to read from a spec: sqrt(2 m mu) / levels at the spec's
    ``bits_per_coordinate`` (or 32 when it said 0), whatever the range and clip."""
    bits = spec.bits_per_coordinate or assumed_bits
    return math.sqrt(2 * spec.min_survivors * spec.noise_mu_share) / ((1 << (bits - 1)) - 1)


def _dp_spec(**kw) -> UpdateSpec:
    base = dict(clip_range=1.0, max_cohort=N_MOD, max_weight=1, field_bits=32, metric_slots=0,
                dp_mode="distributed", l2_clip=1.0, bits_per_coordinate=16, min_survivors=N_MOD)
    base.update(kw)
    levels = (1 << ((base["bits_per_coordinate"] or 32) - 1)) - 1
    base.setdefault("noise_mu_share", (FLOOR * levels) ** 2 / (2 * base["min_survivors"]))
    # the headroom the site demands for this noise (a spec reserving less is refused first)
    base.setdefault("noise_headroom", noise_headroom(base["noise_mu_share"], base["max_cohort"]))
    return UpdateSpec(**base)  # type: ignore[arg-type]


def _measured_noise_multiplier(spec: UpdateSpec, model_size: int, delta: np.ndarray | None) -> float:
    """From the site's actual contribution (the real encoder, no noise: its L2 norm in
    integer units) and its actual noise share (sampled by the library, variance
    estimated from 40,000 draws): std of the noise of ``min_survivors`` shares / norm."""
    dim = spec.dp_dimension(model_size)
    zeros = np.zeros(dim, dtype=np.int64)
    if delta is None:
        enc = encode_failure(spec, model_size, FAILURE_REASONS[0], integer_noise=zeros)
    else:
        enc = encode_update(delta, {}, 1, spec, integer_noise=zeros)
    q = from_field(enc.vector[:dim], spec.field_bits).astype(np.float64)
    var = float(np.var(skellam_share(40_000, spec.noise_mu_share, secure_rng())))
    norm = float(np.linalg.norm(q))
    return math.inf if norm == 0 else math.sqrt(spec.min_survivors * var) / norm


# ---------------------------------------------------------------- 1. DP units
def _dp_round_masked_input(sites, spec, u=1):
    bundles = _through_shares(sites, spec)
    extra, fields = _masked_extra(spec)
    return sites[u].send(Stage.MASKED_INPUT, bundles[u], extra, fields)


def test_an_l2_clip_far_above_the_range_is_refused_before_training():
    """Attack 1a: l2_clip = 1000 x clip_range. The spec's noise read the old way is the
    floor (0.5), but one site may send clip_range * sqrt(d) (far above the clip), so
    the real noise multiplier is about 0.5 / sqrt(15) here and the site refuses."""
    sites = {u: ModSite(u) for u in range(1, N_MOD + 1)}
    spec = _dp_spec(l2_clip=1000.0)
    assert _old_reading(spec) == pytest.approx(FLOOR)
    assert spec.dp_contribution(MODEL_SIZE).noise_multiplier < FLOOR / 3.8
    assert _measured_noise_multiplier(spec, MODEL_SIZE, np.full(MODEL_SIZE, 50.0)) < FLOOR / 3.8  # what it was
    out = _dp_round_masked_input(sites, spec)
    assert out.has_error() and "below this site's noise floor" in out.error.reason
    assert sites[1].trained == 0


def test_as_many_bits_as_fit_in_a_64_bit_field_is_read_at_the_encoders_levels():
    """Attack 1b: bits_per_coordinate = 0 in a 64-bit field, noise sized for 32 bits.
    The encoder uses 2^21 times the levels the site assumed: it now reads them from
    the encoder's own configuration and refuses."""
    sites = {u: ModSite(u) for u in range(1, N_MOD + 1)}
    spec = _dp_spec(field_bits=64, bits_per_coordinate=0, noise_mu_share=(FLOOR * (2**31 - 1)) ** 2 / (2 * N_MOD))
    assert _old_reading(spec) == pytest.approx(FLOOR)
    assert spec.quantization.levels > 2**51  # 53 bits (float64 exact), 2^21 x what the site assumed
    assert spec.dp_contribution(MODEL_SIZE).noise_multiplier < 1e-6
    out = _dp_round_masked_input(sites, spec)
    assert out.has_error() and "below this site's noise floor" in out.error.reason
    assert sites[1].trained == 0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    field_bits=st.sampled_from([16, 24, 32, 48, 64]),
    bits=st.integers(0, 40),
    log_range=st.floats(-3, 3),
    log_clip=st.floats(-3, 3),
    model_size=st.integers(1, 200),
    rotate=st.booleans(),
    cohort=st.integers(1, 40),
    survivors_frac=st.floats(0.01, 1.0),
    log_mu=st.floats(0, 15),
    headroom_frac=st.floats(0.0, 2.0),
    kind=st.sampled_from(["spread", "spike", "failure"]),
)
def test_an_admitted_spec_never_carries_less_noise_than_the_floor(
    field_bits, bits, log_range, log_clip, model_size, rotate, cohort, survivors_frac, log_mu, headroom_frac, kind
):
    """Over the spec space: whenever the site admits a spec, the noise multiplier
    measured from its actual contribution (the real encoder on a worst-case update, or
    the unusable vector) and its actual noise is at least the floor it accepted."""
    headroom = int(headroom_frac * noise_headroom(10.0**log_mu, cohort))  # below 1x: refused as a wrap risk
    try:
        spec = UpdateSpec(
            clip_range=10.0**log_range, max_cohort=cohort, max_weight=1, field_bits=field_bits, dp_mode="distributed",
            l2_clip=10.0**log_clip, noise_mu_share=10.0**log_mu, bits_per_coordinate=bits, noise_headroom=headroom,
            rotation_seed=7 if rotate else -1, min_survivors=max(1, round(survivors_frac * cohort)),
        )
    except ConfigurationError:
        return  # a spec the site cannot even build is refused (a MalformedMessageError reply)
    acct = SiteAccountant(FLOOR, 0.0, 1e-5)
    try:
        acct.admit(spec.dp_contribution(model_size))
    except SiteBudgetError:
        return  # refused before training
    delta = {"spread": np.full(model_size, 1e6), "spike": np.eye(1, model_size, 0).ravel() * 1e6,
             "failure": None}[kind]
    assert _measured_noise_multiplier(spec, model_size, delta) >= FLOOR * 0.95


def test_a_spec_field_the_site_does_not_know_or_lacks_is_refused():
    spec = _spec().to_config()
    with pytest.raises(MalformedMessageError, match=r"unknown fields \['noise_scale_override'\]"):
        UpdateSpec.from_config({**spec, "noise_scale_override": 0.0})
    del spec["l2_clip"]
    with pytest.raises(MalformedMessageError, match=r"lacks \['l2_clip'\]"):
        UpdateSpec.from_config(spec)


def test_unknown_spec_field_through_the_mod_is_an_error_before_training():
    sites = {u: ModSite(u) for u in range(1, N_MOD + 1)}
    spec = _spec()
    bundles = _through_shares(sites, spec)
    extra, fields = _masked_extra(spec)
    extra[wire.SPEC_KEY]["future_field"] = 1
    out = sites[1].send(Stage.MASKED_INPUT, bundles[1], extra, fields)
    assert out.has_error() and "MalformedMessageError" in out.error.reason and "future_field" in out.error.reason
    assert sites[1].trained == 0


def test_a_site_requiring_distributed_dp_refuses_a_round_without_it():
    sites = {u: ModSite(u, {"sgs-require-dp": "true"} if u == 1 else None) for u in range(1, N_MOD + 1)}
    out = _dp_round_masked_input(sites, _spec())
    assert out.has_error() and "requires distributed DP" in out.error.reason
    assert sites[1].trained == 0


# ---------------------------------------------------------------- 2. replies independent of data
class DataSite(ModSite):
    """A site whose data decide its num-examples, its loss and whether its training
    fails: ``kind`` is one of ok, big (10^6 examples), nan (a NaN update and loss),
    raise (its train step raises)."""

    def __init__(self, node: int, kind: str) -> None:
        super().__init__(node)
        self.kind = kind

    def train(self, msg: Message, context: Context) -> Message:
        self.trained += 1
        if self.kind == "raise":
            raise ValueError("this site's data broke its training")
        arrays = msg.content.array_records["arrays"]
        step = np.nan if self.kind == "nan" else 0.01 * context.node_id
        new = ArrayRecord({k: Array((v.numpy() + step).astype(v.numpy().dtype)) for k, v in arrays.items()})
        examples = 10**6 if self.kind == "big" else 10 + context.node_id
        metrics = MetricRecord({"num-examples": examples, "train_loss": float(step) + self.loss})
        return Message(RecordDict({"arrays": new, "metrics": metrics}), reply_to=msg)


def _reply_shape(out: Message) -> tuple:
    """What the server sees of a reply besides the masked words: error or not, its
    stage, vector length and dtype, metric-name fields, next-round fields."""
    if out.has_error():
        return ("error", out.error.code, out.error.reason)
    rec = out.content.config_records[wire.RECORD_KEY]
    vec = out.content.array_records[wire.VECTOR_KEY][wire.FIELD_VECTOR]
    meta = {k: (v if k != wire.FIELD_PAYLOAD else len(v)) for k, v in rec.items()}  # type: ignore[arg-type]
    return ("ok", rec[wire.FIELD_STAGE], vec.shape, vec.dtype, tuple(sorted(meta.items(), key=str)))


@pytest.mark.parametrize(
    "probe",
    [dict(max_weight=w) for w in (1, 8, 64, 1024)]
    + [dict(clip_range=r) for r in (1e-4, 1e4)]
    + [dict(metric_slots=k, metric_range=1e-3) for k in (0, 1, 2)],
)
def test_a_server_searching_over_weights_ranges_and_slots_sees_the_same_replies_for_different_data(probe):
    """Attack 2: for each server-chosen probe, two sites with different data (11 vs
    10^6 examples; a NaN update; a train step that raises after a first good round) give
    replies of the same type, stage, size and fields: only the masked words differ."""
    shapes: dict[str, tuple] = {}
    for kind in ("ok", "big", "nan", "raise"):
        sites = {u: DataSite(u, "ok") for u in range(1, N_MOD + 1)}
        # round 1 honest (every site learns its metric names), round 2 the probe
        server, reqs = mod_round_to_consistency(sites, _spec(), round_id=1)
        finish_mod_round(sites, server, reqs)
        sites[1].kind = kind
        spec = _spec(**probe)
        bundles = _through_shares(sites, spec)
        extra, fields = _masked_extra(spec, {k: v + 1.0 for k, v in MODEL.items()})
        shapes[kind] = _reply_shape(sites[1].send(Stage.MASKED_INPUT, bundles[1], extra, fields))
        assert sites[1].trained == 2
    assert shapes["ok"][0] == "ok"
    assert shapes["big"] == shapes["nan"] == shapes["raise"] == shapes["ok"]


def test_the_sum_counts_unusable_updates_by_reason_and_the_mean_skips_them():
    """Where the failures went: inside the masked vector. The server's sum says how many
    survivors' updates were unusable and why; the weighted mean is over the others."""
    kinds = {1: "ok", 2: "big", 3: "nan", 4: "raise", 5: "ok"}
    sites = {u: DataSite(u, k) for u, k in kinds.items()}
    spec = _spec(max_weight=1000)
    server, reqs = mod_round_to_consistency(sites, spec)
    dec = decode_update(finish_mod_round(sites, server, reqs), spec, N_MOD, MODEL_SIZE, None)
    assert dict(dec.failures) == {"weight outside 1..max_weight": 1, "non-finite update or metric": 1,
                                  "train step raised": 1}
    assert dec.total_weight == 11 + 15
    np.testing.assert_allclose(dec.mean_delta, (11 * 0.01 + 15 * 0.05) / 26, atol=1e-6)


def test_under_distributed_dp_an_unusable_update_is_a_noisy_count_only():
    """Under DP the failure is one more coordinate of the clipped, noised vector (the
    flag at the clip norm, the delta zero): the sensitivity is unchanged and the server
    gets a noisy count, with the noise the sites' floor promises."""
    spec = _dp_spec(noise_mu_share=(2.0 * ((1 << 15) - 1)) ** 2 / (2 * N_MOD))  # z = 2 on the sum
    rng = np.random.default_rng(3)
    estimates = []
    for _ in range(200):
        total = np.zeros(spec.vector_length(MODEL_SIZE), dtype=np.uint64)
        for u in range(1, N_MOD + 1):
            noise = skellam_share(spec.dp_dimension(MODEL_SIZE), spec.noise_mu_share, rng)
            enc = (encode_failure(spec, MODEL_SIZE, FAILURE_REASONS[0], rng, noise) if u <= 2 else
                   encode_update(np.full(MODEL_SIZE, 0.1), {}, 1, spec, rng, noise))
            total = (total + enc.vector.astype(np.uint64)) % (1 << 32)
        dec = decode_update(total.astype(np.uint32), spec, N_MOD, MODEL_SIZE)
        estimates.append(dec.failed_estimate)
    assert np.mean(estimates) == pytest.approx(2.0, abs=0.4)  # unbiased: 2 failed
    assert np.std(estimates) == pytest.approx(2.0, rel=0.2)  # with the noise of z = 2, never exact
    assert dec.failed_std == pytest.approx(2.0, rel=1e-3)  # what the server knows of that noise
    assert dec.total_weight == N_MOD  # every survivor counts once under DP; the weight tells nothing


# ---------------------------------------------------------------- 3. differencing
def _nudged(model: dict[str, np.ndarray], by: float | None = None) -> dict[str, np.ndarray]:
    """The model with one weight moved by one ulp (or by ``by``)."""
    out = {k: v.copy() for k, v in model.items()}
    w = out["w"]
    w[0, 0] = np.nextafter(w[0, 0], np.float32(np.inf)) if by is None else w[0, 0] + np.float32(by)
    return out


def _difference_attack(node_config: dict | None, nudge: float | None = None):
    """Round 3 over sites 1..6 on MODEL; round 4 over 1..5 on MODEL nudged. Returns the
    error replies of round 4's consistency stage and, if it went through, what the
    difference of the two sums gives for site 6 (delta, weight, loss)."""
    sites = {u: ModSite(u, node_config) for u in range(1, 7)}
    spec6, spec5 = _spec(n=6), _spec(n=5)
    server, reqs = mod_round_to_consistency(sites, spec6, round_id=3)
    first = decode_update(finish_mod_round(sites, server, reqs), spec6, 6, MODEL_SIZE, ["train_loss"])
    five = {u: sites[u] for u in range(1, 6)}
    server2, reqs2 = mod_round_to_consistency(five, spec5, round_id=4, model=_nudged(MODEL, nudge))
    replies = {u: five[u].send(Stage.CONSISTENCY, r) for u, r in reqs2.items()}
    errors = [r.error.reason for r in replies.values() if r.has_error()]
    if errors:
        return errors, None
    unmask = server2.collect_consistency({u: _reply(r) for u, r in replies.items()})
    total = server2.collect_unmask({u: _reply(five[u].send(Stage.UNMASK, r)) for u, r in unmask.items()}).total
    second = decode_update(total, spec5, 5, MODEL_SIZE, ["train_loss"])
    w6 = first.total_weight - second.total_weight
    d6 = (first.weighted_delta_sum - second.weighted_delta_sum) / w6
    loss6 = (first.metrics["train_loss"] * first.total_weight - second.metrics["train_loss"] * second.total_weight) / w6
    return [], (d6, w6, loss6)


def test_a_one_ulp_nudged_model_over_a_cohort_without_one_site_is_refused_at_default_settings():
    """Attack 3: the model moved by one ulp has a new digest; the five sites that were in
    both rounds see a near copy of a model they signed another set for, and refuse.
    (Whole-group participation is off in this file's sites, ModSite, to isolate the
    near-copy rule; at the sites' true default the group check refuses first:
    ``test_beyond_the_near_copy_distance_the_groups_refuse_at_default_settings``.)"""
    errors, leaked = _difference_attack(None)
    assert leaked is None and len(errors) == 5
    assert all("PolicyError" in e and "near copy" in e for e in errors)


def test_without_the_near_copy_rule_the_same_attack_recovers_the_site_exactly():
    """The test above could fail: with the rule off (sgs-min-model-change=0) the
    difference of the two sums is site 6's update, weight and loss to rounding."""
    errors, leaked = _difference_attack({"sgs-min-model-change": 0})
    assert not errors and leaked is not None
    d6, w6, loss6 = leaked
    assert w6 == 16 and loss6 == pytest.approx(6.123456789, abs=1e-3)
    np.testing.assert_allclose(d6, 0.06, atol=1e-4)


@pytest.mark.parametrize("nudge", [1e-5, 3e-4])
def test_a_small_perturbation_is_a_near_copy_too(nudge):
    """Site u's own update has norm 0.01 u sqrt(15) (0.039 for site 1): moving one
    weight by less than 1 % of it (sgs-min-model-change) is still a near copy for
    every site that was in both rounds."""
    errors, leaked = _difference_attack(None, nudge)
    assert leaked is None and all("near copy" in e for e in errors)


def test_beyond_the_near_copy_distance_only_noise_protects_documented_limit():
    """A model moved by more than sgs-min-model-change x each site's update norm (here
    0.1 > 0.01 x 0.19, site 5's) is a new model: the rounds run, and for a train step that does not
    depend on the model (this test's) the difference is site 6's update. Secure
    aggregation alone does not stop differencing over models that really differ; the
    distributed-DP preset's noise does (docs/threat_model.md). That is with whole-group
    participation off (``sgs-min-group=0``, ModSite's setting here); the test below is
    the same attack at the default."""
    errors, leaked = _difference_attack(None, 0.1)
    assert not errors and leaked is not None
    np.testing.assert_allclose(leaked[0], 0.06, atol=1e-4)


def test_beyond_the_near_copy_distance_the_groups_refuse_at_default_settings():
    """The same two rounds at the sites' default (groups of 3, learnt at round 3 from the
    six sites' signed identities: two groups of three): round 4's cohort lacks site 6, so
    it splits site 6's group, and all five sites refuse to sign, before any share."""
    errors, leaked = _difference_attack({"sgs-min-group": "3"}, 0.1)
    assert leaked is None and len(errors) == 5
    assert all(e.startswith("PolicyError: the survivor set splits 1 of the federation's 2 groups") for e in errors)


def test_the_same_model_under_a_new_run_is_refused_without_any_state_file_configured():
    """Attack 3, second form: a new run (fresh Context.state, new run id) over the same
    model and a cohort without site 6. The default state file remembers."""
    sites = {u: ModSite(u) for u in range(1, 7)}
    server, reqs = mod_round_to_consistency(sites, _spec(n=6), round_id=3)
    finish_mod_round(sites, server, reqs)
    fresh = {u: ModSite(u) for u in range(1, 6)}
    _server, reqs2 = mod_round_to_consistency(fresh, _spec(n=5), round_id=1)
    out = fresh[2].send(Stage.CONSISTENCY, reqs2[2])
    assert out.has_error() and "already aggregated over another survivor set" in out.error.reason


def test_a_site_may_opt_out_of_remembering_across_runs():
    """``sgs-state-file=memory``: the old, weaker behaviour, for a site that wants it."""
    sites = {u: ModSite(u, {"sgs-state-file": "memory"}) for u in range(1, 7)}
    server, reqs = mod_round_to_consistency(sites, _spec(n=6), round_id=3)
    finish_mod_round(sites, server, reqs)
    fresh = {u: ModSite(u, {"sgs-state-file": "memory"}) for u in range(1, 6)}
    _server, reqs2 = mod_round_to_consistency(fresh, _spec(n=5), round_id=1)
    assert not fresh[2].send(Stage.CONSISTENCY, reqs2[2]).has_error()


def test_honest_rounds_over_the_same_survivors_are_never_refused_however_close_the_models():
    sites = {u: ModSite(u) for u in range(1, 6)}
    spec = _spec()
    for r, model in enumerate([MODEL, _nudged(MODEL), _nudged(_nudged(MODEL))], start=1):
        server, reqs = mod_round_to_consistency(sites, spec, round_id=r, model=model)
        total = finish_mod_round(sites, server, reqs)
        assert decode_update(total, spec, 5, MODEL_SIZE).total_weight == sum(10 + u for u in sites)


# ---------------------------------------------------------------- 4. server-chosen names
@pytest.mark.parametrize(
    "field,value,why",
    [
        ("config-key", "no-such-record", "config-key 'no-such-record' names no ConfigRecord"),
        ("arrays-key", "metrics", "names no ArrayRecord"),
        ("arrays-key", "config", "two different records"),
        ("config-key", wire.SPEC_KEY, "not protocol records"),
        ("arrays-key", "arrays\n", "must be a name"),
        ("weight-key", "", "must be a name"),
        ("weight-key", "x" * 65, "must be a name"),
    ],
)
def test_server_chosen_record_names_are_checked_before_training(field, value, why):
    """Attack 4: a config-key naming no record made the app's train step raise KeyError
    inside the mod; now every server-chosen name is checked first, a typed error."""
    sites = {u: ModSite(u) for u in range(1, N_MOD + 1)}
    spec = _spec()
    bundles = _through_shares(sites, spec)
    extra, fields = _masked_extra(spec)
    fields[field] = value
    out = sites[1].send(Stage.MASKED_INPUT, bundles[1], extra, fields)
    assert out.has_error() and out.error.reason.startswith("MalformedMessageError") and why in out.error.reason
    assert sites[1].trained == 0


# ---------------------------------------------------------------- every preset's spec
def _preset_spec(preset: str, n: int = N_MOD) -> UpdateSpec:
    """The spec each preset's server sends (sample-dp's is secagg's: its noise is the
    clients' DP-SGD)."""
    if preset == "central-dp":
        return _spec(n=n, max_weight=1, metric_slots=0, dp_mode="central", l2_clip=1.0)
    if preset == "distributed-dp":
        return _dp_spec(max_cohort=n, min_survivors=n - 1, noise_mu_share=(FLOOR * 1.5 * 32767) ** 2 / (2 * (n - 1)))
    return _spec(n=n)


PRESETS = ["secagg", "sample-dp", "central-dp", "distributed-dp"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_presets_spec_gives_the_same_replies_for_different_data(preset):
    shapes = {}
    for kind in ("ok", "nan", "raise"):
        sites = {u: DataSite(u, "ok") for u in range(1, N_MOD + 1)}
        server, reqs = mod_round_to_consistency(sites, _preset_spec(preset), round_id=1)
        finish_mod_round(sites, server, reqs)
        sites[1].kind = kind
        spec = _preset_spec(preset)
        bundles = _through_shares(sites, spec)
        extra, fields = _masked_extra(spec, {k: v + 1.0 for k, v in MODEL.items()})
        shapes[kind] = _reply_shape(sites[1].send(Stage.MASKED_INPUT, bundles[1], extra, fields))
    assert shapes["ok"][0] == "ok" and shapes["nan"] == shapes["raise"] == shapes["ok"]


@pytest.mark.parametrize("preset", PRESETS)
def test_every_presets_spec_refuses_the_one_ulp_difference(preset):
    sites = {u: ModSite(u) for u in range(1, 7)}
    server, reqs = mod_round_to_consistency(sites, _preset_spec(preset, 6), round_id=3)
    finish_mod_round(sites, server, reqs)
    five = {u: sites[u] for u in range(1, 6)}
    _server2, reqs2 = mod_round_to_consistency(five, _preset_spec(preset, 5), round_id=4, model=_nudged(MODEL))
    errors = [five[u].send(Stage.CONSISTENCY, r) for u, r in reqs2.items()]
    assert all(e.has_error() and "near copy" in e.error.reason for e in errors)


def test_under_distributed_dp_differencing_beyond_near_copies_recovers_only_noise():
    """The documented limit, under the distributed-dp preset: the same attack with a
    model moved beyond the near-copy distance runs, but each sum carries the noise of
    the sites' floor, so the difference gives site 6's update (0.06 per coordinate)
    buried in noise of std about sqrt(2) x z x clip: nothing beyond the site's noise."""
    sites = {u: ModSite(u) for u in range(1, 7)}
    spec6, spec5 = _preset_spec("distributed-dp", 6), _preset_spec("distributed-dp", 5)
    server, reqs = mod_round_to_consistency(sites, spec6, round_id=3)
    first = decode_update(finish_mod_round(sites, server, reqs), spec6, 6, MODEL_SIZE)
    five = {u: sites[u] for u in range(1, 6)}
    server2, reqs2 = mod_round_to_consistency(five, spec5, round_id=4, model=_nudged(MODEL, 0.5))
    second = decode_update(finish_mod_round(five, server2, reqs2), spec5, 5, MODEL_SIZE)
    d6 = first.weighted_delta_sum - second.weighted_delta_sum
    z = spec5.dp_contribution(MODEL_SIZE).noise_multiplier
    assert z >= FLOOR
    rms_error = float(np.sqrt(np.mean((d6 - 0.06) ** 2)))
    assert rms_error > 0.5 * z * spec5.l2_clip  # std sqrt(2) z clip, per coordinate, in clip units
    assert rms_error > 5 * 0.06  # the update is far below the noise


@pytest.mark.parametrize("data", [b"", b"\x93NUMPY\x09\x09garbage", bytes(range(64))])
def test_a_fuzzed_array_payload_is_a_typed_error_before_training(data):
    """Issue 29: an Array whose bytes are not a NumPy array made the mod raise numpy's
    untyped ValueError ("format version") where it reads the model; it is a typed
    MalformedMessageError naming the entry, answered before the user's code runs."""
    sites = {u: ModSite(u) for u in range(1, N_MOD + 1)}
    spec = _spec()
    bundles = _through_shares(sites, spec)
    extra, fields = _masked_extra(spec)
    first = next(iter(extra["arrays"]))
    good = extra["arrays"][first]
    extra["arrays"][first] = Array(dtype=good.dtype, shape=good.shape, stype=good.stype, data=data)
    out = sites[1].send(Stage.MASKED_INPUT, bundles[1], extra, fields)
    assert out.has_error() and out.error.reason.startswith("MalformedMessageError"), out.error.reason
    assert repr(first) in out.error.reason and "not a valid array" in out.error.reason
    assert sites[1].trained == 0


@pytest.mark.parametrize("metric_range", [float("inf"), float("nan"), -1.0, 0.0])
def test_a_metric_range_that_sizes_no_limbs_is_a_typed_error_before_training(metric_range):
    """Issue 28 sizes each exact metric slot's limbs from the spec's metric range: a lying
    server's infinite (or non-positive) range is refused as a malformed spec, never an
    untyped OverflowError from sizing the limbs."""
    sites = {u: ModSite(u) for u in range(1, N_MOD + 1)}
    spec = _spec()
    bundles = _through_shares(sites, spec)
    extra, fields = _masked_extra(spec)
    extra[wire.SPEC_KEY]["metric_range"] = metric_range
    out = sites[1].send(Stage.MASKED_INPUT, bundles[1], extra, fields)
    assert out.has_error() and out.error.reason.startswith("MalformedMessageError"), out.error.reason
    assert "metric_range must be a positive finite number" in out.error.reason
    assert sites[1].trained == 0
