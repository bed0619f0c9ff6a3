"""Sampler steps vs quality: the paper's sampler (PNDM, 100 steps) against fast multistep samplers.

Run by hand in a workspace where `dvc repro` has produced ``data/ingest`` and ``data/invert``:

    python benchmarks/steps_sweep.py                 # the default sweep (about 10 min on 2 CPU cores)
    python benchmarks/steps_sweep.py --configs pndm:100,dpmsolver++:10 --per-embedding 1 --seeds 3

For each sampler/steps setting it runs the real `sample`, `metrics` and `cas` stage code (synthetic-only
CAS, ``--seeds`` seeds) in a scratch workspace ``.thinair/sweep/<sampler>-<steps>/`` that links the main
workspace's ingest and invert outputs, with ``sample.samples_per_setting = --per-embedding``. It times
sampling (UNet + VAE decode, generator already loaded) and prints one table. Writes
``benchmarks/steps_sweep.json``, which the `report` stage shows. The setting to adopt as the default is
the fastest whose mean CAS is within ``--tolerance`` (0.5 points) of the paper's sampler.
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

from thinair.upstream import link_stages

DEFAULT_CONFIGS = ("pndm:100,ddim:25,dpmsolver++:10,dpmsolver++:15,dpmsolver++:20,dpmsolver++:25,"
                   "unipc:10,unipc:15,unipc:20,unipc:25")


def sample_and_score(params, ws: Path) -> dict:
    """The real `sample` stage code (timed; generator already loaded), then `metrics` and `cas`, in `ws`."""
    from thinair.units import run_local

    t0 = time.perf_counter()
    manifest = run_local("sample", params, ws)
    seconds = time.perf_counter() - t0
    return {"images": manifest["total"], "seconds": seconds,
            "metrics": run_local("metrics", params, ws)["synthetic_vs_train"],
            "cas": run_local("cas", params, ws)["accuracy"]["synthetic"]}


def run_config(root: Path, params_path: str, scheduler: str, steps: int, per_embedding: int, seeds: int,
               checkpoint: str = "final", interval: str = "all") -> dict:
    """One setting; `interval` 'lo-hi' guides only noise levels t/T in [lo, hi] (sample.guidance_interval)."""
    from thinair.config import load_params
    from thinair.diffusion import unet_evaluations
    from thinair.generator import generator_for

    span = None if interval == "all" else [float(x) for x in interval.split("-")]
    ws = root / ".thinair" / "sweep" / (f"{scheduler}-{steps}-{checkpoint}" + ("" if span is None else f"-g{interval}"))
    link_stages(ws, root, ("ingest", "invert"))
    params = load_params(params_path, [f"sample.scheduler={scheduler}", f"sample.steps={steps}",
                                       f"sample.checkpoints=[{checkpoint}]",
                                       f"sample.guidance_interval={'null' if span is None else span}",
                                       f"sample.samples_per_setting={per_embedding}", "cas.modes=[synthetic]",
                                       f"cas.seeds={seeds}", "cas.scale_synthetic=[]", "cas.scale_real=[]",
                                       "cas.reconstructed_test=false"])
    generator_for(params.base)  # load outside the timed region
    r = sample_and_score(params, ws)
    m = r["metrics"]
    gen, _ = generator_for(params.base)
    return {"scheduler": scheduler, "steps": steps, "checkpoint": checkpoint, "interval": interval,
            "unet_evals": unet_evaluations(gen.scheduler(scheduler), steps, span), "images": r["images"],
            "seconds": round(r["seconds"], 2), "images_per_s": round(r["images"] / r["seconds"], 2), "cas": r["cas"],
            **{k: round(float(m[k]), 4) for k in ("fid", "precision", "recall", "coverage")}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma list of sampler:steps[:embedding checkpoint[:guidance interval lo-hi]] (first = reference)")
    ap.add_argument("--per-embedding", type=int, default=1, help="sample.samples_per_setting in the sweep")
    ap.add_argument("--seeds", type=int, default=3, help="CAS trainings per setting")
    ap.add_argument("--tolerance", type=float, default=0.005, help="CAS tolerance vs the reference (0.005 = 0.5 pt)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--root", default=".")
    ap.add_argument("--out", default="benchmarks/steps_sweep.json")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    rows = []
    for item in args.configs.split(","):
        sched, steps, *ckpt = item.split(":")
        rows.append(run_config(root, args.params, sched, int(steps), args.per_embedding, args.seeds, *ckpt))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    ref = rows[0]
    for r in rows[1:]:
        if r["checkpoint"] != ref["checkpoint"] or r.get("interval", "all") != "all":
            r["within_tolerance"] = False  # another embedding checkpoint or interval: shown, not the sampler choice
    for r in rows:
        r["speedup"] = round(r["images_per_s"] / ref["images_per_s"], 2)
        r.setdefault("within_tolerance", r["cas"]["mean"] >= ref["cas"]["mean"] - args.tolerance)
    best = max((r for r in rows if r["within_tolerance"]), key=lambda r: r["images_per_s"])
    note = (f"{args.per_embedding} variant(s) per embedding per setting, synthetic-only CAS over {args.seeds} seeds; "
            f"reference {ref['scheduler']} {ref['steps']} steps. Fastest within {100 * args.tolerance:.1f} CAS "
            f"points of it: {best['scheduler']} {best['steps']} steps ({best['speedup']}x). "
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs.")
    Path(args.out).write_text(json.dumps({"rows": rows, "best": {k: best[k] for k in ("scheduler", "steps")},
                                          "note": note}, indent=1) + "\n")
    print(f"{'sampler':<13}{'ckpt':>6}{'guide':>9}{'evals':>6}{'steps':>6}{'img/s':>9}{'speedup':>9}{'CAS %':>9}{'± std':>7}{'FID':>8}{'prec':>7}"
          f"{'recall':>8}{'cover':>7}")
    for r in rows:
        print(f"{r['scheduler']:<13}{r['checkpoint']:>6}{r.get('interval', 'all'):>9}{r.get('unet_evals', 0):>6}"
              f"{r['steps']:>6}{r['images_per_s']:>9.1f}{r['speedup']:>9.2f}"
              f"{100 * r['cas']['mean']:>9.2f}{100 * r['cas']['std']:>7.2f}{r['fid']:>8.3f}{r['precision']:>7.3f}"
              f"{r['recall']:>8.3f}{r['coverage']:>7.3f}")
    print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
