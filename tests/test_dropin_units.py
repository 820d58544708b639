"""Fast checks of the drop-in pieces (issue 10) without a simulation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from flwr.serverapp.strategy import FedAvg

from sgs_flower.pipeline import (
    HIST_LOW,
    adapted_range,
    apply_delta,
    covering_range,
    magnitude_histogram,
    model_delta,
    unflatten,
)
from strategies import SecAggStrategy


def test_zero_d_integer_entries_stay_zero_d_arrays_of_their_dtype():
    like = [np.zeros((2, 2), np.float32), np.array(7, dtype=np.int64)]
    out = unflatten(np.array([0.1, 0.2, 0.3, 0.4, 9.6]), like)
    assert isinstance(out[1], np.ndarray) and out[1].shape == () and out[1].dtype == np.int64 and int(out[1]) == 10
    # integer entries travel after the float ones, and come back in place
    new = [like[0] + 1, np.array(39, dtype=np.int64)]
    d = model_delta(new, like)
    assert d.tolist() == [1, 1, 1, 1, 32]
    back = apply_delta(like, d)
    assert back[1].dtype == np.int64 and int(back[1]) == 39 and back[0].dtype == np.float32


def test_histogram_and_the_adapted_range_stop_clipping_after_one_round():
    x = np.concatenate([np.full(10, 5.0), np.full(1000, 0.01)])
    h = magnitude_histogram(x, 1.0)
    assert h[-HIST_LOW] == 10  # ten values >= 1.0 * 2^0 (the clipped ones)
    r = adapted_range([covering_range(1.0, h)], 1.0)  # the next round's range, as the strategy sets it
    assert r >= 5.0 and r <= 16.0  # wide enough for 5.0, not wasteful
    assert magnitude_histogram(x, r)[-HIST_LOW] == 0  # the next round clips nothing


def test_custom_train_metrics_aggregation_is_warned_about():
    with pytest.warns(UserWarning, match="max, min, median, per-client lists"):
        SecAggStrategy(FedAvg(fraction_evaluate=0.0, train_metrics_aggr_fn=lambda recs, key: None))
    # federated evaluation is secure now (tests/test_secure_evaluation.py): only a custom
    # evaluate_metrics_aggr_fn is warned about, as a custom train one is
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SecAggStrategy(FedAvg(fraction_evaluate=0.5))
    with pytest.warns(UserWarning, match="evaluate_metrics_aggr_fn=.* will receive ONE reply"):
        SecAggStrategy(FedAvg(fraction_evaluate=0.5, evaluate_metrics_aggr_fn=lambda recs, key: None))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("r", [0.05, 1.0, 1024.0])
def test_histogram_counts_as_the_plain_comparison_does(dtype, r):
    """The exponent-bit histogram equals counting |x| >= r * 2^k directly (on random
    data of widely spread magnitudes; a value within one rounding of an edge could
    differ, none here)."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(300_001) * rng.choice([1e-4, 1e-2, 1.0, 100.0], 300_001)).astype(dtype)
    want = [int(np.count_nonzero(np.abs(x.astype(np.float64)) >= r * 2.0**k)) for k in range(HIST_LOW, HIST_LOW + 16)]
    assert magnitude_histogram(x, r).tolist() == want
