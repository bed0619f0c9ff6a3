"""Bounded-memory PRDC (``thinair.quality.prdc``) at scale, run by hand; prints a table. Reads and writes no files.

    python benchmarks/prdc_bench.py                                  # 100,000 x 100,000, 64-d, float32 blocks
    python benchmarks/prdc_bench.py --n 20000 --m 20000 --dtype float64 --block 512 --threads 2

Features are random normal (real) and shifted/scaled normal (fake). Prints wall time, peak RSS of this
process (``resource.getrusage``, includes the inputs and Python/torch; the tile itself is block x col_block
float32), and the size one N x M float32 distance matrix would need; then a correctness line: the same function against the ``prdc`` package on the
first 2,000 x 2,000 rows (largest absolute difference over the four metrics).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import platform
import resource
import time

import numpy as np
import torch

from thinair.quality import prdc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="real rows")
    ap.add_argument("--m", type=int, default=100_000, help="fake rows")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--block", type=int, default=2048, help="rows per distance tile")
    ap.add_argument("--col-block", type=int, default=16384, help="columns per distance tile")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="distance block dtype")
    ap.add_argument("--check", type=int, default=2000, help="rows compared with the prdc package (0: skip)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = getattr(torch, a.dtype)
    rng = np.random.default_rng(0)
    real = rng.normal(size=(a.n, a.dim)).astype(np.float32)
    fake = (rng.normal(size=(a.m, a.dim)) * 1.1 + 0.1).astype(np.float32)

    t0 = time.perf_counter()
    res = prdc(real, fake, a.k, block=a.block, col_block=a.col_block, dtype=dtype)
    wall = time.perf_counter() - t0
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    full_gib = a.n * a.m * 4 / 2**30

    print(f"# {platform.machine()}, {a.threads} torch threads, torch {torch.__version__}")
    print("| N | M | dim | k | tile | dtype | wall s | peak RSS GiB | N x M float32 GiB | precision | recall "
          "| density | coverage |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {a.n:,} | {a.m:,} | {a.dim} | {a.k} | {a.block} x {a.col_block} | {a.dtype} | {wall:.1f} | {peak_gib:.2f} "
          f"| {full_gib:.1f} | {res['precision']:.4f} | {res['recall']:.4f} | {res['density']:.4f} "
          f"| {res['coverage']:.4f} |")

    if a.check:
        from prdc import compute_prdc

        r, f = real[:a.check].astype(np.float64), fake[:a.check].astype(np.float64)
        with contextlib.redirect_stdout(io.StringIO()):  # compute_prdc prints the sample counts
            ref = compute_prdc(r, f, a.k)
        ours = prdc(r, f, a.k, block=a.block, col_block=a.col_block, dtype=dtype)
        ref = {key: float(v) for key, v in ref.items()}
        diff = max(abs(ours[key] - ref[key]) for key in ours)
        print(f"correctness: {len(r):,} x {len(f):,} subset vs prdc.compute_prdc: max |difference| = {diff:.1e} "
              f"({'OK' if diff <= 1e-6 else 'MISMATCH'}; ours {ours}, prdc {ref})")


if __name__ == "__main__":
    main()
