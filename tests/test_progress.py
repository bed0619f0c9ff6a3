"""Progress of a stage's units (thinair/progress.py): a log line per finished unit always, a live bar only on an
interactive terminal outside `dvc repro` (THINAIR_PROGRESS switches it), checked on a real pseudo-terminal."""
from __future__ import annotations

import functools
import io
import logging
import os
import pty
import subprocess
import sys
import textwrap

import pytest
import yaml

from tests.conftest import tiny_params
from thinair import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("value, tty, dvc, bar", [
    (None, True, False, True),  # auto: a person at a terminal
    (None, False, False, False),  # auto: a pipe, a log file, CI
    (None, True, True, False),  # auto: `dvc repro` (it sets DVC_STAGE for every stage command)
    ("bar", True, True, True),  # asked for, under dvc repro too
    ("bar", False, False, False),  # ... but never into a file
    ("lines", True, False, False),
    ("off", True, False, False),
    (" Bar ", True, False, True),  # case and spaces do not matter
    ("", True, False, True),  # empty = unset
])
def test_the_bar_is_on_only_at_a_terminal_outside_dvc_repro(value, tty, dvc, bar):
    env = ({} if value is None else {progress.ENV: value}) | ({"DVC_STAGE": "invert"} if dvc else {})
    assert progress.bar_wanted(Terminal() if tty else io.StringIO(), env) is bar


def test_a_closed_or_odd_stream_is_no_terminal():
    closed = open(os.devnull)
    closed.close()  # its isatty() raises
    assert not progress.is_terminal(closed) and not progress.is_terminal(object())


def test_a_bad_mode_is_refused_with_the_fix(tmp_path, tiny_generator, capsys, monkeypatch):
    with pytest.raises(ValueError, match="THINAIR_PROGRESS='bars'.*auto.*bar.*lines.*off"):
        progress.mode({progress.ENV: "bars"})
    from thinair.cli import main

    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump(tiny_params(tiny_generator)))
    monkeypatch.setenv(progress.ENV, "bars")
    assert main(["--params", str(f), "--root", str(tmp_path), "invert"]) == 2  # before Prefect starts
    assert "THINAIR_PROGRESS='bars' is not a progress mode" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]  # nothing was written


def test_the_lines_stay_with_the_bar_and_without_it(caplog):
    seen = {}
    for name, env in (("bar", {}), ("pipe", {}), ("lines", {progress.ENV: "lines"}), ("off", {progress.ENV: "off"})):
        stream = io.StringIO() if name == "pipe" else Terminal()
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="thinair"), progress.Progress("invert", 3, stream, env) as p:
            p.finished("invert-chunk-000")
            p.finished("invert-chunk-001")
            drawn = stream.getvalue()
        seen[name] = ([r.getMessage() for r in caplog.records], drawn, stream.getvalue())
    lines, drawn, after = seen["bar"]
    assert lines[0].startswith("invert: invert-chunk-000 done (1/3, 33 %) — ETA ") and len(lines) == 2
    assert "invert:  67%|" in drawn and "2/3, ETA " in drawn  # the bar, with the lines' ETA
    assert screen(drawn)[-1].startswith("invert:  67%|") and screen(after) == []  # removed at exit
    assert seen["pipe"][0] == seen["lines"][0] == lines and seen["pipe"][1] == seen["lines"][1] == ""
    assert seen["off"] == ([], "", "")  # off: no bar, and the lines only at DEBUG


def _bar_drawn_here(result=None) -> bool:
    with progress.Progress("sample", 2, Terminal(), {}) as p:
        drawn = p._bar is not None
    if result is not None:
        result.put(drawn)
    return drawn


def test_a_worker_process_draws_no_bar_of_its_own():
    """A task runner's worker (search runs the sample stage inside its task) logs its lines; its parent draws."""
    import multiprocessing

    assert _bar_drawn_here()  # here: the process owning the terminal
    ctx = multiprocessing.get_context("spawn")
    result = ctx.Queue()
    worker = ctx.Process(target=_bar_drawn_here, args=(result,))
    worker.start()
    assert result.get(timeout=120) is False
    worker.join(timeout=60)


def screen(raw: str) -> list[str]:
    """What a terminal shows after `raw`: a carriage return goes back to column 0, where text overwrites, and
    ESC [ K there erases the line."""
    def overwrite(shown: str, text: str) -> str:
        if text.startswith("\x1b[K"):
            shown, text = "", text[3:]
        return text + shown[len(text):]

    rows = [functools.reduce(overwrite, row.split("\r"), "").rstrip() for row in raw.split("\n")]
    return [r for r in rows if r]


_WORKER = textwrap.dedent("""
    import logging, time
    from thinair.progress import worker_log_format
    logging.basicConfig(level="INFO", format=worker_log_format().replace("%(asctime)s ", ""))
    for i in range(3):
        time.sleep(1.5)
        logging.getLogger("w").info(f"line {i}")  # shorter than the bar
""")
_SCRIPT = textwrap.dedent("""
    import logging, subprocess, sys, time
    from thinair.progress import Progress
    logging.basicConfig(level="INFO", format="%(name)s: %(message)s")
    worker = subprocess.Popen([sys.executable, "-c", sys.argv[1]])  # another process on the same terminal
    with Progress("invert", 3) as p:
        for i in range(3):
            time.sleep(1.5)
            p.finished(f"invert-chunk-{i:03d}")
    worker.wait()
""")


def _in_a_terminal(env: dict) -> str:
    """Run _SCRIPT with stdout and stderr on a pseudo-terminal; return what it wrote there."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", _SCRIPT, _WORKER], stdout=follower, stderr=follower,
                            env={k: v for k, v in os.environ.items() if k not in ("DVC_STAGE", progress.ENV)} | env)
    os.close(follower)
    out = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the follower side closed: the script ended
            break
        if not chunk:
            break
        out += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0, out.decode(errors="replace")
    return out.decode()


def test_a_live_bar_on_a_pseudo_terminal_leaves_every_line_whole():
    raw = _in_a_terminal({})
    assert "invert:  33%|" in raw and "1/3, ETA " in raw and "invert:  67%|" in raw  # the bar moved
    lines = [f"w: line {i}" for i in range(3)]
    done = ["thinair.progress: invert: invert-chunk-000 done (1/3, 33 %) — ETA ",
            "thinair.progress: invert: invert-chunk-001 done (2/3, 66 %) — ETA ",
            "thinair.progress: invert: invert-chunk-002 done (3/3, 100 %)"]
    shown = screen(raw)
    assert [s for s in shown if s.startswith("w:")] == lines  # never glued to the bar, never a piece of it left
    ours = [s for s in shown if s.startswith("thinair")]
    assert len(ours) == 3 and all(s.startswith(d) for s, d in zip(ours, done)) and ours[2] == done[2], ours
    assert len(shown) == 6, shown  # and no bar is left on the screen

    under_dvc = _in_a_terminal({"DVC_STAGE": "invert"})
    assert "|" not in under_dvc and "\x1b" not in under_dvc  # dvc repro: the same lines, no bar
    assert sorted(s.split(" — ETA")[0] for s in screen(under_dvc)) == sorted(s.split(" — ETA")[0] for s in shown)
    assert "invert:  33%|" in _in_a_terminal({"DVC_STAGE": "invert", progress.ENV: "bar"})
