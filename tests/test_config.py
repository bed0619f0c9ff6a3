"""Params: defaults, validation errors that name the key, and the CLI refusing bad params untouched."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from thinair.cli import main
from thinair.config import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_params_are_valid_and_name_every_stage():
    p = load_params(ROOT / "params.yaml")
    assert p.base.dataset == "digits" and p.sample.uncond == "dataset"
    # issue 19's inversion in a quarter of the passes
    assert (p.invert.steps, p.invert.lr, p.invert.lr_schedule, p.invert.warm_start) == (65, 0.3, "cosine", "class")
    # and its cheaper guidance: 8 DPM-Solver++ steps, guided only at noise levels t/T <= 0.3
    assert (p.sample.scheduler, p.sample.steps, p.sample.guidance_interval) == ("dpmsolver++", 8, (0.0, 0.3))
    dvc = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(dvc) == ["ingest", "pretrain", "encode", "invert", "classenc", "search", "sample", "metrics", "cas", "report",
                         "export"]
    for name, stage in dvc.items():
        assert stage["cmd"] == f"thinair {name}"
        assert (ROOT / "tasks" / f"{name}.py").is_file() and (ROOT / "flows" / f"{name}.py").is_file()


@pytest.mark.parametrize("raw, needle", [
    ({"invert": {"lr_rate": 0.1}}, "invert.lr_rate: unknown key"),
    ({"invert": {"steps": "many"}}, "invert.steps: got 'many'"),
    ({"invert": {"steps": 0}}, "greater than or equal to 1"),
    ({"sample": {"interpolation": 1.5}}, "sample.interpolation"),
    ({"base": {"device": "gpu"}}, "base.device"),
    ({"sampel": {}}, "sampel: unknown key"),
    ({"sample": {"checkpoints": [150]}, "invert": {"steps": 300, "checkpoint_every": 100}}, "step 150 is not saved"),
    ({"sample": {"scheduler": "magic"}}, "sample.scheduler"),
    ({"cas": {"steps": 0}}, "cas.steps"),
    ({"cas": {"steps": 500}}, "cas.warmup_steps=1000 exceeds cas.steps=500"),
])
def test_bad_params_name_the_key(raw, needle):
    with pytest.raises(ParamsError) as err:
        parse_params(raw, "params.yaml")
    assert needle in str(err.value)


def test_cas_steps_default_to_epochs_and_take_a_warmup():
    assert parse_params({}).cas.steps is None  # epoch-based training, as before
    cas = parse_params({"cas": {"steps": 50000}}).cas
    assert (cas.steps, cas.warmup_steps) == (50000, 1000)  # the reference code's protocol
    assert parse_params({"cas": {"steps": 10, "warmup_steps": 10}}).cas.warmup_steps == 10


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ParamsError) as err:
        parse_params({"invert": {"lr_rate": 0.1}})
    assert "Allowed keys here:" in str(err.value) and "checkpoint_every" in str(err.value)
    with pytest.raises(ParamsError, match="Did you mean 'checkpoint_every'"):
        parse_params({"invert": {"checkpoint_evry": 10}})


def test_overrides_are_validated(tmp_path):
    f = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", f)
    assert load_params(f, ["invert.steps=7"]).invert.steps == 7
    with pytest.raises(ParamsError, match="invert.stepz"):
        load_params(f, ["invert.stepz=7"])


def test_cli_typo_exits_nonzero_and_touches_nothing(tmp_path, capsys):
    f = tmp_path / "params.yaml"
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["invert"]["stepz"] = 10
    f.write_text(yaml.safe_dump(raw))
    keep = tmp_path / "data" / "invert" / "train-00000.safetensors"
    keep.parent.mkdir(parents=True)
    keep.write_bytes(b"finished work")
    assert main(["--params", str(f), "--root", str(tmp_path), "invert"]) == 2
    assert "invert.stepz: unknown key" in capsys.readouterr().err
    assert keep.read_bytes() == b"finished work"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["data", "invert", "params.yaml", "train-00000.safetensors"]


def test_missing_params_file_is_clear(tmp_path):
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_readme_lists_every_parameter():
    from thinair.config import Params

    readme = (ROOT / "README.md").read_text()
    for section, field in Params.model_fields.items():
        for key in field.annotation.model_fields:
            assert f"`{section}.{key}`" in readme, f"README lacks {section}.{key}: paste `thinair params` output"
