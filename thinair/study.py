"""Guided hyper-parameter search (seed 002, done right): Optuna TPE scored on a validation split of the TRAIN set.

The reference scored each trial on the test split; here :func:`validation_split` carves a stratified validation
set out of the real *train* split only, and :func:`run_study` hands every objective call that :class:`ValidationSplit`
(read-only id arrays) and can refuse a split that touches the test ids, so what an objective sees is checkable.
Trials are stored in an Optuna journal file (``storage_path``, JournalStorage + JournalFileBackend) and a
re-opened study runs only the trials still missing. Each proposal's TPE sampler is seeded from (seed, number of
finished trials), and a trial left RUNNING by a killed run is re-queued (then marked FAIL) when the study is
re-opened, so a resumed study runs the same parameters as an uninterrupted one. A study file has one writer at a
time. Reads and writes only ``storage_path``.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from thinair.io import seed_for


@dataclass(frozen=True)
class ValidationSplit:
    train_ids: np.ndarray  # (N_train,) int64, sorted, read-only
    val_ids: np.ndarray  # (N_val,) int64, sorted, read-only


def _frozen_ids(ids) -> np.ndarray:
    out = np.array(sorted(int(i) for i in ids), dtype=np.int64)
    out.setflags(write=False)
    return out


def validation_split(labels, fraction: float, seed: int, ids=None) -> ValidationSplit:
    """Stratified, deterministic carve-out of a validation set from the real TRAIN split.

    Args:
        labels: (N,) labels of the train split only.
        fraction: share of each class that goes to validation, in (0, 1); every class with >= 2 images gives at
            least one and keeps at least one.
        ids: (N,) the images' ids (e.g. dataset indices); default their positions 0..N-1.
    """
    labels = np.asarray(labels)
    ids = np.arange(len(labels)) if ids is None else np.asarray(ids)
    if labels.ndim != 1 or ids.shape != labels.shape:
        raise ValueError(f"validation_split: labels {labels.shape} and ids {ids.shape} must be equal-length 1-D")
    if len(np.unique(ids)) != len(ids):
        raise ValueError("validation_split: ids must be distinct")
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation_split: fraction={fraction} must be in (0, 1)")
    val = []
    for c in np.unique(labels):
        members = ids[labels == c]
        if len(members) < 2:
            continue  # a singleton class stays in train
        n_val = min(max(1, int(round(fraction * len(members)))), len(members) - 1)
        rng = np.random.default_rng(seed_for(seed, "validation", c.item()))
        val.extend(rng.permutation(np.sort(members))[:n_val].tolist())
    return ValidationSplit(_frozen_ids(set(ids.tolist()) - set(val)), _frozen_ids(val))


def check_space(space: dict) -> dict[str, str]:
    """Validate ``{"name": ("float", lo, hi[, "log"]) | ("int", lo, hi[, "log"]) | ("categorical", [choices])}``
    (lists from YAML work as tuples) without importing Optuna; return {name: kind}."""
    kinds = {}
    for name, spec in space.items():
        kind = spec[0] if isinstance(spec, (list, tuple)) and spec else None
        if kind in ("float", "int") and len(spec) in (3, 4) and (len(spec) == 3 or spec[3] == "log"):
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec[1:3]):
                raise ValueError(f"search space {name!r}: bounds must be numbers, got {list(spec)}")
            if kind == "int" and not all(isinstance(v, int) for v in spec[1:3]):
                raise ValueError(f"search space {name!r}: int bounds must be integers, got {list(spec)}")
            if not spec[1] <= spec[2]:
                raise ValueError(f"search space {name!r}: low {spec[1]} must be <= high {spec[2]}")
            if len(spec) == 4 and spec[1] <= 0:
                raise ValueError(f"search space {name!r}: a log scale needs low > 0, got {spec[1]}")
        elif not (kind == "categorical" and len(spec) == 2 and isinstance(spec[1], (list, tuple)) and spec[1]):
            raise ValueError(f"search space {name!r}: {spec!r} is not one of ('float', low, high[, 'log']), "
                             "('int', low, high[, 'log']) or ('categorical', [choices, ...])")
        kinds[name] = kind
    return kinds


def distributions(space: dict) -> dict:
    """Optuna distributions of a space checked by :func:`check_space`."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for name, kind in check_space(space).items():
        spec = space[name]
        if kind == "categorical":
            out[name] = CategoricalDistribution(list(spec[1]))
        else:
            cls = FloatDistribution if kind == "float" else IntDistribution
            out[name] = cls(spec[1], spec[2], log=len(spec) == 4)
    return out


def _check_disjoint(split: ValidationSplit, test_ids) -> None:
    if test_ids is None:
        return
    leak = np.intersect1d(np.concatenate([split.train_ids, split.val_ids]), np.asarray(test_ids))
    if len(leak):
        raise ValueError(f"run_study: {len(leak)} id(s) of the split are test ids (e.g. {leak[:5].tolist()}); "
                         "carve the validation set out of the train split only")


def run_study(objective: Callable[[dict, ValidationSplit], float], space: dict, n_trials: int, storage_path: str | Path,
              study_name: str, seed: int, split: ValidationSplit, *, direction: str = "maximize", test_ids=None,
              first: dict | None = None):
    """Run (or resume) a seeded TPE study until it holds `n_trials` finished (complete or pruned) trials.

    Args:
        objective: ``objective(params, split) -> score``; it gets the trial's parameters and the split, and must
            train on ``split.train_ids`` and score on ``split.val_ids`` only. It may raise ``optuna.TrialPruned``;
            any other exception marks the trial FAIL and propagates (a re-run replaces the trial).
        space: see :func:`distributions`.
        test_ids: if given, a split that shares any id with them is refused before any trial runs.
        first: parameters (inside `space`) the first trial of a new study runs, e.g. the current settings; kept
            as the study's user attribute ``first_trial``.
    Returns:
        the ``optuna.Study``.
    """
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.trial import TrialState

    dists = distributions(space)
    _check_disjoint(split, test_ids)
    Path(storage_path).parent.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(storage_path)))
    study = optuna.create_study(storage=storage, study_name=study_name, direction=direction, load_if_exists=True,
                                sampler=optuna.samplers.TPESampler(seed=seed_for(seed, "tpe") % 2**32))
    if first is not None and not study.trials:
        study.set_user_attr("first_trial", dict(first))  # e.g. the current settings: the study's baseline
        study.enqueue_trial(dict(first))
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # left by a killed run (one writer per study file): queue its parameters to run next, then fail it (in
        # this order, so a kill in between cannot lose them)
        if not waiting:
            study.enqueue_trial(dict(t.params))
            waiting = [t]
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    done = len(study.get_trials(deepcopy=False, states=finished))
    for _ in range(max(0, n_trials - done)):
        # seeded by the number of finished trials, so a resumed study proposes what an uninterrupted one would
        n = len(study.get_trials(deepcopy=False, states=finished))
        study.sampler = optuna.samplers.TPESampler(seed=seed_for(seed, "tpe", n) % 2**32)
        trial = study.ask(dists)
        try:
            value = objective(dict(trial.params), split)
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
            continue
        except BaseException:
            study.tell(trial, state=TrialState.FAIL)
            raise
        study.tell(trial, float(value))
    return study
