"""How each Diffusion Inversion variant is drawn, beyond the paper (issue 17): pure functions used by `sample`.

* Partner choice (``sample.partner``): the paper interpolates with a *random* other embedding of the same class;
  ``nearest`` takes the closest one and ``knn`` draws among the ``sample.partner_k`` closest (never the image itself).
* Per-embedding noise (``sample.noise_schedule: adaptive``): lambda_i = lambda x d_i / median(d), clipped to
  [lambda / 4, 4 lambda], where d_i is the mean distance of embedding i to its ``partner_k`` nearest same-class
  embeddings: isolated embeddings (sparse regions of the class) are perturbed more, crowded ones less.
* Coverage-driven allocation (``sample.allocation: coverage``): half the budget is drawn uniformly, then the rest
  goes to the real images whose k-NN ball (among the real train images, in the domain classifier's feature space)
  holds none of those synthetic images: Naeem et al.'s coverage, per image (``uncovered``, ``allocate``).
* Label-consistency filter (``sample.filter_min_confidence``): every candidate is scored by the domain classifier
  trained on the real train images (thinair/domain.py); per (embedding, checkpoint, guidance) the first
  ``samples_per_setting`` candidates that are predicted as their own class with at least that confidence are kept,
  topped up with the most confident others, so the final count equals the unfiltered one.

Distances are Euclidean in a seeded random projection of the flattened embeddings to at most ``PROJECTED``
dimensions (Johnson-Lindenstrauss: distances kept within a few per cent), so that a Stable Diffusion bank
(77 x 768 per embedding) costs one matrix product. Reads and writes nothing.
"""
from __future__ import annotations

import numpy as np
import torch

PROJECTED = 256
NOISE_CLIP = 4.0  # adaptive lambda stays within [lambda / NOISE_CLIP, lambda x NOISE_CLIP]


def project(emb: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(N, T, D) embeddings -> (N, d) float32 points whose distances approximate the embeddings' (d <= PROJECTED)."""
    x = emb.reshape(len(emb), -1).float()
    if x.shape[1] <= PROJECTED:
        return x
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(x.shape[1], PROJECTED, generator=g) / PROJECTED ** 0.5
    return x @ m.to(x.device)


def class_neighbours(points: torch.Tensor, labels: np.ndarray, rows) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{row: (same-class rows nearest first, their distances)} for each of `rows`, the row itself excluded."""
    out = {}
    labels = np.asarray(labels)
    for r in rows:
        mates = np.flatnonzero(labels == labels[r])
        mates = mates[mates != r]
        d = torch.cdist(points[[int(r)]], points[mates]).flatten().cpu().numpy() if len(mates) else np.zeros(0)
        order = np.argsort(d, kind="stable")
        out[int(r)] = (mates[order], d[order])
    return out


def choose_partner(kind: str, mates: np.ndarray, k: int, rng: np.random.Generator) -> int:
    """A same-class partner row (mates nearest first) by `kind` (random | nearest | knn); -1 when there is none."""
    if not len(mates):
        return -1
    if kind == "nearest":
        return int(mates[0])
    if kind == "knn":
        return int(rng.choice(mates[:k]))
    return int(rng.choice(np.sort(mates)))  # random: the paper's; sorted, so the draw ignores the distance order


def adaptive_lambdas(points: torch.Tensor, labels: np.ndarray, noise: float, k: int) -> np.ndarray:
    """lambda per bank row: `noise` x its mean distance to its k nearest class mates / the median of those."""
    nb = class_neighbours(points, labels, range(len(labels)))
    d = np.asarray([nb[r][1][:k].mean() if len(nb[r][1]) else np.nan for r in range(len(labels))])
    med = np.nanmedian(d) if np.isfinite(d).any() else np.nan
    if not np.isfinite(med) or med <= 0:
        return np.full(len(labels), noise)
    scale = np.clip(np.nan_to_num(d / med, nan=1.0), 1 / NOISE_CLIP, NOISE_CLIP)
    return noise * scale


def select_consistent(groups: np.ndarray, order: np.ndarray, labels: np.ndarray, probs: np.ndarray,
                      keep, min_confidence: float) -> np.ndarray:
    """Indices of the kept candidates: per group, the first `keep` (by `order`) whose predicted class is their label
    with probability >= min_confidence, then the most confident others until `keep` (or the group runs out).

    groups (M,) group id per candidate, order (M,) its draw rank in the group, labels (M,), probs (M, classes);
    keep: an int, or an array indexed by group id."""
    keep = np.broadcast_to(np.asarray(keep), (int(groups.max()) + 1 if len(groups) else 0,))
    conf = probs[np.arange(len(labels)), labels]
    ok = (probs.argmax(1) == labels) & (conf >= min_confidence)
    kept = []
    for g in np.unique(groups):
        idx = np.flatnonzero(groups == g)
        idx = idx[np.argsort(order[idx], kind="stable")]
        good, bad = idx[ok[idx]], idx[~ok[idx]]
        bad = bad[np.argsort(-conf[bad], kind="stable")]
        kept.append(np.concatenate([good, bad])[:int(keep[g])])
    return np.sort(np.concatenate(kept)) if kept else np.zeros(0, np.int64)


def uncovered(real: np.ndarray, rows: np.ndarray, fake: np.ndarray, k: int) -> np.ndarray:
    """(len(rows),) bool: real feature rows[i] has no `fake` point within its k-th nearest real neighbour's distance.

    real (N, F) every real train image's features, rows the ones to test, fake (M, F) synthetic features."""
    r = torch.from_numpy(np.ascontiguousarray(real, dtype=np.float32))
    q = r[torch.as_tensor(rows, dtype=torch.long)]
    kth = min(k, len(r) - 1)
    radius = torch.cdist(q, r).kthvalue(kth + 1, dim=1).values if kth >= 1 else torch.zeros(len(q))  # +1: itself
    if not len(fake):
        return np.ones(len(q), bool)
    nearest = torch.cdist(q, torch.from_numpy(np.ascontiguousarray(fake, dtype=np.float32))).min(1).values
    return (nearest > radius).numpy()


def allocate(total: int, uncovered_mask: np.ndarray) -> np.ndarray:
    """`total` images over the rows: as evenly as possible over the uncovered ones (the first get the remainder),
    over all rows when every row is covered."""
    mask = np.asarray(uncovered_mask, bool)
    target = np.flatnonzero(mask) if mask.any() else np.arange(len(mask))
    out = np.zeros(len(mask), np.int64)
    if len(target):
        out[target] = total // len(target)
        out[target[:total % len(target)]] += 1
    return out
