"""The fixed cost of one `thinair <stage>` command, before and after the shared Prefect server, side by side.

A stage's fixed cost is what its command costs when every unit is already a cache hit: what a `dvc repro` stage pays
besides its own work. "Before" is the command as it was before the shared server (``thinair/cli.py`` of commit
``--before``, read from git: each command starts and stops a temporary Prefect server of its own, skipped stages
included); "after" is today's (consecutive commands share one local server, thinair/localserver.py; a skipped stage
starts no Prefect at all). Both run in one scratch project and Prefect home, in turns, stage by stage, so the
machine's load weighs on both alike::

    python benchmarks/startup.py                      # every stage once each way (about 5 min on 2 cores)
    python benchmarks/startup.py --stages ingest classenc --repeat 2

The project is the embedded default (digits, the embedded generator, its `base.task_runner`) shrunk to 4 images per
class and a few steps, run once first so that every unit is cached. Prints a table (seconds, and the load average
before and after) and writes it to ``--out`` (JSON) when given.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("ingest", "encode", "invert", "classenc", "search", "sample", "metrics", "cas", "report")
BEFORE = "84382f3"  # the last commit whose `thinair` started a temporary Prefect server in every command
SMALL = {"base": {"chunk_size": 20}, "ingest": {"per_class_limit": 4},
         "invert": {"steps": 4, "batch_size": 10, "checkpoint_every": 2},
         "sample": {"steps": 2, "samples_per_setting": 1, "checkpoints": ["final"]},
         "metrics": {"feature_epochs": 1}, "cas": {"epochs": 1, "seeds": 1, "scale_synthetic": [], "scale_real": []}}


def make_project(where: Path) -> Path:
    """A scratch project: params.yaml (the embedded default, shrunk) and the embedded generator (absolute path)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for section, values in SMALL.items():
        params[section].update(values)
    params["base"]["generator"] = str(ROOT / params["base"]["generator"])
    proj = where / "proj"
    proj.mkdir(parents=True)
    (proj / "params.yaml").write_text(yaml.safe_dump(params))
    return proj


def old_cli(where: Path, rev: str) -> Path | None:
    """``thinair/cli.py`` as of `rev`, as a script (None when git or the revision is not available)."""
    try:
        src = subprocess.run(["git", "show", f"{rev}:thinair/cli.py"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = where / "cli_before.py"
    path.write_text(src)
    return path


def timed(cmd: list[str], proj: Path, env: dict) -> tuple[float, float]:
    """(wall, CPU) seconds of one command run in `proj` (it must succeed). CPU counts the command and the processes
    it waited for (its workers, its temporary server), not the shared server: a load-independent companion figure
    (on a loaded machine wall time is CPU time stretched by the load)."""
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    run = subprocess.run(cmd, cwd=proj, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{run.stdout[-2000:]}\n{run.stderr[-2000:]}")
    return seconds, _children_cpu() - cpu0


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--repeat", type=int, default=1, help="runs per stage and way (the table shows the fastest)")
    ap.add_argument("--before", default=BEFORE, help=f"git revision of the 'before' command (default {BEFORE})")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures here (JSON)")
    args = ap.parse_args(argv)
    where = Path(tempfile.mkdtemp(prefix="thinair-startup-"))
    try:
        return _measure(args, where)
    finally:
        shutil.rmtree(where, ignore_errors=True)


def _measure(args, where: Path) -> dict:
    proj = make_project(where)
    # the shared server must outlive a "before" command (20-30 s) between two "after" ones, as it outlives the
    # ~1 s between two stages of a dvc repro; with a 20 s idle time every "after" paid a server start (5-8 s)
    env = dict(os.environ, PREFECT_HOME=str(where / "prefect-home"), THINAIR_SERVER_IDLE_SECONDS="120",
               DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    env.pop("PREFECT_API_URL", None)
    after = [sys.executable, "-m", "thinair.cli"]
    before_cli = old_cli(where, args.before)
    before = [sys.executable, str(before_cli)] if before_cli else None
    t0, load0 = time.perf_counter(), load()
    first = timed(after + [STAGES[0]], proj, env)[0]  # a fresh Prefect home: migrates the database, starts the server
    for s in STAGES[1:]:
        timed(after + [s], proj, env)  # every unit cached from now on
    warm = time.perf_counter() - t0
    rows = []
    for s in args.stages:
        row = {"stage": s, "before_s": None, "after_s": None, "before_cpu_s": None, "after_cpu_s": None}
        for _ in range(args.repeat):
            if before:
                _keep_fastest(row, "before", timed(before + [s], proj, env | {"THINAIR_SHARED_SERVER": "0"}))
            _keep_fastest(row, "after", timed(after + [s], proj, env))
        row["load"] = load()
        rows.append(row)
        print(f"{s:9s} before {_fmt(row['before_s'])} (CPU {_fmt(row['before_cpu_s'])})  after {_fmt(row['after_s'])}"
              f" (CPU {_fmt(row['after_cpu_s'])})  load {row['load']}", flush=True)
    result = {"rows": rows, "first_command_s": round(first, 1), "warm_up_s": round(warm, 1),
              "load_before": load0, "load_after": load(), "cpus": os.cpu_count(), "before_rev": args.before}
    _report(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _keep_fastest(row: dict, way: str, figures: tuple[float, float]) -> None:
    wall, cpu = figures
    if row[f"{way}_s"] is None or wall < row[f"{way}_s"]:
        row[f"{way}_s"], row[f"{way}_cpu_s"] = round(wall, 2), round(cpu, 2)


def _fmt(x: float | None) -> str:
    return "   -  " if x is None else f"{x:5.1f} s"


def _report(result: dict) -> None:
    print(f"\nfixed cost per `thinair <stage>` (every unit cached), seconds; {result['cpus']} CPUs, "
          f"load average {result['load_before']} -> {result['load_after']}")
    print("| stage | before: wall (CPU) | after: wall (CPU) | load average after the stage |\n|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['stage']} | {_fmt(r['before_s'])} ({_fmt(r['before_cpu_s'])}) | {_fmt(r['after_s'])} "
              f"({_fmt(r['after_cpu_s'])}) | {r['load']} |")
    done = [r for r in result["rows"] if r["before_s"] is not None]
    if done:
        total = {k: sum(r[k] for r in done) for k in ("before_s", "before_cpu_s", "after_s", "after_cpu_s")}
        print(f"| **total** | {total['before_s']:.1f} s ({total['before_cpu_s']:.1f} s) | {total['after_s']:.1f} s "
              f"({total['after_cpu_s']:.1f} s) | |")
    print(f"(after: the first command of the warm-up, on a fresh Prefect home, took {result['first_command_s']} s "
          "including the server's start and database migration)")


if __name__ == "__main__":
    main()
