"""Concurrent use: a second run on a workspace that a run holds refuses at once, names the holder, and
writes nothing; the lock goes away with its holder (a killed run never leaves it stuck)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from thinair.workspace import WorkspaceBusy, exclusive
from tests.conftest import tiny_params


def test_second_holder_is_refused_with_the_first_named(tmp_path):
    with exclusive(tmp_path, "invert"):
        with pytest.raises(WorkspaceBusy, match=r"`thinair invert` \(pid \d+"):
            with exclusive(tmp_path, "sample"):
                pass
    with exclusive(tmp_path, "sample"):  # released: the next run gets it
        pass


def test_a_stage_started_while_another_runs_exits_1_and_writes_nothing(tiny_generator, tmp_path, capsys):
    from thinair.cli import main

    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(tiny_params(tiny_generator)))
    with exclusive(tmp_path, "encode"):
        assert main(["--params", str(f), "--root", str(tmp_path), "ingest"]) == 1
    err = capsys.readouterr().err
    assert "another thinair run is using this workspace" in err and "thinair encode" in err
    assert not (tmp_path / "data").exists()


def test_the_lock_dies_with_its_holder(tmp_path):
    code = ("import sys, time; from thinair.workspace import exclusive\n"
            f"with exclusive({str(tmp_path)!r}, 'invert'):\n    print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(WorkspaceBusy):
        with exclusive(tmp_path, "sample"):
            pass
    proc.kill()
    proc.wait()
    t0 = time.time()
    with exclusive(tmp_path, "sample"):  # SIGKILL released it
        assert time.time() - t0 < 5
