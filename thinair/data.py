"""The synthetic dataset as a Python object: its provenance table, filters, and a lazy ``torch`` Dataset.

Reads ``data/sample/manifest.json``, ``data/sample/provenance.csv`` and the sample shards (``train-NNNNN.npz``), and
with ``real=True`` the ingest train shards (``data/ingest``) too. Writes nothing. ``thinair export``
(thinair/formats.py) selects with the same functions, so an export and a :class:`SyntheticDataset` built with the same
filters hold the same images in the same order::

    from thinair.data import SyntheticDataset, provenance
    ds = SyntheticDataset(".", where=["checkpoint=-1", "guidance>=2"], real=True, transform=T.ToTensor())
    image, label = ds[0]; ds.provenance(0)            # {"method": "inversion", "guidance": 2.0, "seed": ...}
    provenance(".")                                   # one row per synthetic image (pandas)

Rows are the provenance columns of ``data/sample/provenance.csv`` (file, row, label, source_index, partner_index,
alpha, lambda, method, guidance, checkpoint, uncond, scheduler, steps, seed, and prompt / clip_score for method
prompts) plus ``key`` (a unique name, ``syn-train-00000-000012``), ``stage`` (the folder ``file`` is in: sample or
ingest) and ``class_name``. Real rows (``real=True``) have method ``real``, their train-split row as
``source_index`` and no value (NA) in the columns that only describe generation.
"""
from __future__ import annotations

import operator
from collections import OrderedDict
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from thinair import io, paths
from thinair.upstream import require

OPS = {">=": operator.ge, "<=": operator.le, "!=": operator.ne, "==": operator.eq, "=": operator.eq,
       ">": operator.gt, "<": operator.lt}
LEAD = ["key", "stage", "file", "row", "label", "class_name", "method"]


def class_names(root: str | Path = ".") -> list[str]:
    """The dataset's class names, index = label (from ``data/ingest/manifest.json``)."""
    d = paths.stage_dir("ingest", root)
    return list(io.read_json(require(d / io.MANIFEST, "ingest"))["class_names"])


def _key(prefix: str, files: pd.Series, rows: pd.Series) -> pd.Series:
    return prefix + "-" + files.str.removesuffix(".npz") + "-" + rows.map("{:06d}".format)


def _real_rows(root: str | Path, names: list[str]) -> pd.DataFrame:
    """One row per real train image, read from the ingest shards' labels only."""
    d = paths.stage_dir("ingest", root)
    frames, offset = [], 0
    for shard in io.read_json(require(d / io.MANIFEST, "ingest"))["splits"]["train"]["shards"]:
        with np.load(require(d / shard, "ingest"), allow_pickle=False) as z:
            labels = z["labels"]  # only this member is read (npz members load on access)
        n = len(labels)
        frames.append(pd.DataFrame({"file": shard, "row": np.arange(n), "label": labels.astype(np.int64),
                                    "source_index": np.arange(offset, offset + n)}))
        offset += n
    t = pd.concat(frames, ignore_index=True)
    return t.assign(key=_key("real", t["file"], t["row"]), stage="ingest", method="real",
                    class_name=[names[k] for k in t["label"]])


def provenance(root: str | Path = ".", real: bool = False) -> pd.DataFrame:
    """Every synthetic image's provenance (and with `real`, every real train image after them), one row each."""
    d = paths.stage_dir("sample", root)
    manifest = io.read_json(require(d / io.MANIFEST, "sample"))
    syn = pd.read_csv(require(d / manifest.get("provenance", "provenance.csv"), "sample"), keep_default_na=False,
                      na_values=[""])
    names = class_names(root)
    syn = syn.assign(key=_key("syn", syn["file"], syn["row"]), stage="sample",
                     class_name=[names[k] for k in syn["label"]])
    table = syn
    if real:  # integer columns become nullable first: real rows have no value there, and a float would round seeds
        ints = {c: "Int64" for c in syn.columns if pd.api.types.is_integer_dtype(syn[c])}
        table = pd.concat([syn.astype(ints), _real_rows(root, names).astype(
            {c: t for c, t in ints.items() if c in ("row", "label", "source_index")})], ignore_index=True)
    return table[LEAD + [c for c in table.columns if c not in LEAD]].reset_index(drop=True)


def parse_where(cond: str) -> tuple[str, str, str]:
    """``"guidance>=2"`` -> ``("guidance", ">=", "2")``."""
    for op in OPS:  # two-character operators first (dict order)
        col, sep, value = cond.partition(op)
        if sep and col.strip() and not any(c in col for c in "<>=!"):
            return col.strip(), op, value.strip()
    raise ValueError(f"--where {cond!r}: expected COLUMN<op>VALUE with op one of {', '.join(OPS)}, "
                     "e.g. checkpoint=-1 or guidance>=2")


def apply_where(table: pd.DataFrame, where: Iterable[str] | dict | str = ()) -> pd.DataFrame:
    """The rows meeting every condition (``"col<op>value"`` strings, or a dict of equalities). A condition on a
    column a row has no value in (real images have no guidance, checkpoint, seed ...) leaves that row in."""
    if isinstance(where, str):
        where = [where]
    conds = [(k, "=", str(v)) for k, v in where.items()] if isinstance(where, dict) else [parse_where(w) for w in where]
    keep = np.ones(len(table), bool)
    for col, op, value in conds:
        if col not in table.columns:
            extra = " (clip_score and prompt exist only for sample.method: prompts)" if col in ("clip_score",
                                                                                                "prompt") else ""
            raise ValueError(f"--where {col}{op}{value}: no column {col!r} in the provenance{extra}; columns: "
                             f"{', '.join(table.columns)}")
        values = table[col]
        present = values.notna().to_numpy()
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            try:
                target = float(value)
            except ValueError:
                raise ValueError(f"--where {col}{op}{value}: {col} is numeric; {value!r} is not a number") from None
            got = values[present].astype(float).to_numpy()
        elif op in ("=", "==", "!="):
            target, got = value, values[present].astype(str).to_numpy()
        else:
            raise ValueError(f"--where {col}{op}{value}: {col} is text; use = or != on it")
        ok = np.ones(len(table), bool)
        ok[present] = OPS[op](got, target)
        keep &= ok
    return table[keep].reset_index(drop=True)


def subsample(table: pd.DataFrame, limit: int | None = None, per_class: int | None = None,
              seed: int = 0) -> pd.DataFrame:
    """A seeded random subset: at most `per_class` rows of every label, then at most `limit` rows; kept in table
    order, so the same seed and table give the same rows."""
    rng = np.random.default_rng(seed)
    idx = np.arange(len(table))
    if per_class is not None:
        labels = table["label"].to_numpy()
        idx = np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == k), min(per_class, int((labels == k).sum())),
                                                 replace=False) for k in np.unique(labels)] or [idx[:0]]))
    if limit is not None and limit < len(idx):
        idx = np.sort(rng.choice(idx, limit, replace=False))
    return table.iloc[idx].reset_index(drop=True)


def select(root: str | Path = ".", where: Iterable[str] | dict | str = (), real: bool = False,
           limit: int | None = None, per_class: int | None = None, seed: int = 0) -> pd.DataFrame:
    """:func:`provenance`, filtered by `where`, then seeded `per_class` / `limit` subsets (see :func:`subsample`)."""
    table = apply_where(provenance(root, real), where)
    if table.empty:
        raise ValueError(f"no image meets --where {' '.join(where) if not isinstance(where, dict) else where}")
    return subsample(table, limit, per_class, seed)


def shard_path(root: str | Path, stage: str, file: str) -> Path:
    return paths.stage_dir(stage, root) / file


def to_pil(image: np.ndarray):
    """uint8 (H, W, C) -> a PIL image: C=1 grey (L), 3 RGB, 4 RGBA."""
    from PIL import Image

    return Image.fromarray(image[..., 0], "L") if image.shape[-1] == 1 else Image.fromarray(image)


class ShardCache:
    """The ``images`` arrays of the last `size` shards read (least recently used first out). An npz member is
    deflated, so it cannot be memory-mapped: a shard is read whole on its first access."""

    def __init__(self, size: int = 2):
        self.size, self._shards = max(1, size), OrderedDict()

    def images(self, path: Path) -> np.ndarray:
        if path in self._shards:
            self._shards.move_to_end(path)
        else:
            with np.load(path, allow_pickle=False) as z:
                self._shards[path] = z["images"]  # (M, H, W, C) uint8
            while len(self._shards) > self.size:
                self._shards.popitem(last=False)
        return self._shards[path]


try:
    from torch.utils.data import Dataset as _TorchDataset, Sampler as _TorchSampler
except ImportError:  # torch is a dependency; this only keeps `provenance` usable without it
    _TorchDataset = _TorchSampler = object


class SyntheticDataset(_TorchDataset):
    """The synthetic images of ``data/sample`` (and with `real`, the real train split) as a map-style Dataset.

    ``ds[i]`` is ``(image, label)``: a PIL image (grey ``L`` or ``RGB``, as torchvision's datasets give) passed
    through `transform`, and the int label through `target_transform`. Shards are read lazily, on the first access
    to one of their images, and the last `cache_shards` stay in memory; a shuffled loader over many shards re-reads
    a shard per item, so shuffle with :meth:`sampler` (shard order and order within a shard, both seeded) or raise
    `cache_shards` to the shard count. Filters are those of ``thinair export`` (:func:`select`).
    """

    def __init__(self, root: str | Path = ".", where: Iterable[str] | dict | str = (), real: bool = False,
                 transform=None, target_transform=None, limit: int | None = None, per_class: int | None = None,
                 seed: int = 0, cache_shards: int = 2):
        self.root, self.transform, self.target_transform = Path(root), transform, target_transform
        self.table = select(root, where, real, limit, per_class, seed)
        self.classes = class_names(root)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.targets = self.table["label"].astype(int).tolist()
        self._shards = [shard_path(root, s, f) for s, f in zip(self.table["stage"], self.table["file"])]
        self._rows = self.table["row"].astype(int).to_numpy()
        self._cache = ShardCache(cache_shards)

    def __len__(self) -> int:
        return len(self.table)

    def image_array(self, i: int) -> np.ndarray:
        """Image `i` as stored: uint8 (H, W, C), no transform."""
        return self._cache.images(self._shards[i])[self._rows[i]]

    def __getitem__(self, i: int):
        image, label = to_pil(self.image_array(i)), self.targets[i]
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label

    def provenance(self, i: int) -> dict:
        """Everything recorded about image `i` (a provenance row; missing values are None)."""
        row = self.table.iloc[i]
        return {k: (None if pd.isna(v) else v.item() if hasattr(v, "item") else v) for k, v in row.items()}

    def sampler(self, seed: int = 0) -> "ShardSampler":
        return ShardSampler(self._shards, seed)

    def __getstate__(self):  # DataLoader workers start with an empty cache of their own
        return self.__dict__ | {"_cache": ShardCache(self._cache.size)}


class ShardSampler(_TorchSampler):
    """Shuffles shard order, and the order within each shard, anew each epoch (seed + epoch): every shard is read
    once per epoch by a :class:`SyntheticDataset` whose cache holds one shard. Call ``set_epoch`` like
    ``DistributedSampler``'s; without it each pass draws a new order from the same seeded stream."""

    def __init__(self, shards: list, seed: int = 0):
        self.seed, self.epoch = seed, None
        _, self._groups = np.unique([str(s) for s in shards], return_inverse=True)
        self._pass = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._groups)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch if self.epoch is not None else self._pass])
        self._pass += 1
        for g in rng.permutation(int(self._groups.max()) + 1 if len(self._groups) else 0):
            yield from (int(i) for i in rng.permutation(np.flatnonzero(self._groups == g)))
