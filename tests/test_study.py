"""Guided search: a stratified train-only validation split, resumable seeded TPE studies, no test-id leaks."""
from __future__ import annotations

import numpy as np
import optuna
import pytest

from thinair.study import ValidationSplit, distributions, run_study, validation_split

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {"guidance": ("float", 0.0, 7.5), "steps": ("int", 5, 50), "checkpoint": ("categorical", [10, 20, "final"])}
TRAIN_IDS = np.arange(100, 220)  # the real train split's dataset ids
TRAIN_LABELS = np.repeat([0, 1, 2], [60, 40, 20])
TEST_IDS = np.arange(0, 100)


def _score(params, split):
    return -abs(params["guidance"] - 3.0) - abs(params["steps"] - 20) / 10 + (params["checkpoint"] == 20)


def test_split_is_stratified_disjoint_and_deterministic():
    s = validation_split(TRAIN_LABELS, 0.25, seed=0, ids=TRAIN_IDS)
    assert isinstance(s, ValidationSplit)
    assert len(np.intersect1d(s.train_ids, s.val_ids)) == 0
    assert np.array_equal(np.union1d(s.train_ids, s.val_ids), TRAIN_IDS)
    label_of = dict(zip(TRAIN_IDS.tolist(), TRAIN_LABELS.tolist()))
    val_counts = np.bincount([label_of[i] for i in s.val_ids.tolist()])
    assert val_counts.tolist() == [15, 10, 5]  # 25% of every class
    again = validation_split(TRAIN_LABELS, 0.25, seed=0, ids=TRAIN_IDS)
    assert np.array_equal(again.val_ids, s.val_ids) and np.array_equal(again.train_ids, s.train_ids)
    assert not np.array_equal(validation_split(TRAIN_LABELS, 0.25, seed=1, ids=TRAIN_IDS).val_ids, s.val_ids)
    with pytest.raises(ValueError):
        s.val_ids[0] = 5  # read-only


def test_split_edges_and_errors():
    s = validation_split([0, 0, 1, 2, 2, 2], 0.01, seed=0)  # tiny fraction: still one per class; singletons stay
    assert np.bincount(np.asarray([0, 0, 1, 2, 2, 2])[s.val_ids]).tolist() == [1, 0, 1]
    assert len(s.train_ids) == 4
    with pytest.raises(ValueError, match=r"fraction=1.0 must be in \(0, 1\)"):
        validation_split([0, 1], 1.0, 0)
    with pytest.raises(ValueError, match="equal-length"):
        validation_split([0, 1], 0.5, 0, ids=[1, 2, 3])


def test_study_resumes_with_only_the_missing_trials(tmp_path):
    split = validation_split(TRAIN_LABELS, 0.2, 0, TRAIN_IDS)
    store = tmp_path / "search" / "study.journal"
    calls = []

    def objective(params, sp):
        calls.append(params)
        return _score(params, sp)

    study = run_study(objective, SPACE, 3, store, "s", seed=0, split=split)
    assert len(study.trials) == 3 and len(calls) == 3
    study = run_study(objective, SPACE, 5, store, "s", seed=0, split=split)  # re-opened from the journal file
    assert len(study.trials) == 5 and len(calls) == 5
    assert len(run_study(objective, SPACE, 5, store, "s", seed=0, split=split).trials) == 5 and len(calls) == 5
    # the resumed study proposed what an uninterrupted one does
    straight = run_study(_score, SPACE, 5, tmp_path / "other.journal", "s", seed=0, split=split)
    assert [t.params for t in straight.trials] == [t.params for t in study.trials]
    assert all(0.0 <= c["guidance"] <= 7.5 and 5 <= c["steps"] <= 50 and c["checkpoint"] in (10, 20, "final")
               for c in calls)
    assert study.best_value == max(t.value for t in study.trials)
    # past TPE's 10 random start-up trials too (the model is fitted on the history)
    resumed = run_study(_score, SPACE, 12, store, "s", seed=0, split=split)
    straight = run_study(_score, SPACE, 12, tmp_path / "other.journal", "s", seed=0, split=split)
    assert [t.params for t in resumed.trials] == [t.params for t in straight.trials]


def test_trials_left_running_by_a_killed_run_are_failed_and_replaced(tmp_path):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    split = validation_split(TRAIN_LABELS, 0.2, 0, TRAIN_IDS)
    store = tmp_path / "study.journal"
    run_study(_score, SPACE, 1, store, "s", 0, split)
    storage = JournalStorage(JournalFileBackend(str(store)))
    killed = optuna.load_study(study_name="s", storage=storage).ask(distributions(SPACE))  # the run died here
    study = run_study(_score, SPACE, 3, store, "s", 0, split)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert study.trials[2].params == killed.params  # the killed trial's parameters run again first
    # and the trial after it is the one an uninterrupted study proposes next
    straight = run_study(_score, SPACE, 3, tmp_path / "straight.journal", "s", 0, split)
    assert study.trials[3].params == straight.trials[2].params


def test_failed_and_pruned_trials(tmp_path):
    split = validation_split(TRAIN_LABELS, 0.2, 0, TRAIN_IDS)
    store = tmp_path / "study.journal"
    state = {"n": 0}

    def flaky(params, sp):
        state["n"] += 1
        if state["n"] == 2:
            raise RuntimeError("worker died")
        if state["n"] == 3:
            raise optuna.TrialPruned()
        return 1.0

    with pytest.raises(RuntimeError, match="worker died"):
        run_study(flaky, SPACE, 3, store, "s", 0, split)
    study = run_study(flaky, SPACE, 3, store, "s", 0, split)  # re-run: the failed trial is replaced
    states = [t.state.name for t in study.trials]
    assert states == ["COMPLETE", "FAIL", "PRUNED", "COMPLETE"]


def test_objective_only_sees_train_split_ids(tmp_path):
    split = validation_split(TRAIN_LABELS, 0.2, seed=3, ids=TRAIN_IDS)
    touched = []

    def objective(params, sp):
        touched.append((sp.train_ids.copy(), sp.val_ids.copy()))
        return float(len(sp.val_ids))

    run_study(objective, SPACE, 3, tmp_path / "s.journal", "leak", seed=0, split=split, test_ids=TEST_IDS)
    assert len(touched) == 3
    for train, val in touched:
        seen = np.union1d(train, val)
        assert np.isin(seen, TRAIN_IDS).all() and not np.isin(seen, TEST_IDS).any()
        assert len(np.intersect1d(train, val)) == 0
    leaky = ValidationSplit(split.train_ids, np.concatenate([split.val_ids, TEST_IDS[:3]]))
    with pytest.raises(ValueError, match="3 id\\(s\\) of the split are test ids"):
        run_study(objective, SPACE, 1, tmp_path / "t.journal", "leak", 0, leaky, test_ids=TEST_IDS)
    assert len(touched) == 3  # refused before any trial ran


@pytest.mark.parametrize("spec", [("float", 1.0), ("int", 0.5, 3), ("float", 2.0, 1.0), ("categorical", []),
                                  ("uniform", 0, 1), ("float", 0.1, 1.0, "linear")])
def test_bad_space_entries(spec):
    with pytest.raises(ValueError, match="search space 'x'"):
        distributions({"x": spec})


def test_space_from_yaml_lists():
    d = distributions({"lr": ["float", 1e-5, 1e-3, "log"], "steps": ["int", 5, 50], "c": ["categorical", [1, 2]]})
    assert d["lr"].log and d["steps"].high == 50 and list(d["c"].choices) == [1, 2]
