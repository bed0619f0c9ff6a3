"""`metrics`: FID, precision, recall, density, coverage of synthetic vs real train images.

Features (``metrics.features``): ``domain`` = penultimate layer of a classifier trained on the real
train split (cached in ``.thinair/cache/metrics``; for domains where Inception is meaningless or
unavailable, e.g. 8 px digits). Also reports real *test* vs real train as the reference floor.
Reads ``data/ingest`` and ``data/sample``. Writes ``data/metrics/metrics.json`` (a DVC metric).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from prefect import task

from thinair import classifier, io, paths
from thinair.config import Params
from thinair.orchestration import task_options
from thinair.quality import all_metrics
from thinair.stage import ChunkCache, content_key, source_hash, read_split, require

STAGE = "metrics"


def read_synthetic(root: str | Path = ".") -> tuple[np.ndarray, np.ndarray]:
    d = paths.stage_dir("sample", root)
    manifest = io.read_json(require(d / io.MANIFEST, "sample"))
    parts = [io.load_npz(d / f) for f in manifest["chunks"]]
    return np.concatenate([p["images"] for p in parts]), np.concatenate([p["labels"] for p in parts])


def domain_feature_net(params: Params, train, root: str | Path = "."):
    """The real-train classifier used as feature extractor (cached by content)."""
    from safetensors.torch import load_file, save_file

    p = params.metrics
    h, _, c = train.images.shape[1:]
    seed = io.seed_for(params.base.seed, STAGE)
    net = classifier.build("smallcnn", c, len(train.class_names), h, seed)
    key = content_key(STAGE, source_hash(__name__), "domain", p.feature_epochs, params.base.seed, train.images,
                      train.labels)
    cache = ChunkCache(STAGE, root)
    hit = cache.get(key, "feature_net.safetensors")
    if hit is not None:
        net.load_state_dict(load_file(str(hit)))
        return net.eval()
    classifier.train(net, [(classifier.to_tensor(train.images), torch.from_numpy(train.labels), 1.0)],
                     epochs=p.feature_epochs, batch_size=128, optimizer="sgd", lr=0.05, momentum=0.9,
                     weight_decay=5e-4, warmup_epochs=1, padding=1, flip=False,
                     seed=seed)
    tmp = cache.dir / key / "feature_net.safetensors.part"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), str(tmp))
    cache.put(key, "feature_net.safetensors", tmp)
    return net.eval()


def subsample(x: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    if n is None or len(x) <= n:
        return x
    return x[np.sort(np.random.default_rng(seed).choice(len(x), n, replace=False))]


def metrics(params: Params, root: str | Path = ".") -> dict:
    p = params.metrics
    if p.features != "domain":
        raise ValueError("metrics.features: only 'domain' is available in this version; Inception features "
                         "(clean-fid) need its weights file and come with the evaluation issue")
    train, test = read_split("train", root), read_split("test", root)
    syn_x, syn_y = read_synthetic(root)
    if syn_x.shape[1:] != train.images.shape[1:]:
        raise ValueError(f"synthetic images are {syn_x.shape[1:]} but real ones {train.images.shape[1:]}; set "
                         "base.save_resolution: null to save at the dataset's resolution")
    net = domain_feature_net(params, train, root)
    feats = {name: classifier.features(net, classifier.to_tensor(subsample(x, p.max_samples, params.base.seed)))
             for name, x in (("train", train.images), ("test", test.images), ("synthetic", syn_x))}
    acc = float((classifier.predict(net, classifier.to_tensor(test.images)).numpy() == test.labels).mean())
    result = {
        "synthetic_vs_train": all_metrics(feats["train"], feats["synthetic"], p.k),
        "test_vs_train": all_metrics(feats["train"], feats["test"], p.k),
        "counts": {k: int(len(v)) for k, v in feats.items()},
        "features": {"kind": p.features, "dim": int(feats["train"].shape[1]), "feature_net_test_accuracy": acc},
    }
    out = paths.stage_dir(STAGE, root)
    io.write_json(out / "metrics.json", result)
    return result


@task(name="metrics", **task_options(retries=1, delay=5))
def metrics_task(params: Params, root: str = ".") -> dict:
    return metrics(params, root)
