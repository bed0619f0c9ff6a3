"""The paper's settings per dataset, as parameter overrides (``thinair preset NAME``).

Each preset is a set of ``section.key`` overrides on top of ``params.yaml``, applied as a DVC
experiment (``dvc exp run -S ...``) so results stay comparable in ``dvc exp show``. Values are from
"Training on Thin Air" and its reference code (see shared/REFERENCE.md); ``paper`` holds the ResNet-18
test accuracies (%) the paper reports: real only / generated only / real + generated. ``CLASSENC`` holds seed 002's
class-encoder settings per dataset it reports (``thinair preset classenc-cifar10``). Reads and
writes nothing; the preset ``search-best`` reads ``data/search/best.json`` (the `search` stage's best trial).
"""
from __future__ import annotations

import json
from pathlib import Path

# The paper's own choice for every option thinair adds beyond it (issues 17 and 19): pinned by every dataset preset
# and by `paper-di`, so the paper's exact method stays one preset away whatever params.yaml sets.
PAPER_DI = {
    "sample.method": "inversion", "sample.partner": "random", "sample.noise_schedule": "fixed",
    "sample.allocation": "uniform", "sample.filter_min_confidence": None, "sample.start": "noise",
    "sample.guidance_interval": None, "sample.uncond": "dataset", "sample.noise": 0.1, "sample.interpolation": 0.1,
    "sample.scheduler": "pndm", "sample.steps": 100,
    "invert.lr": 0.03, "invert.lr_schedule": "constant", "invert.warm_start": "none",
    "cas.synthetic": "pregenerated",
}

# Diffusion Inversion (seeds 000/001) on Stable Diffusion v1-4. Steps are per embedding (as the paper's "3K steps" and
# its reference code count them): a chunk of 100 at batch 50 runs 2 optimiser steps per per-embedding step, 6,000 in
# all; the checkpoints 1K/2K/3K are in the same units.
_SD = {
    "base.generator": "CompVis/stable-diffusion-v1-4", "base.device": "cuda", "base.chunk_size": 100,
    "invert.num_tokens": 5, "invert.steps": 3000, "invert.batch_size": 50, "invert.lr": 0.03,
    "invert.checkpoint_every": 1000,
    "sample.checkpoints": [1000, 2000, 3000], "sample.guidance_scales": [2.0, 3.0, 4.0],
    "sample.samples_per_setting": 5, "sample.noise": 0.1, "sample.interpolation": 0.1,
    "sample.scheduler": "pndm", "sample.steps": 100, "sample.batch_size": 100, "sample.uncond": "dataset",
    "metrics.features": "inception",  # FID / precision / recall / density / coverage on Inception-V3 features
    # CAS as the reference's train_net.py: 50K optimiser steps for every mode, 1K warm-up, batch 128; 5 seeds
    "cas.model": "resnet18", "cas.optimizer": "sgd", "cas.lr": 0.1, "cas.momentum": 0.9,
    "cas.weight_decay": 5e-4, "cas.batch_size": 128, "cas.flip": True, "cas.steps": 50000, "cas.warmup_steps": 1000,
    "cas.seeds": 5,
    "cas.real_fractions": [0.125, 0.25, 0.5, 0.75, 0.875],  # real:synthetic 1:7, 1:3, 1:1, 3:1, 7:1; best reported
    "cas.scale_synthetic": [1, 3, 9, 18, 27, 45],  # up to all 45 variants (3 checkpoints x 3 guidance x 5)
} | PAPER_DI


def _ds(name: str, res: int, padding: int, **extra) -> dict:
    """A dataset's preset: generation at `res` px, CAS crop padding 1/8 of the CAS image side."""
    return {"base.dataset": name, "base.gen_resolution": res} | _SD | {"cas.crop_padding": padding} | extra


# MedMNIST: the reference inverts 500 images per class in groups of 500 at batch 100 (5 optimiser steps per
# per-embedding step); CAS with AdamW 1e-3. Random flips stay on (the paper's augmentation for every dataset).
_MED = {"ingest.per_class_limit": 500, "base.chunk_size": 500, "invert.batch_size": 100, "cas.optimizer": "adamw",
        "cas.lr": 1e-3}

PRESETS: dict[str, dict] = {
    "cifar10": {"params": _ds("cifar10", 128, 4), "paper": (95.1, 94.6, 95.2)},
    "cifar100": {"params": _ds("cifar100", 128, 4), "paper": (77.9, 74.4, 78.0)},
    "stl10": {"params": _ds("stl10", 256, 12), "paper": (83.3, 89.0, 90.0)},
    # ImageNette at 256 px for inversion and for CAS (ingested at 256, synthetic images saved at 256)
    "imagenette": {"params": _ds("imagenette", 256, 32, **{"ingest.image_size": 256}), "paper": (93.8, 95.4, 95.0)},
    "eurosat": {"params": _ds("eurosat", 256, 8), "paper": None},
    "pathmnist": {"params": _ds("pathmnist", 128, 4, **_MED), "paper": (89.6, 82.1, 92.1)},
    "dermamnist": {"params": _ds("dermamnist", 128, 4, **_MED), "paper": (67.5, 67.5, 66.3)},
    "bloodmnist": {"params": _ds("bloodmnist", 128, 4, **_MED), "paper": (96.4, 93.7, 95.7)},
    "retinamnist": {"params": _ds("retinamnist", 128, 4, **_MED), "paper": None},
}


# Seed 002 (class encoder) on its datasets, as it sets them: SD v1-4 (context 100 tokens x 768, its
# cross_attention_dim), 128 px, encoder lr 1e-4 at batch 64 for 50 epochs, then the UNet fine-tuned (encoder frozen)
# at lr 1e-5, batch 16, 10 epochs; DDIM 50 steps, guidance 7.5; synthetic sets of x1 .. x10 the real train set.
# Epochs map to our step params: steps = epochs x ceil(train images / batch) (batches are drawn at random, so an
# epoch is that many draws, not a pass in order).
CLASSENC_TRAIN_IMAGES = {"cifar10": 50000, "cifar100": 50000, "pathmnist": 89996, "dermamnist": 7007,
                         "bloodmnist": 11959, "retinamnist": 1080}  # the official train splits


def epochs_to_steps(epochs: int, images: int, batch: int) -> int:
    """Optimiser steps of `epochs` epochs of `images` at batch `batch`."""
    return epochs * -(-images // batch)


def _classenc(name: str) -> dict:
    n = CLASSENC_TRAIN_IMAGES[name]
    return PRESETS[name]["params"] | {  # all train images (no per-class limit), 100-image chunks
        "ingest.per_class_limit": None, "base.chunk_size": 100, "invert.batch_size": 50,
        "sample.method": "class_encoder",
        "classenc.tokens": 100, "classenc.hidden": 500, "classenc.lr": 1e-4, "classenc.batch_size": 64,
        "classenc.steps": epochs_to_steps(50, n, 64), "classenc.weight_decay": 0.004, "classenc.grad_clip": 10.0,
        "classenc.finetune": "full", "classenc.finetune_lr": 1e-5, "classenc.finetune_batch_size": 16,
        "classenc.finetune_steps": epochs_to_steps(10, n, 16),
        "sample.scheduler": "ddim", "sample.steps": 50, "sample.guidance_scales": [7.5], "sample.checkpoints": ["final"],
        "sample.samples_per_setting": 10, "cas.scale_synthetic": [1, 10],  # synthetic sets x1 and x10
        # sampling a class encoder reads only the embedding bank's labels: one inversion step is enough
        "invert.steps": 1, "invert.checkpoint_every": 1,
    }


CLASSENC: dict[str, dict] = {f"classenc-{name}": {"params": _classenc(name)} for name in CLASSENC_TRAIN_IMAGES}


# The steering methods side by side on the current dataset (same ingest/metrics/cas/report, equal synthetic
# count): `thinair preset method-class-encoder --run`, then `dvc exp show`.
METHODS: dict[str, dict] = {
    "paper-di": {"params": PAPER_DI},  # Diffusion Inversion sampled and trained exactly as the paper, current dataset
    "method-inversion": {"params": {"sample.method": "inversion"}},
    "method-class-encoder": {"params": {"sample.method": "class_encoder"}},
    "method-class-encoder-lora": {"params": {"sample.method": "class_encoder", "classenc.finetune": "lora"}},
    "method-class-tokens": {"params": {"sample.method": "class_tokens"}},
}


# The embedded default inverts 65 per-embedding steps at lr 0.3 with a cosine schedule from a class warm start: it
# matches 300 steps at the paper's constant 0.03 with a quarter of the UNet passes (issue 19,
# benchmarks/invert_sweep.json); 75 steps at 0.03 constant lose 2.7 CAS points. So `paper-di` on a generator
# `thinair pretrain` made (generators/...) puts the 300 steps back; Stable Diffusion's 3,000 come with the dataset
# presets.
PAPER_RATE_STEPS = {"invert.steps": 300, "invert.checkpoint_every": 100}


def paper_rate_steps(params_file: str | Path) -> dict:
    """PAPER_RATE_STEPS when `params_file` uses a project-trained generator (``generators/...``), else {}."""
    from thinair.config import load_params

    generator = load_params(params_file).base.generator if Path(params_file).exists() else ""
    return dict(PAPER_RATE_STEPS) if str(generator).startswith("generators/") else {}


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


def set_args(name: str, root: str | Path = ".", params_file: str | Path | None = None) -> list[str]:
    """``-S key=value`` arguments of `dvc exp run` for preset `name` (values in YAML flow syntax); `params_file`
    (default ``<root>/params.yaml``) is the params the preset applies to."""
    table = PRESETS | METHODS | CLASSENC
    if name == SEARCH_BEST:
        table = {name: search_best(root)}
    if name not in table:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join([*table, SEARCH_BEST])}")
    params = dict(table[name]["params"])
    if name == "paper-di":
        params |= paper_rate_steps(params_file or Path(root) / "params.yaml")
    out = []
    for key, value in params.items():
        out += ["-S", f"{key}={yaml_value(value)}"]
    return out
