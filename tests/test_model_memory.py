"""The CountSketch behind the near-copy rule (sgs_flower/secagg/model_memory.py)."""

from __future__ import annotations

import os

import numpy as np
import pytest

from sgs_flower.secagg.model_memory import (
    MEMORY_LIMIT,
    memory_entry,
    model_sketch,
    near_sets,
    remember,
)

RNG = np.random.default_rng(0)
MODEL = [RNG.standard_normal((300, 70)).astype(np.float32), RNG.standard_normal(70).astype(np.float32)]


def test_the_sketch_is_linear_and_sees_a_one_coordinate_change_exactly():
    key = os.urandom(32)
    moved = [a.copy() for a in MODEL]
    moved[0][17, 3] += np.float32(0.25)
    diff = model_sketch(moved, key) - model_sketch(MODEL, key)
    assert np.linalg.norm(diff) == pytest.approx(0.25, rel=1e-6)
    assert np.count_nonzero(np.abs(diff) > 1e-9) == 1


def test_the_sketch_norm_estimates_the_distance_for_a_spread_change():
    """E |S d|^2 = |d|^2 over the site's secret key: the mean over 200 keys is within
    4 % (the spread per key is about sqrt(2 / 128) = 12.5 %)."""
    d = [RNG.standard_normal(a.shape) * 1e-3 for a in MODEL]
    true = float(np.sqrt(sum(float(np.sum(x**2)) for x in d)))
    ratios = [np.linalg.norm(model_sketch(d, os.urandom(32))) ** 2 / true**2 for _ in range(200)]
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.04)
    assert 0.05 < np.std(ratios) < 0.2


def test_near_sets_and_the_memory_limit():
    key = os.urandom(32)
    sk = model_sketch(MODEL, key)
    memory = [memory_entry(b"a" * 32, "set-a", sk, step=1.0)]
    assert near_sets(memory, sk + 0.04, step=0.0, min_change=0.05) == frozenset()  # 0.04 * sqrt(128) > 0.05
    assert near_sets(memory, sk + 0.004, step=0.0, min_change=0.05) == {"set-a"}
    assert near_sets(memory, sk, step=0.0, min_change=0.0) == frozenset()  # the rule off
    assert near_sets(memory, sk * np.nan, step=0.0, min_change=0.05) == {"set-a"}  # not comparable: near
    for i in range(MEMORY_LIMIT + 5):
        memory = remember(memory, memory_entry(bytes([i]) * 32, f"set-{i}", sk, 1.0))
    assert len(memory) == MEMORY_LIMIT and memory[-1]["set"] == f"set-{MEMORY_LIMIT + 4}"
