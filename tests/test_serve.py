"""`thinair serve` against a Prefect server: both deployments are registered, a run triggered with
`prefect deployment run 'pipeline/thinair' --param ...` completes and updates dvc.lock. Slow (a served
process and a whole tiny DAG through DVC): `pytest -m slow`."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

from tests.test_dvc_repro import _project


@pytest.mark.slow
def test_served_deployment_run_from_the_cli_updates_dvc_lock(tmp_path, prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    from thinair.flows.pipeline import _server_url

    proj = tmp_path / "proj"
    _, env = _project(proj, base={"task_runner": "thread", "workers": 1},
                      cas={"seeds": 1, "scale_synthetic": [], "scale_real": [], "reconstructed_test": False})
    env["PREFECT_API_URL"] = get_current_settings().api.url or _server_url()
    serve = subprocess.Popen([sys.executable, "-m", "thinair.cli", "--root", str(proj), "serve", "--interval", "86400",
                              "--no-push"], cwd=proj, env=env, start_new_session=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with get_client(sync_client=True) as client:
            t0 = time.time()
            while True:
                names = {d.name for d in client.read_deployments()}
                if {"thinair", "scheduled"} <= names:
                    break
                assert serve.poll() is None, serve.stdout.read()[-3000:]
                assert time.time() - t0 < 180, "deployments never registered"
                time.sleep(2)
        run = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run", "pipeline/thinair", "--param",
                              "guidance_scales=[3.0]", "--watch", "--watch-timeout", "1500"],
                             cwd=proj, env=env, capture_output=True, text=True, timeout=1600)
        if run.returncode != 0:
            os.killpg(serve.pid, signal.SIGTERM)
            raise AssertionError(run.stdout[-2000:] + serve.stdout.read()[-6000:])
        lock = yaml.safe_load((proj / "dvc.lock").read_text())
        assert set(lock["stages"]) >= {"ingest", "encode", "invert", "sample", "metrics", "cas", "report"}
        assert lock["stages"]["sample"]["params"]["params.yaml"]["sample"]["guidance_scales"] == [3.0]
        status = subprocess.run(["dvc", "status"], cwd=proj, env=env, capture_output=True, text=True)
        assert "up to date" in status.stdout
    finally:
        os.killpg(serve.pid, signal.SIGTERM)
        serve.wait(30)
