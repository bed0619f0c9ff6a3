"""`cas`: Classification Accuracy Score — train on real, synthetic, or real+synthetic; test on real test.

Protocol (paper): SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 128, warm-up + cosine, random
crop with padding (+ flip where the domain allows). real+synthetic mixes each batch at
``cas.real_fraction``. Reads ``data/ingest`` and ``data/sample``. Writes ``data/cas/cas.json`` (a DVC
metric: test accuracy per mode) and one trained classifier per mode under ``.thinair/cache/cas``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from prefect import task

from thinair import classifier, io, paths
from thinair.config import Params
from thinair.generator import resolve_device
from thinair.orchestration import task_options
from thinair.stage import ChunkCache, content_key, source_hash, read_split
from thinair.tasks.metrics import read_synthetic

STAGE = "cas"
log = logging.getLogger(__name__)


def train_mode(params: Params, mode: str, real, syn: tuple[np.ndarray, np.ndarray], test, root=".") -> dict:
    """Train one classifier for `mode` and return its real-test accuracy (cached by content)."""
    p = params.cas
    key = content_key(STAGE, source_hash(__name__), mode, p.model_dump(mode="json"), params.base.seed,
                      real.images, real.labels,
                      syn[0] if mode != "real" else None, syn[1] if mode != "real" else None)
    cache = ChunkCache(STAGE, root)
    hit = cache.get(key, "result.json")
    if hit is not None:
        return io.read_json(hit)
    h, _, c = real.images.shape[1:]
    device = resolve_device(params.base.device)
    seed = io.seed_for(params.base.seed, STAGE, mode)
    net = classifier.build(p.model, c, len(real.class_names), h, seed)
    real_src = (classifier.to_tensor(real.images), torch.from_numpy(real.labels))
    syn_src = (classifier.to_tensor(syn[0]), torch.from_numpy(syn[1])) if mode != "real" else None
    sources = {"real": lambda: [real_src + (1.0,)], "synthetic": lambda: [syn_src + (1.0,)],
               "real+synthetic": lambda: [real_src + (p.real_fraction,), syn_src + (1 - p.real_fraction,)]}[mode]()
    classifier.train(net, sources, epochs=p.epochs, batch_size=p.batch_size, optimizer=p.optimizer, lr=p.lr,
                     momentum=p.momentum, weight_decay=p.weight_decay, warmup_epochs=p.warmup_epochs,
                     padding=p.crop_padding, flip=p.flip, seed=seed,
                     device=device, on_epoch=lambda e, l: log.info("cas %s epoch %d/%d loss %.4f", mode, e, p.epochs, l))
    pred = classifier.predict(net.cpu(), classifier.to_tensor(test.images)).numpy()
    per_class = [float((pred[test.labels == k] == k).mean()) for k in range(len(real.class_names))]
    result = {"accuracy": float((pred == test.labels).mean()), "per_class_accuracy": per_class,
              "train_images": int(sum(len(s[0]) for s in sources)), "test_images": int(len(test.labels))}
    tmp = cache.dir / key / "result.json.part"
    io.write_json(tmp, result)
    cache.put(key, "result.json", tmp)
    return result


def cas(params: Params, root: str | Path = ".") -> dict:
    real, test = read_split("train", root), read_split("test", root)
    syn = read_synthetic(root) if any(m != "real" for m in params.cas.modes) else (None, None)
    return summarize(params, {m: train_mode(params, m, real, syn, test, root) for m in params.cas.modes}, root)


def summarize(params: Params, results: dict, root: str | Path = ".") -> dict:
    """Write ``data/cas/cas.json`` from the per-mode results."""
    out = {"accuracy": {m: r["accuracy"] for m, r in results.items()}, "details": results,
           "model": params.cas.model, "test_images": next(iter(results.values()))["test_images"]}
    io.write_json(paths.stage_dir(STAGE, root) / "cas.json", out)
    return out


@task(name="cas-mode", **task_options(retries=1, delay=5))
def cas_mode_task(params: Params, mode: str, root: str = ".") -> dict:
    real, test = read_split("train", root), read_split("test", root)
    syn = read_synthetic(root) if mode != "real" else (None, None)
    return train_mode(params, mode, real, syn, test, root)
