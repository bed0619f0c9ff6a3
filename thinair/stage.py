"""Reading earlier stages' outputs, and the content-keyed chunk cache.

Reads ``data/ingest`` shards and manifests; writes nothing itself except through :class:`ChunkCache`,
which stores finished chunk files under ``.thinair/cache/<stage>/<key>/`` (key = hash of everything
that determines the chunk) and links them into the stage's output directory.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from thinair import faults, io, paths


class StageInputMissing(FileNotFoundError):
    """An upstream stage's output is missing; the message names the stage to run."""


def require(path: Path, stage: str) -> Path:
    if not path.exists():
        raise StageInputMissing(f"{path} is missing: run `thinair {stage}` (or `dvc repro {stage}`) first")
    return path


@dataclass
class Split:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64
    class_names: list[str]


def read_split(split: str, root: str | Path = ".") -> Split:
    """All shards of one ingest split, concatenated in order."""
    d = paths.stage_dir("ingest", root)
    manifest = io.read_json(require(d / io.MANIFEST, "ingest"))
    images, labels = [], []
    for shard in manifest["splits"][split]["shards"]:
        z = io.load_npz(require(d / shard, "ingest"))
        images.append(z["images"])
        labels.append(z["labels"])
    return Split(np.concatenate(images), np.concatenate(labels), list(manifest["class_names"]))


@dataclass
class Synthetic:
    images: np.ndarray  # uint8 (M, H, W, C)
    labels: np.ndarray  # (M,)
    source: np.ndarray  # (M,) train row of the embedding each image came from
    partner: np.ndarray  # (M,) train row of its interpolation partner, -1 = none


def read_synthetic(root: str | Path = ".") -> Synthetic:
    """Every synthetic image of ``data/sample`` with its labels and provenance."""
    d = paths.stage_dir("sample", root)
    manifest = io.read_json(require(d / io.MANIFEST, "sample"))
    parts = [io.load_npz(d / f) for f in manifest["chunks"]]
    return Synthetic(*(np.concatenate([p[k] for p in parts])
                       for k in ("images", "labels", "source_index", "partner_index")))


def upstream_chunks(stage: str, root: str | Path = ".") -> list:
    """The chunk list of an upstream stage's manifest (names or records)."""
    return io.read_json(require(paths.stage_dir(stage, root) / io.MANIFEST, stage))["chunks"]


def chunk_ranges(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def source_hash(module: str) -> str:
    """Hash of a module's source file: part of every chunk key, so changed code never reuses old chunks."""
    import sys

    return io.file_sha256(sys.modules[module].__file__)[:16]


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


class ChunkCache:
    """Finished chunk files keyed on content; a hit is verified against its recorded hash."""

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


def inputs_digest(root: str | Path, *stages: str) -> list[list[str]]:
    """[relative path, sha256] of every file of the given stages' outputs: the inputs of a whole-stage task."""
    out = []
    for s in stages:
        d = require(paths.stage_dir(s, root), s)
        out += [[f.relative_to(root).as_posix(), io.file_sha256_memo(f)] for f in files_under(d)]
    return out


def files_under(d: Path) -> list[Path]:
    return [f for f in sorted(d.rglob("*")) if f.is_file()]


def link_stages(ws: Path, root: str | Path, stages: tuple[str, ...]) -> Path:
    """A scratch workspace `ws` whose upstream stage outputs are symlinks to `root`'s (re-pointed if `root` moved);
    stages `root` lacks are skipped. Returns `ws`."""
    for stage in stages:
        src, dst = paths.stage_dir(stage, root).resolve(), paths.stage_dir(stage, ws)
        if not src.is_dir():
            continue
        if dst.is_symlink() and dst.resolve() != src:
            dst.unlink()
        if not dst.is_symlink():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src, target_is_directory=True)
    return ws
