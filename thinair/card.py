"""The dataset card (``README.md``) of an export, in the Hugging Face dataset-card layout.

YAML front matter (license, task_categories, size_categories, tags; for ``hf`` also the ``configs`` that point
``load_dataset`` at the parquet files), then: summary, how to load, source dataset and split, generator (hub
id@revision or the local directory's content hash) and its licence, method and its parameters, counts per class,
quality (FID/KID/PRDC against their real floor, CAS against training on real images), the generator-fit check,
provenance columns and how to reproduce (``dvc repro`` at the git revision). Reads ``data/ingest/manifest.json``,
``data/sample/manifest.json``, and when present ``data/encode/manifest.json``, ``data/encode/fit.json``,
``data/metrics/metrics.json``, ``data/cas/cas.json``; runs ``git rev-parse HEAD`` in the project root. Writes
nothing (thinair/formats.py writes the text).
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pandas as pd
import yaml

from thinair import io, paths

SD_V1 = re.compile(r"^(CompVis/stable-diffusion-v-?1-\d|runwayml/stable-diffusion-v1-5|"
                   r"stable-diffusion-v1-5/stable-diffusion-v1-5)", re.I)
OPENRAIL = "https://huggingface.co/spaces/CompVis/stable-diffusion-license"
METHODS = {"inversion": "Diffusion Inversion (Zhou, Sahak & Ba 2023): one embedding learned per real train image "
                        "against the frozen UNet, sampled perturbed (noise, same-class interpolation, guidance)",
           "class_encoder": "a class encoder trained against the frozen UNet (classenc stage)",
           "class_tokens": "the generator's own class tokens (prompt baseline)",
           "prompts": "text prompts of each image's class through the generator's text encoder"}
METRIC_KEYS = ("fid", "kid", "precision", "recall", "density", "coverage")


def size_category(n: int) -> str:
    """The Hub's size_categories bucket of `n` rows."""
    for bound, label in ((10**3, "n<1K"), (10**4, "1K<n<10K"), (10**5, "10K<n<100K"), (10**6, "100K<n<1M"),
                         (10**7, "1M<n<10M"), (10**8, "10M<n<100M"), (10**9, "100M<n<1B")):
        if n < bound:
            return label
    return "n>1B"


def licence(generator: str) -> tuple[str, str]:
    """(Hub licence id, note) for images made by `generator` (base.generator)."""
    if SD_V1.match(generator):
        return "creativeml-openrail-m", (
            f"The generator, {generator}, is licensed under the CreativeML OpenRAIL-M licence ({OPENRAIL}). Its "
            "licensor claims no rights in generated output, but you are accountable for the output and its use, "
            "and no use of the output may contravene the licence (its use-based restrictions, Attachment A).")
    if Path(generator).expanduser().is_dir() or generator.startswith((".", "/", "~")) or generator.count("/") != 1:
        return "other", (f"The generator is a local directory ({generator}): see its directory for its licence and "
                         "the data it was trained on.")
    return "other", f"See the model card of the generator, https://huggingface.co/{generator}, for its licence."


def git_revision(root: str | Path) -> str | None:
    """``git rev-parse HEAD`` of the project (plus a shell comment when the tree has uncommitted changes), or None."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=30)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    if rev.returncode:
        return None
    note = "  # the tree had uncommitted changes at export time" if dirty.returncode == 0 and dirty.stdout.strip() else ""
    return rev.stdout.strip() + note


def _read(path: Path) -> dict | None:
    return io.read_json(path) if path.is_file() else None


def _cell(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(_cell(v) for v in r) + " |" for r in rows])


def _load(fmt: str, table: pd.DataFrame, shard_size: int) -> str:
    if fmt == "imagefolder":
        return ('```python\nfrom torchvision.datasets import ImageFolder\nds = ImageFolder("path/to/this/folder")'
                '  # classes = sorted folder names: use ds.classes to name them\n```')
    if fmt == "hf":
        return ('```python\nimport datasets\nds = datasets.load_from_disk("path/to/this/folder/arrow")\n'
                'ds = datasets.load_dataset("parquet", data_files="path/to/this/folder/data/*.parquet", '
                'split="train")\n```')
    last = (len(table) - 1) // shard_size
    return ('```python\nimport webdataset as wds\nds = wds.WebDataset("path/to/this/folder/shard-{000000..'
            f'{last:06d}}}.tar").decode("pil").to_tuple("png", "cls", "json")\n```')


def quality(root: str | Path) -> str:
    """FID/KID/PRDC with the real floor, CAS with the real-trained baseline (what is present)."""
    m = _read(paths.stage_dir("metrics", root) / "metrics.json")
    cas = _read(paths.stage_dir("cas", root) / "cas.json")
    out = []
    if m:
        rows = [[label] + [m[name].get(k, "") for k in METRIC_KEYS] for name, label in (
            ("synthetic_vs_train", "synthetic vs real train"), ("test_vs_train", "floor: real test vs real train"))]
        out.append(f"Distribution metrics ({m['features']['kind']} features, {m['features']['dim']}-d; lower FID/KID "
                   "and higher precision/recall/density/coverage are better). The floor is what held-out real images "
                   "score against the real train set:\n\n" + _table(["compared", "FID", "KID", "precision", "recall",
                                                                     "density", "coverage"], rows))
    else:
        out.append("No data/metrics/metrics.json: run `dvc repro metrics` for FID/KID/PRDC.")
    if cas:
        recon = "reconstructed_accuracy" in cas
        rows = [[mode, f"{100 * a['mean']:.2f} ± {100 * a['std']:.2f}", a["n"]]
                + ([f"{100 * cas['reconstructed_accuracy'][mode]['mean']:.2f}"] if recon else [])
                for mode, a in cas["accuracy"].items()]
        out.append(f"Classification accuracy score (CAS): a {cas['model']} trained on each set, tested on the "
                   f"{cas['test_images']} real test images (%, mean ± std over seeds). Its floor is the row trained "
                   "on real images:\n\n" + _table(["trained on", "accuracy (%)", "seeds"]
                                                 + (["on VAE-reconstructed test (%)"] if recon else []), rows))
    else:
        out.append("No data/cas/cas.json: run `dvc repro cas` for the classification accuracy score.")
    return "\n\n".join(out)


def fit_section(root: str | Path) -> str:
    fit = _read(paths.stage_dir("encode", root) / "fit.json")
    if not fit:
        return "Not run (no data/encode/fit.json; `encode.fit_check: off`, or encode not run)."
    verdict = "passed" if fit["ok"] else "**FAILED**"
    text = (f"{verdict}: a classifier trained on the real train images labels {100 * fit['accuracy_originals']:.1f} % "
            f"of {fit['images']} real test images right, and {100 * fit['accuracy_reconstructions']:.1f} % of the "
            f"same images after the generator's autoencoder (ratio {fit['ratio']:.2f}, threshold {fit['min_ratio']}; "
            f"PSNR {fit['psnr_db']:.1f} dB).")
    return text + (f"\n\n{fit['message']}" if fit.get("message") else "")


def render(params, root: str | Path, table: pd.DataFrame, fmt: str, layout: str, command: str,
           shard_size: int = 10000) -> str:
    """The card's markdown text for an export of `table` (rows of thinair/data.py) in `fmt`."""
    ingest = io.read_json(paths.stage_dir("ingest", root) / io.MANIFEST)
    sample = io.read_json(paths.stage_dir("sample", root) / io.MANIFEST)
    encode = _read(paths.stage_dir("encode", root) / io.MANIFEST) or {}
    b, names = params.base, ingest["class_names"]
    lic, lic_note = licence(b.generator)
    n_real = int((table["method"] == "real").sum())
    n_syn = len(table) - n_real
    meta = {"license": lic} | ({"license_name": "see-generator-and-source-dataset"} if lic == "other" else {})
    meta |= {"task_categories": ["image-classification"], "size_categories": [size_category(len(table))],
             "tags": ["synthetic", "diffusion-inversion", "thinair"],
             "pretty_name": f"thinair synthetic {ingest['dataset']}"}
    if fmt == "hf":
        meta["configs"] = [{"config_name": "default", "data_files": [{"split": "train", "path": "data/train-*"}]}]
    from thinair.generator import generator_identity  # (imports torch: only when a card is written)

    identity = encode.get("generator") or generator_identity(b)
    now = generator_identity(b)
    moved = (f" (params.yaml now names a generator whose identity is {now}: re-run the pipeline before trusting "
             "this card's reproduction recipe)") if encode.get("generator") and now != identity else ""
    counts = table.groupby(["label", "method"]).size().unstack(fill_value=0)
    same = all(str(n) == str(k) for k, n in enumerate(names))  # digits: the name is the label, show it once
    count_rows = [([k] if same else [k, names[k]])
                  + [int(counts.loc[k].drop("real", errors="ignore").sum()) if k in counts.index else 0]
                  + ([int(counts.loc[k].get("real", 0)) if k in counts.index else 0] if n_real else [])
                  for k in range(len(names))]
    count_header = (["class"] if same else ["label", "class"]) + ["synthetic"] + (["real"] if n_real else [])
    sp = sample["params"]
    h, w, c = ingest["image_shape"]
    rev = git_revision(root)
    colour = {1: "grey", 3: "RGB", 4: "RGBA"}.get(c, f"{c}-channel")
    scope = ", not on this export's selection" if n_real or n_syn != sample["total"] else ""
    return f"""---
{yaml.safe_dump(meta, sort_keys=False).strip()}
---

# thinair synthetic {ingest['dataset']}

## Dataset summary

{len(table)} images ({n_syn} synthetic, {n_real} real) of {len(names)} classes, {w}x{h} px {colour}, made by
thinair from the real **{ingest['dataset']}** train split with a latent diffusion generator.
Format: `{fmt}`: {layout}. Exported with:

```bash
{command}
```

## How to load

{_load(fmt, table, shard_size)}

## Source dataset

`{ingest['dataset']}` (thinair `base.dataset`): train split {ingest['splits']['train']['count']} images (the
images the synthetic set was made from), test split {ingest['splits']['test']['count']} images (used only to measure:
the metrics floor and CAS).{' Real images in this export are the train split (`method: real`).' if n_real else ''}
The real images, and what is derived from them, stay under the source dataset's own licence.

## Generator

`{b.generator}`{f" at revision `{b.revision}`" if b.revision else ""}; identity `{identity}` (a hub id@revision, or the
content hash of a local directory's weights and configs){moved}.

Licence: {lic_note}

## Method and parameters

Method `{sp.get('method', 'inversion')}`: {METHODS.get(sp.get('method', 'inversion'), '')}. The `sample` parameters
(`data/sample/manifest.json`), base seed {b.seed}, generated at {b.gen_resolution} px:

```yaml
{yaml.safe_dump(sp, sort_keys=True).strip()}
```

## Counts per class

{_table(count_header, count_rows)}

## Quality

Measured by the pipeline on all {sample['total']} images of `data/sample`{scope}.

{quality(root)}

## Generator-fit check

{fit_section(root)}

## Provenance

Every image has a provenance row (`provenance.csv` beside an image folder, with its `path`; the columns of the
Hugging Face dataset; `<key>.json` in WebDataset shards): `key`, `stage` and `file` /
`row` (the shard it came from, under `data/<stage>/`), `label`, `class_name`, `method`, `source_index` (the real
train image whose embedding it came from), `partner_index` (its interpolation partner, -1 none), `alpha`, `lambda`,
`guidance`, `guidance_interval` (the noise levels guided; `all` = every step), `checkpoint` (-1 = final), `uncond`,
`scheduler`, `steps`, `seed` (its exact noise), and `prompt` / `clip_score` for method prompts. Real images have no value in the generation columns.

## How to reproduce

```bash
git checkout {rev or '<the revision: this project was not a git checkout at export time>'}
dvc repro      # or `dvc pull` when the outputs were pushed to the DVC remote
{command}
```
"""
