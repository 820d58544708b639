"""User-level DP through the real pipeline and protocol: clipping, Skellam shares under
secure aggregation with dropouts, central noise, budget enforcement, ledger resume."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from sgs_flower.dp.aggregator import DPAggregator, ddp_quantization
from sgs_flower.dp.budget import BudgetExhaustedError
from sgs_flower.dp.config import DPConfig
from sgs_flower.dp.ledger_accounting import verify
from sgs_flower.ledger.ledger import Ledger
from sgs_flower.pipeline import UpdateSpec, decode_update, encode_update
from sgs_flower.secagg.client import SecAggClient
from sgs_flower.secagg.server import RoundParams, SecAggServer
from sgs_flower.secagg.simulate import run_protocol
from sgs_flower.secagg.wire import Stage


def secure_round(agg: DPAggregator, deltas: list[np.ndarray], drop: set[int], server_round: int = 1):
    """One DP round through encode -> SecAgg+ -> decode -> release; returns (mean, plan)."""
    n, m = len(deltas), deltas[0].size
    plan = agg.plan(server_round, n, n, m)
    spec = UpdateSpec(max_cohort=n, max_weight=1, field_bits=plan.field_bits, **plan.spec_fields)
    ids = list(range(1, n + 1))
    vectors = {u: encode_update(d, {}, 1, spec).vector for u, d in zip(ids, deltas, strict=True)}
    params = RoundParams(run_id=1, round_id=server_round, cohort=tuple(ids), vector_length=spec.vector_length(m),
                         field_bits=spec.field_bits, min_clients=plan.min_survivors)
    outcome = run_protocol(SecAggServer(params), {u: SecAggClient(u) for u in ids}, vectors,
                           {Stage.MASKED_INPUT: {u + 1 for u in drop}})
    dec = decode_update(outcome.total, spec, len(outcome.survivors), m)
    return agg.release(plan, dec.weighted_delta_sum, dec.count, n - dec.count), plan, dec


@pytest.mark.parametrize("survivors", [10, 8])
def test_distributed_noise_has_the_variance_of_the_survivors_shares(tmp_path, survivors):
    """Zero updates: what comes out is the noise. Its variance must be that of the
    survivors' shares (more than the target when more than min_survivors survive), and
    the ledger must record exactly that, never the target."""
    n, m, z, c = 10, 20_000, 1.0, 1.0
    agg = DPAggregator(DPConfig(mode="distributed-dp", clip_norm=c, noise_multiplier=z, min_survivors=8, rotate=False),
                       ledger_path=tmp_path / "l.jsonl")
    _, plan, dec = secure_round(agg, [np.zeros(m)] * n, drop=set(range(n - survivors)))
    assert dec.count == survivors
    total = dec.weighted_delta_sum
    expected_var = survivors * 2 * plan.spec_fields["noise_mu_share"] / plan.scale**2
    # target: the sum over min_survivors carries std z * c
    assert 8 * 2 * plan.spec_fields["noise_mu_share"] / plan.scale**2 == pytest.approx((z * c) ** 2, rel=1e-9)
    # sample variance of m iid draws: relative std sqrt(2/m) = 1 %; tolerance 5 sigma
    assert np.var(total) == pytest.approx(expected_var, rel=5 * np.sqrt(2 / m))
    rec = Ledger.open(tmp_path / "l.jsonl").round_records()[0]
    assert rec["survivors"] == survivors and rec["noise"]["survivors"] == survivors
    assert rec["noise"]["std_real"] == pytest.approx(np.sqrt(expected_var), rel=1e-9)


def test_distributed_round_recovers_the_clipped_mean(tmp_path):
    """With little noise the released mean is the mean of the clipped (rotated) updates."""
    rng = np.random.default_rng(0)
    deltas = [rng.normal(0, 1, 300) for _ in range(6)]
    agg = DPAggregator(DPConfig(mode="distributed-dp", clip_norm=2.0, noise_multiplier=1e-4, min_survivors=5))
    mean, plan, _ = secure_round(agg, deltas, drop={0})
    clipped = [d * min(1.0, 2.0 / np.linalg.norm(d)) for d in deltas[1:]]
    np.testing.assert_allclose(mean, np.mean(clipped, axis=0), atol=1e-3)
    assert plan.spec_fields["rotation_seed"] >= 0  # rotated by default


def test_central_noise_std_and_unweighted_mean():
    deltas = [np.full(50_000, 0.001 * (i + 1)) for i in range(5)]  # norms > clip: all clipped
    agg = DPAggregator(DPConfig(mode="central-dp", clip_norm=1.0, noise_multiplier=2.0))
    mean, _, dec = secure_round(agg, deltas, drop=set())
    clipped_sum = sum(d * min(1.0, 1.0 / np.linalg.norm(d)) for d in deltas)
    noise = mean * 5 - clipped_sum
    assert np.std(noise) == pytest.approx(2.0, rel=0.02)  # z * clip_norm on the sum
    assert dec.total_weight == 5  # every client counts once, whatever its num-examples


def test_below_min_survivors_the_protocol_aborts_before_release(tmp_path):
    from sgs_flower.secagg.errors import ThresholdError

    agg = DPAggregator(DPConfig(mode="distributed-dp", clip_norm=1.0, noise_multiplier=1.0, min_survivors=8),
                       ledger_path=tmp_path / "l.jsonl")
    with pytest.raises(ThresholdError, match="fewer than min_clients=8"):
        secure_round(agg, [np.zeros(64)] * 10, drop={0, 1, 2})
    assert agg.spent().consumer == 0.0


def test_budget_stops_before_exceeding_and_a_new_process_resumes(tmp_path):
    ledger = tmp_path / "ledger.jsonl"
    cfg = DPConfig(mode="central-dp", clip_norm=1.0, noise_multiplier=4.0, max_epsilon=6.0)
    agg = DPAggregator(cfg, ledger_path=ledger)
    released = 0
    with pytest.raises(BudgetExhaustedError, match=r"would raise the consumer epsilon .* above max_epsilon=6"):
        for r in range(1, 100):
            secure_round(agg, [np.zeros(16)] * 4, drop=set(), server_round=r)
            released += 1
    spent = agg.spent().consumer
    assert 0 < spent <= 6.0 and released >= 1
    # a second server process on the same ledger continues from the spent budget
    code = f"""
import json
from sgs_flower.dp.aggregator import DPAggregator
from sgs_flower.dp.config import DPConfig
agg = DPAggregator(DPConfig(mode="central-dp", clip_norm=1.0, noise_multiplier=4.0, max_epsilon=6.0), ledger_path={str(ledger)!r})
out = {{"spent": agg.spent().consumer, "offset": agg.round_offset}}
try:
    agg.plan(1, 4, 4, 16)
    out["refused"] = False
except Exception as e:
    out["refused"] = type(e).__name__
print(json.dumps(out))
"""
    res = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert res["spent"] == pytest.approx(spent)
    assert res["offset"] == released
    assert res["refused"] == "BudgetExhaustedError"
    assert verify(ledger).ok


def test_ddp_quantization_leaves_room_for_noise():
    q = ddp_quantization(noise_multiplier=2.0, clip_norm=1.0, cohort=100, min_survivors=80, field_bits=32)
    assert 100 * q.levels + q.noise_headroom < 2**31
    assert q.noise_headroom >= 12 * 2.0 * q.levels


def test_binding_digest_is_the_sha256_of_the_arrays_raw_bytes():
    """The digest reads arrays without copying them (no tobytes()), yet hashes exactly
    the bytes tobytes() gives: clients and servers of any version agree on it."""
    import hashlib
    import struct

    from sgs_flower.pipeline import _canonical, binding_digest

    def reference(arrays, config, spec_config):
        m = hashlib.sha256(b"sgs-flower/model/v1")
        for name, a in arrays:
            arr = np.ascontiguousarray(a)
            meta = _canonical([name, arr.dtype.str, list(arr.shape)])
            m.update(struct.pack(">I", len(meta)) + meta)
            m.update(arr.tobytes())
        h = hashlib.sha256(b"sgs-flower/binding/v2")
        h.update(m.digest())
        for part in ({k: (v.hex() if isinstance(v, bytes) else v) for k, v in config.items()}, dict(spec_config)):
            blob = _canonical(part)
            h.update(struct.pack(">I", len(blob)) + blob)
        return h.digest()

    arrays = [
        ("w", np.arange(12, dtype=np.float32).reshape(3, 4)), ("t", np.arange(6.0).reshape(2, 3).T),
        ("s", np.array(2.5)), ("be", np.arange(5, dtype=">f4")), ("b", np.array([True, False])),
        ("h", np.arange(4, dtype=np.float16)), ("e", np.zeros((0, 3))),
        ("d", np.array(["2020-01-01"], dtype="datetime64[D]")),
    ]
    cfg, spec = {"lr": 0.1, "k": b"\x01"}, {"clip_range": 1.0}
    assert binding_digest(arrays, cfg, spec) == reference(arrays, cfg, spec)
    assert binding_digest(arrays[:1], cfg, spec) != binding_digest(arrays[1:2], cfg, spec)


def test_encode_update_of_a_float32_delta_matches_its_float64_copy():
    """The encode path reads a float32 delta as it is (no float64 copy): same words as
    encoding the float64 copy with the same rounding randomness, metrics appended."""
    spec = UpdateSpec(clip_range=0.5, max_cohort=5, max_weight=10, metric_slots=1, metric_range=10.0)
    delta = np.random.default_rng(2).uniform(-0.7, 0.7, 50_001).astype(np.float32)
    a = encode_update(delta, {"loss": 2.0}, 4, spec, rng=np.random.default_rng(9))
    b = encode_update(delta.astype(np.float64), {"loss": 2.0}, 4, spec, rng=np.random.default_rng(9))
    np.testing.assert_array_equal(a.vector, b.vector)
    assert a.clipped == b.clipped == np.count_nonzero(np.abs(delta.astype(np.float64)) > 0.5)
    assert a.vector.size == spec.vector_length(delta.size)
