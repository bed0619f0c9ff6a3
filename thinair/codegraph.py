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
