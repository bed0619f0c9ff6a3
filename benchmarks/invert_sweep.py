"""Cheaper inversion (issue 19, point 1): UNet passes against CAS, the final denoising loss, FID and recall.

Run by hand in a workspace where `dvc repro` has produced ``data/ingest`` and ``data/encode``:

    python benchmarks/invert_sweep.py                      # the default configurations (digits: ~25 min, 2 CPUs)
    python benchmarks/invert_sweep.py --configs "steps=300;steps=75,lr=0.1,lr_schedule=cosine" --seeds 3

Each configuration is a ``;``-separated entry of ``key=value`` overrides of the ``invert`` section (the first is the
reference); ``root`` is the workspace's own ``data/invert`` as `dvc repro` made it with ``--params`` (the default:
no inversion re-run). For each, the real `invert`, `sample`, `metrics` and `cas` stage code runs in a
scratch workspace ``.thinair/invsweep/<name>/`` that links the main workspace's ingest and encode outputs (one
synthetic image per embedding, synthetic-only CAS over ``--seeds`` seeds). UNet passes = forward + backward image
evaluations of the inversion: ``steps x n`` per-image updates plus ``warm_start_steps x batch`` of a class warm start.
The final denoising loss is measured the same way for every configuration: each learned embedding on 8 fixed
(posterior sample, noise, t) draws. Writes ``benchmarks/invert_sweep.json`` and prints one table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

DEFAULT_CONFIGS = ("root;steps=75;steps=75,lr=0.1,lr_schedule=cosine;"
                   "steps=60,warm_start=class,warm_start_steps=200;"
                   "steps=60,lr=0.1,lr_schedule=cosine,warm_start=class,warm_start_steps=200")


def parse_config(text: str) -> dict:
    """'steps=75,lr=0.1' -> {'steps': '75', 'lr': '0.1'}; 'root' -> {} (the workspace's own data/invert)."""
    out = {}
    if text.strip() == "root":
        return out
    for item in text.split(","):
        key, _, value = item.partition("=")
        out[key.strip()] = value.strip()
    return out


def name_of(config: dict) -> str:
    return "-".join(f"{k}{v}" for k, v in config.items()).replace(".", "p")


def unet_passes(params, n: int) -> int:
    """Forward + backward image evaluations of the inversion of `n` images (chunk-wise, as tasks/invert.py runs)."""
    from thinair.tasks.invert import optimiser_steps
    from thinair.upstream import chunk_ranges

    p, total = params.invert, 0
    for s, e in chunk_ranges(n, params.base.chunk_size):
        batch = min(p.batch_size, e - s)
        total += optimiser_steps(p.steps, e - s, batch) * batch
        if p.warm_start == "class":
            total += p.warm_start_steps * batch
    return total


@torch.no_grad()
def eval_loss(params, ws: Path, draws: int = 8) -> float:
    """Mean denoising loss of every learned embedding on `draws` fixed (posterior sample, noise, t) draws each."""
    from diffusers import DDPMScheduler

    from thinair import io, paths
    from thinair.generator import generator_for
    from thinair.tasks.invert import denoising_loss, noisy_batch
    from thinair.upstream import upstream_chunks

    gen, device = generator_for(params.base)
    sched = DDPMScheduler.from_config(gen.scheduler_config)
    losses = []
    for i, f in enumerate(upstream_chunks("invert", ws)):
        emb = io.load_tensors(paths.stage_dir("invert", ws) / f)["embeddings"]
        enc = io.load_tensors(paths.stage_dir("encode", ws) / f)  # invert's chunk i is encode's file of that name
        rng = torch.Generator().manual_seed(1000 + i)
        std = torch.exp(0.5 * enc["logvar"])
        for _ in range(draws):
            idx = torch.arange(len(emb))
            noisy, noise, t = noisy_batch(sched, enc["mean"], std, gen.scaling_factor, idx, rng, device)
            losses.append(denoising_loss(gen.unet, noisy, noise, t, emb.to(device)).item())
    return sum(losses) / len(losses)


def run_config(root: Path, params_path: str, config: dict, seeds: int) -> dict:
    from thinair.config import load_params
    from thinair.units import run_local
    from thinair.upstream import link_stages, read_split

    ws = root / ".thinair" / "invsweep" / (name_of(config) or "root")
    link_stages(ws, root, ("ingest", "encode") if config else ("ingest", "encode", "invert"))
    sets = [f"invert.{k}={v}" for k, v in config.items()]
    if "steps" in config and "checkpoint_every" not in config:  # only the final embeddings are sampled
        sets.append(f"invert.checkpoint_every={config['steps']}")
    params = load_params(params_path, sets + ["sample.checkpoints=[final]", "sample.samples_per_setting=1",
                                              "cas.modes=[synthetic]", f"cas.seeds={seeds}", "cas.scale_synthetic=[]",
                                              "cas.scale_real=[]", "cas.reconstructed_test=false"])
    t0 = time.perf_counter()
    if config:  # else: the workspace's own inversion (made with --params' invert section), linked as it is
        run_local("invert", params, ws)
    seconds = round(time.perf_counter() - t0, 1) if config else None
    run_local("sample", params, ws)
    metrics = run_local("metrics", params, ws)["synthetic_vs_train"]
    cas = run_local("cas", params, ws)["accuracy"]["synthetic"]
    n = len(read_split("train", ws).labels)
    return {"config": config or {"root": "data/invert"}, "passes": unet_passes(params, n), "invert_seconds": seconds,
            "eval_loss": round(eval_loss(params, ws), 5), "cas": cas,
            **{k: round(float(metrics[k]), 4) for k in ("fid", "precision", "recall", "coverage")}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="';'-separated invert overrides (first = reference)")
    ap.add_argument("--seeds", type=int, default=3, help="CAS trainings per configuration")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--root", default=".")
    ap.add_argument("--out", default="benchmarks/invert_sweep.json")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    rows = []
    for text in args.configs.split(";"):
        rows.append(run_config(root, args.params, parse_config(text), args.seeds))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    ref = rows[0]
    for r in rows:
        r["passes_vs_reference"] = round(r["passes"] / ref["passes"], 3)
        r["cas_minus_reference"] = round(100 * (r["cas"]["mean"] - ref["cas"]["mean"]), 2)
    note = (f"one synthetic image per embedding, synthetic-only CAS over {args.seeds} seeds; reference "
            f"{ref['config']}. {platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs.")
    Path(args.out).write_text(json.dumps({"rows": rows, "note": note}, indent=1) + "\n")
    print(f"{'invert overrides':<72}{'passes':>9}{'x ref':>7}{'loss':>9}{'CAS %':>8}{'± std':>7}{'Δ CAS':>7}"
          f"{'FID':>8}{'recall':>8}{'s':>7}")
    for r in rows:
        cfg = ",".join(f"{k}={v}" for k, v in r["config"].items())
        print(f"{cfg:<72}{r['passes']:>9}{r['passes_vs_reference']:>7.3f}{r['eval_loss']:>9.5f}"
              f"{100 * r['cas']['mean']:>8.2f}{100 * r['cas']['std']:>7.2f}{r['cas_minus_reference']:>7.2f}"
              f"{r['fid']:>8.3f}{r['recall']:>8.3f}{r['invert_seconds'] or '-':>7}")
    print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
