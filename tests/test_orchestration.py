"""Task runner choice: each kind builds its Prefect runner, or says which package is missing."""
from __future__ import annotations

import importlib.util

import pytest

from thinair.orchestration import RunnerUnavailable, task_runner


def test_thread_and_process_runners():
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    assert isinstance(task_runner(2, "thread"), ThreadPoolTaskRunner)
    proc = task_runner(2, "process")
    assert isinstance(proc, ProcessPoolTaskRunner) and proc._max_workers == 2


@pytest.mark.parametrize("kind", ["ray"])  # (prefect-dask is a dev dependency: the Dask runner is tested for real)
def test_cluster_runner_without_its_package_names_the_install(kind):
    if importlib.util.find_spec(f"prefect_{kind}") is not None:
        pytest.skip(f"prefect-{kind} is installed here")
    with pytest.raises(RunnerUnavailable, match=rf"pip install 'thinair\[{kind}\]'"):
        task_runner(2, kind)


def test_cli_reports_a_missing_runner_package_without_a_traceback(tiny_generator, tmp_path, capsys):
    import yaml

    from tests.conftest import tiny_params
    from thinair.cli import main

    if importlib.util.find_spec("prefect_ray") is not None:
        pytest.skip("prefect-ray is installed here")
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(tiny_params(tiny_generator, base={"task_runner": "ray"})))
    assert main(["--params", str(f), "--root", str(tmp_path), "ingest"]) == 1
    err = capsys.readouterr().err
    assert "thinair[ray]" in err and "Traceback" not in err
    assert not (tmp_path / "data").exists()
