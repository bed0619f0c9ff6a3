"""`dvc repro` of a tiny copy of the project: the whole DAG, a no-op second run, a params typo that keeps
the last good outputs, and a kill -9 mid-`invert` that resumes to byte-identical outputs. Slow (Prefect
starts a temporary server per stage), so not in the default suite: `pytest -m slow`."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from thinair import io
from tests.conftest import tiny_params

ROOT = Path(__file__).resolve().parents[1]


def _project(proj: Path, **sections) -> tuple[dict, dict]:
    """A runnable copy of the project with tiny params; returns (params, environment)."""
    proj.mkdir(parents=True)
    for item in ("dvc.yaml", "tasks", "thinair", "flows", "benchmarks"):
        src = ROOT / item
        shutil.copytree(src, proj / item) if src.is_dir() else shutil.copy(src, proj / item)
    raw = tiny_params(proj / "generators" / "tiny-digits",
                      pretrain={"vae_steps": 3, "unet_steps": 3, "unet_channels": [8, 16],
                                "vae_channels": [4, 8, 8], "cross_attention_dim": 8, "num_tokens": 2}, **sections)
    raw["base"]["generator"] = "generators/tiny-digits"
    full = yaml.safe_load((ROOT / "params.yaml").read_text())  # DVC needs every listed key present
    for section, values in raw.items():
        full[section].update(values)
    (proj / "params.yaml").write_text(yaml.safe_dump(full))
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               DVC_SITE_CACHE_DIR=str(proj.parent / f"{proj.name}-dvc-site"),
               PREFECT_HOME=str(proj.parent / f"{proj.name}-prefect"))
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=proj, check=True, env=env)
    return full, env


def _repro(proj, env):
    return subprocess.run(["dvc", "repro"], cwd=proj, env=env, capture_output=True, text=True)


def _digests(proj: Path) -> dict:
    # (not dvc.lock: the tiny generator's train_log.json records wall-clock seconds)
    files = [f for f in sorted((proj / "data").rglob("*")) if f.is_file()]
    return {str(f.relative_to(proj)): io.file_sha256(f) for f in files}


@pytest.mark.slow
def test_dvc_repro_runs_the_dag_then_skips_everything(tmp_path):
    proj = tmp_path / "proj"
    raw, env = _project(proj)
    run = _repro(proj, env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for out in ("data/report/index.html", "data/metrics/metrics.json", "data/cas/cas.json",
                "generators/tiny-digits/unet/config.json"):
        assert (proj / out).is_file(), out
    show = subprocess.run(["dvc", "metrics", "show"], cwd=proj, env=env, capture_output=True, text=True)
    assert "synthetic_vs_train.fid" in show.stdout and "accuracy.real" in show.stdout
    t0 = time.time()
    again = _repro(proj, env)
    assert again.returncode == 0 and "didn't change, skipping" in again.stdout
    assert "Running stage" not in again.stdout and time.time() - t0 < 60
    # a params typo fails the run with the key named, and the last good outputs stay in place
    inverted = sorted(p.name for p in (proj / "data" / "invert").iterdir())
    raw["invert"]["stepz"] = 5
    raw["invert"]["steps"] = 6
    (proj / "params.yaml").write_text(yaml.safe_dump(raw))
    bad = _repro(proj, env)
    assert bad.returncode != 0 and "invert.stepz: unknown key" in bad.stdout + bad.stderr
    assert sorted(p.name for p in (proj / "data" / "invert").iterdir()) == inverted


@pytest.mark.slow
def test_dvc_repro_killed_mid_invert_resumes_to_identical_outputs(tmp_path):
    slow = {"invert": {"steps": 400, "checkpoint_every": 50, "batch_size": 20}, "sample": {"checkpoints": ["final"]}}
    ref, env_ref = _project(tmp_path / "ref", **slow)
    assert _repro(tmp_path / "ref", env_ref).returncode == 0
    proj = tmp_path / "run"
    _, env = _project(proj, **slow)
    proc = subprocess.Popen(["dvc", "repro"], cwd=proj, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    work = proj / ".thinair" / "work" / "invert"
    t0 = time.time()
    while not ((proj / "data/invert/train-00000.safetensors").exists() and any(work.glob("*.pt"))):
        assert proc.poll() is None, "dvc repro finished before the kill point"
        assert time.time() - t0 < 600, "kill point never reached"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # dvc and the `thinair invert` it started
    proc.wait()
    again = _repro(proj, env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    log = again.stdout + again.stderr
    # the finished chunk is not recomputed: a Prefect cache hit (or, if its record was not yet written, a chunk
    # cache hit); the killed run's device slots are reclaimed (their leases expire), so the resumed run finishes
    assert "Cached(type=COMPLETED)" in log or "invert chunk 0: reused from cache" in log
    assert "invert chunk 1: resuming from step" in again.stdout + again.stderr
    assert _digests(proj) == _digests(tmp_path / "ref")
