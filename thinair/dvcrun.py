"""The whole DAG through DVC, for runs started from Prefect (UI, deployments, schedules).

Uses DVC's Python API on the project at ``root`` so that ``dvc.lock`` stays the single record of what
produced what, whichever entry point ran the pipeline: parameter overrides are validated, then written into
``params.yaml`` (comments kept, as ``dvc exp run -S`` does); stale stages are found with ``dvc status``
and reproduced one by one in DVC's own order (each runs ``thinair <stage>``); new versions are pushed to
the DVC remote. Reads and writes ``params.yaml``, ``dvc.lock``, ``data/`` and the DVC cache/remote.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
from pathlib import Path

import yaml

from thinair.config import load_params
from thinair.io import atomic_path

log = logging.getLogger(__name__)
_CWD_LOCK = threading.Lock()
PARENT_RUN_ENV = "THINAIR_PIPELINE_RUN"  # set for stage subprocesses: their flow runs are tagged with it


def _console_to_current_streams() -> None:
    """Point DVC's console handlers at today's sys.stdout / sys.stderr. `import dvc` binds them to the streams of
    that moment; if those were replaced and closed since (a test's captured output, a redirected server process),
    DVC's next log line would fail the whole reproduction with "I/O operation on closed file"."""
    import sys

    from dvc.logger import LoggerHandler

    for name in ("dvc", "dvc_objects", "dvc_data"):
        for h in logging.getLogger(name).handlers:
            if isinstance(h, LoggerHandler):
                with h.lock:
                    h.stream = sys.stderr if h.level >= logging.WARNING else sys.stdout


@contextlib.contextmanager
def repo(root: str | Path):
    """DVC's Repo for the project at `root`, used from inside it (DVC resolves outputs against the cwd)."""
    from dvc.repo import Repo

    _console_to_current_streams()
    with _CWD_LOCK:
        old = os.getcwd()
        os.chdir(root)
        try:
            with Repo(".") as r:
                yield r
        finally:
            os.chdir(old)


def apply_overrides(root: str | Path, overrides: list[str]) -> list[str]:
    """Validate ``section.key=value`` overrides against params.yaml, then write the changed ones into it.

    Nothing is written if any override is invalid (raises ParamsError naming it) or none changes a value.
    Only the changed keys' lines are rewritten, so comments and layout stay. Returns the keys changed.
    """
    path = Path(root) / "params.yaml"
    if not overrides:
        return []
    load_params(path, overrides)  # raises ParamsError before anything is written
    current = yaml.safe_load(path.read_text())
    text, changed, requested = path.read_text(), [], {}
    for item in overrides:
        key, value = (part.strip() for part in item.split("=", 1))
        section, name = key.split(".", 1)
        new = yaml.safe_load(value)
        if current.get(section, {}).get(name, object()) == new:
            continue
        text = _set_line(text, section, name, new)
        changed.append(key)
        requested[key] = new
    if changed:
        written = yaml.safe_load(text)
        wrong = [k for k in changed if written[k.split(".")[0]][k.split(".")[1]] != requested[k]]
        if wrong:  # the line edit did not give the requested value: refuse rather than write a wrong params file
            raise ValueError(f"params.yaml: could not rewrite {', '.join(wrong)} in place; set them by hand")
        with atomic_path(path) as tmp:
            tmp.write_text(text)
    return changed


def _set_line(text: str, section: str, name: str, value) -> str:
    """`section.name: value` in a two-level YAML text, keeping the line's comment; appended if absent."""
    flow = json.dumps(value)  # JSON is YAML flow style: numbers, strings, lists, null
    lines = text.splitlines(keepends=True)
    start = next((i for i, ln in enumerate(lines) if re.match(rf"{re.escape(section)}:(\s|$)", ln)), None)
    if start is None:
        return text.rstrip("\n") + f"\n\n{section}:\n  {name}: {flow}\n"
    end = start + 1
    while end < len(lines) and (lines[end].startswith((" ", "\t")) or not lines[end].strip()):
        eol = "\n" if lines[end].endswith("\n") else ""
        m = re.fullmatch(rf"(\s+){re.escape(name)}:(\s*)(.*?)(\s+#.*)?()", lines[end].rstrip("\n"))
        if m:
            comment = m.group(4) or ""
            spaces = len(comment) - len(comment.lstrip())
            pad = " " * max(1, len(m.group(3)) + spaces - len(flow)) if comment else ""
            lines[end] = f"{m.group(1)}{name}: {flow}{pad}{comment.lstrip()}{eol}"
            indent, nxt = len(m.group(1)), end + 1
            while nxt < len(lines) and lines[nxt].strip():  # drop the old value's block lines (`- item`, nested)
                ind = len(lines[nxt]) - len(lines[nxt].lstrip())
                if ind > indent or (ind == indent and lines[nxt].lstrip().startswith("- ")):
                    del lines[nxt]
                else:
                    break
            return "".join(lines)
        end += 1
    while end > start + 1 and not lines[end - 1].strip():
        end -= 1
    lines.insert(end, f"  {name}: {flow}\n")
    return "".join(lines)


def stale_stages(root: str | Path) -> list[str]:
    """Stages whose deps, params or outs changed since dvc.lock (``dvc status``); [] = up to date."""
    with repo(root) as r:
        return sorted({k.split(":")[-1] for k in r.status()})


def stage_order(root: str | Path) -> list[str]:
    """Every stage, upstream first, as ``dvc repro`` visits them."""
    from dvc.repo.reproduce import get_active_graph, plan_repro

    with repo(root) as r:
        return [s.addressing.split(":")[-1] for s in plan_repro(get_active_graph(r.index.graph))]


def reproduce_stage(root: str | Path, stage: str, env: dict | None = None, force: bool = False) -> bool:
    """``dvc repro -s [-f] <stage>``: run it if it is stale now (or always, with `force`: its finished tasks are
    then Prefect cache hits); record it in dvc.lock. Returns whether it ran."""
    old = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        with repo(root) as r:
            return bool(r.reproduce(stage, single_item=True, force=force))
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
