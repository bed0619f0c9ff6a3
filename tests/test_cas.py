"""`cas` stage: repeated seeds, scaling studies, caching, resume after a kill, bad input."""
from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from tests.stages import run_all, run_stage
from thinair import io
from thinair.config import ParamsError, parse_params
from thinair.errors import StageInputMissing
from thinair import training
from thinair.upstream import Synthetic
from thinair.tasks import cas as cas_stage
from tests.conftest import tiny_params


def test_first_variants_takes_each_embeddings_first_n():
    source = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2])  # variant-major, as sample writes them
    syn = Synthetic(np.zeros((9, 2, 2, 1), np.uint8), source % 2, source, -np.ones(9, np.int64))
    assert cas_stage.first_variants(syn, 1).tolist() == [0, 1, 2]
    assert cas_stage.first_variants(syn, 2).tolist() == [0, 1, 2, 3, 4, 5]
    assert cas_stage.first_variants(syn, 9).tolist() == list(range(9))


def _paper_scale_synthetic(tiny_generator, embeddings: int = 4):
    """A synthetic set laid out exactly as sample writes it: 3 checkpoints x 3 guidance x 5 samples per embedding."""
    from thinair.tasks.sample import plan_variants

    p = parse_params(tiny_params(tiny_generator, invert={"steps": 3, "checkpoint_every": 1},
                                 sample={"checkpoints": [1, 2, 3], "guidance_scales": [2.0, 3.0, 4.0],
                                         "samples_per_setting": 5}))
    labels = np.arange(embeddings) % 2
    plan = plan_variants(labels, np.arange(embeddings), p.sample, seed=0, chunk=0)
    rows = np.array([r["row"] for r in plan])
    syn = Synthetic(np.zeros((len(plan), 2, 2, 1), np.uint8), labels[rows], rows, np.full(len(plan), -1),
                    np.array([r["ckpt"] for r in plan]), np.array([r["w"] for r in plan], np.float32))
    return p, syn


def test_first_variants_span_every_checkpoint_and_guidance(tiny_generator):
    """The paper's 45 variants (3 checkpoints x 3 guidance x 5): the first n of every embedding are spread over the
    settings, not the first checkpoint's first guidance scale; 9 = one of each setting; 45 = all."""
    _, syn = _paper_scale_synthetic(tiny_generator)
    for n in (1, 3, 5, 9, 18, 27, 45):
        rows = cas_stage.first_variants(syn, n)
        for e in range(4):
            mine = rows[syn.source[rows] == e]
            settings = list(zip(syn.checkpoint[mine].tolist(), syn.guidance[mine].tolist()))
            assert len(mine) == n
            if n >= 3:
                assert set(syn.checkpoint[mine]) == {1, 2, 3} and set(syn.guidance[mine]) == {2.0, 3.0, 4.0}
            counts = np.unique(settings, axis=0, return_counts=True)[1]
            assert counts.max() - (counts.min() if len(counts) == 9 else 0) <= 1  # spread evenly over settings
    assert len(cas_stage.first_variants(syn, 45)) == len(syn.source) == 4 * 45


def test_scaling_study_reaches_all_45_variants(tiny_generator):
    p, syn = _paper_scale_synthetic(tiny_generator)
    p = p.model_copy(update={"cas": p.cas.model_copy(update={"scale_synthetic": [1, 9, 45, 90], "scale_real": []})})
    real = cas_stage.LabelledImages(np.zeros((4, 2, 2, 1), np.uint8), np.arange(4) % 2, ["a", "b"])
    runs = cas_stage.scaling_runs(p, real, syn)
    assert [(r["x"], r["images"]) for r in runs] == [(1, 4), (9, 36), (45, 180)]  # 90 is capped at the 45 sampled
    first = runs[0]["rows"]  # one variant each, and the first sample of a setting (diagonal order starts at 1K, w=2)
    assert set(syn.checkpoint[first]) == {1} and set(syn.guidance[first]) == {2.0}


def test_real_fractions_train_every_ratio_and_report_the_best(tiny_generator, sampled):
    """The paper's protocol: real+synthetic once per real share (named by its ratio), the best flagged as chosen on
    test; each ratio's batches really mix at its share."""
    params = parse_params(tiny_params(tiny_generator, cas={
        "seeds": 1, "modes": ["real", "real+synthetic"], "real_fractions": [0.125, 0.75], "scale_synthetic": [],
        "scale_real": [], "reconstructed_test": True}))
    assert cas_stage.trained_modes(params) == ["real", "real+synthetic@1:7", "real+synthetic@3:1"]
    real = cas_stage.LabelledImages(np.zeros((2, 2, 2, 1), np.uint8), np.arange(2), ["a", "b"])
    shares = {m: [s for _, _, s in cas_stage.mode_sources(params, m, real, real)] for m in ("real+synthetic@1:7",
                                                                                          "real+synthetic@3:1")}
    assert shares == {"real+synthetic@1:7": [0.125, 0.875], "real+synthetic@3:1": [0.75, 0.25]}
    run_stage("cas", params, sampled)
    metric = io.read_json(sampled / "data" / "cas" / "cas.json")
    acc = metric["accuracy"]
    assert set(acc) == {"real", "real+synthetic@1:7", "real+synthetic@3:1", "real+synthetic"}
    best = max(["real+synthetic@1:7", "real+synthetic@3:1"], key=lambda m: acc[m]["mean"])
    assert acc["real+synthetic"] == acc[best] | {"mode": best, "real_fraction": {"real+synthetic@1:7": 0.125,
                                                 "real+synthetic@3:1": 0.75}[best], "chosen_on": "test"}
    assert metric["real+synthetic_best"]["ratios"] == {"real+synthetic@1:7": 0.125, "real+synthetic@3:1": 0.75}
    assert set(metric["reconstructed_accuracy"]) == set(acc)
    names = [r["mode"] for r in cas_stage.tables(sampled)["cas"][1]]
    assert f"real+synthetic (best: {best}, chosen on test)" in names


def test_real_fractions_null_trains_the_modes_as_before(tiny_generator):
    params = parse_params(tiny_params(tiny_generator, cas={"scale_synthetic": [], "scale_real": []}))
    assert params.cas.real_fractions is None and cas_stage.trained_modes(params) == list(params.cas.modes)
    names = [u["name"] for u in cas_stage.units(params)]
    assert names == [f"{m}-seed{s}" for m in params.cas.modes for s in cas_stage.run_seeds(params, m)]
    with pytest.raises(ParamsError, match="real_fractions is used only by mode real\\+synthetic"):
        parse_params(tiny_params(tiny_generator, cas={"modes": ["real"], "real_fractions": [0.5]}))
    with pytest.raises(ParamsError, match="repeats a ratio"):
        parse_params(tiny_params(tiny_generator, cas={"real_fractions": [0.5, 0.5]}))


def test_real_subset_is_stratified_and_seeded():
    labels = np.repeat(np.arange(4), 25)
    a = cas_stage.real_subset(labels, 0.2, seed=1)
    assert len(a) == 20 and np.bincount(labels[a]).tolist() == [5, 5, 5, 5]
    assert (a == cas_stage.real_subset(labels, 0.2, seed=1)).all()
    assert not (a == cas_stage.real_subset(labels, 0.2, seed=2)).all()
    assert len(cas_stage.real_subset(labels, 0.001, seed=0)) == 4  # at least one per class


def test_seeds_scaling_and_cache(tiny_generator, sampled, caplog):
    tmp_path = sampled  # ingest ... sample done
    params = parse_params(tiny_params(tiny_generator, cas={"seeds": 2, "scale_synthetic": [1, 2],
                                                           "scale_real": [0.5, 1.0], "reconstructed_test": True}))
    with caplog.at_level(logging.INFO, logger="thinair"):
        out = run_stage("cas", params, tmp_path)
    acc = out["accuracy"]
    assert set(acc) == {"real", "synthetic", "real+synthetic"}
    for a in acc.values():
        assert a["n"] == 2 and 0 <= a["mean"] <= 1 and a["std"] >= 0
    details = io.read_json(tmp_path / "data" / "cas" / "details.json")["runs"]
    # 6 mode runs + 6 scaling points, of which the full-size ones (synthetic x2, and real 1.0: its synthetic-only and
    # real-only runs) are the seed-0 mode runs: 9 trainings, 3 cache hits
    assert len(details) == 12 and caplog.text.count(": epoch 1/1 ") == 9
    caplog.clear()
    seeds = {r["seed"] for r in details if r["kind"] == "mode" and r["mode"] == "real"}
    assert len(seeds) == 2  # two different seeds per mode
    syn = pd.read_csv(tmp_path / "data" / "cas" / "scaling_synthetic.csv")
    assert syn.variants_per_embedding.tolist() == [1, 2] and syn.images.tolist() == [40, 80]
    real = pd.read_csv(tmp_path / "data" / "cas" / "scaling_real.csv")
    assert real.real_images.tolist() == [20, 40] and {"real_only", "synthetic_only"} <= set(real.columns)
    assert (tmp_path / "data" / "cas" / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    # every scaling point at full size is the same training as the seed-0 synthetic/real run: cached, not redone
    with caplog.at_level(logging.INFO, logger="thinair"):
        again = run_stage("cas", params, tmp_path)
    assert again == out
    reused = [line for line in caplog.text.splitlines() if "reused from cache" in line and "reconstructed" not in line]
    assert ": epoch " not in caplog.text and len(reused) == len(details)


def test_killed_training_resumes_to_the_same_result(tiny_generator, sampled, monkeypatch, caplog):
    tmp_path = sampled  # ingest ... sample done
    params = parse_params(tiny_params(tiny_generator, cas={"seeds": 1, "epochs": 3, "modes": ["real"],
                                                           "scale_synthetic": [], "scale_real": []}))
    clean = run_stage("cas", params, tmp_path)
    for d in (tmp_path / ".thinair" / "cache" / "cas").iterdir():
        import shutil

        shutil.rmtree(d)

    original = training.log.info

    def die_at_epoch_2(msg, *args):
        if "epoch %d/%d" in msg and args[2] == 2:
            raise KeyboardInterrupt("simulated kill")
        original(msg, *args)

    monkeypatch.setattr(training.log, "info", die_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        run_stage("cas", params, tmp_path)
    assert list((tmp_path / ".thinair" / "work" / "cas").glob("*.pt"))  # epoch 1's checkpoint
    monkeypatch.setattr(training.log, "info", original)
    with caplog.at_level(logging.INFO, logger="thinair"):
        resumed = run_stage("cas", params, tmp_path)
    assert "resuming after epoch 1" in caplog.text
    assert resumed == clean
    assert not list((tmp_path / ".thinair" / "work" / "cas").glob("*.pt"))


def test_bad_scaling_params_and_missing_sample(tiny_generator, tmp_path):
    with pytest.raises(ParamsError, match="cas.scale_real"):
        parse_params(tiny_params(tiny_generator, cas={"scale_real": [0.0]}))
    with pytest.raises(ParamsError, match="cas.augment"):
        parse_params(tiny_params(tiny_generator, cas={"augment": ["rotate"]}))
    params = parse_params(tiny_params(tiny_generator))
    run_all(params, tmp_path, ("ingest",))
    with pytest.raises(StageInputMissing, match="sample"):
        run_stage("cas", params, tmp_path)
