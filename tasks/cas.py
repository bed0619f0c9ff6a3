"""`cas`: Classification Accuracy Score — train on real, synthetic, or real+synthetic; test on real test.

Protocol (paper): SGD lr 0.1, momentum 0.9, weight decay 5e-4, batch 128, warm-up + cosine, random
crop with padding (+ flip where the domain allows), optional extra augmentations (``cas.augment``).
real+synthetic mixes each batch at ``cas.real_fraction``. Every mode is trained ``cas.seeds`` times
(different seeds) and reported as mean +- std. Scaling studies: synthetic-only CAS against the number
of variants per embedding (``cas.scale_synthetic``) and against the share of real train images whose
embeddings are used (``cas.scale_real``, with real-only on the same images beside it).

Reads ``data/ingest``, ``data/sample`` (and the generator when ``cas.reconstructed_test``). Writes
``data/cas/cas.json`` (the DVC metric: accuracy mean/std per mode), ``data/cas/details.json`` (every
run: seed, per-class accuracy, train size), ``data/cas/scaling_synthetic.csv`` and
``data/cas/scaling_real.csv`` (DVC plots) and ``data/cas/scaling.png``. Each finished training is
cached by content in ``.thinair/cache/cas``; a training in progress checkpoints every epoch to
``.thinair/work/cas`` and resumes from there after a kill.
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np
import torch
from prefect import task

from thinair import classifier, io, paths
from thinair.config import Params
from thinair.caching import record
from thinair.devices import current_device, device_slot, set_threads
from thinair.generator import generator_identity, runtime_key
from thinair.orchestration import task_options
from thinair.stage import (ChunkCache, Split, Synthetic, content_key, inputs_digest, read_split, read_synthetic,
                           source_hash)

STAGE = "cas"
# The fields of `cas` that change a training's result (seeds/modes/scaling lists only choose which to run).
TRAIN_FIELDS = ("model", "width", "epochs", "batch_size", "optimizer", "lr", "momentum", "weight_decay",
                "warmup_epochs", "crop_padding", "flip", "augment")
log = logging.getLogger(__name__)
_TRAIN_LOCK = threading.Lock()  # trainings seed torch's global RNG: one at a time per process, so threads can't mix


def first_variants(syn: Synthetic, n: int) -> np.ndarray:
    """Rows of the first `n` variants of every embedding (sample writes them in variant-major order)."""
    order = np.argsort(syn.source, kind="stable")
    rank = np.empty(len(order), np.int64)
    starts = np.r_[0, np.flatnonzero(np.diff(syn.source[order])) + 1]
    sizes = np.diff(np.r_[starts, len(order)])
    rank[order] = np.arange(len(order)) - np.repeat(starts, sizes)
    return np.flatnonzero(rank < n)


def real_subset(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded, class-stratified subset of train rows (at least one per class)."""
    rng = np.random.default_rng(seed)
    rows = [rng.permutation(np.flatnonzero(labels == k))[:max(1, round(fraction * (labels == k).sum()))]
            for k in np.unique(labels)]
    return np.sort(np.concatenate(rows))


def train_run(params: Params, tag: str, seed: int, sources: list[tuple[np.ndarray, np.ndarray, float]],
              tests: dict[str, Split], n_classes: int, root: str | Path = ".") -> dict:
    """Train one classifier on `sources` [(uint8 images, labels, batch share)] and test it on each of `tests`.

    Cached by content (training fields, seed, every array); checkpointed every epoch so a kill resumes.
    """
    p = params.cas
    key = content_key(STAGE, source_hash(__name__), source_hash(classifier.__name__), source_hash("thinair.augment"),
                      {f: getattr(p, f) for f in TRAIN_FIELDS}, seed,
                      [(x, y, share) for x, y, share in sources], {k: (t.images, t.labels) for k, t in tests.items()})
    cache = ChunkCache(STAGE, root)
    hit = cache.get(key, "result.json")
    if hit is not None:
        log.info("cas %s seed %d: reused from cache %s (not retrained)", tag, seed, key)
        return io.read_json(hit) | {"tag": tag}  # the same training may serve several runs (e.g. scaling at 100 %)
    work = paths.work_dir(STAGE, root) / f"{key}.pt"
    resume = torch.load(work, weights_only=True) if work.is_file() else None  # our own checkpoint
    if resume is not None:
        log.info("cas %s seed %d: resuming after epoch %d", tag, seed, int(resume["epoch"]))

    def on_epoch(epoch, loss, state):
        log.info("cas %s seed %d: epoch %d/%d loss %.4f", tag, seed, epoch, p.epochs, loss)
        if epoch < p.epochs:
            with io.atomic_path(work) as tmp:
                torch.save(state, tmp)

    h, _, c = sources[0][0].shape[1:]
    with _TRAIN_LOCK:
        net = classifier.build(p.model, c, n_classes, h, seed, p.width)
        classifier.train(net, [(classifier.to_tensor(x), torch.from_numpy(y), share) for x, y, share in sources],
                         epochs=p.epochs, batch_size=p.batch_size, optimizer=p.optimizer, lr=p.lr,
                         momentum=p.momentum, weight_decay=p.weight_decay, warmup_epochs=p.warmup_epochs,
                         padding=p.crop_padding, flip=p.flip, augment=tuple(p.augment), seed=seed,
                         device=current_device(params.base), resume=resume, on_epoch=on_epoch)
    result = {"tag": tag, "seed": seed, "train_images": int(sum(len(x) for x, _, _ in sources))}
    for name, t in tests.items():
        pred = classifier.predict(net.cpu(), classifier.to_tensor(t.images)).numpy()
        result[name] = {"accuracy": float((pred == t.labels).mean()),
                        "per_class_accuracy": [float((pred[t.labels == k] == k).mean()) for k in range(n_classes)]}
    tmp = cache.dir / key / "result.json.part"
    io.write_json(tmp, result)
    cache.put(key, "result.json", tmp)
    work.unlink(missing_ok=True)
    return result


def reconstructed(params: Params, test: Split) -> Split:
    """The test images after a round trip through the generator's VAE (encode mean -> decode)."""
    from thinair.generator import generator_for
    from thinair.images import to_uint8
    from thinair.tasks.encode import encode_images

    b = params.base
    gen, device = generator_for(b, device=current_device(b))
    post = encode_images(gen.vae, test.images, b.gen_resolution, params.encode.interpolation,
                         params.encode.batch_size, device)
    h, _, c = test.images.shape[1:]
    out = []
    with torch.no_grad():
        for s in range(0, len(test.labels), params.encode.batch_size):
            z = post["mean"][s:s + params.encode.batch_size].to(device, gen.vae.dtype)
            out.append(to_uint8(gen.vae.decode(z).sample, h, c))
    return Split(np.concatenate(out), test.labels, test.class_names)


def run_seeds(params: Params, mode: str) -> list[int]:
    return [io.seed_for(params.base.seed, STAGE, mode, i) for i in range(params.cas.seeds)]


def mode_sources(params: Params, mode: str, real: Split, syn: Synthetic | None) -> list:
    p = params.cas
    return {"real": lambda: [(real.images, real.labels, 1.0)],
            "synthetic": lambda: [(syn.images, syn.labels, 1.0)],
            "real+synthetic": lambda: [(real.images, real.labels, p.real_fraction),
                                       (syn.images, syn.labels, 1 - p.real_fraction)]}[mode]()


def scaling_runs(params: Params, real: Split, syn: Synthetic) -> list[dict]:
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


def cas(params: Params, root: str | Path = ".") -> dict:
    """Every training of the stage, one after the other (the flow runs them as parallel tasks instead)."""
    jobs = plan(params, root)
    return summarize(params, [run_job(params, j, root) for j in jobs], root)


def plan(params: Params, root: str | Path = ".") -> list[dict]:
    """The stage's trainings as small records (mode/study, seed) for tasks to run."""
    p = params.cas
    jobs = [{"kind": "mode", "mode": m, "seed": s} for m in p.modes for s in run_seeds(params, m)]
    if p.scale_synthetic or p.scale_real:
        real, syn = read_split("train", root), read_synthetic(root)
        jobs += [{"kind": "scaling", "index": i} for i in range(len(scaling_runs(params, real, syn)))]
    return jobs


_INPUTS: dict = {}  # per process: (root, manifests' hashes) -> (train, test, synthetic); jobs share one read


def _inputs(root: str | Path, synthetic: bool) -> tuple[Split, Split, Synthetic | None]:
    manifests = [paths.stage_dir(s, root) / io.MANIFEST for s in ("ingest", "sample")]
    key = (str(Path(root).resolve()), synthetic) + tuple(io.file_sha256(f) if f.is_file() else "" for f in manifests)
    if key not in _INPUTS:
        _INPUTS.clear()
        _INPUTS[key] = (read_split("train", root), read_split("test", root),
                        read_synthetic(root) if synthetic else None)
    return _INPUTS[key]


def run_job(params: Params, job: dict, root: str | Path = ".") -> dict:
    """Run one planned training (reading its inputs from the workspace once per process) and return its record."""
    real, test, syn = _inputs(root, job["kind"] == "scaling" or job["mode"] != "real")
    tests = {"test": test}
    if params.cas.reconstructed_test:
        tests["reconstructed"] = _reconstructed_cached(params, test, root)
    n_classes = len(real.class_names)
    if job["kind"] == "mode":
        res = train_run(params, job["mode"], job["seed"], mode_sources(params, job["mode"], real, syn), tests,
                        n_classes, root)
        return job | {"result": res}
    run = scaling_runs(params, real, syn)[job["index"]]
    data = syn if run["mode"] == "synthetic" else real
    sources = [(data.images[run["rows"]], data.labels[run["rows"]], 1.0)]  # only this run's images are copied
    res = train_run(params, f"scale-{run['study']}-{run['x']}-{run['mode']}", run["seed"], sources,
                    {"test": test}, n_classes, root)
    return job | {k: run[k] for k in ("study", "x", "mode", "images", "seed")} | {"result": res}


def _reconstructed_cached(params: Params, test: Split, root) -> Split:
    from thinair.generator import generator_for, runtime_key

    b = params.base
    gen, _ = generator_for(b)
    key = content_key(STAGE, "reconstructed", source_hash(__name__), gen.identity, runtime_key(b), b.gen_resolution,
                      params.encode.interpolation, test.images)
    cache = ChunkCache(STAGE, root)
    hit = cache.get(key, "test.npz")
    if hit is None:
        rec = reconstructed(params, test)
        tmp = cache.dir / key / "test.npz.part"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        io.save_npz(tmp, images=rec.images)
        hit = cache.put(key, "test.npz", tmp)
    return Split(io.load_npz(hit)["images"], test.labels, test.class_names)


def _stats(values: list[float]) -> dict:
    a = np.asarray(values, np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else 0.0, "n": len(a)}


def summarize(params: Params, records: list[dict], root: str | Path = ".") -> dict:
    """Write cas.json (metric), details.json, the scaling CSVs (DVC plots) and scaling.png."""
    import pandas as pd

    out = paths.stage_dir(STAGE, root)
    modes = [r for r in records if r["kind"] == "mode"]
    acc = {m: _stats([r["result"]["test"]["accuracy"] for r in modes if r["mode"] == m]) for m in params.cas.modes}
    metric = {"accuracy": acc, "model": params.cas.model, "seeds": params.cas.seeds,
              "test_images": int(len(read_split("test", root).labels))}
    if params.cas.reconstructed_test:
        metric["reconstructed_accuracy"] = {
            m: _stats([r["result"]["reconstructed"]["accuracy"] for r in modes if r["mode"] == m])
            for m in params.cas.modes}
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
    rows = [{"mode": m, "accuracy_mean_%": round(100 * a["mean"], 2), "accuracy_std_%": round(100 * a["std"], 2),
             "seeds": a["n"]} for m, a in metric["accuracy"].items()]
    result = {"cas": (f"CAS on {metric['test_images']} real test images ({metric['model']})", rows)}
    for name in ("scaling_synthetic", "scaling_real"):
        frame = pd.read_csv(out / f"{name}.csv")
        if len(frame):
            result["cas-" + name.replace("_", "-")] = (f"CAS scaling study: {name}", frame.round(4).to_dict("records"))
    return result


def job_key(params: Params, job: dict, root: str | Path = ".") -> str:
    """One training's inputs: the code, the CAS params, the job, the real and synthetic images and (for the
    reconstructed test) the generator."""
    b = params.base
    gen = [generator_identity(b), runtime_key(b), b.gen_resolution, params.encode.model_dump(mode="json")] \
        if params.cas.reconstructed_test else None
    return content_key(STAGE, source_hash(__name__), source_hash(classifier.__name__), source_hash("thinair.augment"),
                       params.cas.model_dump(mode="json"), b.seed, job, gen, inputs_digest(root, "ingest", "sample"))


@task(name="cas-train", **task_options(retries=1, delay=5, cache=("cas-train", job_key)))
def cas_job_task(params: Params, job: dict, root: str = ".") -> dict:
    set_threads(params.base)
    with device_slot(params.base, root, f"cas {job.get('mode', 'scaling')} {job.get('seed', job.get('index'))}"):
        return record(root, [], **run_job(params, job, root))
