"""Metric maths against the reference implementations (prdc, clean-fid)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from thinair.quality import (
    METRIC_KEYS,
    _poly_mmd2,
    all_metrics,
    fid,
    kid,
    per_class,
    prdc,
)


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


def _prdc_reference(real, fake, k):
    """Brute force in float64 with direct differences: the definitions, no tricks."""
    def dist(a, b):
        return np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))

    rr, fr = np.sort(dist(real, real), 1)[:, k], np.sort(dist(fake, fake), 1)[:, k]
    d = dist(real, fake)
    inside = d < rr[:, None]
    return {"precision": inside.any(0).mean(), "recall": (d < fr[None]).any(1).mean(),
            "density": inside.sum(0).mean() / k, "coverage": (d.min(1) < rr).mean()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prdc_is_exact_with_ties_offsets_and_tiles(dtype):
    rng = np.random.default_rng(3)
    # 10 copies of a few points force ties at the radius (the exact full-row fallback); the large offset
    # makes float32 rounding matter if centring or the float64 re-checks were missing
    real = np.concatenate([rng.normal(size=(120, 3)), np.repeat(rng.normal(size=(4, 3)), 10, 0)]) + 1000
    fake = np.concatenate([rng.normal(0.2, 1.2, size=(90, 3)), np.repeat(real[125:127], 6, 0)])
    ours = prdc(real, fake, k=5, block=16, col_block=24, dtype=dtype)
    ref = _prdc_reference(real, fake, 5)
    for key in ref:
        assert ours[key] == pytest.approx(ref[key], abs=1e-12)


def test_kid_equals_clean_fid_without_subsampling():
    from cleanfid.fid import kernel_distance

    rng = np.random.default_rng(4)
    real, fake = rng.normal(size=(150, 8)), rng.normal(0.5, 1.0, size=(150, 8))
    ours = kid(real, fake, subset_size=1000)  # m = 150 = both sizes: every subset is the whole set
    assert ours["kid"] == pytest.approx(kernel_distance(real, fake, num_subsets=3), abs=1e-6)
    assert ours["kid_std"] == 0.0


def test_kid_subset_term_equals_clean_fid_on_the_same_draw():
    from cleanfid.fid import kernel_distance

    rng = np.random.default_rng(5)
    real, fake = rng.normal(size=(300, 8)), rng.normal(0.5, 1.0, size=(200, 8))
    state = np.random.get_state()
    try:
        np.random.seed(7)
        ref = kernel_distance(real, fake, num_subsets=1, max_subset_size=50)
        np.random.seed(7)  # replay clean-fid's draw: fake subset (its feats2) first, then real
        x, y = fake[np.random.choice(200, 50, replace=False)], real[np.random.choice(300, 50, replace=False)]
    finally:
        np.random.set_state(state)
    assert _poly_mmd2(x, y) == pytest.approx(ref, abs=1e-6)


def test_kid_is_seeded_leaves_the_global_rng_alone_and_sees_shifts():
    rng = np.random.default_rng(6)
    real, same, shifted = rng.normal(size=(400, 8)), rng.normal(size=(400, 8)), rng.normal(1.0, 1.0, size=(400, 8))
    state = np.random.get_state()[1].copy()
    a = kid(real, same, num_subsets=20, subset_size=100, seed=1)
    assert np.array_equal(np.random.get_state()[1], state)
    assert a == kid(real, same, num_subsets=20, subset_size=100, seed=1)
    assert a != kid(real, same, num_subsets=20, subset_size=100, seed=2)
    far = kid(real, shifted, num_subsets=20, subset_size=100)
    assert abs(a["kid"]) < 0.01 * far["kid"] and a["kid_std"] > 0
    # identical sets: ~0 up to the estimator's O(1/m) term from points shared by both subsets
    assert abs(kid(real, real, subset_size=100, num_subsets=20)["kid"]) < 0.01 * far["kid"]


def test_all_metrics_keys_and_backward_compatible_call():
    rng = np.random.default_rng(7)
    real, fake = rng.normal(size=(80, 4)), rng.normal(size=(60, 4))
    m = all_metrics(real, fake, 5)
    assert set(m) == set(METRIC_KEYS) and all(isinstance(v, float) for v in m.values())
    assert all_metrics(real, fake, k=5, kid_subsets=10, kid_subset_size=30, seed=1)["kid_std"] > 0


def test_per_class_computes_each_class_and_skips_small_ones():
    rng = np.random.default_rng(8)
    real, fake = rng.normal(size=(60, 3)), rng.normal(size=(47, 3))
    real_y = np.repeat([0, 1, 2], 20)
    fake_y = np.concatenate([np.zeros(20, int), np.ones(4, int), np.full(20, 2), np.full(3, 5)])
    out = per_class(real, real_y, fake, fake_y, k=5, kid_subset_size=10)
    assert list(out) == ["0", "1", "2", "5"]
    assert out["0"] == {"n_real": 20, "n_fake": 20} | all_metrics(real[:20], fake[:20], 5, kid_subset_size=10)
    assert out["1"]["precision"] is None and "4 fake" in out["1"]["skipped"]
    assert out["5"]["n_real"] == 0 and out["5"]["fid"] is None and "skipped" in out["5"]
    assert "skipped" not in out["2"] and 0 <= out["2"]["coverage"] <= 1
