"""The Prefect path: `thinair <stage>` runs each stage's flow (against a test server), same outputs as
the plain functions; failures come back as clear messages and non-zero exits."""
from __future__ import annotations


import yaml

from thinair import io
from thinair.cli import main
from tests.conftest import tiny_params


def test_every_stage_runs_as_a_flow(prefect_server, tiny_generator, tmp_path, capsys):
    f = tmp_path / "params.yaml"
    search = {"trials": 2, "space": {"sample.guidance_scales": ["float", 1.0, 3.0], "sample.steps": ["int", 1, 2]}}
    f.write_text(yaml.safe_dump(tiny_params(tiny_generator, search=search)))
    for stage in ("ingest", "encode", "invert", "classenc", "search", "sample", "metrics", "cas", "report"):
        assert main(["--params", str(f), "--root", str(tmp_path), stage]) == 0, capsys.readouterr().err
    d = tmp_path / "data"
    assert io.read_json(d / "invert" / "manifest.json")["chunks"] == ["train-00000.safetensors",
                                                                      "train-00001.safetensors"]
    assert io.read_json(d / "sample" / "manifest.json")["total"] == 80
    assert (d / "report" / "index.html").stat().st_size > 1000
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
    assert {"cas", "cas-scaling-synthetic", "cas-scaling-real", "metrics", "metrics-per-class", "search-trials"} <= keys
    assert io.read_json(d / "search" / "manifest.json")["trials"] == 2


def test_missing_upstream_output_names_the_stage_to_run(prefect_server, tiny_generator, tmp_path, capsys):
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(tiny_params(tiny_generator)))
    assert main(["--params", str(f), "--root", str(tmp_path), "invert"]) == 1
    assert "run `thinair encode`" in capsys.readouterr().err


def test_unloadable_generator_fails_without_retry_and_keeps_outputs(prefect_server, tiny_generator, tmp_path, capsys):
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(tiny_params(tiny_generator)))
    assert main(["--params", str(f), "--root", str(tmp_path), "ingest"]) == 0
    before = {p.name: io.file_sha256(p) for p in (tmp_path / "data" / "ingest").iterdir()}
    f.write_text(yaml.safe_dump(tiny_params(tmp_path / "no-such-generator")))
    assert main(["--params", str(f), "--root", str(tmp_path), "encode"]) == 1
    err = capsys.readouterr().err
    assert "no-such-generator" in err and "no such directory" in err
    assert before == {p.name: io.file_sha256(p) for p in (tmp_path / "data" / "ingest").iterdir()}
