"""The `pipeline` and `regenerate` flows (what the served deployments run): through DVC, so dvc.lock records
the run; nothing to do on an unchanged workspace; exactly the stale stages after a params change; new
versions pushed to the DVC remote and pulled back byte-identical."""
from __future__ import annotations

import shutil
import subprocess
import time

import pytest
import yaml

from thinair import dvcrun, io
from thinair.config import ParamsError
from tests.test_dvc_repro import _digests, _project

STAGES = ["ingest", "pretrain", "encode", "invert", "classenc", "search", "sample", "metrics", "cas", "report",
          "export"]


@pytest.fixture
def project(tmp_path, monkeypatch, prefect_server):
    proj = tmp_path / "proj"
    _, env = _project(proj, base={"task_runner": "thread", "workers": 1},  # (no process spawns: a faster test)
                      cas={"seeds": 1, "scale_synthetic": [], "scale_real": [], "reconstructed_test": False})
    for k in ("PATH", "DVC_NO_ANALYTICS", "DVC_SITE_CACHE_DIR"):
        monkeypatch.setenv(k, env[k])
    subprocess.run(["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")], cwd=proj, check=True, env=env)
    return proj, env


def test_overrides_are_validated_before_params_yaml_is_touched(project):
    proj, _ = project
    before = (proj / "params.yaml").read_text()
    with pytest.raises(ParamsError, match="sample.guidance_scale"):
        dvcrun.apply_overrides(proj, ["sample.guidance_scale=[3.0]"])
    with pytest.raises(ParamsError, match="invert.steps"):
        dvcrun.apply_overrides(proj, ["invert.steps=-1"])
    assert (proj / "params.yaml").read_text() == before
    assert dvcrun.apply_overrides(proj, ["sample.noise=0.2"]) == ["sample.noise"]
    assert yaml.safe_load((proj / "params.yaml").read_text())["sample"]["noise"] == 0.2


def test_regenerate_does_nothing_when_unchanged_and_exactly_the_stale_stages_after_a_change(project):
    from thinair.flows.pipeline import pipeline_flow, regenerate_flow

    proj, env = project
    assert dvcrun.stage_order(proj) == STAGES
    first = regenerate_flow(push=True, root=str(proj))
    assert first["reproduced"] == STAGES and first["pushed"] > 0
    lock = (proj / "dvc.lock").read_text()
    assert all(f"  {s}:" in lock for s in STAGES)

    t0 = time.time()
    idle = regenerate_flow(push=True, root=str(proj))
    assert idle == {"changed_params": [], "reproduced": [], "pushed": 0}
    assert time.time() - t0 < 60  # a status check, no stage started
    assert (proj / "dvc.lock").read_text() == lock

    # the UI path: a changed guidance re-runs sample and what depends on it, never ingest/encode/invert
    ingest_before = _digests(proj)
    out = pipeline_flow(guidance_scales=[3.0], push=True, root=str(proj))
    assert out["changed_params"] == ["sample.guidance_scales"]
    # search and export: no-ops at search.trials 0 and export.format null
    assert out["reproduced"] == ["search", "sample", "metrics", "cas", "report", "export"], out
    assert out["pushed"] > 0
    after = _digests(proj)
    for stage in ("ingest", "encode", "invert"):
        assert {k: v for k, v in after.items() if k.startswith(f"data/{stage}/")} == \
               {k: v for k, v in ingest_before.items() if k.startswith(f"data/{stage}/")}
    assert yaml.safe_load((proj / "params.yaml").read_text())["sample"]["guidance_scales"] == [3.0]
    status = subprocess.run(["dvc", "status"], cwd=proj, env=env, capture_output=True, text=True)
    assert "up to date" in status.stdout, status.stdout

    # the pushed versions come back from the remote byte-identical
    shutil.rmtree(proj / ".dvc" / "cache")
    shutil.rmtree(proj / "data" / "sample")
    pull = subprocess.run(["dvc", "pull"], cwd=proj, env=env, capture_output=True, text=True)
    assert pull.returncode == 0, pull.stderr
    assert _digests(proj) == after
    assert io.read_json(proj / "data" / "sample" / "manifest.json")["params"]["guidance_scales"] == [3.0]


def test_overrides_rewrite_only_their_lines_and_keep_comments(tmp_path):
    from pathlib import Path

    original = (Path(__file__).resolve().parents[1] / "params.yaml").read_text()
    (tmp_path / "params.yaml").write_text(original)
    assert dvcrun.apply_overrides(tmp_path, ["sample.samples_per_setting=5"]) == []  # unchanged value: no write
    assert (tmp_path / "params.yaml").read_text() == original
    assert dvcrun.apply_overrides(tmp_path, ["sample.guidance_scales=[3.0, 4.0]", "base.revision=v1"]) == \
        ["sample.guidance_scales", "base.revision"]
    new = (tmp_path / "params.yaml").read_text().splitlines()
    old = original.splitlines()
    differ = [(a, b) for a, b in zip(old, new) if a != b]
    assert len(new) == len(old) and len(differ) == 2
    assert differ[1][1].startswith("  guidance_scales: [3.0, 4.0]") and "# paper default 2" in differ[1][1]
    assert yaml.safe_load((tmp_path / "params.yaml").read_text())["base"]["revision"] == "v1"


def test_overrides_replace_block_style_values(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(
        {"sample": {"guidance_scales": [2.0, 3.0], "noise": 0.1}, "cas": {"modes": ["real", "synthetic"]}}))
    assert dvcrun.apply_overrides(tmp_path, ["sample.guidance_scales=[4.0]", "cas.modes=[real]"]) == \
        ["sample.guidance_scales", "cas.modes"]
    assert yaml.safe_load((tmp_path / "params.yaml").read_text()) == \
        {"sample": {"guidance_scales": [4.0], "noise": 0.1}, "cas": {"modes": ["real"]}}


def test_pipeline_takes_set_after_the_subcommand_as_the_readme_shows(tmp_path, capsys):
    from thinair.cli import _parser, main

    assert _parser().parse_args(["pipeline", "-S", "sample.noise=0.2", "--push"]).set == ["sample.noise=0.2"]
    assert _parser().parse_args(["-S", "sample.noise=0.2", "pipeline"]).set == ["sample.noise=0.2"]
    (tmp_path / "params.yaml").write_text("sample:\n  noise: 0.1\n")
    assert main(["--root", str(tmp_path), "pipeline", "-S", "sample.guidance_scale=[3.0]"]) == 2
    assert "sample.guidance_scale" in capsys.readouterr().err
    assert (tmp_path / "params.yaml").read_text() == "sample:\n  noise: 0.1\n"


def test_dvc_console_follows_the_current_streams():
    """`import dvc` binds its console handlers to the streams of that moment; once those are closed (an earlier
    test's captured output), DVC's next log line failed a reproduction. thinair re-points them before each use."""
    import io
    import logging
    import sys

    from dvc.logger import LoggerHandler

    handlers = [h for h in logging.getLogger("dvc").handlers if isinstance(h, LoggerHandler)]
    gone = io.StringIO()
    gone.close()
    for h in handlers:
        h.stream = gone
    dvcrun._console_to_current_streams()
    assert handlers and all(h.stream is (sys.stderr if h.level >= logging.WARNING else sys.stdout) for h in handlers)
    logging.getLogger("dvc.stage.run").info("Running stage 'x':")  # raised "I/O operation on closed file" before
