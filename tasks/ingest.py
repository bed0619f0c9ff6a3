"""`ingest`: a dataset to sharded npz with train/test splits and a manifest.

Reads the dataset named by ``base.dataset`` (see :mod:`thinair.datasets`). Writes
``data/ingest/{train,test}-NNNNN.npz`` (keys ``images`` uint8 (N, H, W, C), ``labels`` int64 (N,),
``class_names``) and ``data/ingest/manifest.json`` (written last).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from thinair import datasets, faults, io, paths
from thinair.config import Params
from thinair.rawdata import holdout_split
from thinair.upstream import chunk_ranges

STAGE = "ingest"
USES_DEVICE = False
RETRIES = (2, 5)


def limit_per_class(labels: np.ndarray, per_class: int | None, total: int | None, seed: int,
                    subset_seed: int | None = None) -> np.ndarray:
    """Indices kept after the per-class and total limits (the first images of each class, in order; or, with
    `subset_seed`, a seeded random draw per class)."""
    keep = np.arange(len(labels))
    if per_class is not None:
        rng = None if subset_seed is None else np.random.default_rng(io.seed_for(subset_seed, "ingest-subset"))
        rows = [np.flatnonzero(labels == c) for c in np.unique(labels)]
        keep = np.concatenate([r[:per_class] if rng is None else rng.permutation(r)[:per_class] for r in rows])
        keep.sort()
    if total is not None and total < len(keep):
        rng = np.random.default_rng(io.seed_for(seed, "ingest-limit"))
        keep = np.sort(rng.choice(keep, size=total, replace=False))
    return keep


def validate(raw: datasets.RawDataset, name: str) -> None:
    """Refuse data the later stages cannot learn from, naming the problem."""
    n_cls = len(raw.class_names)
    for split, x, y in (("train", raw.train_images, raw.train_labels), ("test", raw.test_images, raw.test_labels)):
        if len(x) == 0:
            raise ValueError(f"dataset {name!r}: the {split} split is empty; check base.dataset and ingest limits")
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"dataset {name!r}: {split} images must be uint8 (N, H, W, 1|3), got {x.dtype} {x.shape}")
        if y.min() < 0 or y.max() >= n_cls:
            raise ValueError(f"dataset {name!r}: {split} labels must be in [0, {n_cls}), got [{y.min()}, {y.max()}]")
    if len(np.unique(raw.train_labels)) < 2:
        raise ValueError(f"dataset {name!r}: the train split has a single class; a classifier needs at least two")


def ingest(params: Params, root: str | Path = ".") -> dict:
    """Load, limit and shard the dataset; return the manifest."""
    b, p = params.base, params.ingest
    raw = datasets.load(b.dataset, b.data_root, test_fraction=p.test_fraction, download=p.download,
                        image_size=p.image_size, corrupt=p.corrupt)
    task, pool = holdout_split(raw.train_labels, p.holdout_fraction, datasets.SPLIT_SEED)  # pool: never the task's
    if p.holdout_fraction and len(np.unique(raw.train_labels[task])) < len(raw.class_names):
        raise ValueError(f"ingest.holdout_fraction={p.holdout_fraction} leaves a class of {b.dataset!r} without "
                         "train images; lower it")
    raw.train_images, raw.train_labels = raw.train_images[task], raw.train_labels[task]
    keep = limit_per_class(raw.train_labels, p.per_class_limit, p.limit, b.seed, p.subset_seed)
    raw.train_images, raw.train_labels = raw.train_images[keep], raw.train_labels[keep]
    validate(raw, b.dataset)
    out = paths.stage_dir("ingest", root)
    out.mkdir(parents=True, exist_ok=True)
    names = np.asarray(raw.class_names, dtype=str)
    manifest = {"dataset": b.dataset, "class_names": raw.class_names, "image_shape": list(raw.train_images.shape[1:]),
                "skipped": raw.skipped, "splits": {}}
    if p.holdout_fraction:  # recorded only when used, so a default run's manifest is unchanged
        manifest["holdout"] = {"fraction": p.holdout_fraction, "pool_images": int(len(pool))}
    written = {io.MANIFEST}
    for split, x, y in (("train", raw.train_images, raw.train_labels), ("test", raw.test_images, raw.test_labels)):
        shards = []
        for i, (s, e) in enumerate(chunk_ranges(len(x), p.shard_size)):
            name = paths.chunk_name(split, i, "npz")
            io.save_npz(out / name, images=x[s:e], labels=y[s:e].astype(np.int64), class_names=names)
            shards.append(name)
        written.update(shards)
        manifest["splits"][split] = {"count": int(len(x)), "shards": shards,
                                     "per_class": np.bincount(y, minlength=len(names)).tolist()}
    for f in out.iterdir():  # drop shards of an earlier, larger run
        if f.is_file() and f.name not in written:
            faults.point("unlink", f)
            f.unlink()
    io.write_json(out / io.MANIFEST, manifest)
    return manifest


def source_fingerprint(dataset: str) -> list:
    """What identifies the dataset's content without reading it: the name of a built-in dataset (a fixed
    release), or every file's (path, size, mtime) of a `folder:` dataset."""
    if not dataset.startswith("folder:"):
        return [dataset]
    root = Path(dataset.split(":", 1)[1]).expanduser()
    if not root.is_dir():
        return [dataset, "missing"]
    return [[f.relative_to(root).as_posix(), f.stat().st_size, f.stat().st_mtime_ns]
            for f in sorted(root.rglob("*")) if f.is_file()]


def units(params: Params, root: str | Path = ".") -> list[dict]:
    """One unit: the whole dataset."""
    return [{"name": "all"}]


def key(params: Params, unit: dict, root: str | Path = ".") -> list:
    b = params.base
    return [b.dataset, b.seed, params.ingest.model_dump(mode="json"), source_fingerprint(b.dataset)]


def compute(params: Params, unit: dict, out: Path, root: str | Path = ".", device=None) -> dict:
    return ingest(params, root)


def finish(params: Params, records: list[dict], root: str | Path = ".") -> dict:
    return records[0]["result"]
