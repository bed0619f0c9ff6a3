"""Kill -9 in the middle of `invert` and of `sample`, run again: outputs are byte-identical to an
uninterrupted run and finished chunks are reused, not recomputed (the logs say so)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from thinair import io
from thinair.config import parse_params
from tests.conftest import tiny_params
from tests.stages import run_all

ROOT = Path(__file__).resolve().parents[1]


def _raw(tiny_generator, invert_steps: int = 400):
    # slow enough per chunk (hundreds of steps) that a kill lands mid-chunk
    return tiny_params(tiny_generator, invert={"steps": invert_steps, "checkpoint_every": 50, "batch_size": 20},
                       sample={"steps": 20, "checkpoints": ["final"], "samples_per_setting": 3})


def _child(params_file, root, *stages):
    return subprocess.Popen([sys.executable, "-m", "tests.stages", str(params_file), str(root), *stages], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _kill_when(proc, condition, timeout=600):  # generous: a loaded CI machine can be many times slower
    t0 = time.time()
    while not condition():
        if proc.poll() is not None:
            pytest.fail("the run finished before it could be killed:\n" + proc.stdout.read()[-2000:])
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail("kill point never reached")
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _digests(d: Path) -> dict:
    return {str(f.relative_to(d)): io.file_sha256(f) for f in sorted(d.rglob("*")) if f.is_file()}


def _reference(raw: dict, root: Path) -> Path:
    """The uninterrupted run a killed one must equal: its data/."""
    run_all(parse_params(raw), root, ("ingest", "encode", "invert", "sample"))
    return root / "data"


@pytest.mark.slow  # the default suite kills invert anywhere: tests/reliability/test_kill_anywhere.py::test_kill_invert_anywhere
def test_kill_during_invert_then_resume(tiny_generator, tmp_path):
    raw = _raw(tiny_generator)
    ref = _reference(raw, tmp_path / "ref")
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(raw))
    root = tmp_path / "run"
    run_all(parse_params(raw), root, ("ingest", "encode"))
    work = root / ".thinair" / "work" / "invert"
    # kill once chunk 0 is finished and chunk 1 has written a mid-chunk checkpoint
    proc = _child(f, root, "invert")
    _kill_when(proc, lambda: (root / "data/invert/train-00000.safetensors").exists() and any(work.glob("*.pt")))
    assert not (root / "data/invert/manifest.json").exists()
    done = _child(f, root, "invert", "sample")
    log, _ = done.communicate(timeout=300)
    assert done.returncode == 0, log[-3000:]
    assert "invert chunk 0: reused from cache" in log and "invert chunk 1: resuming from step" in log
    assert _digests(root / "data") == _digests(ref)


def test_kill_during_sample_then_resume(tiny_generator, tmp_path):
    raw = _raw(tiny_generator, invert_steps=4)  # only sample must last long enough to be killed mid-way
    ref = _reference(raw, tmp_path / "ref")
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(raw))
    root = tmp_path / "run"
    run_all(parse_params(raw), root, ("ingest", "encode", "invert"))
    proc = _child(f, root, "sample")
    _kill_when(proc, lambda: (root / "data/sample/train-00000.npz").exists())
    done = _child(f, root, "sample")
    log, _ = done.communicate(timeout=300)
    assert done.returncode == 0, log[-3000:]
    assert "sample chunk 0: reused from cache" in log and "sample chunk 1: reused" not in log
    assert _digests(root / "data") == _digests(ref)
