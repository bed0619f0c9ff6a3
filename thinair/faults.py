"""Kill points for the kill-anywhere tests (tests/reliability/killharness.py); inert unless switched on.

Every durable step a stage takes (an atomic write's start, its fsync-before-rename and its rename, a chunk
entering the content cache, a stale file being deleted) calls :func:`point`. With ``THINAIR_TRACE=<file>`` set,
each call appends one line ``<n> <kind> <what>`` to that file under an exclusive lock, so the count is shared by
every process of a run (Prefect's process workers inherit the environment). With ``THINAIR_KILL_AT=<n>`` also
set, the call that writes line ``n`` SIGKILLs its whole process group -- the pipeline, as ``kill -9`` would --
right there. Without ``THINAIR_TRACE`` a point costs one environment lookup. Reads and writes only the trace file.
"""
from __future__ import annotations

import fcntl
import os
import signal

TRACE_ENV = "THINAIR_TRACE"
KILL_ENV = "THINAIR_KILL_AT"


def point(kind: str, what: object) -> None:
    """Record (and with THINAIR_KILL_AT, maybe die at) one kill point: `kind` names the step, `what` its file."""
    trace = os.environ.get(TRACE_ENV)
    if not trace:
        return
    with open(trace, "a+", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        n = sum(1 for _ in f) + 1
        f.write(f"{n} {kind} {what}\n")
        f.flush()
        os.fsync(f.fileno())
        if os.environ.get(KILL_ENV) == str(n):
            os.killpg(os.getpgrp(), signal.SIGKILL)
