"""Kill anywhere (issue 7): SIGKILL each stage at >= 3 seeded random kill points, resume, compare byte for byte.

See killharness.py for the protocol. The default suite runs it on `invert` (the stage with mid-chunk
checkpoints); the slow test runs every stage of the DAG through its plain functions, and invert, sample and cas
also through the real CLI + Prefect flow. Set THINAIR_KILL_REPORT=<file> to keep the points tried as JSON.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import tiny_params
from tests.reliability.killharness import choose_points, kill_anywhere, read_trace, save_reports, strays
from tests.stages import ORDER, run_stage

PRETRAIN = {"vae_steps": 4, "unet_steps": 4, "batch_size": 16, "unet_channels": [8, 16], "vae_channels": [4, 8, 8],
            "cross_attention_dim": 8, "num_tokens": 2, "output": "gen"}
CLASSENC = {"steps": 6, "batch_size": 16, "tokens": 2, "hidden": 16, "checkpoint_every": 2, "finetune": "lora",
            "finetune_steps": 4}
MANIFESTS = {"ingest", "encode", "invert", "classenc", "search", "sample"}


def _raw(gen, stage: str, mode: str = "core") -> dict:
    raw = tiny_params(gen, base={"task_runner": "process", "workers": 2}) if mode == "cli" else tiny_params(gen)
    raw["cas"] |= {"seeds": 1, "modes": ["real", "synthetic"], "scale_synthetic": [1], "scale_real": [1.0]}
    if stage == "classenc":
        raw["sample"]["method"] = "class_encoder"
        raw["classenc"] = dict(CLASSENC)
    if stage == "pretrain":
        raw["pretrain"] = dict(PRETRAIN)
    if stage == "search":  # two trials, so kills land inside a trial and between trials of the study
        raw["search"] = {"trials": 2, "space": {"sample.guidance_scales": ["float", 1.0, 3.0],
                                                "sample.steps": ["int", 1, 2]}}
    return raw


class Chain:
    """The workspace just before each stage, built lazily: upstream stages run in-process, once per module."""

    def __init__(self, base: Path, gen: Path):
        from thinair.config import parse_params

        self.base, self.params, self.done = base, parse_params(_raw(gen, "ingest")), 0
        (base / "chain").mkdir()

    def __getitem__(self, stage: str) -> Path:
        snap = self.base / f"before-{stage}"
        if stage == "pretrain":
            snap.mkdir(exist_ok=True)
            return snap
        while not snap.exists():
            nxt = ORDER[self.done]
            shutil.copytree(self.base / "chain", self.base / f"before-{nxt}", symlinks=True)
            run_stage(nxt, self.params, self.base / "chain")
            self.done += 1
        return snap


@pytest.fixture(scope="module")
def snapshots(tiny_generator, tmp_path_factory):
    return Chain(tmp_path_factory.mktemp("kill-chain"), tiny_generator)


def _outputs(stage: str) -> list[str]:
    return ["gen"] if stage == "pretrain" else ["data"]


def _run(snapshots, tiny_generator, tmp_path, stages, mode="core"):
    reports = []
    for stage in stages:
        work = tmp_path / f"{mode}-{stage}"
        work.mkdir()
        rep = kill_anywhere(snapshots[stage], stage, _raw(tiny_generator, stage, mode), work, _outputs(stage),
                            points=3, seed=0, mode=mode, manifest_dir=stage if stage in MANIFESTS else None)
        assert len(rep.trials) >= 3 and rep.total_points >= 3
        reports.append(rep)
    if os.environ.get("THINAIR_KILL_REPORT"):
        save_reports(reports, Path(os.environ["THINAIR_KILL_REPORT"]))
    return reports


def test_choose_points_spreads_over_the_stage_and_is_seeded():
    pts = choose_points(90, 3, seed=0, stage="invert")
    assert len(pts) == 3 and pts[0] <= 30 < pts[1] <= 60 < pts[2] <= 90
    assert pts == choose_points(90, 3, seed=0, stage="invert") != choose_points(90, 3, seed=1, stage="invert")


def test_trace_and_kill_point_take_the_whole_process_group_down(tmp_path):
    """The fault hook itself: a child that passes 5 points dies at point 3, and its child process with it."""
    import subprocess
    import sys

    code = ("import os, subprocess, sys, time\n"
            "from thinair import faults\n"
            "kid = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "open(sys.argv[1], 'w').write(str(kid.pid))\n"
            "for i in range(5): faults.point('write-renamed', f'f{i}')\n")
    trace, pidfile = tmp_path / "t", tmp_path / "pid"
    env = dict(os.environ, THINAIR_TRACE=str(trace), THINAIR_KILL_AT="3")
    proc = subprocess.run([sys.executable, "-c", code, str(pidfile)], env=env, start_new_session=True)
    assert proc.returncode == -9
    assert read_trace(trace) == [("write-renamed", "f0"), ("write-renamed", "f1"), ("write-renamed", "f2")]
    kid = int(pidfile.read_text())
    import time

    for _ in range(50):  # the grandchild was in the killed group
        try:
            os.kill(kid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the kill point did not take the child's child down")


def test_strays_finds_temporary_files(tmp_path):
    (tmp_path / "data" / "x").mkdir(parents=True)
    (tmp_path / "data" / "x" / ".a.npz.123.tmp").write_bytes(b"")
    (tmp_path / "gen.old").mkdir()
    assert sorted(strays(tmp_path, ["data", "gen"])) == ["data/x/.a.npz.123.tmp", "gen.old"]


def test_kill_invert_anywhere(snapshots, tiny_generator, tmp_path):
    (rep,) = _run(snapshots, tiny_generator, tmp_path, ["invert"])
    assert any(t.finished_before_kill for t in rep.trials)  # at least one kill came after a finished chunk


@pytest.mark.slow
def test_kill_every_stage_anywhere(snapshots, tiny_generator, tmp_path):
    reports = _run(snapshots, tiny_generator, tmp_path, ["pretrain", *ORDER])
    assert sum(len(r.trials) for r in reports) >= 3 * (len(ORDER) + 1)


@pytest.mark.slow
def test_kill_cli_stages_anywhere(snapshots, tiny_generator, tmp_path):
    _run(snapshots, tiny_generator, tmp_path, ["invert", "sample", "cas"], mode="cli")


def test_a_killed_writes_temporary_file_is_removed_by_the_next_write(tmp_path):
    """A SIGKILL between fsync and rename leaves `.name.<pid>.<rand>.tmp`; the next write of that file deletes it
    (its writer is dead) but leaves a live writer's temporary file alone."""
    import subprocess
    import sys

    from thinair import io

    code = "import sys; from thinair import io; io.write_json(sys.argv[1], {'a': 1})"
    env = dict(os.environ, THINAIR_TRACE=str(tmp_path / "t"), THINAIR_KILL_AT="2")  # 2 = write-synced
    target = tmp_path / "out" / "metrics.json"
    assert subprocess.run([sys.executable, "-c", code, str(target)], env=env, start_new_session=True).returncode == -9
    (orphan,) = (tmp_path / "out").glob(".metrics.json.*.tmp")
    with io.atomic_path(target) as live:  # a live writer's temporary file (its flock held) survives
        io.write_json(target, {"a": 2})
        assert not orphan.exists() and live.exists()
        live.write_text('{"a": 3}')
    assert io.read_json(target) == {"a": 3} and not list((tmp_path / "out").glob(".*.tmp"))
    other = tmp_path / "out" / ".metrics.json.1.tmp"  # not one of ours (not mkstemp's name): left alone
    other.write_text("")
    io.write_json(target, {"a": 4})
    assert other.exists()
