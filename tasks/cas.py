"""`cas`: Classification Accuracy Score — train on real, synthetic, or real+synthetic; test on real test.

Protocol (paper): SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 128, warm-up + cosine, random
crop with padding (+ flip where the domain allows), optional extra augmentations (``cas.augment``).
real+synthetic mixes each batch at ``cas.real_fraction``, or once per ratio of ``cas.real_fractions`` (modes
``real+synthetic@R:S``; ``real+synthetic`` then reports the best ratio, chosen on the test split as the paper's
Table 7 does, and flagged ``chosen_on: test``). Every mode is trained ``cas.seeds`` times (different seeds) and
reported as mean +- std. Scaling studies: synthetic-only CAS against the number of variants per embedding
(``cas.scale_synthetic``; the first n variants of every embedding, sample by sample across all checkpoint x guidance
settings: thinair/upstream.py ``variant_rank``) and against the share of real train images whose embeddings are used
(``cas.scale_real``, with real-only on the same images beside it).

Reads ``data/ingest``, ``data/sample`` (and the generator when ``cas.reconstructed_test``). Writes
``data/cas/cas.json`` (the DVC metric: accuracy mean/std per mode), ``data/cas/details.json`` (every
run: seed, per-class accuracy, train size), ``data/cas/scaling_synthetic.csv`` and
``data/cas/scaling_real.csv`` (DVC plots) and ``data/cas/scaling.png``. Each finished training is
cached by content in ``.thinair/cache/cas``; a training in progress checkpoints every epoch to
``.thinair/work/cas`` and resumes from there after a kill.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from thinair import io, paths
from thinair.config import Params, real_ratio
from thinair.devices import current_device
from thinair.diffusion import reconstruct
from thinair.generator import generator_for, generator_identity, runtime_key
from thinair.draws import stream
from thinair.training import train_and_test, training_parts
from thinair.units import Checkpoint, cached, code_key, content_key
from thinair.upstream import LabelledImages, Synthetic, memoized, read_split, read_synthetic, variant_rank

STAGE = "cas"
RETRIES = (1, 5)


def first_variants(syn: Synthetic, n: int) -> np.ndarray:
    """Rows of the first `n` variants of every embedding in :func:`variant_rank`'s order (all settings first)."""
    return np.flatnonzero(variant_rank(syn) < n)


def real_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded, class-stratified subset of train rows (at least one per class)."""
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(np.flatnonzero(labels == k))[:max(1, round(fraction * (labels == k).sum()))]
            for k in np.unique(labels)]
    return np.sort(np.concatenate(rows))


def reconstructed(params: Params, test: LabelledImages) -> LabelledImages:
    """The test images after a round trip through the generator's VAE (encode mean -> decode)."""
    b = params.base
    gen_model, device = generator_for(b, device=current_device(b))
    images = reconstruct(gen_model.vae, test.images, b.gen_resolution, params.encode.interpolation,
                         params.encode.batch_size, device)
    return LabelledImages(images, test.labels, test.class_names)


MIXED = "real+synthetic"


def trained_modes(params: Params) -> list[str]:
    """The modes trained: ``cas.modes``, with real+synthetic as ``real+synthetic@R:S`` per ``cas.real_fractions``."""
    p, out = params.cas, []
    for m in p.modes:
        out += [f"{m}@{real_ratio(f)}" for f in p.real_fractions] if m == MIXED and p.real_fractions else [m]
    return out


def real_share(params: Params, mode: str) -> float:
    """The share of real images per batch of a real+synthetic mode (``cas.real_fraction`` without a ratio)."""
    ratio = mode.partition("@")[2]
    return next(f for f in params.cas.real_fractions if real_ratio(f) == ratio) if ratio else params.cas.real_fraction


def run_seeds(params: Params, mode: str) -> list[int]:
    """The mode's training seeds (every real+synthetic ratio gets real+synthetic's: paired comparisons)."""
    return [io.seed_for(params.base.seed, STAGE, mode.partition("@")[0], i) for i in range(params.cas.seeds)]


def mode_sources(params: Params, mode: str, real: LabelledImages, syn: Synthetic | None, seed: int = 0,
                 root: str | Path = ".") -> list:
    """[(images, labels, batch share)] of a mode; with cas.synthetic on_the_fly the synthetic images are a stream
    of fresh variants seeded by the training's `seed` (thinair/draws.py ``stream``) in place of data/sample's."""
    share = real_share(params, mode) if mode.startswith(MIXED) else 1.0

    def synthetic(s: float) -> tuple:
        if params.cas.synthetic == "on_the_fly":
            return stream(params, seed, root, current_device(params.base)), None, s
        return syn.images, syn.labels, s

    return {"real": lambda: [(real.images, real.labels, 1.0)],
            "synthetic": lambda: [synthetic(1.0)],
            MIXED: lambda: [(real.images, real.labels, share), synthetic(1 - share)]}[mode.partition("@")[0]]()


def scaling_runs(params: Params, real: LabelledImages, syn: Synthetic) -> list[dict]:
    """The scaling studies' trainings: [{study, x, mode, images, rows, seed}], one seed each (the mode's first);
    `rows` index the synthetic set (mode synthetic) or the real train split (mode real)."""
    p, runs = params.cas, []
    max_variants = int(np.bincount(syn.source).max())
    for n in sorted({min(n, max_variants) for n in p.scale_synthetic}):
        rows = first_variants(syn, n)
        runs.append({"study": "synthetic", "x": n, "mode": "synthetic", "images": len(rows), "rows": rows})
    for f in sorted(set(p.scale_real)):
        keep = real_subset(real.labels, f, io.seed_for(params.base.seed, STAGE, "scale_real", f))
        inside = np.isin(syn.source, keep) & ((syn.partner < 0) | np.isin(syn.partner, keep))
        runs.append({"study": "real", "x": len(keep), "mode": "synthetic", "images": int(inside.sum()),
                     "rows": np.flatnonzero(inside)})
        runs.append({"study": "real", "x": len(keep), "mode": "real", "images": len(keep), "rows": keep})
    for r in runs:
        r["seed"] = run_seeds(params, r["mode"])[0]
    return [r for r in runs if r["images"] > 0]  # a tiny share may keep no image whose partner is kept too


def _inputs(root: str | Path, synthetic: bool) -> tuple[LabelledImages, LabelledImages, Synthetic | None]:
    """(train, test, synthetic or None), each read once per process for all of the stage's trainings."""
    train, test = memoized("cas-real", root, ("ingest",), lambda: (read_split("train", root), read_split("test", root)))
    return train, test, memoized("cas-synthetic", root, ("sample",), lambda: read_synthetic(root)) if synthetic else None


def units(params: Params, root: str | Path = ".") -> list[dict]:
    """One unit per training: every mode x seed, then the scaling studies' points (their full-size points are the
    same trainings as mode runs: same key, so the flow runs them after those and takes them from the cache)."""
    p = params.cas
    out = [{"name": f"{m.replace(':', 'to')}-seed{s}", "job": {"kind": "mode", "mode": m, "seed": s}}
           for m in trained_modes(params) for s in run_seeds(params, m)]
    if p.scale_synthetic or p.scale_real:
        real, _, syn = _inputs(root, True)
        for i, run in enumerate(scaling_runs(params, real, syn)):
            out.append({"name": f"scaling-{i}", "job": {"kind": "scaling", "index": i},
                        "run": {k: run[k] for k in ("study", "x", "mode", "images", "seed")}})
    return [u | {"file": "result.json", "publish": False} for u in out]


def _training(params: Params, unit: dict, root: str | Path) -> tuple[str, int, list, dict, int]:
    """(tag, seed, sources, tests, classes) of one unit's training."""
    job = unit["job"]
    real, test, syn = _inputs(root, job["kind"] == "scaling" or (job["mode"] != "real"
                                                                  and params.cas.synthetic == "pregenerated"))
    n_classes = len(real.class_names)
    # every training is tested on the same sets, so a scaling study's full-size point is its mode's first-seed run
    # (same key: trained once, the other one a cache hit)
    tests = {"test": test}
    if params.cas.reconstructed_test:
        tests["reconstructed"] = _reconstructed_cached(params, test, root)
    if job["kind"] == "mode":
        return job["mode"], job["seed"], mode_sources(params, job["mode"], real, syn, job["seed"], root), tests, \
            n_classes
    run = scaling_runs(params, real, syn)[job["index"]]
    data = syn if run["mode"] == "synthetic" else real
    sources = [(data.images[run["rows"]], data.labels[run["rows"]], 1.0)]  # only this run's images are copied
    return _scaling_tag(run), run["seed"], sources, tests, n_classes


def _scaling_tag(run: dict) -> str:
    return f"scale-{run['study']}-{run['x']}-{run['mode']}"


def key(params: Params, unit: dict, root: str | Path = ".") -> list:
    """The training's content: so a scaling point equal to a mode run is the same unit, trained once."""
    _, seed, sources, tests, _ = _training(params, unit, root)
    return training_parts(params, seed, sources, tests)


def cost(params: Params, unit: dict, root: str | Path = ".") -> float:
    """A training's relative cost, its training images (the flow starts the longest trainings first)."""
    _, _, sources, _, _ = _training(params, unit, root)
    try:
        return float(sum(len(images) for images, _, _ in sources))
    except TypeError:  # an on-the-fly stream has no length: as long as the real split
        return float(len(_inputs(root, False)[0].labels) * len(sources))


def compute(params: Params, unit: dict, out: Path, root: str | Path = ".", device=None) -> None:
    tag, seed, sources, tests, n_classes = _training(params, unit, root)
    train_and_test(params, tag, seed, sources, tests, n_classes, out, Checkpoint(STAGE, unit["key"], root))


def finish(params: Params, records: list[dict], root: str | Path = ".") -> dict:
    """Each training's result under this unit's tag (one cached training may serve two units), then the summary
    files."""
    runs = []
    for r in records:
        u = r["unit"]
        tag = u["job"]["mode"] if u["job"]["kind"] == "mode" else _scaling_tag(u["run"])
        result = io.read_json(Path(root) / r["file"]) | {"tag": tag}
        runs.append(u["job"] | u.get("run", {}) | {"result": result})
    return summarize(params, runs, root)


def _reconstructed_cached(params: Params, test: LabelledImages, root) -> LabelledImages:
    """The reconstructed test split (cached on the generator, the runtime settings and the images)."""
    b = params.base
    # the generator's identity without loading it: the flow computes every unit's key (and the workers their
    # trainings) without importing diffusers (~8 s of CPU a process here); only a cache miss loads the VAE
    key = content_key(STAGE, "reconstructed", code_key(__name__), generator_identity(b), runtime_key(b),
                      b.gen_resolution, params.encode.interpolation, test.images)
    f = cached(STAGE, key, "test.npz", lambda out: io.save_npz(out, images=reconstructed(params, test).images), root,
               "cas reconstructed test")
    return LabelledImages(io.load_npz(f)["images"], test.labels, test.class_names)


def _stats(values: list[float]) -> dict:
    a = np.asarray(values, np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a)}


def summarize(params: Params, records: list[dict], root: str | Path = ".") -> dict:
    """Write cas.json (metric), details.json, the scaling CSVs (DVC plots) and scaling.png."""
    import pandas as pd

    out = paths.stage_dir(STAGE, root)
    modes = [r for r in records if r["kind"] == "mode"]
    trained = trained_modes(params)
    acc = {m: _stats([r["result"]["test"]["accuracy"] for r in modes if r["mode"] == m]) for m in trained}
    metric = {"accuracy": acc, "model": params.cas.model, "seeds": params.cas.seeds,
              "test_images": int(len(read_split("test", root).labels))}
    if params.cas.reconstructed_test:
        metric["reconstructed_accuracy"] = {
            m: _stats([r["result"]["reconstructed"]["accuracy"] for r in modes if r["mode"] == m]) for m in trained}
    if params.cas.real_fractions and MIXED in params.cas.modes:
        add_best_ratio(params, metric)
    scale = pd.DataFrame([{"study": r["study"], "x": r["x"], "mode": r["mode"], "images": r["images"],
                           "accuracy": r["result"]["test"]["accuracy"]} for r in records if r["kind"] == "scaling"],
                         columns=["study", "x", "mode", "images", "accuracy"])
    syn_scale = scale[scale.study == "synthetic"].rename(columns={"x": "variants_per_embedding"})
    real_scale = pd.DataFrame({"real_images": sorted(set(scale.x[scale.study == "real"]))})
    for mode, col in (("synthetic", "synthetic_only"), ("real", "real_only")):
        sel = scale[(scale.study == "real") & (scale["mode"] == mode)]
        real_scale[col] = real_scale.real_images.map(dict(zip(sel.x, sel.accuracy)))
    for name, frame in (("scaling_synthetic.csv", syn_scale.drop(columns=["study", "mode"])),
                        ("scaling_real.csv", real_scale)):
        with io.atomic_path(out / name) as tmp:
            frame.to_csv(tmp, index=False)
    plot_scaling(syn_scale, real_scale, out / "scaling.png")
    io.write_json(out / "details.json", {"runs": [{k: v for k, v in r.items()} for r in records]})
    io.write_json(out / "cas.json", metric)
    return metric


def add_best_ratio(params: Params, metric: dict) -> None:
    """Report real+synthetic as its best ratio, chosen on the test split like the paper's Table 7 (so optimistic),
    flagged as such; every ratio stays listed as ``real+synthetic@R:S``."""
    ratios = [m for m in metric["accuracy"] if m.startswith(MIXED + "@")]
    best = max(ratios, key=lambda m: metric["accuracy"][m]["mean"])  # the first of equals, in cas.real_fractions order
    chosen = {"mode": best, "real_fraction": real_share(params, best), "chosen_on": "test"}
    for table in ("accuracy", "reconstructed_accuracy"):
        if table in metric:
            metric[table][MIXED] = metric[table][best] | chosen
    metric["real+synthetic_best"] = chosen | {"ratios": {m: real_share(params, m) for m in ratios}}


def plot_scaling(syn_scale, real_scale, path: Path) -> None:
    """The two scaling studies side by side as a PNG (offline: DVC's HTML plots need a CDN)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), dpi=100)
    ax = axes[0]
    if len(syn_scale):
        ax.plot(syn_scale.variants_per_embedding, 100 * syn_scale.accuracy, "o-", label="synthetic only")
    ax.set(xlabel="synthetic variants per embedding", ylabel="CAS (%)", title="More synthetic images")
    ax = axes[1]
    for col, label in (("synthetic_only", "synthetic only"), ("real_only", "real only")):
        if col in real_scale:
            ax.plot(real_scale.real_images, 100 * real_scale[col], "o-", label=label)
    ax.set(xlabel="real train images inverted (log scale)", ylabel="CAS (%)", title="More real images", xscale="log")
    if len(real_scale):
        ax.set_xticks(list(real_scale.real_images), [str(x) for x in real_scale.real_images])
        ax.minorticks_off()
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="lower right")
    fig.tight_layout()
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def tables(root: str | Path = ".") -> dict[str, tuple[str, list[dict]]]:
    """The stage's key tables (for Prefect artifacts and the report): CAS per mode, and the scaling studies."""
    import pandas as pd

    out = paths.stage_dir(STAGE, root)
    metric = io.read_json(out / "cas.json")
    rows = [{"mode": f"{m} (best: {a['mode']}, chosen on {a['chosen_on']})" if "mode" in a else m,
             "accuracy_mean_%": round(100 * a["mean"], 2), "accuracy_std_%": round(100 * a["std"], 2),
             "seeds": a["n"]} for m, a in metric["accuracy"].items()]
    result = {"cas": (f"CAS on {metric['test_images']} real test images ({metric['model']})", rows)}
    for name in ("scaling_synthetic", "scaling_real"):
        frame = pd.read_csv(out / f"{name}.csv")
        if len(frame):
            result["cas-" + name.replace("_", "-")] = (f"CAS scaling study: {name}", frame.round(4).to_dict("records"))
    return result
