"""The paper's settings per dataset, as parameter overrides (``thinair preset NAME``).

Each preset is a set of ``section.key`` overrides on top of ``params.yaml``, applied as a DVC
experiment (``dvc exp run -S ...``) so results stay comparable in ``dvc exp show``. Values are from
"Training on Thin Air" and its reference code (see shared/REFERENCE.md); ``paper`` holds the ResNet-18
test accuracies (%) the paper reports: real only / generated only / real + generated. Reads and
writes nothing; the preset ``search-best`` reads ``data/search/best.json`` (the `search` stage's best trial).
"""
from __future__ import annotations

import json
from pathlib import Path

_SD = {
    "base.generator": "CompVis/stable-diffusion-v1-4", "base.device": "cuda", "base.chunk_size": 100,
    "invert.num_tokens": 5, "invert.steps": 3000, "invert.batch_size": 50, "invert.lr": 0.03,
    "invert.checkpoint_every": 1000,
    "sample.checkpoints": [1000, 2000, 3000], "sample.guidance_scales": [2.0, 3.0, 4.0],
    "sample.samples_per_setting": 5, "sample.noise": 0.1, "sample.interpolation": 0.1,
    "sample.scheduler": "pndm", "sample.steps": 100, "sample.batch_size": 100, "sample.uncond": "dataset",
    "cas.model": "resnet18", "cas.optimizer": "sgd", "cas.lr": 0.1, "cas.momentum": 0.9,
    "cas.weight_decay": 5e-4, "cas.batch_size": 128, "cas.flip": True,
    "metrics.features": "domain",
}


def _ds(name: str, res: int, padding: int, epochs: int, **extra) -> dict:
    return _SD | {"base.dataset": name, "base.gen_resolution": res, "cas.crop_padding": padding,
                  "cas.epochs": epochs} | extra


_MED = {"ingest.per_class_limit": 500, "cas.optimizer": "adamw", "cas.lr": 1e-3, "cas.flip": False}

PRESETS: dict[str, dict] = {
    "cifar10": {"params": _ds("cifar10", 128, 4, 100), "paper": (95.1, 94.6, 95.2)},
    "cifar100": {"params": _ds("cifar100", 128, 4, 100), "paper": (77.9, 74.4, 78.0)},
    "stl10": {"params": _ds("stl10", 256, 12, 200), "paper": (83.3, 89.0, 90.0)},
    "imagenette": {"params": _ds("imagenette", 256, 16, 100, **{"ingest.image_size": 128}),
                   "paper": (93.8, 95.4, 95.0)},
    "eurosat": {"params": _ds("eurosat", 256, 8, 100), "paper": None},
    "pathmnist": {"params": _ds("pathmnist", 128, 4, 100, **_MED), "paper": (89.6, 82.1, 92.1)},
    "dermamnist": {"params": _ds("dermamnist", 128, 4, 100, **_MED), "paper": (67.5, 67.5, 66.3)},
    "bloodmnist": {"params": _ds("bloodmnist", 128, 4, 100, **_MED), "paper": (96.4, 93.7, 95.7)},
    "retinamnist": {"params": _ds("retinamnist", 128, 4, 100, **_MED), "paper": None},
}


# The steering methods side by side on the current dataset (same ingest/metrics/cas/report, equal synthetic
# count): `thinair preset method-class-encoder --run`, then `dvc exp show`.
METHODS: dict[str, dict] = {
    "method-inversion": {"params": {"sample.method": "inversion"}},
    "method-class-encoder": {"params": {"sample.method": "class_encoder"}},
    "method-class-encoder-lora": {"params": {"sample.method": "class_encoder", "classenc.finetune": "lora"}},
    "method-class-tokens": {"params": {"sample.method": "class_tokens"}},
}


SEARCH_BEST = "search-best"  # the `search` stage's best trial (data/search/best.json), applied as an experiment


def search_best(root: str | Path = ".") -> dict:
    """The overrides of the `search` stage's best trial as a preset (``{"params": {key: value}}``)."""
    import yaml

    from thinair import paths

    f = paths.stage_dir("search", root) / "best.json"
    if not f.is_file():
        raise ValueError(f"preset {SEARCH_BEST}: {f} does not exist; run the search first "
                         "(dvc exp run -n search -S search.trials=20), then this preset in that workspace")
    best = json.loads(f.read_text())
    return {"params": {o.split("=", 1)[0]: yaml.safe_load(o.split("=", 1)[1]) for o in best["overrides"]}}


def yaml_value(value) -> str:
    """A value in YAML flow syntax, as `-S key=value` and `thinair -S` take it."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def set_args(name: str, root: str | Path = ".") -> list[str]:
    """``-S key=value`` arguments of `dvc exp run` for preset `name` (values in YAML flow syntax)."""
    table = PRESETS | METHODS
    if name == SEARCH_BEST:
        table = {name: search_best(root)}
    if name not in table:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join([*table, SEARCH_BEST])}")
    out = []
    for key, value in table[name]["params"].items():
        out += ["-S", f"{key}={yaml_value(value)}"]
    return out
