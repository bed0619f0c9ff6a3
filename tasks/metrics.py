"""`metrics`: FID, KID, precision, recall, density, coverage of synthetic vs real train images.

Features (``metrics.features``): ``inception`` = clean-fid's Inception-V3 ("clean" resize; its weights
file must be present or downloadable, else the stage fails at once saying where to put it), ``domain`` =
penultimate layer of a classifier trained on the real train split (thinair/domain.py, cached in ``.thinair/cache/domain``;
for domains where Inception is meaningless, e.g. 8 px digits), ``clip`` = a local CLIP vision model.
Overall and per class, plus real *test* vs real train as the reference floor. Reads ``data/ingest`` and
``data/sample``. Writes ``data/metrics/metrics.json`` (the DVC metric; per-class values under
``per_class``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from thinair import features, io, paths
from thinair.config import Params
from thinair.devices import current_device
from thinair.domain import accuracy, domain_classifier
from thinair.quality import METRIC_KEYS, all_metrics, per_class
from thinair.upstream import inputs_digest, read_split, read_synthetic

STAGE = "metrics"


def domain_feature_net(params: Params, train, root: str | Path = "."):
    """The real-train classifier used as feature extractor (thinair/domain.py, cached by content)."""
    return domain_classifier(train.images, train.labels, len(train.class_names), params.metrics.feature_epochs,
                             params.base.seed, root)


def subsample_rows(n: int, limit: int | None, seed: int) -> np.ndarray:
    return np.arange(n) if limit is None or n <= limit else np.sort(
        np.random.default_rng(seed).choice(n, limit, replace=False))


def metrics(params: Params, root: str | Path = ".") -> dict:
    """Compute every metric and write data/metrics/metrics.json; returns its content."""
    p, seed = params.metrics, params.base.seed
    features.check_available(p.features, p.clip_model)  # fail before any work
    train, test = read_split("train", root), read_split("test", root)
    syn = read_synthetic(root)
    if syn.images.shape[1:] != train.images.shape[1:]:
        raise ValueError(f"synthetic images are {syn.images.shape[1:]} but real ones {train.images.shape[1:]}; set "
                         "base.save_resolution: null to save at the dataset's resolution")
    info = {"kind": p.features}
    net = None
    if p.features == "domain":
        net = domain_feature_net(params, train, root)
        info["feature_net_test_accuracy"] = accuracy(net, test.images, test.labels)
    extract = features.build(p.features, device=str(_device(params)), clip_model=p.clip_model, domain_net=net)
    sets = {"train": (train.images, train.labels), "test": (test.images, test.labels),
            "synthetic": (syn.images, syn.labels)}
    feats, labels = {}, {}
    for name, (x, y) in sets.items():
        rows = subsample_rows(len(y), p.max_samples, seed)
        feats[name], labels[name] = extract(x[rows]), y[rows]
    opts = {"k": p.k, "kid_subsets": p.kid_subsets, "kid_subset_size": p.kid_subset_size, "seed": seed}
    result = {
        "synthetic_vs_train": all_metrics(feats["train"], feats["synthetic"], **opts),
        "test_vs_train": all_metrics(feats["train"], feats["test"], **opts),
        "counts": {k: int(len(v)) for k, v in feats.items()},
        "features": info | {"dim": int(feats["train"].shape[1])},
    }
    if p.per_class:
        result["per_class"] = per_class(feats["train"], labels["train"], feats["synthetic"], labels["synthetic"],
                                        **opts)
    out = paths.stage_dir(STAGE, root)
    io.write_json(out / "metrics.json", result)
    return result


def _device(params: Params):
    return current_device(params.base)


def tables(result: dict) -> dict[str, tuple[str, list[dict]]]:
    """Key tables for Prefect artifacts: overall metrics (and the floor), and per class."""
    rows = [{"compared": name} | {k: round(float(result[name][k]), 4) for k in METRIC_KEYS}
            for name in ("synthetic_vs_train", "test_vs_train")]
    out = {"metrics": (f"Distribution metrics, {result['features']['kind']} features", rows)}
    if "per_class" in result:
        out["metrics-per-class"] = ("Per class: synthetic vs real train", [
            {"class": c} | {k: (None if v.get(k) is None else round(float(v[k]), 4)) for k in METRIC_KEYS}
            for c, v in result["per_class"].items()])
    return out


SET_THREADS = False  # the metrics keep the process's torch threads
RETRIES = (1, 5)


def units(params: Params, root: str | Path = ".") -> list[dict]:
    """One unit: the whole stage."""
    return [{"name": "all"}]


def key(params: Params, unit: dict, root: str | Path = ".") -> list:
    """The params and every input file (real and synthetic images) the metrics depend on."""
    return [params.metrics.model_dump(mode="json"), params.base.seed, inputs_digest(root, "ingest", "sample")]


def compute(params: Params, unit: dict, out: Path, root: str | Path = ".", device=None) -> dict:
    return metrics(params, root)


def finish(params: Params, records: list[dict], root: str | Path = ".") -> dict:
    return records[0]["result"]
