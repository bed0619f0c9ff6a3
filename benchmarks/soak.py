"""Load soak: the real `sample` stage making 50,000 images (sharded), with the memory of its whole process tree
sampled over time and every image accounted for exactly once.

Run by hand in a workspace where `dvc repro` has produced ``data/ingest`` and ``data/invert``:

    python benchmarks/soak.py                          # 50,000 images: 13 min on 2 shared CPU cores
    python benchmarks/soak.py --images 2000 --out /tmp/soak.json
    python benchmarks/soak.py --workspace PATH --params PATH/params.yaml --images 100   # any prepared workspace

It runs ``thinair sample`` as a subprocess (the Prefect flow, the local API server it starts and the task runner's
worker processes: the real process tree; its own Prefect home and server, even where
``PREFECT_API_URL`` names another) in a scratch workspace ``.thinair/soak/`` linked to the main
workspace's ingest and invert outputs (or in ``--workspace``, used as it is), with
``sample.samples_per_setting = ceil(--images / (train embeddings x checkpoints x guidance scales))``. The
sample stage's outputs, chunk cache and cached task records are removed first, so every image is generated.
Every ``--interval`` seconds it sums the resident set size (RSS) of the process and all its descendants
(a page shared by several processes counts in each: an upper bound). Afterwards it checks the accounting of
``data/sample``: manifest total == sum of its counts == provenance rows == images over all shards (each npz
read with ``allow_pickle=False``), the provenance matches the shards row for row, every (source, checkpoint,
guidance, seed) appears exactly once, and every train embedding has exactly ``samples_per_setting`` variants
per checkpoint and guidance scale. Prints the figures and OK, or the problems (exit status 1). Writes
``benchmarks/soak.json``: images, seconds, images/s, peak RSS, a downsampled RSS timeline, RSS at 10/50/90 %
of the run and two flatness figures (the second half's peak over the first half's, and the slope of a line
fitted to RSS over the middle 80 % of the run, MB/min).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from thinair.upstream import link_stages

MB = 1024 * 1024
FLAT_TOLERANCE = 0.10  # "flat": second-half peak and middle-80 % drift both within 10 % of the peak


# --- memory of a process tree -------------------------------------------------------------------------------

def tree_rss(pid: int) -> tuple[int, int]:
    """(sum of RSS in bytes, number of processes) over `pid` and all its descendants; (0, 0) once it is gone."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root] + root.children(recursive=True)
    except psutil.Error:
        return 0, 0
    total, n = 0, 0
    for p in procs:
        try:
            total += p.memory_info().rss
            n += 1
        except psutil.Error:  # exited between the listing and the read
            pass
    return total, n


class RssSampler:
    """Samples :func:`tree_rss` of `pid` every `interval` seconds in a background thread:
    ``samples`` = [(seconds since start, rss bytes, processes)]."""

    def __init__(self, pid: int, interval: float = 1.0):
        self.pid, self.interval, self.samples = pid, interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        while True:
            rss, n = tree_rss(self.pid)
            if n:
                self.samples.append((time.perf_counter() - t0, rss, n))
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def rss_summary(samples: list[tuple[float, int, int]], every: float = 5.0) -> dict:
    """Peak, a timeline (the peak of each `every`-second window), RSS at 10/50/90 % of the run and flatness."""
    if not samples:
        raise ValueError("no RSS samples: the process exited before the first one")
    t = np.array([s[0] for s in samples])
    mb = np.array([s[1] for s in samples]) / MB
    end = float(t[-1])

    def at(frac: float) -> float:
        return round(float(mb[int(np.argmin(np.abs(t - frac * end)))]), 1)

    windows = np.floor(t / every).astype(int)
    timeline = [[round(float(w * every), 1), round(float(mb[windows == w].max()), 1)] for w in np.unique(windows)]
    half = t <= end / 2
    first, second = float(mb[half].max()), float(mb[~half].max()) if (~half).any() else float(mb[half].max())
    middle = (t >= 0.1 * end) & (t <= 0.9 * end)
    slope = float(np.polyfit(t[middle] / 60, mb[middle], 1)[0]) if middle.sum() >= 3 and end > 0 else 0.0
    peak = float(mb.max())
    drift = abs(slope) * 0.8 * end / 60  # MB the fitted line moves over the middle 80 %
    return {"samples": len(samples), "interval_s": round(end / max(1, len(samples) - 1), 2),
            "peak_rss_mb": round(peak, 1), "peak_processes": int(max(s[2] for s in samples)),
            "rss_mb_at": {"10%": at(0.1), "50%": at(0.5), "90%": at(0.9)},
            "first_half_peak_mb": round(first, 1), "second_half_peak_mb": round(second, 1),
            "second_vs_first_half": round(second / first, 3), "slope_mb_per_min_middle80": round(slope, 2),
            "drift_mb_middle80": round(drift, 1),
            "flat": bool(second <= (1 + FLAT_TOLERANCE) * first and drift <= FLAT_TOLERANCE * peak),
            "timeline_every_s": every, "timeline": timeline}


# --- accounting ---------------------------------------------------------------------------------------------

def check_accounting(root: str | Path, samples_per_setting: int | None = None) -> tuple[dict, list[str]]:
    """Whether ``data/sample`` in `root` accounts for every image exactly once. Returns (figures, problems);
    no problems = OK. `samples_per_setting` defaults to the one in the manifest's params."""
    import pandas as pd

    from thinair import io, paths
    from thinair.tasks.sample import PROVENANCE, load_bank

    d = paths.stage_dir("sample", root)
    problems: list[str] = []
    manifest = io.read_json(d / io.MANIFEST)
    chunks, counts, total = manifest["chunks"], manifest["counts"], int(manifest["total"])
    p = manifest["params"]
    sps = samples_per_setting if samples_per_setting is not None else int(p["samples_per_setting"])
    if len(set(chunks)) != len(chunks):
        problems.append(f"manifest lists a shard twice: {sorted(c for c in set(chunks) if chunks.count(c) > 1)}")
    on_disk = sorted(f.name for f in d.glob("train-*.npz"))
    if sorted(set(chunks)) != on_disk:
        problems.append(f"shards on disk {on_disk} != manifest chunks {sorted(set(chunks))}")
    if set(counts) != set(chunks):
        problems.append(f"manifest counts name {sorted(counts)}, chunks {sorted(set(chunks))}")
    frames, shard_images = [], 0
    for f in dict.fromkeys(chunks):
        if not (d / f).is_file():
            problems.append(f"{f}: listed in the manifest but missing")
            continue
        with np.load(d / f, allow_pickle=False) as z:
            arrays = {k: z[k] for k in ("labels", "source_index", "checkpoint", "guidance", "seed")}
            images = z["images"]
        n = len(images)
        if images.ndim != 4 or images.dtype != np.uint8:
            problems.append(f"{f}: images {images.dtype} {images.shape}, expected uint8 (N, H, W, C)")
        bad = {k: len(v) for k, v in arrays.items() if len(v) != n}
        if bad:
            problems.append(f"{f}: {n} images but array lengths {bad}")
            continue
        if counts.get(f) != n:
            problems.append(f"{f}: manifest count {counts.get(f)} != {n} images in the shard")
        shard_images += n
        frames.append(pd.DataFrame({"file": f, "row": np.arange(n), **arrays}))
    shards = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["file", "row", "labels", "source_index", "checkpoint", "guidance", "seed"])
    prov = pd.read_csv(d / PROVENANCE)
    sum_counts = int(sum(counts.values()))
    if not total == sum_counts == len(prov) == shard_images:
        problems.append(f"manifest total {total}, sum of counts {sum_counts}, provenance rows {len(prov)} and "
                        f"images over the shards {shard_images} differ")
    dup_rows = int(prov.duplicated(["file", "row"]).sum())
    if dup_rows:
        problems.append(f"provenance: {dup_rows} (file, row) pair(s) listed more than once")
    both = shards.merge(prov, on=["file", "row"], how="outer", indicator=True, suffixes=("", "_prov"))
    only_shard, only_prov = int((both["_merge"] == "left_only").sum()), int((both["_merge"] == "right_only").sum())
    if only_shard or only_prov:
        problems.append(f"{only_shard} image(s) in the shards have no provenance row; {only_prov} provenance "
                        "row(s) name no image")
    matched = both[both["_merge"] == "both"]
    differ = {c: int((matched[c] != matched[c + "_prov"]).sum()) for c in ("source_index", "checkpoint", "seed")}
    differ["label"] = int((matched["labels"] != matched["label"]).sum())
    differ["guidance"] = int((~np.isclose(matched["guidance"].astype(float), matched["guidance_prov"].astype(float))
                              ).sum())
    if any(differ.values()):
        problems.append(f"provenance disagrees with the shards (rows per column): {differ}")
    key = ["source_index", "checkpoint", "guidance", "seed"]
    dup_keys = int(shards.duplicated(key).sum())
    if dup_keys:
        problems.append(f"{dup_keys} image(s) repeat a (source, checkpoint, guidance, seed) already generated")
    train = set(load_bank(root, [])["index"].tolist())
    ckpts = {-1 if c == "final" else int(c) for c in p["checkpoints"]}
    scales = {float(np.float32(w)) for w in p["guidance_scales"]}
    per_setting = shards.groupby(["source_index", "checkpoint", "guidance"]).size()
    expected = len(train) * len(ckpts) * len(scales)
    wrong = per_setting[per_setting != sps]
    if len(per_setting) != expected or len(wrong):
        problems.append(f"{len(per_setting)} (embedding, checkpoint, guidance) settings (expected {expected}); "
                        f"{len(wrong)} without exactly {sps} variant(s)")
    sources = set(shards["source_index"].tolist())
    if sources != train:
        problems.append(f"{len(train - sources)} train embedding(s) have no image, {len(sources - train)} source "
                        "index(es) are not train embeddings")
    if set(shards["checkpoint"].tolist()) - ckpts or {float(w) for w in shards["guidance"].tolist()} - scales:
        problems.append("images with a checkpoint or guidance scale that is not in the params")
    if int(manifest.get("variants_per_embedding", -1)) != len(ckpts) * len(scales) * sps:
        problems.append(f"manifest variants_per_embedding {manifest.get('variants_per_embedding')} != "
                        f"{len(ckpts) * len(scales) * sps}")
    figures = {"images": shard_images, "manifest_total": total, "provenance_rows": int(len(prov)),
               "shards": len(frames), "train_embeddings": len(train), "samples_per_setting": sps,
               "variants_per_embedding": len(ckpts) * len(scales) * sps}
    return figures, problems


# --- the run ------------------------------------------------------------------------------------------------

def fresh(ws: Path) -> None:
    """Remove the sample stage's outputs, chunk cache, work files and cached task records: all is generated."""
    from thinair import paths

    for d in (paths.stage_dir("sample", ws), paths.cache_dir("sample", ws), paths.work_dir("sample", ws)):
        shutil.rmtree(d, ignore_errors=True)
    results = paths.prefect_results(ws)
    if results.is_dir():
        for f in results.glob("sample-chunk-*"):
            f.unlink()


def plan(ws: Path, params_path: str, sets: list[str], images: int) -> tuple[int, int, int]:
    """(samples_per_setting, train embeddings, variants per setting) for at least `images` images."""
    from thinair.config import load_params
    from thinair.tasks.sample import load_bank

    p = load_params(params_path, sets).sample
    train = len(load_bank(ws, [])["index"])
    per = len(p.checkpoints) * len(p.guidance_scales)
    return max(1, math.ceil(images / (train * per))), train, per


def thinair_command() -> list[str]:
    exe = Path(sys.executable).with_name("thinair")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "thinair.cli"]


def run_sample(ws: Path, params_path: str, sets: list[str], cwd: Path, interval: float, log: Path):
    """`thinair sample` in `ws` under the RSS sampler: (exit status, wall seconds, RSS samples, the flow's own
    seconds as it printed them, the command)."""
    cmd = thinair_command() + ["--params", params_path, "--root", str(ws)]
    for s in sets:
        cmd += ["-S", s]
    cmd.append("sample")
    # Its own Prefect home, so the local API server it starts (thinair/localserver.py; its child while it runs) is
    # part of the measured tree, whatever server this shell names.
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(ws / ".thinair" / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DVC_NO_ANALYTICS="1", HF_HUB_OFFLINE="1")
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        with RssSampler(proc.pid, interval) as sampler:
            rc = proc.wait()
        seconds = time.perf_counter() - t0
    m = re.search(r"thinair sample: done in ([0-9.]+)s", log.read_text(errors="replace"))
    return rc, seconds, sampler.samples, float(m.group(1)) if m else None, cmd


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=50_000, help="at least this many images (default 50,000)")
    ap.add_argument("--workspace", default=None, help="a prepared workspace (data/ingest, data/invert) to run in "
                    "as it is (default: .thinair/soak under --root, linked to its ingest/invert outputs)")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("-S", "--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="extra params overrides for the run (repeatable)")
    ap.add_argument("--root", default=".", help="the main workspace; the subprocess runs here (relative paths in "
                    "the params, such as base.generator, resolve against it)")
    ap.add_argument("--interval", type=float, default=1.0, help="RSS sampling period, seconds")
    ap.add_argument("--every", type=float, default=5.0, help="timeline resolution in the JSON, seconds")
    ap.add_argument("--out", default="benchmarks/soak.json")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    params_path = str(Path(args.params).resolve())
    if args.workspace:
        ws = Path(args.workspace).resolve()
    else:
        ws = root / ".thinair" / "soak"
        link_stages(ws, root, ("ingest", "invert"))
    sps, train, per = plan(ws, params_path, args.set, args.images)
    sets = args.set + [f"sample.samples_per_setting={sps}"]
    fresh(ws)
    print(f"soak: {train} train embeddings x {per} setting(s) x {sps} = {train * per * sps} images in {ws}",
          file=sys.stderr, flush=True)
    log = ws / ".thinair" / "soak.log"
    rc, seconds, samples, flow_seconds, cmd = run_sample(ws, params_path, sets, root, args.interval, log)
    if rc != 0:
        print(f"soak: `{' '.join(cmd)}` exited with status {rc}; its log ({log}) ends:\n"
              + "\n".join(log.read_text(errors="replace").splitlines()[-30:]), file=sys.stderr)
        return 1
    figures, problems = check_accounting(ws, sps)
    rss = rss_summary(samples, args.every)
    import torch

    result = {"target_images": args.images, **figures, "seconds": round(seconds, 1),
              "flow_seconds": flow_seconds, "images_per_s": round(figures["images"] / seconds, 1),
              **{k: v for k, v in rss.items() if k != "timeline"},
              "accounting": {"ok": not problems, "problems": problems},
              "command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd)),
              "note": f"RSS = sum over the `thinair sample` process and all its descendants (Prefect API server, "
                      f"task-runner workers), sampled every {args.interval:g} s. {platform.machine()}, "
                      f"{os.cpu_count()} CPUs, torch {torch.__version__}.",
              "timeline": rss["timeline"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"images {figures['images']:,} in {figures['shards']} shards ({train} embeddings x {per} x {sps}); "
          f"{seconds:.1f} s wall ({flow_seconds} s flow), {result['images_per_s']} images/s")
    print(f"RSS (process tree, up to {rss['peak_processes']} processes): peak {rss['peak_rss_mb']} MB; at 10/50/90 %: "
          f"{rss['rss_mb_at']['10%']} / {rss['rss_mb_at']['50%']} / {rss['rss_mb_at']['90%']} MB; "
          f"peak 2nd half / 1st half {rss['second_half_peak_mb']} / {rss['first_half_peak_mb']} MB = "
          f"{rss['second_vs_first_half']}; slope over the middle 80 % {rss['slope_mb_per_min_middle80']} MB/min "
          f"({rss['drift_mb_middle80']} MB): {'flat' if rss['flat'] else 'NOT FLAT'}")
    if problems:
        print("accounting: FAILED\n  " + "\n  ".join(problems))
        return 1
    print(f"accounting: OK (manifest total = sum of counts = provenance rows = shard images = {figures['images']:,}; "
          f"each (source, checkpoint, guidance, seed) once; {sps} variant(s) per embedding and setting)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
