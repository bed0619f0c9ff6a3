"""Immiscible noise assignment: a real minimising permutation, KNN picks the nearest, seeded draws."""
from __future__ import annotations

import itertools

import pytest
import torch

from thinair.immiscible import assign, immiscible_noise, nearest


def _total(latents, noise) -> float:
    return (latents.flatten(1) - noise.flatten(1)).norm(dim=1).sum().item()


@pytest.mark.parametrize("seed", range(5))
def test_assign_is_permutation_and_never_raises_distance(seed):
    g = torch.Generator().manual_seed(seed)
    lat, noise = torch.randn(16, 4, 3, 3, generator=g) * 2 + 0.5, torch.randn(16, 4, 3, 3, generator=g)
    perm = assign(lat, noise)
    assert perm.dtype == torch.long and sorted(perm.tolist()) == list(range(16))
    assert _total(lat, noise[perm]) <= _total(lat, noise) + 1e-9


def test_assign_is_the_optimum_on_a_small_batch():
    g = torch.Generator().manual_seed(3)
    lat, noise = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    best = min(_total(lat, noise[list(p)]) for p in itertools.permutations(range(5)))
    assert _total(lat, noise[assign(lat, noise)]) == pytest.approx(best, abs=1e-9)


def test_assign_recovers_a_shuffled_pairing():
    g = torch.Generator().manual_seed(1)
    lat = torch.randn(8, 4, 2, 2, generator=g)
    shuffle = torch.randperm(8, generator=g)
    noise = lat[shuffle] + 0.01 * torch.randn(lat.shape, generator=g)
    assert torch.equal(noise[assign(lat, noise)], noise[shuffle.argsort()])


def test_assign_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="same shape"):
        assign(torch.zeros(2, 3), torch.zeros(3, 3))


def test_off_equals_plain_randn():
    lat = torch.randn(4, 4, 2, 2)
    got = immiscible_noise(lat, torch.Generator().manual_seed(7), "off")
    assert torch.equal(got, torch.randn(lat.shape, generator=torch.Generator().manual_seed(7)))


def test_assign_mode_is_a_reordering_of_the_same_draw():
    lat = torch.randn(8, 4, 2, 2, generator=torch.Generator().manual_seed(0)) + 1.0
    plain = immiscible_noise(lat, torch.Generator().manual_seed(5), "off")
    paired = immiscible_noise(lat, torch.Generator().manual_seed(5), "assign")
    assert torch.equal(paired, plain[assign(lat, plain)])
    assert _total(lat, paired) <= _total(lat, plain)


@pytest.mark.parametrize("batch", [1, 3])
def test_knn_picks_the_nearest_of_k(batch):
    lat = torch.randn(batch, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    got = immiscible_noise(lat, torch.Generator().manual_seed(9), "knn", k=6)
    cand = torch.randn(batch, 6, 4, 2, 2, generator=torch.Generator().manual_seed(9))  # the documented draw
    dist = (cand.flatten(2) - lat.flatten(1)[:, None]).norm(dim=2)  # (B, k)
    for b in range(batch):
        assert torch.equal(got[b], cand[b, dist[b].argmin()])
        assert any(torch.equal(got[b], cand[b, j]) for j in range(6))
    assert torch.equal(nearest(lat, cand), dist.argmin(1))


@pytest.mark.parametrize("mode", ["off", "assign", "knn"])
def test_deterministic_for_a_seed(mode):
    lat = torch.randn(6, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    a = immiscible_noise(lat, torch.Generator().manual_seed(11), mode)
    b = immiscible_noise(lat, torch.Generator().manual_seed(11), mode)
    c = immiscible_noise(lat, torch.Generator().manual_seed(12), mode)
    assert a.shape == lat.shape and torch.equal(a, b) and not torch.equal(a, c)


def test_bad_mode_and_k():
    with pytest.raises(ValueError, match="not one of"):
        immiscible_noise(torch.zeros(1, 2), torch.Generator(), "nearest")
    with pytest.raises(ValueError, match="k=0"):
        immiscible_noise(torch.zeros(1, 2), torch.Generator(), "knn", k=0)
