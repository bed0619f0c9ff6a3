"""What every dataset loader returns, and the deterministic stratified split they share. No I/O.

Used by thinair/datasets.py (built-in datasets) and thinair/imagefolder.py (a user's folder), so neither imports
the other's module for it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

IMG_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


@dataclass
class RawDataset:
    train_images: np.ndarray  # (N, H, W, C) uint8
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]
    skipped: list[dict] = field(default_factory=list)  # unreadable files, by path and reason


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with every class split in the same proportion, deterministically."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(len(idx) * test_fraction))
        if len(idx) > 1:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def holdout_split(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (task, pool) of a train split: a stratified, deterministic `fraction` of every class is held out as
    the *pool* a generator may be pretrained on (``pretrain.pool: holdout``), the rest is what the task may use
    (``ingest.holdout_fraction``). The two never share an index; with fraction 0 the pool is empty."""
    if fraction <= 0:
        return np.arange(len(labels)), np.arange(0)
    task, pool = stratified_split(labels, fraction, seed)
    return task, pool


def image_hashes(images) -> list[str]:
    """Hex sha256 of every image's uint8 bytes (``np.ascontiguousarray(img).tobytes()``), in the images' order.

    What pretrain records of its pool (``train_log.json``) and what the task side compares against it, so the two
    are shown disjoint by content, not only by index."""
    return [hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest() for im in images]
