"""The whole DAG through DVC, for runs started from Prefect (UI, deployments, schedules).

Uses DVC's Python API on the project at ``root`` so that ``dvc.lock`` stays the single record of what
produced what, whichever entry point ran the pipeline: parameter overrides are validated, then written into
``params.yaml`` (comments kept, as ``dvc exp run -S`` does); stale stages are found with ``dvc status``
and reproduced one by one in DVC's own order (each runs ``thinair <stage>``); new versions are pushed to
the DVC remote. Reads and writes ``params.yaml``, ``dvc.lock``, ``data/`` and the DVC cache/remote.
"""
from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path

import yaml

from thinair.config import load_params

log = logging.getLogger(__name__)
_CWD_LOCK = threading.Lock()
PARENT_RUN_ENV = "THINAIR_PIPELINE_RUN"  # set for stage subprocesses: their flow runs are tagged with it


@contextlib.contextmanager
def repo(root: str | Path):
    """DVC's Repo for the project at `root`, used from inside it (DVC resolves outputs against the cwd)."""
    from dvc.repo import Repo

    with _CWD_LOCK:
        old = os.getcwd()
        os.chdir(root)
        try:
            with Repo(".") as r:
                yield r
        finally:
            os.chdir(old)


def apply_overrides(root: str | Path, overrides: list[str]) -> list[str]:
    """Validate ``section.key=value`` overrides against params.yaml, then write them into it.

    Nothing is written if any override is invalid (raises ParamsError naming it). Returns the keys changed.
    """
    path = Path(root) / "params.yaml"
    if not overrides:
        return []
    load_params(path, overrides)  # raises ParamsError before anything is written
    from dvc.utils.serialize import modify_yaml

    changed = []
    with modify_yaml(path) as data:
        for item in overrides:
            key, value = item.split("=", 1)
            section, name = key.strip().split(".", 1)
            new = yaml.safe_load(value)
            if data[section].get(name) != new:
                data[section][name] = new
                changed.append(key.strip())
    return changed


def stale_stages(root: str | Path) -> list[str]:
    """Stages whose deps, params or outs changed since dvc.lock (``dvc status``); [] = up to date."""
    with repo(root) as r:
        return sorted({k.split(":")[-1] for k in r.status()})


def stage_order(root: str | Path) -> list[str]:
    """Every stage, upstream first, as ``dvc repro`` visits them."""
    from dvc.repo.reproduce import get_active_graph, plan_repro

    with repo(root) as r:
        return [s.addressing.split(":")[-1] for s in plan_repro(get_active_graph(r.index.graph))]


def reproduce_stage(root: str | Path, stage: str, env: dict | None = None) -> bool:
    """``dvc repro -s <stage>``: run it if it is stale now; record it in dvc.lock. Returns whether it ran."""
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with repo(root) as r:
            return bool(r.reproduce(stage, single_item=True))
    finally:
        for k, v in old.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def push(root: str | Path) -> int:
    """``dvc push`` to the default remote; returns the number of files transferred."""
    with repo(root) as r:
        if not r.config.get("core", {}).get("remote"):
            log.warning("no default DVC remote configured (dvc remote add -d ...): nothing pushed")
            return 0
        return int(r.push())
