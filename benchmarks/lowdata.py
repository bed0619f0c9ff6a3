"""The low-data benchmark: does synthetic data make a classifier better when real labels are scarce?

The user's situation, on any dataset `base.dataset` accepts: a generator pretrained on a pool of images disjoint
from the task (``pretrain.pool: holdout``: a stratified share of the train split the task never sees; conditional
on the pool's labels, or unconditional), and only k labelled real images per class (``ingest.holdout_fraction`` +
``ingest.per_class_limit`` + ``ingest.subset_seed``: each seed draws its own k per class from the task part).
At each k and seed, the real stage code runs in a scratch workspace (ingest, encode with its fit check, invert on
those k x classes images only, sample), then every arm trains the same classifier for the same number of optimiser
steps (``--steps``, the reference's fixed-step protocol, so a small real set is not trained for fewer steps than a
large mixed one) with the same seed, tested on the real test split (never used to choose anything):

    real                      the k images per class (crop, flip as in cas)
    real+<augment>            + one classical augmentation of the paper's comparison (cas.augment)
    di                        Diffusion Inversion images only
    real+di                   real and DI images, half of each batch each (cas.real_fraction 0.5)
    real+di@<r>               the paper's other real:synthetic batch ratios (1:7, 1:3, 3:1, 7:1), reported beside
    real+di[<opts>]           real + DI with the beyond-paper sampling options of issue 17 (OPTIONS, joined by +:
                              knn, nearest, adaptive, filter, image, coverage; e.g. real+di[knn+filter]), same count
    recon, real+recon         the k real images after the generator's VAE round trip (x1), alone and with the
                              real ones: where Diffusion Inversion's images fall short, these say whether the
                              generator's autoencoder already loses it (recon < real) or inversion and sampling do
                              (di < recon at the same count ratio)
    <arm>+<augment>           a synthetic arm with a classical augmentation on its batches (real+di+mixup)
    real+tokens               real + the generator's class tokens (conditional generator only: it learned the pool's
                              labels, a baseline DI does not need)
    real+classenc             real + the class encoder (seed 002) trained on the k images per class
    fly, real+fly             DI images drawn on the fly (cas.synthetic on_the_fly): fresh variants every optimiser
                              step, never repeated, alone and half of each real batch; equal optimiser steps (and
                              images trained on) as di / real+di, whose pre-generated set repeats each image
    real+fly~time             real+fly at the wall time of real+di (sampling its pre-generated set + training): the
                              steps are cut to fit, from this cell's measured draw rate and training times (needs
                              real+di and real+fly before it in --arms)
    real+di~fly               real + a pre-generated set as large as real+fly draws (equal image count, same steps)

Everything is cached by content under ``.thinair/lowdata/<name>/`` (stages, trainings, the generators' training
checkpoints), so a killed run resumes where it stopped; results are written after every cell.

    python benchmarks/lowdata.py                                  # digits; hours on 2 CPU cores (see README)
    python benchmarks/lowdata.py --ks 5,10 --seeds 5 --arms real,real+cutout,di,real+di
    python benchmarks/make_textures.py && python benchmarks/lowdata.py --dataset folder:.thinair/datasets/textures \
        --name textures

Writes ``benchmarks/lowdata/<name>.json`` (every training, and mean/std/n per variant, k and arm) and
``benchmarks/lowdata/<name>.png`` (test accuracy against real images per class).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

AUGMENTS = ("autoaugment", "randaugment", "cutout", "mixup", "cutmix", "augmix")
RATIOS = {"1:7": 0.125, "1:3": 0.25, "3:1": 0.75, "7:1": 0.875}  # real:synthetic per batch; 1:1 is real+di
DEFAULT_ARMS = (["real"] + [f"real+{a}" for a in AUGMENTS] + ["di", "real+di"] + [f"real+di@{r}" for r in RATIOS]
                + ["real+tokens", "real+classenc"])
PLOTTED = ("real", "best augmentation", "real+di", "di", "real+tokens")
OPTIONS = {  # issue 17's sampling options (sample.* overrides), composable in an arm: real+di[knn+filter]
    "knn": {"partner": "knn"}, "nearest": {"partner": "nearest"}, "adaptive": {"noise_schedule": "adaptive"},
    "filter": {"filter_min_confidence": 0.5}, "image": {"start": "image", "strength": 0.6},
    "coverage": {"allocation": "coverage"}}


def di_options(arm: str) -> str | None:
    """'knn+filter' of real+di[knn+filter] (validated against OPTIONS); None for an arm without options."""
    base = arm.split("@")[0]
    if "[" not in base:
        return None
    opts = base[base.index("[") + 1:].rstrip("]")
    unknown = [o for o in opts.split("+") if o not in OPTIONS]
    if unknown:
        raise SystemExit(f"arm {arm!r}: unknown DI option(s) {unknown}; known: {sorted(OPTIONS)}")
    return opts


def warmup(steps: int) -> int:
    """The warm-up of a `steps`-step classifier training: 5 %, at least one step."""
    return max(1, steps // 20)


def base_params(args, generator: Path | None, k: int | None, seed: int, **sections):
    """The params of one cell: params.yaml's, with the benchmark's dataset, generator, subset and CAS protocol."""
    from thinair.config import load_params

    sets = [f"base.dataset={args.dataset}", f"base.gen_resolution={args.resolution}", "base.seed=0",
            "base.workers=1", "base.task_runner=thread", f"ingest.holdout_fraction={args.holdout}",
            f"ingest.per_class_limit={'null' if k is None else k}", f"ingest.subset_seed={seed}",
            f"sample.samples_per_setting={args.per_embedding}", f"cas.steps={args.steps}",
            f"cas.batch_size={args.batch_size}",
            f"cas.warmup_steps={warmup(args.steps)}", "cas.scale_synthetic=[]", "cas.scale_real=[]",
            "cas.reconstructed_test=false", f"classenc.steps={args.classenc_steps}"]
    if generator is not None:
        sets.append(f"base.generator={generator}")
    sets += args.set
    for section, values in sections.items():
        sets += [f"{section}.{key}={json.dumps(v)}" for key, v in values.items()]
    return load_params(args.params, sets)


def pretrain_generator(args, ws: Path, variant: str) -> Path:
    """The generator of `variant` (cond | uncond), pretrained on the holdout pool of the dataset (resumable)."""
    from thinair.tasks.pretrain import pretrain

    out = ws / "generators" / variant
    vae_steps, unet_steps = (int(x) for x in args.pretrain_steps.split(","))
    params = base_params(args, None, None, 0, pretrain={
        "dataset": args.dataset, "data_root": args.data_root, "pool": "holdout", "holdout_fraction": args.holdout,
        "labels": variant == "cond", "output": str(out), "resolution": args.resolution, "vae_steps": vae_steps,
        "unet_steps": unet_steps})
    log_file = out / "train_log.json"
    if log_file.is_file() and json.loads(log_file.read_text())["params"]["pretrain"] == params.pretrain.model_dump():
        return out
    t0 = time.time()
    pretrain(params, ws)
    print(f"pretrained {variant} generator in {time.time() - t0:.0f} s -> {out}", flush=True)
    return out


def synthetic_sets(args, params, cell: Path, arms: list[str], variant: str) -> dict:
    """Run the stages of one cell and return {method: (images, labels)} for the synthetic arms it needs."""
    from thinair.units import run_local
    from thinair.upstream import link_stages, read_split, read_synthetic

    for stage in ("ingest", "encode", "invert"):
        run_local(stage, params, cell)
    out = {}
    bases = [split_augment(a)[0] for a in arms]
    if "real+di~fly" in bases:  # a pre-generated set of as many images as real+fly draws in --steps steps
        ws = link_stages(cell / "di-fly-count", cell, ("ingest", "encode", "invert"))
        n_emb = len(read_split("train", cell).labels)
        per_step = max(1, round(args.batch_size * (1 - params.cas.real_fraction)))  # classifier._plan's rule
        settings = len(params.sample.checkpoints) * len(params.sample.guidance_scales)
        update = {"samples_per_setting": -(-args.steps * per_step // (n_emb * settings))}
        run_local("sample", params.model_copy(update={"sample": params.sample.model_copy(update=update)}), ws)
        syn = read_synthetic(ws)
        out["inversion~fly"] = (syn.images, syn.labels)
    wanted = {"inversion": any(a.split("@")[0] in ("di", "real+di") for a in bases),
              "class_tokens": variant == "cond" and "real+tokens" in bases,
              "class_encoder": "real+classenc" in bases}
    for opts in sorted({di_options(a) for a in bases} - {None}):  # issue 17's options: DI with sample overrides
        ws = link_stages(cell / f"di-{opts.replace('+', '-')}", cell, ("ingest", "encode", "invert"))
        update = {k: v for o in opts.split("+") for k, v in OPTIONS[o].items()}
        p = params.model_copy(update={"sample": params.sample.model_copy(update=update)})
        type(p.sample).model_validate(p.sample.model_dump())  # the combination is a valid sample section
        run_local("sample", p, ws)
        syn = read_synthetic(ws)
        out[f"inversion[{opts}]"] = (syn.images, syn.labels)
    if any(a.split("@")[0] in ("recon", "real+recon") for a in bases):  # the generator's autoencoder alone
        from thinair.diffusion import reconstruct
        from thinair.generator import load_generator
        from thinair.upstream import read_split

        real = read_split("train", cell)
        vae = load_generator(str(params.base.generator)).vae
        out["reconstruction"] = (reconstruct(vae, real.images, params.base.gen_resolution,
                                             params.encode.interpolation, 256, "cpu"), real.labels)
    for method, needed in wanted.items():
        if not needed:
            continue
        ws = cell if method == "inversion" else link_stages(cell / method, cell, ("ingest", "encode", "invert"))
        p = params.model_copy(update={"sample": params.sample.model_copy(update={"method": method})})
        if method == "class_encoder":
            run_local("classenc", p, ws)
        run_local("sample", p, ws)
        syn = read_synthetic(ws)
        out[method] = (syn.images, syn.labels)
    return out


def split_augment(arm: str) -> tuple[str, list[str]]:
    """real+di+mixup -> (real+di, [mixup]): a synthetic arm with a classical augmentation on its batches."""
    for a in AUGMENTS:
        if arm.endswith(f"+{a}") and arm != f"real+{a}":
            return arm[:-len(a) - 1], [a]
    return arm, []


def arm_sources(arm: str, real, syn: dict, default_fraction: float):
    """[(images, labels, batch share)] and the augmentations of one arm; None when the arm does not apply."""
    real_src = (real.images, real.labels)
    arm, extra = split_augment(arm)
    if arm == "real":
        return [real_src + (1.0,)], []
    if arm.startswith("real+") and arm[5:] in AUGMENTS:
        return [real_src + (1.0,)], [arm[5:]]
    spec = _synthetic_sources(arm, real_src, syn, default_fraction)
    return None if spec is None else (spec, extra)


def _synthetic_sources(arm: str, real_src: tuple, syn: dict, default_fraction: float) -> list | None:
    if arm == "real+di~fly":
        return [real_src + (default_fraction,), (*syn["inversion~fly"], 1 - default_fraction)] \
            if "inversion~fly" in syn else None
    opts, kind = di_options(arm), arm.split("@")[0].split("[")[0]
    method = {"di": "inversion", "real+di": "inversion", "real+tokens": "class_tokens",
              "real+classenc": "class_encoder", "recon": "reconstruction", "real+recon": "reconstruction"}.get(kind)
    method = f"{method}[{opts}]" if opts else method
    if method not in syn:
        return None
    x, y = syn[method]
    if kind in ("di", "recon"):
        return [(x, y, 1.0)]
    fraction = RATIOS[arm.split("@")[1]] if "@" in arm else default_fraction
    return [real_src + (fraction,), (x, y, 1 - fraction)]


FLY = ("fly", "real+fly")


def fly_sources(arm: str, real, fresh, fraction: float) -> list:
    """[(images, labels, batch share)] of an on-the-fly arm: the stream `fresh` alone, or beside the real images."""
    return [(fresh, None, 1.0)] if arm == "fly" else [(real.images, real.labels, fraction), (fresh, None, 1 - fraction)]


def equal_time_steps(steps: int, pregenerated: dict, fly: dict, pregenerated_images: int) -> int:
    """Optimiser steps that give real+fly the wall time of real+di: sampling real+di's set (at real+fly's measured
    draw rate) plus real+di's training, divided by real+fly's time per step (drawing and training)."""
    rate = fly["on_the_fly"]["images"] / fly["on_the_fly"]["seconds"]  # images drawn per second
    budget = pregenerated_images / rate + pregenerated["seconds"]
    return max(1, min(steps, round(steps * budget / fly["seconds"])))


def run_cell(args, ws: Path, generator: Path, variant: str, k: int | None, seed: int, arms: list[str]) -> list[dict]:
    from thinair import io
    from thinair.draws import stream
    from thinair.training import cached_training
    from thinair.upstream import read_split

    params = base_params(args, generator, k, seed)
    data_seed = 0 if k is None else seed  # every image: one set of synthetic data serves every seed
    cell = ws / variant / f"k{'all' if k is None else k}" / f"s{data_seed}"
    t0 = time.time()
    syn = synthetic_sets(args, base_params(args, generator, k, data_seed), cell, arms, variant)
    real, test = read_split("train", cell), read_split("test", cell)
    fit = io.read_json(cell / "data" / "encode" / "fit.json")
    rows, done = [], {}
    for arm in arms:
        train_seed, cas_update = io.seed_for(0, "lowdata", seed), {}
        if arm.split("~")[0] in FLY:
            if arm == "real+fly~time":
                if not {"real+di", "real+fly"} <= set(done):
                    raise SystemExit("arm real+fly~time needs real+di and real+fly before it in --arms")
                steps = equal_time_steps(args.steps, done["real+di"], done["real+fly"], len(syn["inversion"][0]))
                cas_update = {"steps": steps, "warmup_steps": warmup(steps)}
            spec = (fly_sources(arm, real, stream(params, train_seed, cell), params.cas.real_fraction), [])
        else:
            spec = arm_sources(arm, real, syn, params.cas.real_fraction)
        if spec is None:
            continue
        sources, augment = spec
        p = params.model_copy(update={"cas": params.cas.model_copy(update={"augment": augment} | cas_update)})
        res = cached_training(p, "cas", arm, train_seed, sources, {"test": test}, len(real.class_names), cell)
        done[arm] = res
        rows.append({"variant": variant, "k": "all" if k is None else k, "seed": seed, "arm": arm,
                     "accuracy": res["test"]["accuracy"], "real_images": len(real.labels),
                     "train_images": res["train_images"], "steps": p.cas.steps,
                     "train_seconds": res.get("seconds"),
                     "drawn": res.get("on_the_fly", {}).get("images"),
                     "draw_seconds": res.get("on_the_fly", {}).get("seconds")})
    took = time.time() - t0
    print(f"{variant} k={k or 'all'} seed={seed}: " + ", ".join(f"{r['arm']} {100 * r['accuracy']:.1f}"
                                                                 for r in rows) + f"  ({took:.0f} s)", flush=True)
    for r in rows:
        r["fit_ratio"] = fit["ratio"]
    return rows


def summarize(rows: list[dict]) -> dict:
    """{variant: {k: {arm: {mean, std, n}}}} in %, std over seeds (ddof 1); plus the best augmentation per k."""
    out: dict = {}
    for r in rows:
        out.setdefault(r["variant"], {}).setdefault(str(r["k"]), {}).setdefault(r["arm"], []).append(r["accuracy"])
    for variant in out.values():
        for arms in variant.values():
            for arm, accs in arms.items():
                a = 100 * np.asarray(accs)
                arms[arm] = {"mean": round(float(a.mean()), 2), "std": round(float(a.std(ddof=1)) if len(a) > 1
                                                                             else 0.0, 2), "n": len(a)}
            augs = {a: v for a, v in arms.items() if a.startswith("real+") and a[5:] in AUGMENTS}
            if augs:
                best = max(augs, key=lambda a: augs[a]["mean"])
                arms["best augmentation"] = augs[best] | {"arm": best}
    return out


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(summary), figsize=(5.2 * len(summary), 3.8), dpi=100, squeeze=False)
    for ax, (variant, ks) in zip(axes[0], summary.items()):
        order = sorted(ks, key=lambda k: float("inf") if k == "all" else int(k))
        xs = np.arange(len(order))
        for arm in PLOTTED:
            pts = [(i, ks[k][arm]) for i, k in enumerate(order) if arm in ks[k]]
            if pts:
                ax.errorbar([i for i, _ in pts], [v["mean"] for _, v in pts], yerr=[v["std"] for _, v in pts],
                            marker="o", capsize=3, label=arm)
        ax.set_xticks(xs, order)
        ax.set(xlabel="real images per class", ylabel="test accuracy (%)",
               title=f"{title}: {'conditional' if variant == 'cond' else 'unconditional'} generator")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="digits", help="any base.dataset spec (digits, folder:PATH, cifar10, ...)")
    ap.add_argument("--name", default=None, help="workspace and results name (default: the dataset's)")
    ap.add_argument("--out", default=None, help="results JSON (default: benchmarks/lowdata/<name>.json)")
    ap.add_argument("--data-root", default="~/.cache/thinair/datasets")
    ap.add_argument("--ks", default="5,10,20,50,all", help="real images per class, comma list ('all': every one)")
    ap.add_argument("--seeds", type=int, default=5, help="seeds per k: each draws its own k per class and seeds "
                    "every arm's classifier")
    ap.add_argument("--variants", default="cond,uncond", help="generators: cond (pool labels) | uncond")
    ap.add_argument("--arms", default=",".join(DEFAULT_ARMS))
    ap.add_argument("--holdout", type=float, default=0.5, help="share of each class of train kept for the "
                    "generator's pool (never the task's)")
    ap.add_argument("--resolution", type=int, default=16, help="generation resolution (px)")
    ap.add_argument("--pretrain-steps", default="1000,3000", help="VAE,UNet steps of each generator")
    ap.add_argument("--per-embedding", type=int, default=10, help="synthetic images per real image")
    ap.add_argument("--steps", type=int, default=500, help="optimiser steps of every classifier training")
    ap.add_argument("--batch-size", type=int, default=128, help="classifier batch size (cas.batch_size)")
    ap.add_argument("--classenc-steps", type=int, default=500)
    ap.add_argument("-S", "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a parameter of every cell (e.g. invert.steps=100), repeatable")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--root", default=".")
    args = ap.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("thinair.tasks.pretrain").setLevel(logging.INFO)  # the generators' progress and ETA
    name = args.name or args.dataset.replace("folder:", "").rstrip("/").split("/")[-1]
    ws = Path(args.root).resolve() / ".thinair" / "lowdata" / name
    out = Path(args.out) if args.out else Path(args.root) / "benchmarks" / "lowdata" / f"{name}.json"
    arms = args.arms.split(",")
    ks = [None if k == "all" else int(k) for k in args.ks.split(",")]
    t_start, rows, timing = time.time(), [], {}
    for variant in args.variants.split(","):
        t0 = time.time()
        generator = pretrain_generator(args, ws, variant)
        timing[f"pretrain-{variant}"] = round(time.time() - t0, 1)
        for k in ks:
            t0 = time.time()
            for seed in range(args.seeds):
                rows += run_cell(args, ws, generator, variant, k, seed, arms)
                summary = summarize(rows)
                result = {"config": {k2: v for k2, v in vars(args).items()} | {"machine": platform.machine(),
                                                                               "cpus": os.cpu_count()},
                          "timing_s": timing | {"total": round(time.time() - t_start, 1)},
                          "summary": summary, "rows": rows}
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(result, indent=1) + "\n")
            timing[f"{variant}-k{k or 'all'}"] = round(time.time() - t0, 1)
        plot(summarize(rows), out.with_suffix(".png"), name)
    print(f"wrote {out} and {out.with_suffix('.png')} in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
