"""Metric maths against the reference implementations (prdc, clean-fid)."""
from __future__ import annotations

import numpy as np
import pytest

from thinair.quality import fid, prdc


def test_prdc_agrees_with_the_prdc_package():
    from prdc import compute_prdc

    rng = np.random.default_rng(0)
    real, fake = rng.normal(size=(300, 16)), rng.normal(0.3, 1.1, size=(250, 16))
    ours = prdc(real, fake, k=5, block=64)  # small blocks exercise the chunking
    ref = compute_prdc(real, fake, nearest_k=5)
    for key in ("precision", "recall", "density", "coverage"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-6)


def test_identical_sets_are_perfect():
    x = np.random.default_rng(1).normal(size=(200, 8))
    m = prdc(x, x, k=5)
    assert m["precision"] == m["recall"] == m["coverage"] == 1.0
    assert fid(x, x) == pytest.approx(0.0, abs=1e-6)


def test_fid_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(2)
    a, b = rng.normal(0, 1, size=(20000, 4)), rng.normal(1, 2, size=(20000, 4))
    # ||mu_a - mu_b||^2 + tr(Sa + Sb - 2 sqrt(Sa Sb)) = 4 + 4 * (1 + 4 - 4) = 8
    assert fid(a, b) == pytest.approx(8.0, rel=0.05)
    far = rng.normal(5, 1, size=(2000, 4))
    assert fid(a[:2000], far) > fid(a[:2000], a[2000:4000])


def test_prdc_refuses_too_few_samples():
    with pytest.raises(ValueError, match="more than k=5"):
        prdc(np.zeros((3, 2)), np.zeros((10, 2)))
