"""The `search` stage: trials scored on a validation split of TRAIN (the test split is never read), resumable,
best trial written as `dvc exp run -S` overrides (preset search-best)."""
from __future__ import annotations

import numpy as np
import pytest

from thinair import io
from thinair.config import ParamsError, parse_params
from tests.conftest import tiny_params
from tests.stages import run_all

SPACE = {"sample.guidance_scales": ["float", 1.0, 4.0], "sample.steps": ["int", 1, 3],
         "sample.checkpoints": ["categorical", [2, "final"]], "sample.noise": ["float", 0.0, 0.3]}


def _raw(gen, **search):
    raw = tiny_params(gen, search={"space": SPACE, "fixed": {"sample.samples_per_setting": 2}} | search)
    raw["cas"] |= {"epochs": 1}
    return raw


def test_trial_params_and_overrides_wrap_list_params(tiny_generator):
    from thinair.tasks.search import overrides, trial_params

    p = parse_params(_raw(tiny_generator))
    values = {"sample.guidance_scales": 2.5, "sample.steps": 3, "sample.checkpoints": "final"}
    tp = trial_params(p, values)
    assert tp.sample.guidance_scales == [2.5] and tp.sample.steps == 3 and tp.sample.checkpoints == ["final"]
    assert tp.sample.samples_per_setting == 2  # search.fixed
    assert overrides(p, values) == ["sample.guidance_scales=[2.5]", "sample.steps=3", "sample.checkpoints=[final]"]


def test_baseline_is_the_current_settings_when_inside_the_space(tiny_generator):
    from thinair.tasks.search import baseline

    raw = _raw(tiny_generator)
    raw["sample"] |= {"checkpoints": ["final"], "guidance_scales": [2.0], "steps": 2, "noise": 0.1}
    assert baseline(parse_params(raw)) == {"sample.guidance_scales": 2.0, "sample.steps": 2,
                                           "sample.checkpoints": "final", "sample.noise": 0.1}
    raw["sample"]["steps"] = 9  # outside [1, 3]
    assert baseline(parse_params(raw)) is None
    raw["sample"] |= {"steps": 2, "guidance_scales": [2.0, 3.0]}  # two values: not one trial
    assert baseline(parse_params(raw)) is None


def test_study_key_ignores_searched_keys_and_trial_count_only(tiny_generator, tmp_path):
    from thinair.tasks.search import study_key

    run_all(parse_params(_raw(tiny_generator)), tmp_path, ("ingest", "encode", "invert", "classenc"))
    k = study_key(parse_params(_raw(tiny_generator, trials=2)), tmp_path)
    same = _raw(tiny_generator, trials=5)
    same["sample"] |= {"steps": 7, "guidance_scales": [3.0]}  # searched keys: the best trial's values applied
    assert study_key(parse_params(same), tmp_path) == k
    other = _raw(tiny_generator, trials=2)
    other["sample"]["uncond"] = "class"  # not searched: a different study
    assert study_key(parse_params(other), tmp_path) != k


def test_search_space_and_fixed_are_validated():
    with pytest.raises(ParamsError, match="Did you mean 'sample.guidance_scales'"):
        parse_params({"search": {"space": {"sample.guidance": ["float", 1, 2]}}})
    with pytest.raises(ParamsError, match="low 3 must be <= high 2"):
        parse_params({"search": {"space": {"sample.steps": ["int", 3, 2]}}})
    with pytest.raises(ParamsError, match="search.fixed: 'invert.steps' is not a parameter it can set"):
        parse_params({"search": {"fixed": {"invert.steps": 3}}})


def test_search_stage_end_to_end_never_reads_test_and_resumes(tiny_generator, tmp_path, monkeypatch):
    import yaml

    import thinair.upstream
    from thinair import presets
    from thinair.config import load_params
    from thinair.tasks import search as stage

    start = _raw(tiny_generator, trials=3)
    start["sample"] |= {"checkpoints": ["final"], "guidance_scales": [2.0], "noise": 0.1}  # inside the space
    params = parse_params(start)
    run_all(params, tmp_path, ("ingest", "encode", "invert", "classenc"))
    test_shards = {s for s in io.read_json(tmp_path / "data/ingest/manifest.json")["splits"]["test"]["shards"]}
    splits, loaded, calls = [], [], []
    real_read, real_load, real_score = thinair.upstream.read_split, io.load_npz, stage.score
    monkeypatch.setattr(stage, "read_split", lambda split, root=".": splits.append(split) or real_read(split, root))
    monkeypatch.setattr(io, "load_npz", lambda path: loaded.append(str(path)) or real_load(path))

    def spy_score(tp, split, train, ws, device=None):
        assert not np.intersect1d(split.train_ids, split.val_ids).size and len(split.val_ids) > 0
        calls.append(tp.sample.model_dump())
        return real_score(tp, split, train, ws, device)

    monkeypatch.setattr(stage, "score", spy_score)
    m = stage.search(params, tmp_path)
    assert splits == ["train"] and not [f for f in loaded if any(f.endswith(s) for s in test_shards)]
    assert m["ran"] and m["trials"] == 3 and len(calls) == 3
    # the first trial ran the current settings: the study's baseline
    assert {k: calls[0][k] for k in ("guidance_scales", "steps", "checkpoints", "noise")} == \
        {"guidance_scales": [2.0], "steps": 2, "checkpoints": ["final"], "noise": 0.1}
    first = float((tmp_path / "data/search/trials.csv").read_text().splitlines()[1].split(",")[2])
    assert m["baseline_validation_cas"] == pytest.approx(first)
    assert m["train_part"] + m["validation_part"] == 40  # 4 digits x 10 classes
    trials = (tmp_path / "data/search/trials.csv").read_text().splitlines()
    assert len(trials) == 4 and trials[0].startswith("trial,state,validation_cas")
    best = io.read_json(tmp_path / "data/search/best.json")
    assert 0.0 <= best["validation_cas"] <= 1.0 and best["command"].startswith("dvc exp run -n search-best -S ")
    # the best trial's overrides validate and are what the preset hands to `dvc exp run`
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_raw(tiny_generator, trials=3)))
    sets = presets.set_args("search-best", tmp_path)
    applied = load_params(tmp_path / "params.yaml", sets[1::2])
    assert applied.sample.steps == best["params"]["sample.steps"]
    # more trials extend the same study: only the new one runs; the same count again runs none
    calls.clear()
    assert stage.search(parse_params(_raw(tiny_generator, trials=4)), tmp_path)["trials"] == 4 and len(calls) == 1
    calls.clear()
    again = stage.search(parse_params(_raw(tiny_generator, trials=4)), tmp_path)
    assert again["trials"] == 4 and not calls
    assert again["baseline_validation_cas"] == pytest.approx(first)  # still the settings the study began from


def test_search_off_writes_only_its_manifest(tiny_generator, tmp_path):
    from thinair.tasks.search import search

    (tmp_path / "data/search").mkdir(parents=True)
    (tmp_path / "data/search/best.json").write_text("{}")  # from an earlier search
    m = search(parse_params(_raw(tiny_generator)), tmp_path)
    assert m["ran"] is False and sorted(p.name for p in (tmp_path / "data/search").iterdir()) == ["manifest.json"]


def test_search_refuses_a_checkpoint_invert_never_saved_before_any_trial(tiny_generator, tmp_path):
    from thinair.tasks.search import search

    raw = _raw(tiny_generator, trials=2, space={"sample.checkpoints": ["categorical", [3, "final"]]})
    params = parse_params(raw)
    run_all(params, tmp_path, ("ingest", "encode", "invert", "classenc"))
    with pytest.raises(ParamsError, match="sample.checkpoints: step 3 is not saved by invert"):
        search(params, tmp_path)
    assert not list((tmp_path / ".thinair/work").glob("search/*.journal"))


def test_preset_search_best_without_a_search_says_how(tmp_path):
    from thinair import presets

    with pytest.raises(ValueError, match="run the search first"):
        presets.set_args("search-best", tmp_path)
