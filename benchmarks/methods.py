"""The steering methods side by side at equal synthetic count: real data, Diffusion Inversion, the class encoder
(seed 002) and the generator's class tokens (the prompt baseline when there is no text encoder).

Run by hand in a workspace where `dvc repro` has produced ``data/ingest``, ``data/encode`` and ``data/invert``:

    python benchmarks/methods.py                       # about 10 min on 2 CPU cores (embedded default)
    python benchmarks/methods.py --methods inversion,class_encoder --seeds 3

For each method it runs the real `classenc` (when needed), `sample`, `metrics` and `cas` stage code in a scratch
workspace ``.thinair/methods/<method>/`` linked to the main workspace's ingest/encode/invert outputs, with the
params of ``params.yaml`` and ``sample.method`` set (so every method makes the same number of images per train
image). CAS is synthetic-only over ``--seeds`` seeds; the `real` row trains on the real train split instead and
its distribution metrics are the floor (real test vs real train). Prints one table and writes
``benchmarks/methods.json``, which the `report` stage shows.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from steps_sweep import sample_and_score  # noqa: E402 - the sibling benchmark's scoring helper

METHODS = ("inversion", "class_encoder", "class_tokens")
KEYS = ("fid", "kid", "precision", "recall", "density", "coverage")


def _params(params_path: str, seeds: int, extra: list[str]):
    from thinair.config import load_params

    return load_params(params_path, [f"cas.seeds={seeds}", "cas.scale_synthetic=[]", "cas.scale_real=[]",
                                     "cas.reconstructed_test=false"] + extra)


def run_method(root: Path, params_path: str, method: str, seeds: int) -> dict:
    from thinair.units import run_local

    ws = root / ".thinair" / "methods" / method
    link_stages(ws, root, ("ingest", "encode", "invert"))
    params = _params(params_path, seeds, [f"sample.method={method}", "cas.modes=[synthetic]"])
    t0 = time.perf_counter()
    trained = run_local("classenc", params, ws)
    train_s = time.perf_counter() - t0
    r = sample_and_score(params, ws)
    return {"method": method, "images": r["images"], "train_seconds": round(train_s, 1) if trained["trained"]
            else 0.0, "sample_seconds": round(r["seconds"], 1), "cas": r["cas"],
            **{k: round(float(r["metrics"][k]), 4) for k in KEYS}}


def run_real(root: Path, params_path: str, seeds: int, synthetic: Path) -> dict:
    """CAS trained on the real train split, and the real floor of the metrics (test vs train). `synthetic`: a
    method's data/sample (metrics also compute synthetic vs train; this row reports only test vs train)."""
    from thinair.units import run_local

    ws = root / ".thinair" / "methods" / "real"
    link_stages(ws, root, ("ingest", "encode", "invert"))
    sample = ws / "data" / "sample"
    if sample.is_symlink():
        sample.unlink()
    sample.symlink_to(synthetic.resolve(), target_is_directory=True)
    params = _params(params_path, seeds, ["cas.modes=[real]"])
    m = run_local("metrics", params, ws)["test_vs_train"]
    c = run_local("cas", params, ws)["accuracy"]["real"]
    from thinair.upstream import read_split

    return {"method": "real", "images": int(len(read_split("train", ws).labels)), "train_seconds": 0.0,
            "sample_seconds": 0.0, "cas": c, **{k: round(float(m[k]), 4) for k in KEYS}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--methods", default=",".join(METHODS), help="comma list of sample.method values")
    ap.add_argument("--seeds", type=int, default=3, help="CAS trainings per method")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--root", default=".")
    ap.add_argument("--out", default="benchmarks/methods.json")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    rows = []
    for method in args.methods.split(","):
        rows.append(run_method(root, args.params, method, args.seeds))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    first = root / ".thinair" / "methods" / rows[0]["method"] / "data" / "sample"
    rows.insert(0, run_real(root, args.params, args.seeds, first))
    print(json.dumps(rows[0]), file=sys.stderr, flush=True)
    note = (f"Synthetic-only CAS over {args.seeds} seeds on the real test split, every method at the same number "
            f"of images ({rows[1]['images']}); the real row trains on the {rows[0]['images']} real train images and "
            "its metrics are real test vs real train (the floor). "
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {os.cpu_count()} CPUs.")
    Path(args.out).write_text(json.dumps({"rows": rows, "note": note}, indent=1) + "\n")
    print(f"{'method':<15}{'images':>8}{'train s':>9}{'sample s':>10}{'CAS %':>8}{'± std':>7}"
          + "".join(f"{k:>10}" for k in KEYS))
    for r in rows:
        print(f"{r['method']:<15}{r['images']:>8}{r['train_seconds']:>9.1f}{r['sample_seconds']:>10.1f}"
              f"{100 * r['cas']['mean']:>8.2f}{100 * r['cas']['std']:>7.2f}" + "".join(f"{r[k]:>10.4f}" for k in KEYS))
    print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
