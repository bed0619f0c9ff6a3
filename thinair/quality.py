"""Distribution metrics on feature vectors: pure functions ``f(real, fake, **opts) -> dict``. No file I/O.

* FID: Frechet distance of Gaussian fits (clean-fid's ``frechet_distance``).
* KID: unbiased polynomial-kernel MMD^2 over random subsets, as clean-fid's ``kernel_distance`` (seeded here).
* Precision / recall / density / coverage (Naeem et al. 2020, the ``prdc`` package's definitions) with
  k-nearest-neighbour radii, in (block x col_block) distance tiles: memory O(block x col_block) besides the
  inputs, never an N x M matrix. Tiles are float32 (fast matmul); every comparison that float32 rounding
  could flip (a band around each radius) is redone in float64, so results equal a float64 computation.
* ``per_class`` / ``all_metrics`` bundle them.

Inputs are numpy arrays (N, D) of any float dtype; real and fake must share D.
"""
from __future__ import annotations

import numpy as np
import torch

METRIC_KEYS = ("fid", "kid", "kid_std", "precision", "recall", "density", "coverage")
_CANDIDATES = 4  # extra float32 nearest-neighbour candidates re-ranked in float64 for each radius
_CHUNK = 65536  # pairs per exact float64 re-check


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Frechet Inception Distance between Gaussian fits of two feature sets (clean-fid's formula)."""
    from cleanfid.fid import frechet_distance

    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    return float(frechet_distance(real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False)))


# ---------------------------------------------------------------- KID

def _poly_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with kernel (x.y / D + 1)^3 of equal-size samples x (m, D), y (m, D).

    The per-subset term of clean-fid's ``kernel_distance`` (its final ``/ m`` included).
    """
    m, d = x.shape
    kxx, kyy, kxy = (x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3  # (m, m) each
    within = kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)
    return float((within / (m - 1) - kxy.sum() * 2 / m) / m)


def kid(real: np.ndarray, fake: np.ndarray, num_subsets: int = 100, subset_size: int = 1000, seed: int = 0) -> dict:
    """Kernel Inception Distance: mean and std of the unbiased MMD^2 over random subsets.

    Same estimator and subset size rule as clean-fid's ``kernel_distance`` (m = min(N, M, subset_size), fake
    subset drawn before real, without replacement), but drawn from ``np.random.default_rng(seed)``; the global
    numpy RNG is not touched. When m equals both set sizes every subset is the whole set, so it is computed once.

    Returns:
        ``{"kid": mean, "kid_std": std (ddof=0)}`` over the subsets.
    """
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    m = min(len(real), len(fake), subset_size)
    if m < 2:
        raise ValueError(f"kid needs at least 2 real and 2 fake samples, got {len(real)} and {len(fake)}")
    if m == len(real) == len(fake):  # every draw is a permutation of the full sets; the estimate ignores order
        return {"kid": _poly_mmd2(fake, real), "kid_std": 0.0}
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(num_subsets):
        x = fake[rng.choice(len(fake), m, replace=False)]
        y = real[rng.choice(len(real), m, replace=False)]
        vals.append(_poly_mmd2(x, y))
    return {"kid": float(np.mean(vals)), "kid_std": float(np.std(vals))}


# ---------------------------------------------------------------- PRDC


class _Points:
    """One feature set, centred on a shared origin: exact float64 copy, fast-dtype copy, squared norms."""

    def __init__(self, x: np.ndarray, origin: np.ndarray, dtype: torch.dtype):
        self.x64 = torch.as_tensor(np.asarray(x, np.float64) - origin)  # (N, D)
        self.norm64 = (self.x64 ** 2).sum(1)  # (N,)
        self.x, self.norm = self.x64.to(dtype), self.norm64.to(dtype)

    def __len__(self):
        return len(self.x64)


def _sq_dists(a: _Points, s: int, e: int, b: _Points, c0: int, c1: int) -> torch.Tensor:
    """Squared distances (e - s, c1 - c0) of a[s:e] to b[c0:c1]: ||a||^2 + ||b||^2 - 2 a.b in the fast dtype."""
    return torch.addmm(b.norm[None, c0:c1], a.x[s:e], b.x[c0:c1].T, alpha=-2.0).add_(a.norm[s:e, None])


def _exact_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distances between paired rows (broadcasting), float64 by direct differences."""
    return ((a - b) ** 2).sum(-1)


def _tolerance(a: _Points) -> float:
    """Bound on the fast dtype's error in a squared distance, in units of ||a||^2 + ||b||^2.

    Measured float32 errors are <= 3.4e-7 of that for D = 2..2048; this is 27x to 200x wider.
    """
    return 8 * torch.finfo(a.x.dtype).eps * (8 + a.x.shape[1] ** 0.5)


def _radii_sq(p: _Points, k: int, block: int, col_block: int) -> torch.Tensor:
    """Squared distance (N,) from each point to its (k+1)-th nearest point of the same set, itself included.

    That is the prdc package's radius (its ``get_kth_value(dists, k + 1)``). The k+1+_CANDIDATES nearest by
    fast-dtype distance are re-ranked exactly; a row whose candidates cannot be proven to hold the true k+1
    nearest (ties within rounding error) is recomputed exactly in full.
    """
    n, c = len(p), min(k + 1 + _CANDIDATES, len(p))
    tol = _tolerance(p) * (p.norm64 + p.norm64.max())  # (N,)
    out = torch.empty(n, dtype=torch.float64)
    for s in range(0, n, block):
        e = min(s + block, n)
        vals = idx = None  # running c smallest fast distances (B, c), ascending, and their columns
        for c0 in range(0, n, col_block):
            d = _sq_dists(p, s, e, p, c0, min(c0 + col_block, n))  # (B, T)
            v, i = d.topk(min(c, d.shape[1]), dim=1, largest=False)
            i += c0
            if vals is not None:  # merge with the previous tiles' candidates
                v, pos = torch.cat([vals, v], 1).topk(c, dim=1, largest=False)
                i = torch.cat([idx, i], 1).gather(1, pos)
            vals, idx = v, i
        r2 = torch.empty(e - s, dtype=torch.float64)  # exact (k+1)-th smallest among the candidates
        for t in range(0, e - s, 256):
            u = min(t + 256, e - s)
            r2[t:u] = _exact_sq(p.x64[s + t:s + u, None, :], p.x64[idx[t:u]]).sort(1).values[:, k]
        if c < n:  # a non-candidate has exact d2 >= vals[:, -1] - tol; it is irrelevant when that exceeds r2
            for i in torch.nonzero(vals[:, -1].double() - tol[s:e] <= r2).flatten().tolist():
                row = torch.cat([_exact_sq(p.x64[s + i], p.x64[j:j + _CHUNK]) for j in range(0, n, _CHUNK)])
                r2[i] = row.kthvalue(k + 1).values
        out[s:e] = r2
    return out


def _pairs_inside(d: torch.Tensor, thr2: torch.Tensor, tol: torch.Tensor, exact_sq) -> tuple:
    """(rows, cols) of the entries of a fast squared-distance tile d (B, T) with ``dist < sqrt(thr2)``.

    thr2 and tol (float64) broadcast against d: a column (B, 1) or a row (1, T). Exact to float64: entries
    within tol of the threshold are recomputed by ``exact_sq(rows, cols)`` and compared as prdc does (on
    distances, strictly). Only entries below thr2 + tol are materialised (few: balls hold ~k points).
    """
    rows, cols = torch.nonzero(d <= (thr2 + tol).to(d.dtype), as_tuple=True)
    t2, tl = thr2.expand_as(d)[rows, cols], tol.expand_as(d)[rows, cols]
    keep = d[rows, cols].double() < t2 - tl
    for s in torch.nonzero(~keep).flatten().split(_CHUNK):
        keep[s] = exact_sq(rows[s], cols[s]).sqrt() < t2[s].sqrt()
    return rows[keep], cols[keep]


def prdc(real: np.ndarray, fake: np.ndarray, k: int = 5, block: int = 2048, col_block: int = 16384,
         dtype: torch.dtype = torch.float32) -> dict:
    """Precision, recall, density, coverage of `fake` against `real` (Naeem et al. 2020).

    Equals the ``prdc`` package's ``compute_prdc`` (float64 Euclidean distances, k-th neighbour radii with the
    point itself counted, strict ``<``) without its N x M matrices: distances come in (block, col_block)
    tiles, one sweep per set for the radii and one real x fake sweep, so memory is O(block x col_block) on
    top of the inputs.

    Args:
        real: (N, D) real features.
        fake: (M, D) fake features.
        k: nearest neighbours for the radii.
        block: rows per tile. col_block: columns per tile.
        dtype: dtype of the distance tiles (float32 or float64); the result is float64-exact either way.
    """
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f"prdc needs more than k={k} real and fake samples, got {len(real)} and {len(fake)}")
    origin = np.asarray(real, np.float64).mean(0)  # centring keeps ||x||^2 small next to distances (less rounding)
    r, f = _Points(real, origin, dtype), _Points(fake, origin, dtype)
    r_rad2, f_rad2 = _radii_sq(r, k, block, col_block), _radii_sq(f, k, block, col_block)  # (N,), (M,)
    r_tol = _tolerance(r) * (r.norm64 + f.norm64.max())  # (N,) for comparisons against real radii
    f_tol = _tolerance(r) * (r.norm64.max() + f.norm64)  # (M,) for comparisons against fake radii
    density = torch.zeros(len(f), dtype=torch.int64)  # number of real balls containing fake j
    covered = torch.zeros(len(r), dtype=torch.bool)  # real ball i contains some fake
    recall_hit = torch.zeros(len(r), dtype=torch.bool)  # real i inside some fake ball
    for s in range(0, len(r), block):
        e = min(s + block, len(r))
        for c0 in range(0, len(f), col_block):
            c1 = min(c0 + col_block, len(f))
            d = _sq_dists(r, s, e, f, c0, c1)  # (B, T)

            def exact(i, j, s=s, c0=c0):
                return _exact_sq(r.x64[s + i], f.x64[c0 + j])

            i, j = _pairs_inside(d, r_rad2[s:e, None], r_tol[s:e, None], exact)  # fake j in real ball i
            density += torch.bincount(j + c0, minlength=len(f))
            covered[s + i] = True
            i, _ = _pairs_inside(d, f_rad2[None, c0:c1], f_tol[None, c0:c1], exact)  # real i in fake ball j
            recall_hit[s + i] = True
    return {"precision": float((density > 0).double().mean()), "recall": float(recall_hit.double().mean()),
            "density": int(density.sum()) / (k * len(f)), "coverage": float(covered.double().mean())}


# ---------------------------------------------------------------- bundles

def all_metrics(real: np.ndarray, fake: np.ndarray, k: int = 5, kid_subsets: int = 100, kid_subset_size: int = 1000,
                seed: int = 0) -> dict:
    """FID, KID (mean, std), precision, recall, density, coverage of `fake` against `real` (keys METRIC_KEYS)."""
    return ({"fid": fid(real, fake)} | kid(real, fake, kid_subsets, kid_subset_size, seed)
            | prdc(real, fake, k))


def per_class(real: np.ndarray, real_labels: np.ndarray, fake: np.ndarray, fake_labels: np.ndarray, k: int = 5,
              kid_subsets: int = 100, kid_subset_size: int = 1000, seed: int = 0) -> dict:
    """``all_metrics`` within each class present in either set.

    Returns:
        ``{str(class): {metric: value, "n_real": int, "n_fake": int}}``. A class with <= k samples on either
        side (or whose metrics fail, e.g. a singular FID) gets every metric None and a ``"skipped"`` reason.
    """
    real_labels, fake_labels = np.asarray(real_labels), np.asarray(fake_labels)
    out = {}
    for c in sorted(set(real_labels.tolist()) | set(fake_labels.tolist())):
        r, f = real[real_labels == c], fake[fake_labels == c]
        entry = {"n_real": len(r), "n_fake": len(f)}
        if len(r) <= k or len(f) <= k:
            entry |= dict.fromkeys(METRIC_KEYS) | {
                "skipped": f"needs more than k={k} samples per side, has {len(r)} real and {len(f)} fake"}
        else:
            try:
                entry |= all_metrics(r, f, k, kid_subsets, kid_subset_size, seed)
            except (ValueError, np.linalg.LinAlgError) as err:
                entry |= dict.fromkeys(METRIC_KEYS) | {"skipped": f"metrics failed: {err}"}
        out[str(c)] = entry
    return out
