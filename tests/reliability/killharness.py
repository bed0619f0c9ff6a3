"""Kill-anywhere harness: SIGKILL a stage at seeded random kill points, run it again, compare with a clean run.

For one stage and a prepared workspace (every upstream stage already run), :func:`kill_anywhere`:
1. copies the workspace and runs the stage uninterrupted in a child process with ``THINAIR_TRACE`` set
   (thinair/faults.py), which lists every kill point the stage passes: each atomic write's start, its
   fsync-before-rename and its rename, each chunk entering the content cache ("computed"), each stale-file delete;
2. draws ``points`` kill indices with a seeded generator, one from each equal slice of that list, so the kills
   spread over the whole stage;
3. for each index, on a fresh copy: runs the stage with ``THINAIR_KILL_AT`` (the child SIGKILLs its own process
   group there, as ``kill -9`` of the pipeline would), checks it died at exactly that point, runs the stage again
   and asserts: it succeeds; every output file (``data/`` and, for pretrain, the generator) is byte-identical to
   the clean run; no stray temporary files remain; and no chunk the killed run had finished is computed again.
The child runs the stage either through its plain functions (``core``: ``python -m tests.stages``) or through
the real CLI and Prefect flow (``cli``: ``thinair <stage>``, process workers, Prefect cache records).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from thinair import io

ROOT = Path(__file__).resolve().parents[2]
TEMP_MARKERS = (".tmp", ".part")


@dataclass
class Trial:
    at: int
    point: str  # "<kind> <what>" of the kill point
    finished_before_kill: int = 0  # chunks (cache entries) the killed run had finished: none was computed again


@dataclass
class Report:
    stage: str
    mode: str
    total_points: int
    trials: list[Trial]

    def as_dict(self) -> dict:
        return {"stage": self.stage, "mode": self.mode, "total_points": self.total_points,
                "trials": [t.__dict__ for t in self.trials]}


def read_trace(f: Path) -> list[tuple[str, str]]:
    if not f.is_file():
        return []
    return [tuple(line.split(" ", 2)[1:]) for line in f.read_text().splitlines() if line.strip()]


TIMING_KEYS = {"seconds"}  # wall-clock durations in logs (pretrain's train_log.json): never equal between runs


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if k not in TIMING_KEYS}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def digests(root: Path, outputs: list[str]) -> dict[str, str]:
    """sha256 of every output file (a JSON file's `seconds` timings left out; every other byte counts)."""
    import hashlib

    out = {}
    for rel in outputs:
        d = root / rel
        for f in sorted(d.rglob("*")) if d.is_dir() else []:
            if not f.is_file():
                continue
            digest = io.file_sha256(f)
            if f.suffix == ".json" and any(f'"{k}"' in f.read_text() for k in TIMING_KEYS):
                body = json.dumps(_without_timings(json.loads(f.read_text())), sort_keys=True).encode()
                digest = "json:" + hashlib.sha256(body).hexdigest()
            out[f.relative_to(root).as_posix()] = digest
    return out


def strays(root: Path, outputs: list[str]) -> list[str]:
    found = []
    for rel in outputs:
        base = root / rel
        for d in (base, base.with_name(base.name + ".tmp"), base.with_name(base.name + ".old")):
            if d != base and d.exists():
                found.append(d.relative_to(root).as_posix())
        if base.is_dir():
            found += [f.relative_to(root).as_posix() for f in base.rglob("*")
                      if any(m in f.name for m in TEMP_MARKERS)]
    return found


def run_child(root: Path, stage: str, mode: str, trace: Path, kill_at: int | None = None,
              timeout: float = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, THINAIR_TRACE=str(trace), PYTHONPATH=str(ROOT))
    if mode == "cli":  # its own Prefect database: the `gpu` limit's slots are not shared with other runs here
        env["PREFECT_HOME"] = str(root.parent / f"{root.name.split('-')[0]}-prefect-home")
        env.pop("PREFECT_API_URL", None)
    env.pop("THINAIR_KILL_AT", None)
    if kill_at is not None:
        env["THINAIR_KILL_AT"] = str(kill_at)
    if mode == "core":
        cmd, cwd = [sys.executable, "-m", "tests.stages", str(root / "params.yaml"), str(root), stage], ROOT
    else:
        cmd, cwd = [str(Path(sys.executable).with_name("thinair")), stage], root
    # its own session: the kill point's killpg takes the whole run down, not the test
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
                          start_new_session=True)


def choose_points(total: int, points: int, seed: int, stage: str) -> list[int]:
    """One index (1-based) from each of `points` equal slices of 1..total, seeded by (seed, stage)."""
    rng = np.random.default_rng(io.seed_for(seed, "kill", stage))
    edges = np.linspace(1, total + 1, points + 1).astype(int)
    return sorted({int(rng.integers(lo, max(lo + 1, hi))) for lo, hi in zip(edges[:-1], edges[1:])})


def kill_anywhere(prepared: Path, stage: str, raw: dict, work: Path, outputs: list[str], points: int = 3,
                  seed: int = 0, mode: str = "core", manifest_dir: str | None = None) -> Report:
    """Run the protocol above; raise AssertionError on any broken promise, else return what was tried."""
    def fresh(name: str) -> Path:
        dst = work / name
        shutil.copytree(prepared, dst, symlinks=True)
        (dst / "params.yaml").write_text(yaml.safe_dump(raw))
        return dst

    ref = fresh(f"{stage}-ref")
    done = run_child(ref, stage, mode, work / f"{stage}-ref.trace")
    assert done.returncode == 0, f"clean {stage} run failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}"
    trace = read_trace(work / f"{stage}-ref.trace")
    expected = digests(ref, outputs)
    assert expected, f"the clean {stage} run wrote nothing under {outputs}"
    if manifest_dir:
        assert manifest_is_last(work / f"{stage}-ref.trace", manifest_dir), f"{stage}: manifest.json not written last"
    trials = []
    for at in choose_points(len(trace), points, seed, stage):
        ws = fresh(f"{stage}-kill{at}")
        killed_trace, resume_trace = work / f"{stage}-kill{at}.trace", work / f"{stage}-resume{at}.trace"
        killed = run_child(ws, stage, mode, killed_trace, kill_at=at)
        seen = read_trace(killed_trace)
        assert killed.returncode == -9 and len(seen) == at, (
            f"{stage}: expected SIGKILL at point {at} ({' '.join(trace[at - 1])}), got rc={killed.returncode} "
            f"after {len(seen)} points:\n{killed.stderr[-2000:]}")
        resumed = run_child(ws, stage, mode, resume_trace)
        assert resumed.returncode == 0, (f"{stage}: the run after a kill at point {at} failed:\n"
                                         f"{resumed.stdout[-2000:]}{resumed.stderr[-3000:]}")
        got = digests(ws, outputs)
        diff = sorted(k for k in set(got) | set(expected) if got.get(k) != expected.get(k))
        assert not diff, f"{stage}: after a kill at point {at} ({' '.join(seen[-1])}) outputs differ: {diff[:10]}"
        left = strays(ws, outputs)
        assert not left, f"{stage}: temporary files left after a kill at point {at}: {left}"
        finished = {w for k, w in seen if k == "computed"}
        again = sorted(finished & {w for k, w in read_trace(resume_trace) if k == "computed"})
        assert not again, f"{stage}: chunks finished before the kill at point {at} were computed again: {again}"
        trials.append(Trial(at, " ".join(seen[-1]).replace(f"{ws}/", ""), len(finished)))
        shutil.rmtree(ws)
    shutil.rmtree(ref)
    return Report(stage, mode, len(trace), trials)


def manifest_is_last(trace_file: Path, stage_dir: str) -> bool:
    """In a clean run's trace, the last file renamed into `stage_dir` is its manifest.json."""
    renamed = [w for k, w in read_trace(trace_file) if k == "write-renamed" and f"/{stage_dir}/" in w]
    return bool(renamed) and renamed[-1].endswith(f"/{stage_dir}/{io.MANIFEST}")


def save_reports(reports: list[Report], path: Path) -> None:
    path.write_text(json.dumps([r.as_dict() for r in reports], indent=2) + "\n")
