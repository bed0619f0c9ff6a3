"""Presets: the paper's settings per dataset validate as params and print a runnable `dvc exp run`."""
from __future__ import annotations

from pathlib import Path

import pytest

from thinair.cli import main
from thinair.config import load_params
from thinair.presets import PRESETS, set_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_valid_params(name):
    sets = set_args(name)
    p = load_params(ROOT / "params.yaml", [sets[i + 1] for i in range(0, len(sets), 2)])
    assert p.base.dataset == name and p.invert.lr == 0.03 and p.invert.num_tokens == 5
    assert p.sample.checkpoints == [1000, 2000, 3000] and p.sample.steps == 100
    assert p.base.gen_resolution == (256 if name in ("stl10", "imagenette", "eurosat") else 128)
    # per-embedding steps: 3000 updates of every embedding, checkpoints at 1K/2K/3K in the same units
    assert (p.invert.steps, p.invert.checkpoint_every) == (3000, 1000)
    assert (p.cas.steps, p.cas.warmup_steps, p.cas.seeds) == (50000, 1000, 5) and p.cas.flip  # MedMNIST flips too
    assert p.cas.real_fractions == [0.125, 0.25, 0.5, 0.75, 0.875] and p.cas.scale_synthetic[-1] == 45
    assert p.metrics.features == "inception"
    if name == "imagenette":  # 256 px for inversion and for CAS
        assert p.ingest.image_size == 256 and p.base.save_resolution in (None, 256)
    if name.endswith("mnist"):  # the reference's groups of 500 at batch 100: 5 optimiser steps per update
        assert (p.base.chunk_size, p.invert.batch_size, p.cas.optimizer) == (500, 100, "adamw")


def test_preset_stl10_prints_one_checkable_value_per_line(capsys):
    assert main(["--params", str(ROOT / "params.yaml"), "preset", "stl10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "dvc exp run -n paper-stl10 \\" and all(ln.endswith(" \\") for ln in lines[:-1])
    for line in ["-S base.dataset=stl10", "-S base.gen_resolution=256", "-S base.generator=CompVis/stable-diffusion-v1-4",
                 "-S invert.steps=3000", "-S invert.batch_size=50", "-S invert.checkpoint_every=1000",
                 "-S invert.lr=0.03", "-S invert.num_tokens=5", "-S 'sample.checkpoints=[1000, 2000, 3000]'",
                 "-S 'sample.guidance_scales=[2.0, 3.0, 4.0]'", "-S sample.samples_per_setting=5",
                 "-S sample.scheduler=pndm", "-S sample.steps=100", "-S metrics.features=inception",
                 "-S cas.model=resnet18", "-S cas.steps=50000", "-S cas.warmup_steps=1000", "-S cas.crop_padding=12",
                 "-S 'cas.real_fractions=[0.125, 0.25, 0.5, 0.75, 0.875]'",
                 "-S 'cas.scale_synthetic=[1, 3, 9, 18, 27, 45]'"]:
        assert f"  {line} \\" in lines or f"  {line}" == lines[-1], line


@pytest.mark.parametrize("name,encoder_steps,finetune_steps", [("classenc-cifar10", 50 * 782, 10 * 3125),
                                                               ("classenc-dermamnist", 50 * 110, 10 * 438)])
def test_class_encoder_presets_are_seed_002s(name, encoder_steps, finetune_steps):
    """100 tokens, lr 1e-4 at batch 64 for 50 epochs; fine-tune lr 1e-5 at batch 16 for 10 epochs; DDIM 50, w 7.5
    (epochs = steps x batch / train images: CIFAR-10 50,000, DermaMNIST 7,007)."""
    sets = set_args(name)
    p = load_params(ROOT / "params.yaml", [sets[i + 1] for i in range(0, len(sets), 2)])
    c = p.classenc
    assert p.sample.method == "class_encoder" and (c.tokens, c.hidden, c.lr, c.batch_size) == (100, 500, 1e-4, 64)
    assert (c.steps, c.finetune, c.finetune_lr, c.finetune_batch_size, c.finetune_steps) == (
        encoder_steps, "full", 1e-5, 16, finetune_steps)
    assert (p.sample.scheduler, p.sample.steps, p.sample.guidance_scales) == ("ddim", 50, [7.5])
    assert p.base.gen_resolution == 128 and p.ingest.per_class_limit is None


def test_preset_cli_prints_the_experiment(capsys):
    assert main(["--params", str(ROOT / "params.yaml"), "preset", "cifar10"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("dvc exp run -n paper-cifar10 ") and "-S base.dataset=cifar10" in out


def test_unknown_preset_is_refused(capsys):
    assert main(["--params", str(ROOT / "params.yaml"), "preset", "mnist"]) == 2
    assert "choose one of" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["method-inversion", "method-class-encoder", "method-class-encoder-lora",
                                  "method-class-tokens"])
def test_method_presets_are_valid_experiments(name, capsys):
    from thinair.presets import METHODS

    sets = set_args(name)
    p = load_params(ROOT / "params.yaml", [sets[i + 1] for i in range(0, len(sets), 2)])
    assert p.sample.method == METHODS[name]["params"]["sample.method"]
    assert main(["--params", str(ROOT / "params.yaml"), "preset", name]) == 0
    assert capsys.readouterr().out.startswith(f"dvc exp run -n {name} \\\n  -S sample.method=")


def test_paper_di_pins_every_beyond_paper_option_to_the_papers_choice(capsys):
    """Issues 17 and 19 add options beyond the paper; `paper-di` (and every dataset preset) sets each back to the
    paper's value, whatever params.yaml says, and those values are the defaults today."""
    from thinair.config import Params
    from thinair.presets import PAPER_DI

    beyond = {"sample.partner", "sample.noise_schedule", "sample.allocation", "sample.filter_min_confidence",
              "sample.start", "sample.guidance_interval", "invert.lr_schedule", "invert.warm_start", "cas.synthetic"}
    assert beyond <= set(PAPER_DI)
    changed = ["-S", "sample.partner=knn", "-S", "sample.guidance_interval=[0.3,0.7]", "-S", "invert.warm_start=class",
               "-S", "cas.synthetic=on_the_fly", "-S", "sample.scheduler=dpmsolver++"]
    sets = changed + set_args("paper-di")
    p = load_params(ROOT / "params.yaml", [sets[i + 1] for i in range(0, len(sets), 2)])
    default = Params()
    for key in beyond:
        section, name = key.split(".")
        assert getattr(getattr(p, section), name) == getattr(getattr(default, section), name) == PAPER_DI[key]
    assert (p.sample.scheduler, p.sample.steps) == ("pndm", 100)
    # the embedded generator at the paper's constant 0.03: the 300 steps it needs, not the cheap default's 75
    assert (p.invert.steps, p.invert.checkpoint_every, p.invert.lr) == (300, 100, 0.03)
    for name in PRESETS:
        assert set(PAPER_DI.items()) <= {(k, v if not isinstance(v, list) else tuple(v))
                                         for k, v in PRESETS[name]["params"].items()}
    assert main(["--params", str(ROOT / "params.yaml"), "preset", "paper-di"]) == 0
    assert "-S sample.partner=random" in capsys.readouterr().out
