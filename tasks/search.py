"""`search`: guided hyper-parameter search over the sampler (seed 002, done right), scored on a validation split.

Each Optuna TPE trial (thinair/study.py) draws values for the ``search.space`` keys (sampler checkpoint, steps,
guidance, and for Diffusion Inversion the noise and interpolation strengths), applies them and ``search.fixed``
on top of the params, runs the real `sample` stage code in a scratch workspace, and scores the result by CAS:
a classifier (the `cas` training params, ``search.seeds`` seeds) trained on the synthetic images whose source
*and* interpolation partner are in the trial's train part, tested on the held-out validation part of the real
TRAIN split (``search.validation_fraction``, stratified, seeded). The test split is never read. The first trial
of a study runs the current settings (when they lie inside the space), so the study has them as its baseline.
With ``search.trials: 0`` (the default) the stage writes only a manifest saying so.

Caveat: with ``sample.method: class_encoder`` the encoder (the `classenc` stage) was trained on the whole train
split, validation part included, so those trials' scores are optimistic; their ranking is what the search uses.

Reads ``data/ingest`` (train split), ``data/encode`` (img2img), ``data/invert``, ``data/classenc`` and the
generator. Writes ``data/search/trials.csv`` (every finished trial: number, state, validation CAS, parameters),
``data/search/best.json`` (the best trial's parameters as ``-S`` overrides and the `dvc exp run` command that
applies them; ``thinair preset search-best --run`` runs it) and ``manifest.json`` (last). The study (Optuna
journal) and the trials' scratch workspace live in ``.thinair/work/search``: a killed search resumes, re-running
only the unfinished trial, whose sampled chunks and finished trainings are content-cached there.
"""
from __future__ import annotations

import logging
import shlex
import shutil
from pathlib import Path

import numpy as np

from thinair import io, paths, skips
from thinair import study as core
from thinair.config import Params, parse_params
from thinair.generator import generator_identity, runtime_key
from thinair.presets import yaml_value
from thinair.steering import method_inputs
from thinair.training import cached_training
from thinair.units import code_key, content_key, run_local, stage_code
from thinair.upstream import LabelledImages, inputs_digest, link_stages, read_split, read_synthetic

STAGE = "search"
RUNS = ("sample",)  # it runs the sample stage's code (by name, through thinair/units.py): part of its key
RETRIES = (1, 10)
LINKED = ("ingest", "encode", "invert", "classenc")
log = logging.getLogger(__name__)


def trial_params(params: Params, values: dict) -> Params:
    """`params` with search.fixed and the trial's values applied (a list param gets the one value drawn)."""
    raw = params.model_dump(mode="json")
    for key, value in list(params.search.fixed.items()) + list(values.items()):
        section, name = key.split(".", 1)
        raw[section][name] = [value] if isinstance(raw[section][name], list) and not isinstance(value, list) else value
    return parse_params(raw, "search trial")


def overrides(params: Params, values: dict) -> list[str]:
    """The trial's values as `section.key=value` overrides (YAML flow values), as `dvc exp run -S` takes them."""
    tp = trial_params(params, values)
    return [f"{key}={yaml_value(getattr(getattr(tp, key.split('.')[0]), key.split('.', 1)[1]))}" for key in values]


def baseline(params: Params) -> dict | None:
    """The current settings as a trial of the space (a new study's first trial), or None if one lies outside."""
    values = {}
    for key, spec in params.search.space.items():
        section, name = key.split(".", 1)
        v = getattr(getattr(params, section), name)
        if isinstance(v, list):
            if len(v) != 1:
                return None
            v = v[0]
        if spec[0] == "categorical":
            inside = v in spec[1]
        else:
            inside = isinstance(v, (int, float)) and spec[1] <= v <= spec[2] and (spec[0] == "float" or
                                                                                   isinstance(v, int))
        if not inside:
            return None
        values[key] = v
    return values


def score(params: Params, split: core.ValidationSplit, train: LabelledImages, ws: Path,
          device=None) -> tuple[float, int]:
    """Sample with `params` in `ws`; CAS of the synthetic images from split.train_ids on split.val_ids (the mean
    over search.seeds trainings). Returns (score, synthetic images trained on)."""
    run_local("sample", params, ws, device)
    syn = read_synthetic(ws)
    keep = np.isin(syn.source, split.train_ids) & ((syn.partner < 0) | np.isin(syn.partner, split.train_ids))
    if not keep.any():
        raise ValueError("search: no synthetic image of this trial comes from the train part of the split (its "
                         "source or partner is a validation image, or the CLIP filter dropped it); lower "
                         "search.validation_fraction or sample.clip_min_score")
    val = LabelledImages(train.images[split.val_ids], train.labels[split.val_ids], train.class_names)
    accs = []
    for i in range(params.search.seeds):
        res = cached_training(params, "cas", "search", io.seed_for(params.base.seed, STAGE, "cas", i),
                              [(syn.images[keep], syn.labels[keep], 1.0)], {"val": val},
                              len(train.class_names), ws)
        accs.append(res["val"]["accuracy"])
    shutil.rmtree(paths.cache_dir("sample", ws), ignore_errors=True)  # scored: its images are not needed again
    return float(np.mean(accs)), int(keep.sum())


def study_key(params: Params, root: str | Path = ".") -> str:
    """What the study's trials depend on: the code, the params with search.fixed applied minus the searched keys
    and search.trials, the generator, the inputs. So more trials extend the same study, and applying its best
    values reuses it."""
    raw = trial_params(params, {}).model_dump(mode="json")
    for key in params.search.space:
        section, name = key.split(".", 1)
        raw[section].pop(name, None)
    raw["search"].pop("trials")
    for section in ("metrics", "report", "pretrain", "ingest"):
        raw.pop(section)
    return content_key(STAGE, code_key(*stage_code(STAGE)), raw, generator_identity(params.base),
                       runtime_key(params.base), inputs_digest(root, "ingest", "invert", "classenc"),
                       method_inputs(params, root))


def search(params: Params, root: str | Path = ".", device=None) -> dict:
    """Run (or resume) the study; write trials.csv, best.json and the manifest. Returns the manifest."""
    import pandas as pd
    from optuna.trial import TrialState

    s, out = params.search, paths.stage_dir(STAGE, root)
    out.mkdir(parents=True, exist_ok=True)
    if (manifest := skips.write_if_skipped(STAGE, params, root)) is not None:
        return manifest  # search.trials is 0
    train = read_split("train", root)  # the TRAIN split only: trials are scored on a part of it
    split = core.validation_split(train.labels, s.validation_fraction, params.base.seed)
    key = study_key(params, root)
    for key_name, spec in s.space.items():  # a bad choice (a checkpoint invert never saved) fails before any trial
        for v in spec[1] if spec[0] == "categorical" else ():
            trial_params(params, {key_name: v})
    ws = link_stages(paths.work_dir(STAGE, root) / "workspace", root, LINKED)

    def objective(values: dict, sp: core.ValidationSplit) -> float:
        acc, n = score(trial_params(params, values), sp, train, ws, device)
        log.info("search trial %s: validation CAS %.4f on %d synthetic images", values, acc, n)
        return acc

    study = core.run_study(objective, s.space, s.trials, paths.work_dir(STAGE, root) / f"{key}.journal",
                           f"search-{key}", params.base.seed, split, first=baseline(params))
    # the finished trials, numbered in order: attempts a killed run left FAILed (and re-ran) are not results
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    table = pd.DataFrame([{"trial": i, "state": t.state.name, "validation_cas": t.value}
                          | {k: t.params.get(k) for k in s.space} for i, t in enumerate(finished)])
    with io.atomic_path(out / "trials.csv") as tmp:
        table.to_csv(tmp, index=False)
    best = study.best_trial
    best_number = next(i for i, t in enumerate(finished) if t.number == best.number)
    sets = overrides(params, best.params)
    command = "dvc exp run -n search-best " + " ".join(f"-S {shlex.quote(o)}" for o in sets)
    io.write_json(out / "best.json", {"trial": best_number, "validation_cas": best.value, "params": best.params,
                                      "overrides": sets, "command": command})
    base = study.user_attrs.get("first_trial")  # the settings the study began from (even after they changed)
    base_trial = next((t for t in finished if base is not None and t.params == base and t.value is not None), None)
    manifest = {"ran": True, "study": key, "trials": sum(t.state == TrialState.COMPLETE for t in finished),
                "best_trial": best_number, "best_validation_cas": best.value,
                "baseline_validation_cas": None if base_trial is None else base_trial.value,
                "train_part": int(len(split.train_ids)), "validation_part": int(len(split.val_ids)),
                "files": ["trials.csv", "best.json"]}
    io.write_json(out / io.MANIFEST, manifest)
    log.info("search: best trial %d, validation CAS %.4f (current settings: %s): %s", best_number, best.value,
             manifest["baseline_validation_cas"], " ".join(sets))
    return manifest


def units(params: Params, root: str | Path = ".") -> list[dict]:
    """One unit: the study."""
    return [{"name": "study"}]


def key(params: Params, unit: dict, root: str | Path = ".") -> list:
    return [study_key(params, root) if params.search.trials else None, params.search.trials]


def compute(params: Params, unit: dict, out: Path, root: str | Path = ".", device=None) -> dict:
    return search(params, root, device)


def finish(params: Params, records: list[dict], root: str | Path = ".") -> dict:
    return records[0]["result"]


def tables(root: str | Path = ".") -> dict[str, tuple[str, list[dict]]]:
    """The trials table (best first) for a Prefect artifact; empty when the stage did not search."""
    import pandas as pd

    f = paths.stage_dir(STAGE, root) / "trials.csv"
    if not f.is_file():
        return {}
    rows = pd.read_csv(f).sort_values("validation_cas", ascending=False, na_position="last")
    return {"search-trials": ("Search trials: CAS on the validation split of train (best first)",
                              rows.astype(object).where(rows.notna(), None).to_dict("records"))}
