"""benchmarks/gpu_smoke.py: the hand-run half-precision smoke script runs the real stages (so it cannot rot), quickly on
a small SD-layout model in the default suite and on SD v1's exact architecture (CPU, bfloat16, 64 px) under -m slow."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import benchmark_script

ROOT = Path(__file__).resolve().parents[1]


def _smoke():
    return benchmark_script("gpu_smoke")


def test_smoke_script_runs_every_stage_in_bfloat16_on_a_small_model(tmp_path, capsys):
    assert _smoke().main(["--device", "cpu", "--dtype", "bfloat16", "--arch", "tiny", "--resolution", "16",
                          "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "all stages passed" in out
    for stage in ("ingest", "encode", "invert", "sample", "cas"):
        assert f"| bfloat16 | {stage} |" in out
    assert "FAILED" not in out


def test_smoke_reports_a_failing_stage(tmp_path, capsys, monkeypatch):
    smoke = _smoke()
    monkeypatch.setattr(smoke, "check", lambda stage, root: "broken on purpose" if stage == "invert" else "")
    assert smoke.main(["--device", "cpu", "--dtype", "bfloat16", "--arch", "tiny", "--resolution", "16",
                       "--workdir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "| bfloat16 | invert |" in out and "FAILED: broken on purpose" in out and "| bfloat16 | sample |" not in out


@pytest.mark.slow  # SD v1's 860M-parameter UNet on 2 CPU cores: minutes
def test_smoke_sd_v1_architecture_on_the_cpu_in_bfloat16(tmp_path, capsys):
    assert _smoke().main(["--device", "cpu", "--dtype", "bfloat16", "--workdir", str(tmp_path)]) == 0
    assert "all stages passed" in capsys.readouterr().out
