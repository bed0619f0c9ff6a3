"""The cached unit of work: the one place that keys, caches, resumes, publishes and runs a stage's units.

A stage (``tasks/<stage>.py``) is a name and four plain functions; nothing else is needed to run it cached,
resumable and published, in a Prefect flow (:func:`run_flow`), without Prefect (:func:`run_local`, tests and
scratch workspaces) or one unit at a time (:func:`run_unit`)::

    STAGE = "encode"
    def units(params, root) -> list[dict]     # small JSON-able records, each with a "name"; a chunk-cached unit
                                              # also names its output "file" ("publish": False keeps it in the cache)
    def key(params, unit, root) -> list       # what determines the unit's bytes besides code (params, inputs)
    def compute(params, unit, out, root, device) -> dict | None
                                              # write the unit's file at `out` (a temporary path); a unit without
                                              # "file" writes its stage folder `out` itself and returns its result;
                                              # unit["key"] is the unit's key (for its Checkpoint)
    def finish(params, records, root)         # manifests and summaries from the records, in unit order

Optional module constants: ``USES_DEVICE = False`` (no device slot), ``SET_THREADS = False`` (keep the process's
torch threads), ``RETRIES = (retries, first delay s)``, ``RUNS = ("sample", ...)`` (stages whose code it runs: their
code is part of its key).

The key of a unit is ``content_key(stage, code_key(tasks.<stage> and every project module it imports), key(...))``,
so an edit of any line the stage can run recomputes its units. A unit with a "file" lives in
``.thinair/cache/<stage>/<key>/<file>`` (verified by its sha256 on every hit) and is linked into
``data/<stage>/``; a killed computation leaves only a ``.part`` file, which the next run overwrites. Prefect's
task cache sits on top: each task returns a small record (output hashes), checked before reuse
(:func:`verified_key`). Long computations checkpoint through :class:`Checkpoint`.

Reads and writes ``.thinair/cache/<stage>``, ``.thinair/work/<stage>``, ``.thinair/prefect/results`` and the stage's
``data/<stage>`` folder.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from thinair import codegraph, faults, io, paths
from thinair.codegraph import code_key  # noqa: F401 - stages key their sub-results with it
from thinair.progress import Progress

log = logging.getLogger(__name__)


# --- keys --------------------------------------------------------------------------------------------------------

def _binary(p) -> bool:
    if isinstance(p, (np.ndarray, Path)):
        return True
    items = p.values() if isinstance(p, dict) else p if isinstance(p, (list, tuple)) else ()
    return any(_binary(v) for v in items)


def _feed(h, p) -> None:
    if isinstance(p, np.ndarray):
        h.update(str((p.dtype, p.shape)).encode())
        h.update(np.ascontiguousarray(p).tobytes())
    elif isinstance(p, Path):
        h.update(io.file_sha256(p).encode())
    elif _binary(p):  # a container holding arrays/files: hash its parts, never their (truncated) repr
        items = sorted(p.items()) if isinstance(p, dict) else enumerate(p)
        h.update(b"{" if isinstance(p, dict) else b"[")
        for k, v in items:
            h.update(json.dumps(k).encode())
            _feed(h, v)
        h.update(b"}" if isinstance(p, dict) else b"]")
    else:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())
    h.update(b"\x00")


def content_key(*parts) -> str:
    """Stable hash of JSON-able parts, numpy arrays and files (by content), also nested in lists/dicts."""
    h = hashlib.sha256()
    for p in parts:
        _feed(h, p)
    return h.hexdigest()[:24]


def stage_code(stage) -> list[str]:
    """The modules whose code a stage runs: tasks/<stage>.py and those of the stages it runs (``RUNS``)."""
    mod = stage_module(stage)
    return [mod.__name__] + [codegraph.stage_module(s) for s in getattr(mod, "RUNS", ())]


def unit_key(stage, params, unit: dict, root: str | Path = ".") -> str:
    """The full key of one unit of `stage` (a stage module, or its name)."""
    mod = stage_module(stage)
    return content_key(mod.STAGE, code_key(*stage_code(mod)), mod.key(params, unit, root))


# --- the content-keyed file cache --------------------------------------------------------------------------------

class ChunkCache:
    """Finished unit files keyed on content; a hit is verified against its recorded hash."""

    def __init__(self, stage: str, root: str | Path = "."):
        self.dir = paths.cache_dir(stage, root)

    def get(self, key: str, name: str) -> Path | None:
        f = self.dir / key / name
        meta = self.dir / key / (name + ".sha256")
        if f.is_file() and meta.is_file() and meta.read_text().strip() == io.file_sha256(f):
            return f
        return None

    def put(self, key: str, name: str, src: Path) -> Path:
        dst = self.dir / key / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst) if src.parent == dst.parent else shutil.copyfile(src, dst)
        io.write_bytes(dst.parent / (name + ".sha256"), io.file_sha256(dst).encode())
        faults.point("computed", f"{self.dir.name}/{key}/{name}")
        return dst


def cached(stage: str, key: str, name: str, make, root: str | Path = ".", what: str | None = None) -> Path:
    """The cache file `name` of `key`, computed by ``make(part_path)`` only if the cache lacks a verified copy."""
    cache = ChunkCache(stage, root)
    hit = cache.get(key, name)
    if hit is not None:
        log.info("%s: reused from cache %s (not recomputed)", what or f"{stage} {name}", key)
        return hit
    tmp = cache.dir / key / (name + ".part")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    make(tmp)
    return cache.put(key, name, tmp)


def publish(src: Path, dst: Path) -> None:
    """Place a cached file at `dst` (hard link when possible, else copy), atomically."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    with io.atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def clean_dir(d: Path, keep: set[str]) -> None:
    """Remove files in a stage's output directory that this run did not produce (stale chunks)."""
    if d.is_dir():
        for f in d.iterdir():
            if f.is_file() and f.name not in keep:
                faults.point("unlink", f)
                f.unlink()


class Checkpoint:
    """Work in progress of one keyed computation, in ``.thinair/work/<stage>/<key>[-<phase>].pt``: saved atomically,
    loaded (``torch.load(weights_only=True)``: our own tensors and plain types) to resume after a kill, and
    deleted once the result is in the cache."""

    def __init__(self, stage: str, key: str, root: str | Path = ".", phase: str | None = None):
        self.path = paths.work_dir(stage, root) / (f"{key}-{phase}.pt" if phase else f"{key}.pt")

    def load(self, what: str) -> dict | None:
        import torch

        if not self.path.is_file():
            return None
        state = torch.load(self.path, weights_only=True)
        where = f"from step {int(state['step'])}" if "step" in state else f"after epoch {int(state.get('epoch', 0))}"
        log.info("%s: resuming %s", what, where)
        return state

    def save(self, state: dict) -> None:
        import torch

        self.path.parent.mkdir(parents=True, exist_ok=True)
        with io.atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def clear(self) -> None:
        if self.path.exists():
            faults.point("unlink", self.path)
            self.path.unlink()


# --- records (what a task returns; Prefect persists it) -----------------------------------------------------------

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


def verified_key(name: str, context, parameters: dict) -> str:
    """Prefect ``cache_key_fn``: the unit's key (computed once, by the caller, and passed in as ``key``), after
    dropping a stored record that fails verification."""
    root = parameters.get("root", ".")
    key = f"{name}-{parameters['unit']['name']}-{parameters['key']}"  # per unit: two units may share one cache file
    stored = paths.prefect_results(root) / key
    if stored.is_file():
        why = problem(_stored_result(stored), root)
        if why is not None:
            log.warning("%s: cached result %s not reused: %s; recomputing", name, key, why)
            stored.unlink(missing_ok=True)
    return key


# --- running units ----------------------------------------------------------------------------------------------

def stage_module(stage):
    """The stage's module (tasks/<stage>.py), from the module itself or its name."""
    return importlib.import_module(codegraph.stage_module(stage)) if isinstance(stage, str) else stage


def files_under(d: Path) -> list[Path]:
    return [f for f in sorted(d.rglob("*")) if f.is_file()]


def run_unit(stage, params, unit: dict, root: str | Path = ".", device=None, key: str | None = None) -> dict:
    """Compute one unit (or take it from the cache), publish it, and return its record."""
    mod = stage_module(stage)
    key = key or unit_key(mod, params, unit, root)
    out_dir = paths.stage_dir(mod.STAGE, root)
    name = unit.get("file")
    if name is None:  # a whole-stage unit: it writes its own folder; Prefect's verified record is its cache
        out_dir.mkdir(parents=True, exist_ok=True)
        result = mod.compute(params, unit | {"key": key}, out_dir, root, device)
        return record(root, files_under(out_dir), unit=unit, key=key, result=result)
    what = f"{mod.STAGE} chunk {unit['chunk']}" if "chunk" in unit else f"{mod.STAGE} {unit['name']}"
    made = cached(mod.STAGE, key, name, lambda tmp: mod.compute(params, unit | {"key": key}, tmp, root, device), root,
                  what)
    out = made
    if unit.get("publish", True):
        out = out_dir / name
        publish(made, out)
    return record(root, [out], unit=unit, key=key, file=Path(os.path.relpath(out, root)).as_posix())


def run_local(stage, params, root: str | Path = ".", device=None):
    """Run a whole stage in this process, without Prefect (tests, benchmarks, scratch workspaces)."""
    mod = stage_module(stage)
    units = mod.units(params, root)
    records = []
    with Progress(mod.STAGE, len(units)) as progress:
        for u in units:
            records.append(run_unit(mod, params, u, root, device))
            progress.finished(u["name"])
    return mod.finish(params, records, root)


def _task_body(stage: str, params, unit: dict, root: str = ".", key: str = "") -> dict:
    """What one Prefect task runs: the unit, holding a device slot when the stage uses the device."""
    from thinair.devices import device_slot, set_threads

    mod = stage_module(stage)
    if not getattr(mod, "USES_DEVICE", True):  # e.g. ingest, report: no device slot, no thread setting
        return run_unit(mod, params, unit, root, None, key)
    if getattr(mod, "SET_THREADS", True):  # cores / workers torch threads (metrics keeps the process's own)
        set_threads(params.base)
    with device_slot(params.base, root, f"{stage} {unit['name']}") as device:
        return run_unit(mod, params, unit, root, device, key)


@functools.lru_cache(maxsize=None)
def unit_task(stage: str):
    """The Prefect task of `stage`'s units: retried on transient errors, cached on the unit's key (verified)."""
    from prefect import task

    from thinair.orchestration import task_options

    mod = stage_module(stage)
    retries, delay = getattr(mod, "RETRIES", (2, 10))
    opts = task_options(retries=retries, delay=delay) | {
        "cache_key_fn": functools.partial(verified_key, stage), "persist_result": True, "result_serializer": "json"}
    opts.pop("cache_policy")  # the key function decides
    return task(name=stage, **opts)(_task_body)


def bind(task, root: str | Path):
    """The task with its result records stored under this project's ``.thinair/prefect/results``."""
    store = paths.prefect_results(root)
    store.mkdir(parents=True, exist_ok=True)
    return task.with_options(result_storage=store)  # a Path: Prefect's LocalFileSystem at that directory


def fan_out(task, calls: list[tuple], root, what: str, names: list[str] | None = None) -> list:
    """Submit ``task(*args)`` for each args tuple (its results cached under this project's root) and wait for
    all, updating a ``<what>-progress`` progress artifact as they finish. Returns the results in order."""
    from prefect.artifacts import create_progress_artifact, update_progress_artifact
    from prefect.futures import as_completed

    task = bind(task, root)
    futures = [(task.with_options(task_run_name=names[i]) if names else task).submit(*args)
               for i, args in enumerate(calls)]
    progress = create_progress_artifact(0.0, key=f"{what}-progress",
                                        description=f"{what}: {len(futures)} task(s) finished, in percent")
    index = {id(f): i for i, f in enumerate(futures)}
    with Progress(what, len(futures)) as lines:  # a line per finished task (and a live bar on a terminal)
        for done, f in enumerate(as_completed(futures), 1):
            update_progress_artifact(progress, 100.0 * done / max(1, len(futures)))
            i = index.get(id(f))
            lines.finished(names[i] if names and i is not None else f"task {done}")
    return [f.result() for f in futures]


def schedule(mod, params, units: list[dict], keys: list[str], root: str | Path = ".") -> list[list[int]]:
    """The waves a stage's units run in, as unit indices in submission order.

    A unit whose key an earlier unit has is the same work (e.g. a scaling study's full-size point and its mode's
    run): it waits for the second wave, where it is that unit's cache hit, instead of computing it again beside it.
    Every other unit is in the first wave. Within a wave the costliest units go first when the stage says what a
    unit costs (``cost(params, unit, root)``, any relative figure): the workers then end together on short units
    instead of one of them idling through a long unit submitted last. Order changes no result: every unit is
    seeded by its key."""
    first, repeats, seen = [], [], set()
    for i, k in enumerate(keys):
        (repeats if k in seen else first).append(i)
        seen.add(k)
    cost = getattr(mod, "cost", None)
    if cost is not None:
        costs = {i: cost(params, units[i], root) for i in first}
        first.sort(key=lambda i: -costs[i])  # stable: equal costs keep the stage's order
    return [w for w in (first, repeats) if w]


def run_flow(stage: str, params, root: str | Path = "."):
    """Run a stage inside the current Prefect flow: one task per unit (a device slot each, retried, a cache hit
    when its key is unchanged), in waves (:func:`schedule`: a unit that repeats an earlier one's key waits for it
    and reuses its cache), then ``finish``. Returns what ``finish`` returns."""
    from thinair.devices import ensure_limit

    mod = stage_module(stage)
    if getattr(mod, "USES_DEVICE", True):
        ensure_limit(params.base)
    units = mod.units(params, root)
    keys = [unit_key(mod, params, u, root) for u in units]
    records: list = [None] * len(units)
    waves = schedule(mod, params, units, keys, root)
    for wave, mine in enumerate(waves):
        what = stage if len(waves) == 1 else f"{stage}-wave{wave}"
        done = fan_out(unit_task(mod.STAGE), [(mod.STAGE, params, units[i], str(root), keys[i]) for i in mine],
                       root, what, [f"{mod.STAGE}-{units[i]['name']}" for i in mine])
        for i, r in zip(mine, done):
            records[i] = r
    return mod.finish(params, records, root)
