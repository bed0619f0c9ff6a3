"""`export` (optional): the synthetic dataset as files other tools load, versioned by DVC like every stage output.

Off by default: with ``export.format: null`` the stage writes only ``data/export/manifest.json`` saying so, and
`thinair export` does that without starting Prefect (thinair/skips.py, as
`search` does with ``search.trials: 0``). With a format it writes ``data/export/`` exactly as ``thinair export``
writes an export with the same options (thinair/formats.py: ``export.where``, ``real``, ``limit``, ``per_class``,
``seed`` and ``shard_size`` are its ``--where`` ... ``--shard-size``), dataset card (``README.md``) included, then
``manifest.json`` (last: what was exported, and the options). The export is made in ``.thinair/work/export`` and
swapped in when complete, so a failed run keeps the last good export.

Reads ``data/ingest``, ``data/sample`` and what the card reads (``data/encode/manifest.json`` and ``fit.json``,
``data/metrics/metrics.json``, ``data/cas/cas.json``). Writes ``data/export``.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from thinair import formats, io, paths, skips
from thinair.config import Export, Params
from thinair.generator import generator_identity
from thinair.upstream import inputs_digest

STAGE = "export"
USES_DEVICE = False
RETRIES = (1, 5)
CARD_INPUTS = (("encode", "manifest.json"), ("encode", "fit.json"), ("metrics", "metrics.json"), ("cas", "cas.json"))


def command(e: Export) -> str:
    """What the card says made the export: this stage, and the ``thinair export`` command that writes the same."""
    same = formats.command_line("OUT", e.format, e.where, e.real, e.limit, e.per_class, e.seed, e.shard_size)
    return f"dvc repro export  # the export stage (params.yaml export:); the same files as: {same}"


def write(params: Params, out: Path, root: str | Path = ".") -> dict:
    """The export of ``params.export`` written to `out` (a new folder); returns formats.export's summary. A selection
    error names the param to fix (export.where, not --where)."""
    e = params.export
    try:
        return formats.export(params, out, e.format, root, e.where, e.real, e.limit, e.per_class, e.seed, e.shard_size,
                              command(e))
    except ValueError as err:  # a column the provenance lacks, a filter that keeps no image
        if "--where" not in str(err):
            raise
        raise ValueError(f"{str(err).replace('--where', 'export.where')}; fix export.where in params.yaml (or "
                         "-S export.where=...)") from None


def replace_dir(new: Path, out: Path) -> None:
    """Put the complete folder `new` where `out` is (two renames; the old folder is deleted after)."""
    old = new.with_name(new.name + ".old")
    if out.exists():
        os.replace(out, old)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def export(params: Params, root: str | Path = ".") -> dict:
    """Write data/export (or, while export.format is null, only a manifest saying the stage is off); return the
    manifest."""
    e, work = params.export, paths.work_dir(STAGE, root)
    shutil.rmtree(work, ignore_errors=True)  # what a killed run left
    if (manifest := skips.write_if_skipped(STAGE, params, root)) is not None:
        return manifest
    work.mkdir(parents=True)
    new = work / "next"
    summary = write(params, new, root)
    manifest = {"ran": True, "format": e.format, "images": summary["images"], "synthetic": summary["synthetic"],
                "real": summary["real"], "options": e.model_dump(mode="json"), "command": command(e)}
    io.write_json(new / io.MANIFEST, manifest)
    replace_dir(new, paths.stage_dir(STAGE, root))
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def units(params: Params, root: str | Path = ".") -> list[dict]:
    """One unit: the whole export."""
    return [{"name": "all"}]


def key(params: Params, unit: dict, root: str | Path = ".") -> list:
    """The options, and (when on) the images, the generator and the files the card quotes."""
    e, b = params.export, params.base
    if e.format is None:
        return [None]
    cards = [paths.stage_dir(stage, root) / name for stage, name in CARD_INPUTS]
    return [e.model_dump(mode="json"), b.generator, generator_identity(b), b.seed, b.gen_resolution,
            inputs_digest(root, "ingest", "sample"), [io.file_sha256(f) if f.is_file() else None for f in cards]]


def compute(params: Params, unit: dict, out: Path, root: str | Path = ".", device=None) -> dict:
    return export(params, root)


def finish(params: Params, records: list[dict], root: str | Path = ".") -> dict:
    return records[0]["result"]
