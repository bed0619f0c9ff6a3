"""Prefect task caching keyed on content, verified on every hit, stored inside the project.

A cached task's key is ``<task>-<hash>`` where the hash comes from the task's *key function*: the content of
its input files, its stage's params, the generator's identity (hub id@revision, or a hash of a local
directory) and the source of the code that computes it (see :func:`thinair.stage.content_key`). The task
returns a small record ``{"outputs": {path relative to root: sha256}, ...}``, which Prefect persists as JSON
in ``.thinair/prefect/results/<key>`` (git- and DVC-ignored; never the user's home).

Before Prefect looks a key up, :func:`verified_key` checks that every output named by the stored record
still exists with its recorded hash. A record whose outputs were deleted or changed is removed, so Prefect
runs the task again (the task then reuses or recomputes its chunk file; see ``ChunkCache``). A hit shows in
the logs and the UI as ``Cached``.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

from thinair import io, paths

log = logging.getLogger(__name__)


def record(root: str | Path, files, **extra) -> dict:
    """A task's result record: the sha256 of each output file (by path relative to root) plus `extra`."""
    outs = {Path(os.path.relpath(f, root)).as_posix(): io.file_sha256(f) for f in files}
    return {"outputs": outs, **extra}


def _stored_result(path: Path) -> dict | None:
    """The task result inside a Prefect result record written with the JSON serializer."""
    try:
        rec = json.loads(path.read_bytes())
        result = rec["result"]
        return json.loads(result) if isinstance(result, str) else result
    except (OSError, ValueError, KeyError, TypeError):
        return None


def problem(result: dict | None, root: str | Path) -> str | None:
    """Why a stored record cannot be trusted (None if every output is present and unchanged)."""
    if not isinstance(result, dict) or not isinstance(result.get("outputs"), dict):
        return "the record is unreadable"
    for rel, sha in result["outputs"].items():
        f = Path(root) / rel
        if not f.is_file():
            return f"{rel} is missing"
        if io.file_sha256(f) != sha:
            return f"{rel} changed since it was written"
    return None


def verified_key(name: str, key_fn, context, parameters: dict) -> str:
    """Prefect ``cache_key_fn``: the content key, after dropping a stored record that fails verification."""
    root = parameters.get("root", ".")
    key = f"{name}-{key_fn(**parameters)}"
    stored = paths.prefect_results(root) / key
    if stored.is_file():
        why = problem(_stored_result(stored), root)
        if why is not None:
            log.warning("%s: cached result %s not reused: %s; recomputing", name, key, why)
            stored.unlink(missing_ok=True)
    return key


def cache_options(name: str, key_fn) -> dict:
    """Task options for a content-cached task whose results are records (see :func:`record`)."""
    return {"cache_key_fn": functools.partial(verified_key, name, key_fn), "persist_result": True,
            "result_serializer": "json"}


def bind(task, root: str | Path):
    """The task with its result records stored under this project's ``.thinair/prefect/results``."""
    store = paths.prefect_results(root)
    store.mkdir(parents=True, exist_ok=True)
    return task.with_options(result_storage=store)  # a Path: Prefect's LocalFileSystem at that directory
