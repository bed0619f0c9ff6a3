"""Stages with nothing to compute under the current params, and what they write then: their manifest alone.

`classenc` trains only for ``sample.method: class_encoder``; `search` searches only when ``search.trials > 0``;
`export` exports only when ``export.format`` is set.
Otherwise the stage writes ``data/<stage>/manifest.json`` saying why (and removes what an earlier run left there).
The stage code (tasks/classenc.py, tasks/search.py, tasks/export.py) and `thinair <stage>` both call
:func:`write_if_skipped`; the command does so before it starts Prefect or loads a model, so a skipped stage of
``dvc repro`` costs about a second.
Imports no torch, on purpose. Writes ``data/<stage>/`` only.
"""
from __future__ import annotations

from pathlib import Path

from thinair import io, paths
from thinair.config import Params
from thinair.units import clean_dir


def skipped(stage: str, params: Params) -> dict | None:
    """The manifest of `stage` when it has nothing to do under `params`; None when it must run."""
    if stage == "classenc" and params.sample.method != "class_encoder":
        return {"trained": False, "reason": f"sample.method is {params.sample.method!r}, not 'class_encoder'"}
    if stage == "search" and params.search.trials == 0:
        return {"ran": False, "why": "search.trials is 0; run `dvc exp run -S search.trials=20` to search"}
    if stage == "export" and params.export.format is None:
        return {"ran": False, "why": "export.format is null; run `dvc exp run -S export.format=imagefolder` "
                                     "(or hf, webdataset) to export"}
    return None


def write_if_skipped(stage: str, params: Params, root: str | Path = ".") -> dict | None:
    """If `stage` has nothing to do, leave only its manifest in ``data/<stage>`` and return it; else None."""
    manifest = skipped(stage, params)
    if manifest is not None:
        out = paths.stage_dir(stage, root)
        out.mkdir(parents=True, exist_ok=True)
        clean_dir(out, {io.MANIFEST})
        io.write_json(out / io.MANIFEST, manifest)
    return manifest
