"""Distribution metrics on feature vectors: pure functions ``f(real, fake, **opts) -> dict``.

FID (Frechet distance of Gaussian fits, via clean-fid's implementation) and precision / recall /
density / coverage (Naeem et al. 2020) with k-nearest-neighbour radii, computed in row blocks so
memory stays O(block x N) instead of O(N x M).
"""
from __future__ import annotations

import numpy as np
import torch


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    from cleanfid.fid import frechet_distance

    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    return float(frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False)))


def _blocks(a: torch.Tensor, b: torch.Tensor, block: int):
    """Yield (start, squared-free euclidean distances of a[start:start+block] to all of b)."""
    for s in range(0, len(a), block):
        yield s, torch.cdist(a[s:s + block], b)


def kth_nn_radius(x: torch.Tensor, k: int, block: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row (self excluded)."""
    out = torch.empty(len(x), dtype=x.dtype)
    for s, d in _blocks(x, x, block):
        out[s:s + len(d)] = d.topk(k + 1, dim=1, largest=False).values[:, k]  # column 0 is the point itself
    return out


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5, block: int = 2048) -> dict:
    """Precision, recall, density, coverage of `fake` against `real` (Naeem et al. 2020)."""
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if len(r) <= k or len(f) <= k:
        raise ValueError(f"prdc needs more than k={k} real and fake samples, got {len(r)} and {len(f)}")
    r_rad, f_rad = kth_nn_radius(r, k, block), kth_nn_radius(f, k, block)
    in_real = torch.zeros(len(f), dtype=torch.bool)
    density = torch.zeros(len(f), dtype=torch.float64)
    nearest_fake = torch.full((len(r),), float("inf"), dtype=torch.float64)
    for s, d in _blocks(r, f, block):  # d: (block_real, n_fake)
        inside = d < r_rad[s:s + len(d), None]
        in_real |= inside.any(0)
        density += inside.sum(0)
        nearest_fake[s:s + len(d)] = d.min(1).values
    recall_hits = torch.zeros(len(r), dtype=torch.bool)
    for s, d in _blocks(f, r, block):  # d: (block_fake, n_real)
        recall_hits |= (d < f_rad[s:s + len(d), None]).any(0)
    return {"precision": float(in_real.double().mean()), "recall": float(recall_hits.double().mean()),
            "density": float(density.sum() / (k * len(f))),
            "coverage": float((nearest_fake < r_rad).double().mean())}


def all_metrics(real: np.ndarray, fake: np.ndarray, k: int = 5) -> dict:
    return {"fid": fid(real, fake)} | prdc(real, fake, k)
