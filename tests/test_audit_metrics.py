"""Metrics of the leakage audit: exact on known cases, so the table's numbers mean what they say."""

from __future__ import annotations

import numpy as np
import pytest

from sgs_flower.audit import metrics
from sgs_flower.digits import load_digits_arrays


def test_identical_images_score_perfectly() -> None:
    x, y = load_digits_arrays()
    ids = np.arange(16)
    s = metrics.score(x[ids], x[ids], ids, x, y[ids], y[ids])
    assert s.mse == 0 and s.psnr == pytest.approx(100.0)
    assert s.ssim == pytest.approx(1.0)
    assert s.ident == 1.0 and s.label_acc == 1.0


def test_psnr_of_known_error() -> None:
    a = np.zeros((1, 1, 8, 8))
    assert metrics.psnr(a, a + 0.1)[0] == pytest.approx(20.0)


def test_ssim_penalises_structure_not_just_brightness() -> None:
    x, _ = load_digits_arrays()
    img = x[:1].astype(np.float64)
    assert metrics.ssim(img, np.clip(img + 0.05, 0, 1))[0] > 0.9
    assert metrics.ssim(img, x[1:2].astype(np.float64))[0] < 0.5  # a 0 against a 1


def test_match_undoes_a_permutation() -> None:
    x, _ = load_digits_arrays()
    perm = np.array([3, 0, 2, 1])
    assert metrics.match(x[:4][perm], x[:4]).tolist() == perm.tolist()


def test_label_accuracy_is_multiset_overlap() -> None:
    assert metrics.label_accuracy(np.array([1, 1, 2, 3]), np.array([1, 2, 2, 3])) == 0.75


def test_baseline_is_at_chance() -> None:
    x, y = load_digits_arrays()
    ids = np.arange(0, 1797, 50)
    b = metrics.baseline_scores(x[ids], ids, x, y)
    assert b.ident <= 1 / len(ids)
    assert 9.0 < b.psnr < 14.0
    assert b.label_acc < 0.2
