"""Progress of a stage's units: one log line per finished unit, and a live bar when a person watches the terminal.

Every finished unit is a log line, ``invert: invert-chunk-007 done (8/15, 53 %) — ETA 3 min 10 s``: what a log file,
CI and ``dvc repro`` show. On an interactive terminal a live bar (tqdm) of units done / total with the same ETA
(counting down between units) stays below the log lines. ``THINAIR_PROGRESS`` chooses:

* ``auto`` (default): the bar when stderr is a terminal and the command is not run by ``dvc repro`` (DVC sets
  ``DVC_STAGE`` for every stage command it runs);
* ``bar``: the bar whenever stderr is a terminal, under ``dvc repro`` too;
* ``lines``: no bar, the lines only;
* ``off``: no bar, and the lines at DEBUG level only (``THINAIR_LOG_LEVEL=DEBUG`` shows them).

There is never a bar when stderr is not a terminal (a pipe, a file, CI). Reads the environment; writes to stderr.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import sys
import threading
import time
from typing import Mapping

log = logging.getLogger(__name__)

ENV = "THINAIR_PROGRESS"
MODES = ("auto", "bar", "lines", "off")
DVC_STAGE_ENV = "DVC_STAGE"  # set by DVC for every stage command (dvc/stage/run.py prepare_kwargs)


def duration(seconds: float) -> str:
    """``3 min 10 s`` / ``1 h 02 min`` / ``12 s`` (progress lines' ETA)."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 60} min {s % 60} s" if s >= 60 else f"{s} s"


def _read(env: Mapping[str, str] | None) -> Mapping[str, str]:
    """`env`, or the two variables this module reads from the environment (never the whole of it)."""
    if env is not None:
        return env
    return {k: v for k in (ENV, DVC_STAGE_ENV) if (v := os.environ.get(k)) is not None}


def mode(env: Mapping[str, str] | None = None) -> str:
    """``THINAIR_PROGRESS`` from `env` (default: the environment), validated: auto (when unset), bar, lines or off."""
    env = _read(env)
    value = env.get(ENV, "").strip().lower() or "auto"
    if value not in MODES:
        raise ValueError(f"{ENV}={env[ENV]!r} is not a progress mode: set it to auto (the default: a live bar on an "
                         "interactive terminal, except under dvc repro), bar, lines (log lines only) or off, or unset it")
    return value


def is_terminal(stream) -> bool:
    """True if `stream` is an open interactive terminal."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def bar_wanted(stream=None, env: Mapping[str, str] | None = None) -> bool:
    """Whether a live bar goes to `stream` (default stderr): only on a terminal; under ``dvc repro`` (``DVC_STAGE``
    in `env`) only with ``THINAIR_PROGRESS=bar``; never with lines or off."""
    env = _read(env)
    chosen = mode(env)
    if chosen in ("lines", "off") or not is_terminal(sys.stderr if stream is None else stream):
        return False
    return chosen == "bar" or DVC_STAGE_ENV not in env


def worker_log_format(env: Mapping[str, str] | None = None) -> str:
    """The console log format of a worker process (thinair/orchestration.py): while the parent may draw a bar on the
    same terminal, each line first wipes the line the bar is on (``\\r`` and erase to its end), so a line shorter
    than the bar never keeps a piece of it; the parent draws the bar again below."""
    return ("\r\x1b[K" if bar_wanted(env=env) else "") + "%(asctime)s %(name)s: %(message)s"


class Progress:
    """`total` units of `what`: a log line per finished unit and, when :func:`bar_wanted` in the process that owns the
    terminal (not in a task runner's worker process), a live bar. Use it as a context manager: the bar is removed at
    exit (the lines stay)."""

    def __init__(self, what: str, total: int, stream=None, env: Mapping[str, str] | None = None):
        self.what, self.total, self.done, self._clock = what, total, 0, time.monotonic
        self.t0 = self.last = self._clock()
        self.eta: float | None = None  # seconds left, as estimated when the last unit finished
        self.level = logging.DEBUG if mode(env) == "off" else logging.INFO
        drawn = bar_wanted(stream, env) and multiprocessing.parent_process() is None  # a worker's parent draws it
        self._bar = _Bar(self, sys.stderr if stream is None else stream) if drawn else None

    def finished(self, name: str) -> None:
        """Unit `name` is done: log its line (ETA = mean time per unit so far x units left) and move the bar."""
        self.done += 1
        self.last = self._clock()
        self.eta = (self.last - self.t0) / self.done * (self.total - self.done)
        log.log(self.level, "%s: %s done (%d/%d, %d %%)%s", self.what, name, self.done, self.total,
                100 * self.done // max(1, self.total), f" — ETA {duration(self.eta)}" if self.done < self.total else "")
        if self._bar is not None:
            self._bar.advance()

    def eta_text(self) -> str:
        """``ETA 3 min 10 s`` counted down from the last unit's estimate ("" before the first unit and after the last)."""
        if self.eta is None or self.done >= self.total:
            return ""
        return f"ETA {duration(max(0.0, self.eta - (self._clock() - self.last)))}"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _HomeAfterDraw:
    """The bar's stream: every write that does not end a line is followed by ``\\r``, so the cursor waits at the start
    of the bar's line and a line another process prints there (a worker's log line, which also wipes that line
    first: :func:`worker_log_format`) starts at column 0 instead of being glued after the bar; the next redraw puts the
    bar below that line. Equal to the stream it wraps, so ``tqdm.write`` to that stream lifts the bar too."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        self.stream.write(text if text.endswith("\n") or not text else text + "\r")

    def flush(self) -> None:
        self.stream.flush()

    def __eq__(self, other) -> bool:
        return other is self or other is self.stream

    __hash__ = object.__hash__

    def __getattr__(self, name):  # encoding, isatty, fileno ...
        return getattr(self.stream, name)


class _AboveBar(logging.Handler):
    """A console handler's stand-in while a bar is drawn: the bar is lifted, the original handler writes its line (its
    own format, filters and stream), and the bar is drawn again below it."""

    def __init__(self, original: logging.Handler):
        super().__init__(original.level)
        self.original = original

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        with tqdm.external_write_mode(file=self.original.stream):  # clears every bar on that stream, redraws after
            self.original.handle(record)


def _console_handlers() -> list[tuple[logging.Logger, logging.Handler]]:
    """(logger, handler) for every handler writing to stdout or stderr (the root logger's, Prefect's ...)."""
    loggers = [logging.getLogger()] + [lg for lg in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(lg, logging.Logger)]
    return [(lg, h) for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr)]


class _Bar:
    """The live bar of a :class:`Progress`: tqdm on `stream` (a fixed width, ~60 columns), console log lines written
    above it, redrawn every second so the ETA counts down (and the bar comes back below another process's lines)."""

    def __init__(self, progress: Progress, stream):
        from tqdm import tqdm

        self.progress, size = progress, shutil.get_terminal_size()
        self.tqdm = tqdm(total=progress.total, desc=progress.what, file=_HomeAfterDraw(stream), leave=False,
                         mininterval=0, ncols=size.columns, nrows=size.lines,  # (80 x 24 when unknown)
                         bar_format="{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt}{postfix}")
        self._swapped = [(lg, h, _AboveBar(h)) for lg, h in _console_handlers()]
        for lg, h, above in self._swapped:
            lg.handlers = [above if x is h else x for x in lg.handlers]
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name=f"{progress.what}-progress-bar", daemon=True)
        self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(1.0):
            self.tqdm.set_postfix_str(self.progress.eta_text(), refresh=True)

    def advance(self) -> None:
        self.tqdm.set_postfix_str(self.progress.eta_text(), refresh=False)
        self.tqdm.update(1)

    def close(self) -> None:
        self._stop.set()
        self._ticker.join()
        for lg, h, above in self._swapped:
            lg.handlers = [h if x is above else x for x in lg.handlers]
        self.tqdm.close()
