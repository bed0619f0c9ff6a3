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
    assert capsys.readouterr().out.startswith(f"dvc exp run -n {name} -S sample.method=")
