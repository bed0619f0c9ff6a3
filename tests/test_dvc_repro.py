"""`dvc repro` of a tiny copy of the project: the whole DAG, then a no-op second run. Slow (Prefect
starts a temporary server per stage), so not in the default suite: `pytest -m slow`."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dvc_repro_runs_the_dag_then_skips_everything(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    for item in ("dvc.yaml", "tasks", "thinair", "flows"):
        src = ROOT / item
        shutil.copytree(src, proj / item) if src.is_dir() else shutil.copy(src, proj / item)
    raw = tiny_params(proj / "generators" / "tiny-digits",
                      pretrain={"vae_steps": 3, "unet_steps": 3, "unet_channels": [8, 16],
                                "vae_channels": [4, 8, 8], "cross_attention_dim": 8, "num_tokens": 2})
    raw["base"]["generator"] = "generators/tiny-digits"
    full = yaml.safe_load((ROOT / "params.yaml").read_text())  # DVC needs every listed key present
    for section, values in raw.items():
        full[section].update(values)
    raw = full
    (proj / "params.yaml").write_text(yaml.safe_dump(raw))
    env = dict(os.environ, DVC_NO_ANALYTICS="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}",
               DVC_SITE_CACHE_DIR=str(tmp_path / "dvc-site"), PREFECT_HOME=str(tmp_path / "prefect"))
    subprocess.run(["dvc", "init", "--no-scm", "-q"], cwd=proj, check=True, env=env)
    run = subprocess.run(["dvc", "repro"], cwd=proj, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for out in ("data/report/index.html", "data/metrics/metrics.json", "data/cas/cas.json",
                "generators/tiny-digits/unet/config.json"):
        assert (proj / out).is_file(), out
    show = subprocess.run(["dvc", "metrics", "show"], cwd=proj, env=env, capture_output=True, text=True)
    assert "synthetic_vs_train.fid" in show.stdout and "accuracy.real" in show.stdout
    t0 = time.time()
    again = subprocess.run(["dvc", "repro"], cwd=proj, env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "didn't change, skipping" in again.stdout
    assert "Running stage" not in again.stdout and time.time() - t0 < 60
    # a params typo fails the run with the key named, and the last good outputs stay in place
    inverted = sorted(p.name for p in (proj / "data" / "invert").iterdir())
    raw["invert"]["stepz"] = 5
    raw["invert"]["steps"] = 6
    (proj / "params.yaml").write_text(yaml.safe_dump(raw))
    bad = subprocess.run(["dvc", "repro"], cwd=proj, env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "invert.stepz: unknown key" in bad.stdout + bad.stderr
    assert sorted(p.name for p in (proj / "data" / "invert").iterdir()) == inverted
