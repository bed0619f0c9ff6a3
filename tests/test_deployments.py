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


# A three-stage stand-in for thinair's DAG: each stage writes its params and what it read (seconds per stage instead
# of a thinair process each), so the flows' DVC logic is checked in the default suite; the real DAG is the slow test
# below.
TOY_STAGE = """import json, pathlib, sys, yaml
stage, deps, params = sys.argv[1], sys.argv[2:], yaml.safe_load(open("params.yaml"))
seen = {"guidance": params["sample"]["guidance_scales"]}
seen |= {d: json.loads(pathlib.Path(f"data/{d}/out.json").read_text()) for d in deps}
(out := pathlib.Path(f"data/{stage}")).mkdir(parents=True, exist_ok=True)
(out / "out.json").write_text(json.dumps(seen))
"""
TOY_DAG = {"stages": {
    "ingest": {"cmd": "python stage.py ingest", "deps": ["stage.py"], "params": ["base.dataset"],
               "outs": ["data/ingest"]},
    "sample": {"cmd": "python stage.py sample ingest", "deps": ["stage.py", "data/ingest"],
               "params": ["sample.guidance_scales"], "outs": ["data/sample"]},
    "report": {"cmd": "python stage.py report sample", "deps": ["stage.py", "data/sample"], "outs": ["data/report"]},
}}


@pytest.fixture
def toy_project(tmp_path, monkeypatch, prefect_server):
    """A DVC project with thinair's params.yaml, the toy DAG above and a local remote."""
    import os
    import sys
    from pathlib import Path

    proj = tmp_path / "toy"
    proj.mkdir()
    shutil.copy(Path(__file__).resolve().parents[1] / "params.yaml", proj / "params.yaml")
    (proj / "stage.py").write_text(TOY_STAGE)
    (proj / "dvc.yaml").write_text(yaml.safe_dump(TOY_DAG, sort_keys=False))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("DVC_SITE_CACHE_DIR", str(tmp_path / "dvc-site"))
    for cmd in (["dvc", "init", "--no-scm", "-q"], ["dvc", "remote", "add", "-d", "local", str(tmp_path / "remote")]):
        subprocess.run(cmd, cwd=proj, check=True)
    return proj


def test_regenerate_and_pipeline_reproduce_exactly_the_stale_stages_of_a_toy_dag(toy_project):
    """The flows' DVC logic on the toy DAG: everything stale at first, nothing when unchanged, after a params change
    exactly the stages downstream of it (dvc.lock records them), pushed, and pulled back byte-identical."""
    from thinair.flows.pipeline import pipeline_flow, regenerate_flow

    proj = toy_project
    assert dvcrun.stage_order(proj) == ["ingest", "sample", "report"]
    first = regenerate_flow(push=True, root=str(proj))
    assert first["reproduced"] == ["ingest", "sample", "report"] and first["pushed"] > 0
    lock = (proj / "dvc.lock").read_text()
    assert regenerate_flow(push=True, root=str(proj)) == {"changed_params": [], "reproduced": [], "pushed": 0}
    assert (proj / "dvc.lock").read_text() == lock
    ingest = (proj / "data/ingest/out.json").read_text()
    out = pipeline_flow(guidance_scales=[3.0], push=True, root=str(proj))
    assert out["changed_params"] == ["sample.guidance_scales"] and out["reproduced"] == ["sample", "report"]
    assert 0 < out["pushed"] < first["pushed"]  # the two new versions only
    assert (proj / "data/ingest/out.json").read_text() == ingest  # not re-run: it still saw the old value
    assert io.read_json(proj / "data/report/out.json") == {"guidance": [3.0], "sample": {
        "guidance": [3.0], "ingest": {"guidance": [2.0]}}}
    assert (proj / "dvc.lock").read_text() != lock and dvcrun.stale_stages(proj) == []
    report = _digests(proj)
    shutil.rmtree(proj / ".dvc" / "cache")
    shutil.rmtree(proj / "data" / "report")
    subprocess.run(["dvc", "pull"], cwd=proj, check=True, capture_output=True)
    assert _digests(proj) == report


@pytest.mark.slow  # the flows' DVC logic: the toy-DAG test above; every stage's command: tests/test_flows.py
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
