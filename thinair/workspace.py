"""One run at a time per workspace: an exclusive lock on ``.thinair/locks/workspace.lock``.

Every `thinair <stage>` holds it for its whole run, so two runs on one project never interleave writes to
``data/`` (a second run refuses at once with a message naming the holder). ``dvc repro`` adds its own lock
on top (``.dvc/tmp/lock``). The lock is released by the OS when the holder dies, so a killed run never
leaves it stuck. Writes only the lock file (holder's pid, command and start time, for the message).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from pathlib import Path

from thinair import paths
from thinair.errors import WorkspaceBusy  # noqa: F401 - raised here; defined in thinair/errors.py


@contextlib.contextmanager
def exclusive(root: str | Path, command: str):
    """Hold the workspace lock for `command`, or raise :class:`WorkspaceBusy` at once."""
    path = paths.state_dir(root) / "locks" / "workspace.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        try:
            holder = json.loads(f.read() or "{}")
        except ValueError:
            holder = {}
        f.close()
        since = time.strftime("%H:%M:%S", time.localtime(holder.get("since", time.time())))
        raise WorkspaceBusy(
            f"another thinair run is using this workspace ({Path(root).resolve()}): `thinair {holder.get('command', '?')}`"
            f" (pid {holder.get('pid', '?')}, since {since}). Wait for it to finish, or run in another copy of the "
            "project; two runs on one workspace would interleave their writes.") from None
    try:
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "command": command, "since": time.time()}))
        f.flush()
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()
