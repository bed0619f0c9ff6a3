"""`report`: one self-contained HTML page (opens offline) with real-vs-synthetic grids and metric tables.

Reads ``data/ingest``, ``data/sample``, ``data/invert/losses.json``, ``data/metrics/metrics.json``,
``data/cas/`` (cas.json, scaling CSVs, scaling.png) and, when present, ``benchmarks/steps_sweep.json``
(the sampler steps-vs-quality sweep, see benchmarks/steps_sweep.py). Writes ``data/report/index.html``
(images inlined as base64 PNG) and ``data/report/grid.png`` (per class: real images left, synthetic right).
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from thinair import io, paths
from thinair.config import Params
from thinair.images import png_bytes, tile
from thinair.upstream import inputs_digest, read_split, read_synthetic, require

STAGE = "report"
SWEEP = Path("benchmarks") / "steps_sweep.json"
METHODS = Path("benchmarks") / "methods.json"
METRIC_KEYS = ("fid", "kid", "precision", "recall", "density", "coverage")

PAPER_CAS = {  # ResNet-18 test accuracy (%), "Training on Thin Air" Table: real / DI only / real + DI
    "cifar10": (95.1, 94.6, 95.2), "cifar100": (77.9, 74.4, 78.0), "stl10": (83.3, 89.0, 90.0),
    "imagenette": (93.8, 95.4, 95.0), "pathmnist": (89.6, 82.1, 92.1), "dermamnist": (67.5, 67.5, 66.3),
    "bloodmnist": (96.4, 93.7, 95.7)}


def class_grid(real, real_y, syn, syn_y, n_classes: int, per_class: int, upscale: int, seed: int) -> np.ndarray:
    """One row pair per class: `per_class` real images, a gap, `per_class` synthetic ones."""
    rng = np.random.default_rng(seed)
    rows = []
    for k in range(n_classes):
        picks = []
        for x, y in ((real, real_y), (syn, syn_y)):
            idx = np.flatnonzero(y == k)
            idx = rng.choice(idx, min(per_class, len(idx)), replace=False) if len(idx) else idx
            sel = x[idx]
            if len(sel) < per_class:
                sel = np.concatenate([sel, np.full((per_class - len(sel),) + x.shape[1:], 255, np.uint8)])
            picks.append(sel)
        gap = np.full((1,) + real.shape[1:], 255, np.uint8)
        rows.append(np.concatenate([picks[0], gap, picks[1]]))
    return tile(np.concatenate(rows), 2 * per_class + 1, upscale)


def class_label(index: int, name: str) -> str:
    """How a class is named on the page: "index: name", or just the name when it is its index ("3" for digits)."""
    return str(name) if str(name) == str(index) else f"{index}: {name}"


def class_legend(class_names: list[str]) -> str:
    """The grid's legend, one item per row pair, top to bottom (HTML)."""
    items = "".join(f"<li>{html.escape(class_label(k, n))}</li>" for k, n in enumerate(class_names))
    return f'<ul class="legend">{items}</ul>'


def _table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


MODE_INDEX = {"real": 0, "synthetic": 1, "real+synthetic": 2}


def sweep_section(path: Path) -> str:
    """The sampler steps-vs-quality sweep as an HTML table ("" when the sweep was not run)."""
    if not path.is_file():
        return ""
    sweep = io.read_json(path)
    rows = [[r["scheduler"], r["steps"], r["images_per_s"], r["speedup"], 100 * r["cas"]["mean"],
             100 * r["cas"]["std"], r["fid"], r["precision"], r["recall"], r["coverage"]] for r in sweep["rows"]]
    return ("<h2>Sampler steps vs quality</h2>" + _table(
        ["sampler", "steps", "images/s", "speed-up", "CAS (%)", "± std", "FID", "precision", "recall", "coverage"],
        rows) + f"<p>{html.escape(sweep['note'])}</p>")


def methods_section(path: Path) -> str:
    """The steering methods side by side (benchmarks/methods.py) as an HTML table ("" when not run)."""
    if not path.is_file():
        return ""
    data = io.read_json(path)
    names = {"real": "real data", "inversion": "Diffusion Inversion", "class_encoder": "class encoder (seed 002)",
             "class_tokens": "class tokens (prompt baseline)"}
    rows = [[names.get(r["method"], r["method"]), r["images"], 100 * r["cas"]["mean"], 100 * r["cas"]["std"],
             r["fid"], r["kid"], r["precision"], r["recall"], r["density"], r["coverage"]] for r in data["rows"]]
    return ("<h2>Steering methods side by side</h2>" + _table(
        ["method", "images", "CAS (%)", "± std", "FID", "KID", "precision", "recall", "density", "coverage"], rows)
        + f"<p>{html.escape(data['note'])}</p>")


# The synthetic set is flagged when its recall or coverage falls below this share of the real floor (real test vs
# real train). The embedded default keeps about half its floor's recall (0.45 vs 0.95); a generator of another
# domain keeps almost none (recall 0.0, coverage 0.03 on an image folder of photographs).
FLOOR_SHARE = 0.25


def warnings(root: str | Path, metrics: dict) -> list[str]:
    """What the page must say first: a failed generator-fit check, a synthetic set far below the real floor."""
    out = []
    fit_file = paths.stage_dir("encode", root) / "fit.json"
    if fit_file.is_file():
        fit = io.read_json(fit_file)
        if not fit["ok"]:
            out.append("Generator-fit check failed: " + fit["message"])
        elif fit.get("conclusive") is False:
            out.append("Generator-fit check " + fit["message"])
    syn, floor = metrics["synthetic_vs_train"], metrics["test_vs_train"]
    for k in ("recall", "coverage"):
        if floor.get(k) and syn.get(k) is not None and syn[k] < FLOOR_SHARE * floor[k]:
            out.append(f"The synthetic set's {k} is {syn[k]:.2f}, below {FLOOR_SHARE} x the real floor "
                       f"({floor[k]:.2f}, real test vs real train): it misses most of the real data. Check the "
                       "generator-fit figures in data/encode/fit.json before trusting the CAS below.")
    return out


def report(params: Params, root: str | Path = ".") -> Path:
    b, p = params.base, params.report
    train = read_split("train", root)
    syn = read_synthetic(root)
    syn_x, syn_y = syn.images, syn.labels
    m = io.read_json(require(paths.stage_dir("metrics", root) / "metrics.json", "metrics"))
    cas = io.read_json(require(paths.stage_dir("cas", root) / "cas.json", "cas"))
    losses = io.read_json(require(paths.stage_dir("invert", root) / "losses.json", "invert"))
    sample_manifest = io.read_json(paths.stage_dir("sample", root) / io.MANIFEST)
    sp = sample_manifest["params"]
    grid = class_grid(train.images, train.labels, syn_x, syn_y, len(train.class_names), p.images_per_class,
                      p.upscale, b.seed)
    out = paths.stage_dir(STAGE, root)
    grid_png = png_bytes(grid)
    io.write_bytes(out / "grid.png", grid_png)
    metric_rows = [[name] + [m[name].get(k, "") for k in METRIC_KEYS]
                   for name in ("synthetic_vs_train", "test_vs_train")]
    per_class = m.get("per_class", {})
    class_rows = [[class_label(int(k), train.class_names[int(k)])]
                  + [v.get(key, "") if isinstance(v, dict) else "" for key in METRIC_KEYS] for k, v in per_class.items()]
    paper = PAPER_CAS.get(b.dataset)
    cas_rows = []
    for mode, acc in cas["accuracy"].items():
        label = f"{mode} (best: {acc['mode'].partition('@')[2]}, chosen on {acc['chosen_on']})" if "mode" in acc else mode
        row = [label, f"{100 * acc['mean']:.2f} ± {100 * acc['std']:.2f}", acc["n"]]
        if "reconstructed_accuracy" in cas:
            r = cas["reconstructed_accuracy"][mode]
            row.append(f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f}")
        cas_rows.append(row + ([paper[MODE_INDEX[mode]] if mode in MODE_INDEX else ""] if paper else []))
    cas_header = ["trained on", "accuracy (%)", "seeds"] + (["on VAE-reconstructed test (%)"]
                                                             if "reconstructed_accuracy" in cas else [])
    cas_header += ["paper, ResNet-18 (%)"] if paper else []
    scaling_png = paths.stage_dir("cas", root) / "scaling.png"
    scaling_img = base64.b64encode(scaling_png.read_bytes()).decode() if scaling_png.is_file() else ""
    sweep_html = methods_section(Path(root) / METHODS) + sweep_section(Path(root) / SWEEP)
    loss_rows = [[f, v["first"], v["last"]] for f, v in losses["chunks"].items()]
    img = base64.b64encode(grid_png).decode()
    banner = "".join(f'<p class="warn"><strong>Warning.</strong> {html.escape(w)}</p>\n' for w in warnings(root, m))
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>thinair report: {html.escape(b.dataset)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}
th{{background:#f3f3f3}}td:first-child{{text-align:left}}img{{image-rendering:pixelated;max-width:100%}}
.legend{{columns:5;list-style:none;padding:0}}
.warn{{background:#fff3cd;border:1px solid #e0b000;padding:8px 12px}}</style></head><body>
{banner}<h1>thinair report — Diffusion Inversion on <code>{html.escape(b.dataset)}</code></h1>
<p>Generator <code>{html.escape(b.generator)}</code>; {len(train.labels)} real train images inverted,
{sample_manifest['total']} synthetic images ({sample_manifest['variants_per_embedding']} per embedding;
sampler {html.escape(sp['scheduler'])}, {sp['steps']} steps, guidance {sp['guidance_scales']}, checkpoints
{sp['checkpoints']}, noise &lambda;={sp['noise']}, interpolation &alpha;={sp['interpolation']}).</p>
<h2>Real (left) vs synthetic (right), one row per class</h2>
{class_legend(train.class_names)}
<img alt="real vs synthetic grid" src="data:image/png;base64,{img}">
<h2>Classification accuracy score (real test split, %, mean ± std over seeds)</h2>
{_table(cas_header, cas_rows)}
<p>Classifier: {html.escape(cas['model'])}; {cas['test_images']} real test images.</p>
{f'<h2>Scaling studies (synthetic-only CAS)</h2><img alt="CAS scaling" src="data:image/png;base64,{scaling_img}">'
 if scaling_img else ""}
<h2>Distribution metrics ({html.escape(m['features']['kind'])} features, {m['features']['dim']}-d)</h2>
{_table(["compared", "FID", "KID", "precision", "recall", "density", "coverage"], metric_rows)}
<p><em>test_vs_train</em> is the floor: real held-out images against the real train set.</p>
{("<h3>Per class: synthetic vs real train</h3>" + _table(["class", "FID", "KID", "precision", "recall", "density",
                                                          "coverage"], class_rows)) if class_rows else ""}
{sweep_html}
<h2>Inversion loss (mean of first / last {losses['window']} steps)</h2>
{_table(["chunk", "first", "last"], loss_rows)}
</body></html>
"""
    io.write_bytes(out / "index.html", page.encode())
    return out / "index.html"


USES_DEVICE = False
RETRIES = (1, 5)


def units(params: Params, root: str | Path = ".") -> list[dict]:
    """One unit: the page."""
    return [{"name": "page"}]


def key(params: Params, unit: dict, root: str | Path = ".") -> list:
    """Every param and every input the report shows."""
    extras = [Path(root) / f for f in (SWEEP, METHODS)]
    return [params.model_dump(mode="json"), inputs_digest(root, "ingest", "invert", "sample", "metrics", "cas"),
            [io.file_sha256(f) if f.is_file() else None for f in extras]]


def compute(params: Params, unit: dict, out: Path, root: str | Path = ".", device=None) -> str:
    return str(report(params, root))


def finish(params: Params, records: list[dict], root: str | Path = ".") -> Path:
    return Path(records[0]["result"])
