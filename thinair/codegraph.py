"""Which project source files a module's code depends on, and one hash of them for cache keys.

A unit's cache key must see every line of code that can change its bytes, not only its stage's own file: editing
the resize in thinair/images.py must recompute the encoded chunks. :func:`closure` follows every ``import`` /
``from ... import`` of a ``thinair`` module in a module's source (function-level imports too, read with ``ast``,
nothing is executed) to its transitive closure; :func:`code_key` hashes those files' contents. ``dvc.yaml`` lists the
same files as each stage's code deps (``thinair dvc-deps STAGE`` prints them; a test checks they agree).
Reads source files only.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
from pathlib import Path

PACKAGE = "thinair"


@functools.lru_cache(maxsize=None)
def _origin(module: str) -> str | None:
    """The source file of a project module, or None if `module` is not one (an attribute, a typo)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return spec.origin if spec is not None and spec.origin and spec.origin.endswith(".py") else None


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


@functools.lru_cache(maxsize=None)
def _imports(path: str, mtime_ns: int) -> tuple[str, ...]:
    """Project modules named by the import statements of one file (mtime in the cache key: edits are seen)."""
    tree = ast.parse(Path(path).read_text(), filename=path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == PACKAGE:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # kept only where a module of that name exists
    return tuple(sorted(found))


def closure(*modules: str) -> list[Path]:
    """Every project source file that `modules` import, directly or not (packages' __init__ files included)."""
    seen: dict[str, Path] = {}
    todo = list(modules)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        origin = _origin(name)
        if origin is None:
            continue
        seen[name] = Path(origin)
        todo += _parents(name)
        todo += _imports(origin, Path(origin).stat().st_mtime_ns)
    return sorted(set(seen.values()))


def source_root() -> Path:
    """The folder holding thinair/, tasks/ and flows/ (the project root in a source checkout)."""
    return Path(_origin(PACKAGE)).parent.parent


def relative(files: list[Path]) -> list[str]:
    """Paths as dvc.yaml writes them: relative to the project root, forward slashes."""
    root = source_root()
    return sorted(f.resolve().relative_to(root.resolve()).as_posix() for f in files)


def code_key(*modules: str) -> str:
    """Hash of the contents of every file in ``closure(*modules)``: part of every unit's cache key."""
    h = hashlib.sha256()
    root = source_root().resolve()
    for f in closure(*modules):
        h.update(f.resolve().relative_to(root).as_posix().encode() if f.resolve().is_relative_to(root) else
                 f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def stage_module(stage: str) -> str:
    """The module name of a stage's code (tasks/<stage>.py)."""
    return f"{PACKAGE}.tasks.{stage}"


def stage_files(stage: str) -> list[str]:
    """The code files a stage's results depend on, as dvc.yaml lists them: the closure of tasks/<stage>.py and of
    the stages it runs (its ``RUNS``), i.e. exactly what its units' keys hash."""
    import importlib

    mod = importlib.import_module(stage_module(stage))
    modules = [mod.__name__] + [stage_module(s) for s in getattr(mod, "RUNS", ())]
    return relative(closure(*modules))


def _stage_blocks(lines: list[str]) -> dict[str, tuple[int, int]]:
    """{stage: (first, end) line range of its ``deps:`` list} in dvc.yaml's text."""
    blocks, stage, i = {}, None, 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("  ") and not line.startswith("   ") and line.rstrip().endswith(":"):
            stage = line.strip()[:-1]
        elif stage and line.strip() == "deps:":
            j = i + 1
            while j < len(lines) and lines[j].startswith("      - "):
                j += 1
            blocks[stage] = (i + 1, j)
            i = j
            continue
        i += 1
    return blocks


def sync_dvc_yaml(path: str | Path = "dvc.yaml", write: bool = True) -> dict[str, tuple[list[str], list[str]]]:
    """Make every stage's code deps in dvc.yaml equal :func:`stage_files` (data deps and comments on them are kept).
    Returns {stage: (missing, extra)} as found before writing; with ``write=False`` it only checks."""
    path = Path(path)
    lines = path.read_text().splitlines(keepends=True)
    found = {}
    for stage, (start, end) in sorted(_stage_blocks(lines).items(), key=lambda kv: -kv[1][0]):
        if _origin(stage_module(stage)) is None:
            continue
        want = stage_files(stage)
        entries = [ln for ln in lines[start:end]]
        have = [ln.split("- ", 1)[1].split("#")[0].strip() for ln in entries]
        code = [h for h in have if h.endswith(".py")]
        found[stage] = (sorted(set(want) - set(code)), sorted(set(code) - set(want)))
        keep = [ln for ln, h in zip(entries, have) if not h.endswith(".py")]
        lines[start:end] = [f"      - {f}\n" for f in want] + keep
    if write:
        path.write_text("".join(lines))
    return {s: d for s, d in found.items() if d[0] or d[1]}


if __name__ == "__main__":  # python -m thinair.codegraph [--check]: sync (or check) dvc.yaml's code deps
    import sys

    diff = sync_dvc_yaml(write="--check" not in sys.argv)
    for s, (missing, extra) in diff.items():
        print(f"{s}: missing {missing}, extra {extra}")
    sys.exit(1 if diff and "--check" in sys.argv else 0)
