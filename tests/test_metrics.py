"""`metrics` stage: KID and per-class metrics in metrics.json; feature choices that cannot work fail fast."""
from __future__ import annotations

import pytest
import yaml

from tests.conftest import tiny_params
from tests.stages import run_stage
from thinair import io
from thinair.config import ParamsError, parse_params
from thinair.quality import METRIC_KEYS


def test_metrics_json_has_kid_floor_and_per_class(params, sampled):
    out = run_stage("metrics", params, sampled)
    on_disk = io.read_json(sampled / "data" / "metrics" / "metrics.json")
    assert on_disk == out
    for name in ("synthetic_vs_train", "test_vs_train"):
        assert set(METRIC_KEYS) <= set(out[name])
    assert set(out["per_class"]) == {str(k) for k in range(10)}
    assert all(v["n_real"] == 4 for v in out["per_class"].values())  # 4 train digits per class in the fixture
    from thinair.tasks.metrics import tables

    t = tables(out)
    assert [r["compared"] for r in t["metrics"][1]] == ["synthetic_vs_train", "test_vs_train"]
    assert len(t["metrics-per-class"][1]) == 10


def test_clip_features_need_a_clip_model(tiny_generator):
    with pytest.raises(ParamsError, match="metrics.clip_model"):
        parse_params(tiny_params(tiny_generator, metrics={"features": "clip"}))


def test_inception_offline_fails_before_any_work(tiny_generator, tmp_path, monkeypatch, capsys):
    from thinair import features
    from thinair.cli import main

    if features.inception_weights_path().is_file():
        pytest.skip("clean-fid's Inception weights are present on this machine")
    monkeypatch.setenv("THINAIR_INCEPTION_DOWNLOAD", "0")
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(tiny_params(tiny_generator, metrics={"features": "inception"})))
    assert main(["--params", str(f), "--root", str(tmp_path), "ingest"]) == 1
    err = capsys.readouterr().err
    assert "inception-2015-12-05.pt" in err and str(features.inception_weights_path()) in err
    assert not (tmp_path / "data").exists()  # nothing was started
