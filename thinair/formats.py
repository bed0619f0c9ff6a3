"""``thinair export``: the synthetic dataset as files other tools load, each export with a dataset card.

Formats (``--format``), all holding the images selected by thinair/data.py's :func:`~thinair.data.select` (the same
``--where`` filters, ``--real``, seeded ``--limit`` / ``--per-class`` as :class:`~thinair.data.SyntheticDataset`):

* ``imagefolder``: ``OUT/<class name>/<key>.png`` (``torchvision.datasets.ImageFolder``) and ``OUT/provenance.csv``
  (``path`` relative to OUT, then every provenance column). ImageFolder numbers classes by *sorted folder name*:
  map its ``classes`` to names, not its indices to ours, when names do not sort like their labels ("10" < "2").
* ``hf``: a Hugging Face ``datasets`` dataset with columns ``image`` (``datasets.Image``), ``label``
  (``ClassLabel`` of the class names) and the provenance columns, as parquet files ``OUT/data/train-*.parquet``
  (the Hub layout: ``load_dataset("parquet", data_files=...)``, or ``load_dataset(OUT)`` through the card's
  ``configs``) and as ``save_to_disk`` output in ``OUT/arrow`` (``load_from_disk``).
* ``webdataset``: tar shards ``OUT/shard-NNNNNN.tar`` of ``--shard-size`` images, members ``<key>.png``,
  ``<key>.cls`` (the label) and ``<key>.json`` (the provenance row), written with fixed metadata (same images,
  same bytes).

Reads what thinair/data.py and thinair/card.py read. Writes only OUT, atomically: into a hidden folder beside it,
renamed to OUT when complete (OUT must not exist, or be empty). Nothing is uploaded unless ``--push-to-hub`` asks.
"""
from __future__ import annotations

import io as _io
import json
import os
import re
import shlex
import shutil
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from thinair import card
from thinair.data import ShardCache, class_names, select, shard_path, to_pil
from thinair.errors import ExportFailed

FORMATS = ("imagefolder", "hf", "webdataset")
SHARD_SIZE = 10000  # images per parquet file / tar shard unless --shard-size says otherwise


def png(image: np.ndarray) -> bytes:
    """uint8 (H, W, C) -> PNG bytes (grey images stay one channel)."""
    buf = _io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return buf.getvalue()


def iter_images(root: str | Path, table: pd.DataFrame):
    """The table's images in order, uint8 (H, W, C); rows come grouped by shard, so each shard is read once."""
    cache = ShardCache(1)
    for stage, file, row in zip(table["stage"], table["file"], table["row"]):
        yield cache.images(shard_path(root, stage, file))[int(row)]


def class_dirs(names: list[str]) -> list[str]:
    """A folder name per class: the class name made safe for a path, unique, never one of the export's own files."""
    out = []
    for k, name in enumerate(names):
        d = re.sub(r"[/\\\x00]", "_", str(name)).strip()
        d = f"class_{k}" if d in ("", ".", "..", "README.md", "provenance.csv", "manifest.json") or d in out else d
        out.append(d)
    return out


def records(table: pd.DataFrame) -> list[dict]:
    """The rows as JSON-able dicts (missing values: None)."""
    return [{k: (None if pd.isna(v) else v.item() if hasattr(v, "item") else v) for k, v in r.items()}
            for r in table.to_dict("records")]


def write_imagefolder(root, table: pd.DataFrame, out: Path, names: list[str], shard_size: int) -> str:
    dirs = class_dirs(names)
    rel = [f"{dirs[int(k)]}/{key}.png" for k, key in zip(table["label"], table["key"])]
    for d in sorted({r.split("/")[0] for r in rel}):
        (out / d).mkdir()
    for path, image in zip(rel, iter_images(root, table)):
        (out / path).write_bytes(png(image))
    table.insert(0, "path", rel)
    table.to_csv(out / "provenance.csv", index=False)
    return "`<class name>/<key>.png` per image, and `provenance.csv` (`path`, then every provenance column)"


def hf_features(table: pd.DataFrame, names: list[str]):
    """``datasets.Features``: image, ClassLabel label, and a typed Value per provenance column."""
    import datasets

    feats = {"image": datasets.Image()}
    for col in table.columns:
        dtype = table[col].dtype
        feats[col] = (datasets.ClassLabel(names=list(names)) if col == "label" else datasets.Value("bool")
                      if pd.api.types.is_bool_dtype(dtype) else datasets.Value("int64")
                      if pd.api.types.is_integer_dtype(dtype) else datasets.Value("float64")
                      if pd.api.types.is_float_dtype(dtype) else datasets.Value("string"))
    return datasets.Features(feats)


def write_hf(root, table: pd.DataFrame, out: Path, names: list[str], shard_size: int) -> str:
    try:
        import datasets
    except ImportError:
        raise ExportFailed("--format hf needs the Hugging Face `datasets` package: pip install 'thinair[export]'") \
            from None

    features = hf_features(table, names)
    images, n = iter_images(root, table), -(-len(table) // shard_size)
    (out / "data").mkdir()
    files = []
    for s in range(n):
        part = table.iloc[s * shard_size:(s + 1) * shard_size]
        rows = records(part)
        cols = {"image": [{"bytes": png(next(images)), "path": f"{k}.png"} for k in part["key"]]}
        cols |= {c: [r[c] for r in rows] for c in part.columns}
        files.append(out / "data" / f"train-{s:05d}-of-{n:05d}.parquet")
        datasets.Dataset.from_dict(cols, features=features).to_parquet(str(files[-1]))
    cache = Path(tempfile.mkdtemp(prefix=".hf-cache.", dir=out))
    try:  # the parquet files, read back into Arrow (memory-mapped, not held in RAM), saved for load_from_disk
        full = datasets.Dataset.from_parquet([str(f) for f in files], features=features, cache_dir=str(cache))
        full.save_to_disk(str(out / "arrow"))
        del full
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return ("`data/train-NNNNN-of-NNNNN.parquet` (columns `image`, `label` (ClassLabel) and the provenance columns) "
            "and the same dataset saved with `save_to_disk` in `arrow/`")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: same images, same bytes
    tar.addfile(info, _io.BytesIO(data))


def write_webdataset(root, table: pd.DataFrame, out: Path, names: list[str], shard_size: int) -> str:
    images, rows = iter_images(root, table), records(table)
    for s in range(0, len(rows), shard_size):
        with tarfile.open(out / f"shard-{s // shard_size:06d}.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
            for r in rows[s:s + shard_size]:
                _add(tar, f"{r['key']}.png", png(next(images)))
                _add(tar, f"{r['key']}.cls", str(r["label"]).encode())
                _add(tar, f"{r['key']}.json", json.dumps(r, sort_keys=True).encode())
    return ("`shard-NNNNNN.tar` WebDataset shards; per image `<key>.png`, `<key>.cls` (the label) and `<key>.json` "
            "(its provenance row)")


WRITERS = {"imagefolder": write_imagefolder, "hf": write_hf, "webdataset": write_webdataset}


def command_line(out, fmt: str, where=(), real=False, limit=None, per_class=None, seed=0,
                 shard_size=SHARD_SIZE) -> str:
    """The ``thinair export`` command that makes this export (for the card)."""
    args = ["thinair", "export", "--format", fmt] + [a for w in where for a in ("--where", w)]
    args += (["--real"] if real else []) + (["--limit", str(limit)] if limit is not None else [])
    args += (["--per-class", str(per_class)] if per_class is not None else [])
    args += (["--seed", str(seed)] if seed else [])
    args += (["--shard-size", str(shard_size)] if shard_size != SHARD_SIZE and fmt != "imagefolder" else []) + [str(out)]
    return shlex.join(args)


def export(params, out: str | Path, fmt: str = "imagefolder", root: str | Path = ".", where=(), real: bool = False,
           limit: int | None = None, per_class: int | None = None, seed: int = 0, shard_size: int = SHARD_SIZE,
           command: str | None = None) -> dict:
    """Write the selected images to `out` in `fmt` with a dataset card (README.md); returns a summary. `command` is
    what the card says made the export (default: the ``thinair export`` command line of these arguments)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if shard_size < 1:
        raise ValueError("--shard-size must be at least 1")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportFailed(f"{out} already exists and is not empty; give a new OUT folder or delete it first")
    where = list(where)
    table = select(root, where, real, limit, per_class, seed)
    names = class_names(root)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        layout = WRITERS[fmt](root, table.copy(), tmp, names, shard_size)
        text = card.render(params, root, table, fmt, layout,
                           command or command_line(out, fmt, where, real, limit, per_class, seed, shard_size), shard_size)
        (tmp / "README.md").write_text(text)
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    counts = table["method"].eq("real").value_counts()
    return {"out": str(out), "format": fmt, "images": int(len(table)), "real": int(counts.get(True, 0)),
            "synthetic": int(counts.get(False, 0))}


def push_to_hub(out: str | Path, repo: str) -> None:
    """Upload an ``hf`` export's card and parquet files to the dataset repo `repo` (needs network and a token)."""
    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    if flag not in ("", "0", "false", "no", "off"):
        raise ExportFailed(f"--push-to-hub {repo}: HF_HUB_OFFLINE is set, so nothing was uploaded; the export is "
                           f"complete in {out}. Unset HF_HUB_OFFLINE and log in (`hf auth login`) to push it.")
    try:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(repo, repo_type="dataset", exist_ok=True)
        api.upload_folder(folder_path=str(out), repo_id=repo, repo_type="dataset",
                          allow_patterns=["README.md", "data/*.parquet"])
    except Exception as err:  # network, auth, permissions: all end the same way
        raise ExportFailed(f"--push-to-hub {repo}: the upload failed ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}); the export is complete in {out}") from None


def run(args, params) -> dict:
    """``thinair export``: the export, then the optional push."""
    if args.push_to_hub and args.format != "hf":
        raise ValueError("--push-to-hub needs --format hf")
    for flag in ("limit", "per_class"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    summary = export(params, args.out, args.format, args.root, args.where, args.real, args.limit, args.per_class,
                     args.seed, args.shard_size)
    if args.push_to_hub:
        push_to_hub(args.out, args.push_to_hub)
    return summary
