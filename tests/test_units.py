"""The unit of work (thinair/units.py) and what its keys see (thinair/codegraph.py): a key covers every project
module a stage can run, dvc.yaml lists the same files, the import graph has no circle and no task imports another,
and every error thinair raises on purpose is one ThinairError with a `permanent` flag."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import tiny_params
from thinair import codegraph, errors, units

ROOT = codegraph.source_root()
LAYERS = {"thinair": "thinair", "tasks": "thinair.tasks", "flows": "thinair.flows"}


def _modules() -> dict[str, Path]:
    out = {}
    for folder, pkg in LAYERS.items():
        for f in sorted((ROOT / folder).glob("*.py")):
            out[pkg if f.stem == "__init__" else f"{pkg}.{f.stem}"] = f
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: {m for m in codegraph._imports(str(f), f.stat().st_mtime_ns) if m in mods and m != name}
            for name, f in mods.items()}


def test_the_key_of_encode_sees_the_resize_and_the_scheduler_set_up():
    """The bug this fixes: a key hashed only its stage's own file, so an edit of thinair/images.py reused stale
    chunks."""
    encode = codegraph.relative(codegraph.closure("thinair.tasks.encode"))
    assert {"tasks/encode.py", "thinair/images.py", "thinair/diffusion.py", "thinair/generator.py"} <= set(encode)
    sample = codegraph.relative(codegraph.closure("thinair.tasks.sample"))
    assert {"thinair/prompt_sampling.py", "thinair/steering.py", "thinair/class_encoder.py"} <= set(sample)
    assert "thinair/quality.py" not in encode  # only what it imports, not the whole package


def test_dvc_yaml_code_deps_are_exactly_what_the_keys_hash(tmp_path):
    copy = tmp_path / "dvc.yaml"
    shutil.copyfile(ROOT / "dvc.yaml", copy)
    diff = codegraph.sync_dvc_yaml(copy, write=False)
    assert diff == {}, f"dvc.yaml code deps differ from the stages' import closures: {diff}; run " \
                       "`python -m thinair.codegraph` to sync them"
    search = codegraph.stage_files("search")
    assert "tasks/sample.py" in search  # the search runs the sample stage's code (RUNS), by name
    # and the check can fail: drop one file a key hashes
    text = copy.read_text()
    at = text.index("\n  encode:\n")
    copy.write_text(text[:at] + text[at:].replace("      - thinair/images.py\n", "", 1))
    assert "thinair/images.py" in codegraph.sync_dvc_yaml(copy, write=False)["encode"][0]


def test_the_import_graph_has_no_circle_and_no_task_imports_another():
    graph = _graph()
    assert graph["thinair.tasks.encode"], "the graph is empty: the check below would prove nothing"
    for name, deps in graph.items():
        if name.startswith("thinair.tasks."):
            assert not {d for d in deps if d.startswith("thinair.tasks.")}, f"{name} imports another task"
    state: dict[str, int] = {}

    def visit(u: str, path: list[str]) -> None:
        state[u] = 1
        for v in sorted(graph[u]):
            assert state.get(v) != 1, "import circle: " + " -> ".join(path[path.index(v):] + [v])
            if v not in state:
                visit(v, path + [v])
        state[u] = 2

    for u in sorted(graph):
        if u not in state:
            visit(u, [u])


def test_every_stage_has_the_same_four_functions():
    import yaml

    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert {"ingest", "report", "export"} <= set(stages)
    for stage in stages:
        if stage == "pretrain":  # trains the embedded generator; DVC decides when (not a unit stage)
            continue
        mod = units.stage_module(stage)
        assert mod.STAGE == stage
        for fn in ("units", "key", "compute", "finish"):
            assert callable(getattr(mod, fn)), f"tasks/{stage}.py lacks {fn}()"


def test_one_error_hierarchy():
    classes = []
    for name, f in _modules().items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    getattr(b, "id", getattr(b, "attr", "")).endswith(("Error", "Exception", "Unavailable", "Missing",
                                                                        "Loss", "Busy")) for b in node.bases):
                classes.append(f"{name}.{node.name}")
    assert set(classes) == {f"thinair.errors.{c}" for c in (
        "ParamsError", "StageInputMissing", "DatasetUnavailable", "GeneratorUnavailable", "FeaturesUnavailable",
        "ThinairError", "GeneratorMisfit", "ExportFailed", "RunnerUnavailable", "NonFiniteLoss", "WorkspaceBusy")}, classes
    import thinair.class_encoder
    import thinair.tasks.invert

    assert thinair.class_encoder.NonFiniteLoss is thinair.tasks.invert.NonFiniteLoss is errors.NonFiniteLoss
    assert errors.is_permanent(errors.NonFiniteLoss("x")) and errors.is_permanent(ValueError("x"))
    assert not errors.is_permanent(RuntimeError("CUDA error: launch failure"))

    class Flaky(errors.ThinairError):
        permanent = False

    assert not errors.is_permanent(Flaky("x"))


def test_a_unit_computes_once_then_comes_from_the_cache(tiny_generator, tmp_path, caplog):
    import logging

    from thinair.config import parse_params

    params = parse_params(tiny_params(tiny_generator))
    units.run_local("ingest", params, tmp_path)
    first = units.run_local("encode", params, tmp_path)
    with caplog.at_level(logging.INFO, logger="thinair"):
        again = units.run_local("encode", params, tmp_path)
    assert again == first and len(first["chunks"]) == 2
    assert "encode chunk 0: reused from cache" in caplog.text and "encode chunk 1: reused from cache" in caplog.text
    made = units.run_unit("encode", params, units.stage_module("encode").units(params, tmp_path)[0], tmp_path)
    assert made["file"] == "data/encode/train-00000.safetensors" and made["outputs"]


# --- an edit of a shared module recomputes exactly the units whose code includes it ---------------------------
_RUN = textwrap.dedent("""
    import json, logging, sys
    from thinair.config import parse_params
    from thinair.units import run_local
    import thinair
    assert thinair.__file__.startswith(sys.argv[3]), thinair.__file__  # the copied source, not the installed one
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    params = parse_params(json.loads(sys.argv[1]))
    for stage in ("ingest", "encode", "invert"):
        run_local(stage, params, sys.argv[2])
""")


def _run_copy(src: Path, raw: dict, ws: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(src))
    out = subprocess.run([sys.executable, "-c", _RUN, json.dumps(raw), str(ws), str(src)], env=env, cwd=src,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


def _reused(log: str, stage: str) -> int:
    return sum(1 for line in log.splitlines() if line.startswith("thinair.units:") and f": {stage} chunk " in line
               and "reused from cache" in line)


def test_editing_a_shared_module_recomputes_exactly_the_affected_units(tiny_generator, tmp_path):
    src = tmp_path / "src"  # the project's source laid out as installed: thinair/, thinair/tasks, thinair/flows
    shutil.copytree(ROOT / "thinair", src / "thinair", ignore=shutil.ignore_patterns("__pycache__"))
    for layer in ("tasks", "flows"):
        shutil.copytree(ROOT / layer, src / "thinair" / layer, ignore=shutil.ignore_patterns("__pycache__"))
    raw, ws = tiny_params(tiny_generator), tmp_path / "ws"
    _run_copy(src, raw, ws)

    with open(src / "thinair" / "quality.py", "a") as f:  # metrics' code, not encode's or invert's
        f.write("\n# an edit encode and invert do not run\n")
    log = _run_copy(src, raw, ws)
    # every chunk from the cache: the keys are the same in a new process (unchanged code would give the same reuse;
    # one run checks both) and do not see code the stage does not run
    assert _reused(log, "encode") == 2 and _reused(log, "invert") == 2

    with open(src / "thinair" / "images.py", "a") as f:  # the resize encode uses (invert does not import it)
        f.write("\n# an edit of the resize\n")
    log = _run_copy(src, raw, ws)
    assert _reused(log, "encode") == 0, "encode reused chunks made by other code"
    assert _reused(log, "invert") == 2  # its inputs' bytes did not change, and its code does not include images.py

    with open(src / "thinair" / "generator.py", "a") as f:  # the scheduler set-up both use
        f.write("\n# an edit of the scheduler set-up\n")
    log = _run_copy(src, raw, ws)
    assert _reused(log, "encode") == 0 and _reused(log, "invert") == 0


@pytest.mark.parametrize("stage", ["invert", "sample"])
def test_a_chunked_stage_is_a_five_line_flow(stage):
    body = [ln for ln in (ROOT / "flows" / f"{stage}.py").read_text().split('"""', 2)[2].splitlines() if ln.strip()]
    assert len(body) <= 9 and any("run_flow" in ln for ln in body), body


def test_every_finished_unit_is_a_progress_line_with_an_eta(caplog):
    import logging

    progress = units.Progress("invert", 3)
    with caplog.at_level(logging.INFO, logger="thinair"):
        for name in ("chunk-000", "chunk-001", "chunk-002"):
            progress.finished(name)
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("invert: chunk-000 done (1/3, 33 %) — ETA ")
    assert lines[2] == "invert: chunk-002 done (3/3, 100 %)"


def test_schedule_runs_repeated_keys_later_and_the_costliest_units_first():
    import types

    from thinair.units import schedule

    units = [{"name": n, "cost": c} for n, c in (("a", 1), ("b", 5), ("c", 3), ("a-again", 9), ("d", 5))]
    keys = ["ka", "kb", "kc", "ka", "kd"]
    plain = types.SimpleNamespace()  # a stage that says nothing of costs: its own order
    assert schedule(plain, None, units, keys) == [[0, 1, 2, 4], [3]]
    costed = types.SimpleNamespace(cost=lambda params, unit, root: unit["cost"])
    assert schedule(costed, None, units, keys) == [[1, 4, 2, 0], [3]]  # equal costs keep the stage's order
    assert schedule(plain, None, units[:1] * 3, ["k"] * 3) == [[0], [1, 2]]  # repeats: after the first, together
