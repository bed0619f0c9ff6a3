"""Reading earlier stages' outputs: the ingest splits, the synthetic set (and the order its variants are taken
in), manifests and their digests.

Reads ``data/<stage>`` folders (shards and ``manifest.json``); writes nothing, except :func:`link_stages`'s symlinks
in a scratch workspace. A missing input raises :class:`StageInputMissing` naming the stage to run.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from thinair import io, paths
from thinair.errors import StageInputMissing
from thinair.units import files_under


def require(path: Path, stage: str) -> Path:
    if not path.exists():
        raise StageInputMissing(f"{path} is missing: run `thinair {stage}` (or `dvc repro {stage}`) first")
    return path


@dataclass
class LabelledImages:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64
    class_names: list[str]


def read_split(split: str, root: str | Path = ".") -> LabelledImages:
    """All shards of one ingest split, concatenated in order."""
    d = paths.stage_dir("ingest", root)
    manifest = io.read_json(require(d / io.MANIFEST, "ingest"))
    images, labels = [], []
    for shard in manifest["splits"][split]["shards"]:
        z = io.load_npz(require(d / shard, "ingest"))
        images.append(z["images"])
        labels.append(z["labels"])
    return LabelledImages(np.concatenate(images), np.concatenate(labels), list(manifest["class_names"]))


@dataclass
class Synthetic:
    images: np.ndarray  # uint8 (M, H, W, C)
    labels: np.ndarray  # (M,)
    source: np.ndarray  # (M,) train row of the embedding each image came from
    partner: np.ndarray  # (M,) train row of its interpolation partner, -1 = none
    checkpoint: np.ndarray | None = None  # (M,) embedding checkpoint it was sampled from (-1 = final)
    guidance: np.ndarray | None = None  # (M,) guidance scale it was sampled with


def read_synthetic(root: str | Path = ".") -> Synthetic:
    """Every synthetic image of ``data/sample`` with its labels and provenance."""
    d = paths.stage_dir("sample", root)
    manifest = io.read_json(require(d / io.MANIFEST, "sample"))
    parts = [io.load_npz(d / f) for f in manifest["chunks"]]
    keys = ["images", "labels", "source_index", "partner_index"]
    keys += [k for k in ("checkpoint", "guidance") if parts and all(k in p for p in parts)]
    return Synthetic(*(np.concatenate([p[k] for p in parts]) for k in keys))


def _rank_within(group: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Each row's rank by `key` among the rows of its `group` (ties in file order). (M,), (M,) -> (M,)."""
    order = np.lexsort((np.arange(len(group)), key, group))
    starts = np.r_[0, np.flatnonzero(np.diff(group[order])) + 1]
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    return rank


def _first_seen(values: np.ndarray | None, m: int) -> np.ndarray:
    """Codes 0.. of `values` in order of first appearance (sample's order of the params list); zeros if absent."""
    if values is None:
        return np.zeros(m, np.int64)
    _, first, inverse = np.unique(values, return_index=True, return_inverse=True)
    return np.argsort(np.argsort(first))[inverse.reshape(-1)]


def variant_rank(syn: Synthetic) -> np.ndarray:
    """Each synthetic image's rank among its embedding's variants, the order the scaling study takes them in.

    Sample index s is outermost: the first sample of every (checkpoint, guidance) setting, then the second, and so
    on. Within one s the C x W settings go in diagonal order, so that any max(C, W) consecutive ones cover every
    checkpoint and every guidance scale: with C >= W, setting (i, j) comes at ((j - i) mod W) * C + i (3 x 3:
    (1K, 2), (2K, 3), (3K, 4), (1K, 3), (2K, 4), (3K, 2), ...), else at ((i - j) mod C) * W + j. So the first n
    variants of every embedding span all settings as soon as n >= max(C, W), and n = C x W x S is all of them.
    With one checkpoint and one guidance scale this is the file order.
    """
    m = len(syn.source)
    ci, wi = _first_seen(syn.checkpoint, m), _first_seen(syn.guidance, m)
    c, w = int(ci.max(initial=0)) + 1, int(wi.max(initial=0)) + 1
    s = _rank_within(syn.source * c * w + ci * w + wi, np.zeros(m, np.int64))  # sample index within its setting
    slot = ((wi - ci) % w) * c + ci if c >= w else ((ci - wi) % c) * w + wi
    return _rank_within(syn.source, s * c * w + slot)


_MEMO: dict = {}  # per process: name -> (key, value), the last value read for that name


def memoized(name: str, root: str | Path, stages: tuple[str, ...], load):
    """``load()``, read once per process for `root` while the manifests of `stages` are unchanged (so every unit of
    a stage shares one read of its inputs; a changed upstream is read again). Keeps one value per `name`."""
    manifests = [paths.stage_dir(s, root) / io.MANIFEST for s in stages]
    key = (str(Path(root).resolve()),) + tuple(io.file_sha256(f) if f.is_file() else "" for f in manifests)
    hit = _MEMO.get(name)
    if hit is None or hit[0] != key:
        _MEMO[name] = hit = (key, load())
    return hit[1]


def upstream_chunks(stage: str, root: str | Path = ".") -> list:
    """The chunk list of an upstream stage's manifest (names or records)."""
    return io.read_json(require(paths.stage_dir(stage, root) / io.MANIFEST, stage))["chunks"]


def chunk_ranges(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]


def inputs_digest(root: str | Path, *stages: str) -> list[list[str]]:
    """[relative path, sha256] of every file of the given stages' outputs: the inputs of a whole-stage task."""
    out = []
    for s in stages:
        d = require(paths.stage_dir(s, root), s)
        out += [[f.relative_to(root).as_posix(), io.file_sha256_memo(f)] for f in files_under(d)]
    return out


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
