"""`search`: guided hyper-parameter search over the sampler (seed 002, done right), scored on a validation split.

Each Optuna TPE trial (thinair/search.py) draws values for the ``search.space`` keys (sampler checkpoint, steps,
guidance, and for Diffusion Inversion the noise and interpolation strengths), applies them and ``search.fixed``
on top of the params, runs the real `sample` stage code in a scratch workspace, and scores the result by CAS:
a classifier (the `cas` params, ``search.seeds`` seeds) trained on the synthetic images whose source *and*
interpolation partner are in the trial's train part, tested on the held-out validation part of the real TRAIN
split (``search.validation_fraction``, stratified, seeded). The test split is never read. With
``search.trials: 0`` (the default) the stage writes only a manifest saying so.

Reads ``data/ingest`` (train split), ``data/invert``, ``data/classenc`` and the generator. Writes
``data/search/trials.csv`` (every trial: number, state, score, parameters, images), ``data/search/best.json``
(the best trial's parameters as ``-S`` overrides and the `dvc exp run` command that applies them;
``thinair preset search-best --run`` runs it) and ``manifest.json`` (last). The study (Optuna journal) and the
trial workspace live in ``.thinair/work/search``: a killed search resumes, re-running only the unfinished trial,
whose sampled chunks and finished trainings are content-cached there.
"""
from __future__ import annotations

import logging
import shlex
from pathlib import Path

import numpy as np
from prefect import task

from thinair import classifier, io, paths
from thinair import search as core
from thinair.tasks import cas as cas_stage
from thinair.tasks import sample as sample_stage
from thinair.caching import record
from thinair.config import Params, parse_params
from thinair.devices import device_slot, set_threads
from thinair.generator import generator_identity, runtime_key
from thinair.orchestration import task_options
from thinair.stage import Split, content_key, files_under, inputs_digest, read_split, read_synthetic, source_hash

STAGE = "search"
LINKED = ("ingest", "encode", "invert", "classenc")
log = logging.getLogger(__name__)


def yaml_value(value) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def trial_params(params: Params, values: dict) -> Params:
    """`params` with search.fixed and the trial's values applied (a list param gets the one value drawn)."""
    raw = params.model_dump(mode="json")
    for key, value in list(params.search.fixed.items()) + list(values.items()):
        section, name = key.split(".", 1)
        if isinstance(raw[section][name], list) and not isinstance(value, list):
            value = [value]
        raw[section][name] = value
    return parse_params(raw, "search trial")


def overrides(params: Params, values: dict) -> list[str]:
    """The trial's values as `section.key=value` overrides (YAML flow values), as `dvc exp run -S` takes them."""
    out = []
    for key, value in values.items():
        section, name = key.split(".", 1)
        current = getattr(getattr(params, section), name)
        wrap = isinstance(current, list) and not isinstance(value, list)
        out.append(f"{key}={yaml_value([value] if wrap else value)}")
    return out


def workspace(root: str | Path) -> Path:
    """The trials' scratch workspace: links to the main workspace's upstream outputs, its own sample/cache."""
    ws = paths.work_dir(STAGE, root) / "workspace"
    (ws / "data").mkdir(parents=True, exist_ok=True)
    for stage in LINKED:
        src, dst = (Path(root) / "data" / stage).resolve(), ws / "data" / stage
        if src.is_dir() and not dst.is_symlink():
            dst.symlink_to(src, target_is_directory=True)
    return ws


def score(params: Params, split: core.Split, train: Split, ws: Path) -> tuple[float, int]:
    """Sample with `params` in `ws`; CAS of the synthetic images from split.train_ids on split.val_ids."""
    records = [sample_stage.sample_chunk(params, c, ws) for c in range(sample_stage.chunk_count(ws))]
    sample_stage.finalize(params, records, ws)
    syn = read_synthetic(ws)
    keep = np.isin(syn.source, split.train_ids) & ((syn.partner < 0) | np.isin(syn.partner, split.train_ids))
    if not keep.any():
        raise ValueError("search: no synthetic image comes from the trial's train part; lower "
                         "search.validation_fraction")
    val = Split(train.images[split.val_ids], train.labels[split.val_ids], train.class_names)
    accs = []
    for seed in cas_stage.run_seeds(params, "synthetic")[:params.search.seeds]:
        res = cas_stage.train_run(params, "search", seed, [(syn.images[keep], syn.labels[keep], 1.0)], {"val": val},
                        len(train.class_names), ws)
        accs.append(res["val"]["accuracy"])
    return float(np.mean(accs)), int(keep.sum())


def study_key(params: Params, root: str | Path = ".") -> str:
    """What the study's trials depend on: the code, the params minus the searched keys and search.trials, the
    generator, the inputs. So more trials extend the same study, and applying its best values reuses it."""
    raw = params.model_dump(mode="json")
    for key in params.search.space:
        section, name = key.split(".", 1)
        raw[section].pop(name, None)
    raw["search"].pop("trials")
    for section in ("metrics", "report", "pretrain", "ingest"):
        raw.pop(section)
    return content_key(STAGE, source_hash(__name__), source_hash(core.__name__), source_hash(sample_stage.__name__),
                       source_hash(cas_stage.__name__), source_hash(classifier.__name__), raw,
                       generator_identity(params.base), runtime_key(params.base),
                       inputs_digest(root, "ingest", "invert", "classenc"))


def search(params: Params, root: str | Path = ".") -> dict:
    """Run (or resume) the study; write trials.csv, best.json and the manifest. Returns the manifest."""
    import pandas as pd

    s, out = params.search, paths.stage_dir(STAGE, root)
    out.mkdir(parents=True, exist_ok=True)
    if s.trials == 0:
        manifest = {"ran": False, "why": "search.trials is 0; run `dvc exp run -S search.trials=20` to search"}
        for f in out.iterdir():
            if f.is_file() and f.name != io.MANIFEST:
                f.unlink()
        io.write_json(out / io.MANIFEST, manifest)
        return manifest
    train = read_split("train", root)  # the TRAIN split only: trials are scored on a part of it
    split = core.validation_split(train.labels, s.validation_fraction, params.base.seed)
    key = study_key(params, root)
    ws = workspace(root)
    for values in _categorical_checks(params):
        trial_params(params, values)  # a bad choice (e.g. a checkpoint invert never saved) fails before any trial

    def objective(values: dict, sp: core.Split) -> float:
        tp = trial_params(params, values)
        acc, n = score(tp, sp, train, ws)
        log.info("search trial %s: validation CAS %.4f on %d synthetic images", values, acc, n)
        images[tuple(sorted(values.items(), key=lambda kv: kv[0]))] = n
        return acc

    images: dict = {}
    study = core.run_study(objective, s.space, s.trials, paths.work_dir(STAGE, root) / f"{key}.journal",
                           f"search-{key}", params.base.seed, split)
    rows = []
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False):
        rows.append({"trial": t.number, "state": t.state.name, "validation_cas": t.value}
                    | {k: t.params.get(k) for k in s.space})
    table = pd.DataFrame(rows)
    with io.atomic_path(out / "trials.csv") as tmp:
        table.to_csv(tmp, index=False)
    best = study.best_trial
    sets = overrides(params, best.params)
    command = "dvc exp run -n search-best " + " ".join(f"-S {shlex.quote(o)}" for o in sets)
    io.write_json(out / "best.json", {"trial": best.number, "validation_cas": best.value, "params": best.params,
                                      "overrides": sets, "command": command})
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    manifest = {"ran": True, "study": key, "trials": len(done), "best_trial": best.number,
                "best_validation_cas": best.value, "train_part": int(len(split.train_ids)),
                "validation_part": int(len(split.val_ids)), "files": ["trials.csv", "best.json"]}
    io.write_json(out / io.MANIFEST, manifest)
    log.info("search: best trial %d, validation CAS %.4f: %s", best.number, best.value, " ".join(sets))
    return manifest


def _categorical_checks(params: Params) -> list[dict]:
    out = []
    for key, spec in params.search.space.items():
        if spec[0] == "categorical":
            out += [{key: v} for v in spec[1]]
    return out


def stage_key(params: Params, root: str | Path = ".") -> str:
    return content_key(STAGE, study_key(params, root) if params.search.trials else None, params.search.trials)


@task(name="search", **task_options(retries=1, delay=10, cache=("search", stage_key)))
def search_task(params: Params, root: str = ".") -> dict:
    set_threads(params.base)
    with device_slot(params.base, root, "search"):
        manifest = search(params, root)
    return record(root, files_under(paths.stage_dir(STAGE, root)), manifest=manifest)


def tables(root: str | Path = ".") -> dict[str, tuple[str, list[dict]]]:
    """The trials table (best first) for a Prefect artifact; empty when the stage did not search."""
    import pandas as pd

    f = paths.stage_dir(STAGE, root) / "trials.csv"
    if not f.is_file():
        return {}
    rows = pd.read_csv(f).sort_values("validation_cas", ascending=False, na_position="last")
    return {"search-trials": ("Search trials: CAS on the validation split of train (best first)",
                              rows.astype(object).where(rows.notna(), None).to_dict("records"))}
