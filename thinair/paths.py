"""Where everything lives, declared once.

Stage outputs: ``data/<stage>/`` (DVC outs, rewritten by each run of the stage). Resumable work in
progress and the content-keyed chunk cache: ``.thinair/`` (ignored by git and DVC), which is what lets
a killed or re-run stage skip the chunks it already finished.
"""
from __future__ import annotations

from pathlib import Path

DATA = Path("data")
STATE = Path(".thinair")


def stage_dir(stage: str, root: str | Path = ".") -> Path:
    return Path(root) / DATA / stage


def cache_dir(stage: str, root: str | Path = ".") -> Path:
    return Path(root) / STATE / "cache" / stage


def work_dir(stage: str, root: str | Path = ".") -> Path:
    return Path(root) / STATE / "work" / stage


def chunk_name(split: str, index: int, ext: str) -> str:
    return f"{split}-{index:05d}.{ext}"


def state_dir(root: str | Path = ".") -> Path:
    return Path(root) / STATE


def prefect_results(root: str | Path = ".") -> Path:
    """Prefect's result records of cached tasks (project-local, not in the user's home)."""
    return (Path(root) / STATE / "prefect" / "results").resolve()
