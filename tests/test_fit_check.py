"""The generator-fit check of `encode` (tasks/encode.py) and the report's warnings: a generator that cannot
represent the dataset warns (or, with encode.fit_check: fail, stops before invert) with figures and the fix; one
that can passes. Uses the shipped, trained digits generator: a random tiny one represents nothing."""
from __future__ import annotations

import logging

import numpy as np
import pytest
from PIL import Image

from thinair import io
from thinair.config import parse_params
from thinair.errors import GeneratorMisfit
from thinair.units import run_local

EMBEDDED = "generators/tiny-digits"


def _colour_folder(root, n: int = 30, size: int = 12):
    """Two classes that differ only in colour (reddish vs bluish noise): obvious to a classifier of the real
    images, gone after an autoencoder that only ever saw grey digits."""
    rng = np.random.default_rng(0)
    for c, channel in (("red", 0), ("blue", 2)):
        (root / c).mkdir(parents=True)
        for i in range(n):
            x = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
            x[..., channel] = rng.integers(150, 256, (size, size), dtype=np.uint8)
            Image.fromarray(x, "RGB").save(root / c / f"{i}.png")


def _params(dataset: str, **encode):
    from tests.conftest import tiny_params

    from thinair.codegraph import source_root

    raw = tiny_params(source_root() / EMBEDDED, base={"dataset": dataset, "chunk_size": 200},
                      ingest={"per_class_limit": 30, "test_fraction": 0.3}, metrics={"feature_epochs": 20},
                      encode={"fit_check": "warn", **encode})  # (tiny_params turns it off)
    return parse_params(raw)


def test_a_generator_of_the_domain_passes(tmp_path):
    params = _params("digits")
    run_local("ingest", params, tmp_path)
    manifest = run_local("encode", params, tmp_path)
    fit = io.read_json(tmp_path / "data" / "encode" / "fit.json")
    assert fit["ok"] and manifest["fit"]["ok"] and fit["message"] is None
    assert fit["accuracy_originals"] > 0.8 and fit["ratio"] >= 0.9, fit
    assert fit["psnr_db"] > 15


def test_a_generator_of_another_domain_warns_with_figures_and_the_fix(tmp_path, caplog):
    _colour_folder(tmp_path / "colours")
    params = _params(f"folder:{tmp_path / 'colours'}")
    run_local("ingest", params, tmp_path / "ws")
    with caplog.at_level(logging.WARNING, logger="thinair"):
        manifest = run_local("encode", params, tmp_path / "ws")
    fit = io.read_json(tmp_path / "ws" / "data" / "encode" / "fit.json")
    assert not fit["ok"] and not manifest["fit"]["ok"]
    assert fit["accuracy_originals"] >= 0.9 and fit["ratio"] < 0.9, fit
    assert "GENERATOR-FIT CHECK FAILED" in caplog.text and "cannot represent this dataset" in caplog.text
    assert "thinair pretrain -S pretrain.dataset=folder:" in fit["message"] and "stable-diffusion" in fit["message"]
    assert (tmp_path / "ws" / "data" / "encode" / "train-00000.safetensors").is_file()  # warn: the run goes on

    from thinair.tasks.report import warnings

    metrics = {"synthetic_vs_train": {"recall": 0.0, "coverage": 0.03},
               "test_vs_train": {"recall": 0.9, "coverage": 0.6}}
    said = warnings(tmp_path / "ws", metrics)
    assert said[0].startswith("Generator-fit check failed: the generator") and len(said) == 3
    assert warnings(tmp_path / "ws", {"synthetic_vs_train": {"recall": 0.45, "coverage": 0.9},
                                      "test_vs_train": {"recall": 0.95, "coverage": 0.64}})[1:] == []


def test_fit_check_fail_stops_before_invert_and_off_skips_it(tmp_path):
    _colour_folder(tmp_path / "colours")
    params = _params(f"folder:{tmp_path / 'colours'}", fit_check="fail")
    run_local("ingest", params, tmp_path / "ws")
    with pytest.raises(GeneratorMisfit, match="cannot represent this dataset.*encode.fit_check: fail"):
        run_local("encode", params, tmp_path / "ws")
    off = _params(f"folder:{tmp_path / 'colours'}", fit_check="off")
    manifest = run_local("encode", off, tmp_path / "ws")
    assert "fit" not in manifest and not (tmp_path / "ws" / "data" / "encode" / "fit.json").exists()


def test_holdout_and_subset_seed_select_disjoint_reproducible_task_images(tmp_path):
    from thinair.rawdata import holdout_split
    from thinair.tasks.ingest import ingest

    full = parse_params({"base": {"dataset": "digits"}})
    half = parse_params({"base": {"dataset": "digits"}, "ingest": {"holdout_fraction": 0.5, "per_class_limit": 5,
                                                                   "subset_seed": 3}})
    m = ingest(half, tmp_path / "a")
    assert m["holdout"]["pool_images"] > 700 and m["splits"]["train"]["per_class"] == [5] * 10
    task_imgs = io.load_npz(tmp_path / "a" / "data" / "ingest" / "train-00000.npz")["images"]
    ingest(full, tmp_path / "b")
    all_imgs = io.load_npz(tmp_path / "b" / "data" / "ingest" / "train-00000.npz")
    _, pool = holdout_split(all_imgs["labels"], 0.5, 0)
    pool_bytes = {x.tobytes() for x in all_imgs["images"][pool]}
    assert not any(x.tobytes() in pool_bytes for x in task_imgs)  # the task never sees the pool
    again = ingest(half, tmp_path / "c")
    assert again == m and (io.load_npz(tmp_path / "c" / "data" / "ingest" / "train-00000.npz")["images"]
                           == task_imgs).all()
    other = ingest(half.model_copy(update={"ingest": half.ingest.model_copy(update={"subset_seed": 4})}),
                   tmp_path / "d")
    assert other["splits"]["train"]["per_class"] == [5] * 10
    assert not (io.load_npz(tmp_path / "d" / "data" / "ingest" / "train-00000.npz")["images"] == task_imgs).all()


@pytest.mark.slow  # added at the end of a session and not yet run to completion on a quiet machine
def test_a_classifier_at_chance_gives_no_verdict(tmp_path, caplog):
    """Two classes of the same noise: no classifier can beat chance, so the check cannot judge the generator and
    says so instead of passing or failing it."""
    rng = np.random.default_rng(1)
    for c in ("a", "b"):
        (tmp_path / "noise" / c).mkdir(parents=True)
        for i in range(100):  # 30 % of 100 per class tested: a chance classifier stays under the bar
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8), "RGB").save(
                tmp_path / "noise" / c / f"{i}.png")
    params = _params(f"folder:{tmp_path / 'noise'}", fit_check="fail")
    run_local("ingest", params, tmp_path / "ws")
    with caplog.at_level(logging.WARNING, logger="thinair"):
        manifest = run_local("encode", params, tmp_path / "ws")  # fail mode, yet no stop: no verdict
    fit = io.read_json(tmp_path / "ws" / "data" / "encode" / "fit.json")
    assert fit["conclusive"] is False and fit["ok"] and manifest["fit"]["ok"], fit
    assert fit["message"].startswith("inconclusive: the domain classifier labels only") and "inconclusive" in caplog.text
