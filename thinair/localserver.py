"""The local Prefect server that consecutive `thinair` commands share: started on first use, stopped when idle.

Without ``PREFECT_API_URL`` every Prefect process starts a temporary server of its own and stops it at exit: 20-30 s
on 2 cores (importing the server, checking its database, starting it), paid again by every stage of a ``dvc repro``.
Here the first `thinair` command starts the same server (Prefect's temporary-server app: no UI, the services a
temporary server runs, bound to 127.0.0.1, the user's ``PREFECT_HOME``) as a process of its own, and the following
commands find it and use it at once. Each command holds a *client lock* (an ``fcntl`` lock on a file of its own) for
its lifetime; the OS releases it when the command ends, even by SIGKILL. The server stops once no client has held a
lock for :data:`IDLE_SECONDS` (``THINAIR_SERVER_IDLE_SECONDS``). Starting, finding and stopping are serialised by one
start lock, so a command never connects to a server that is shutting down.

One server per Prefect home and server settings: ``$PREFECT_HOME/thinair-server/<settings hash>/`` holds
``server.json`` (url, pid), ``server.log``, ``start.lock`` and ``clients/<pid>.lock``; nothing else is written.
``THINAIR_SHARED_SERVER=0`` gives each command Prefect's own temporary server again.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

log = logging.getLogger(__name__)
IDLE_SECONDS = 60.0  # between two stages of one `dvc repro` DVC needs seconds; a minute leaves a wide margin
POLL_SECONDS = 1.0
ENABLED_ENV, IDLE_ENV = "THINAIR_SHARED_SERVER", "THINAIR_SERVER_IDLE_SECONDS"
# what makes Prefect's app a temporary server's (as prefect.server.api.server.SubprocessASGIServer starts it)
SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}
_CLIENT_LOCKS: dict[Path, object] = {}  # state dir -> this process's open, locked client file


def enabled() -> bool:
    """Whether `thinair` commands share the local server (the default) rather than start one each."""
    return os.environ.get(ENABLED_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def state_dir(home: str | Path, server_env: dict[str, str]) -> Path:
    """The shared server's folder for this Prefect home and these server settings (other settings, other server)."""
    digest = hashlib.sha256(json.dumps(sorted(server_env.items())).encode()).hexdigest()[:12]
    return Path(home).expanduser() / "thinair-server" / digest


@contextlib.contextmanager
def _locked(path: Path):
    """Hold an exclusive ``fcntl`` lock on `path` (waiting for it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def healthy(url: str, timeout: float = 2.0) -> bool:
    """Whether the Prefect API at `url` answers its health check."""
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def _recorded_url(d: Path) -> str | None:
    """The url of the server recorded in `d`, if it is up."""
    try:
        url = json.loads((d / "server.json").read_text())["url"]
    except (OSError, ValueError, KeyError):
        return None
    return url if healthy(url) else None


def _register(d: Path) -> None:
    """Hold this process's client lock in `d` until it exits (the server stays up while any is held)."""
    if d in _CLIENT_LOCKS:
        return
    path = d / "clients" / f"{os.getpid()}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")  # noqa: SIM115 - held open (and locked) until this process exits
    fcntl.flock(f, fcntl.LOCK_EX)
    _CLIENT_LOCKS[d] = f


def live_clients(d: Path) -> int:
    """How many processes hold a client lock in `d`; the files of dead ones are removed. Call with the start lock."""
    n = 0
    for path in sorted((d / "clients").glob("*.lock")):
        with open(path, "a+") as f:  # a lock held through another open file conflicts, even in this process
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                n += 1
                continue
            path.unlink(missing_ok=True)  # its holder died (or ended): nobody will lock it again
    return n


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(d: Path, env: dict[str, str], timeout: float) -> tuple[str, int] | None:
    """Start a server process for `d` on a free port and wait until it answers: (url, pid), or None if it exited
    (its port was taken meanwhile)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    with open(d / "server.log", "ab") as logf:
        proc = subprocess.Popen([sys.executable, "-m", "thinair.localserver", str(d), str(port)],
                                env=dict(os.environ, **env, **SERVER_ENV), stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)  # outlives this command's group
    deadline = time.monotonic() + timeout
    while not healthy(url, timeout=1.0):
        if proc.poll() is not None:
            return None
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the shared Prefect server did not answer within {timeout:.0f} s; see "
                               f"{d / 'server.log'}")
        time.sleep(0.1)
    return url, proc.pid


def _start(d: Path, env: dict[str, str], timeout: float) -> str:
    """Start the server for `d` (three tries) and record it in ``server.json``. Returns its API url."""
    for _ in range(3):
        started = _launch(d, env, timeout)
        if started:
            break
    else:
        raise RuntimeError(f"the shared Prefect server did not start; see {d / 'server.log'}")
    url, pid = started
    with open(d / "server.json.part", "w") as f:
        json.dump({"url": url, "pid": pid, "started": time.time()}, f)
    os.replace(d / "server.json.part", d / "server.json")
    log.info("started the shared Prefect server on %s (it stops after %.0f s without a thinair command)", url,
             idle_seconds())
    return url


def connect(home: str | Path, server_env: dict[str, str], timeout: float = 180) -> str:
    """The API url of the shared server for `home` (started if none is up), held open for this process's lifetime.

    Args:
        home: the Prefect home (its database and concurrency leases).
        server_env: Prefect settings the server must run with (``Settings.to_environment_variables``).
        timeout: seconds to wait for a new server to answer.
    """
    d = state_dir(home, server_env)
    with _locked(d / "start.lock"):
        url = _recorded_url(d) or _start(d, server_env, timeout)
        _register(d)
    return url


def idle_seconds() -> float:
    return float(os.environ.get(IDLE_ENV, IDLE_SECONDS))


# --- the server process -----------------------------------------------------------------------------------------

def _should_stop(d: Path, url: str, idle: float, last_busy: float) -> tuple[bool, float]:
    """One idle check: (stop now?, time the server was last seen in use). Holds the start lock while deciding, and
    withdraws ``server.json`` before saying yes, so no command can connect to a server about to stop."""
    now = time.monotonic()
    with _locked(d / "start.lock"):
        if live_clients(d):
            return False, now
        if now - last_busy < idle:
            return False, last_busy
        with contextlib.suppress(OSError, ValueError, KeyError):
            if json.loads((d / "server.json").read_text())["url"] == url:
                (d / "server.json").unlink()
        return True, last_busy


def _watch(server, d: Path, url: str, idle: float) -> None:
    """Thread body: ask uvicorn to exit once the server has been without clients for `idle` seconds."""
    last_busy = time.monotonic()
    while not server.should_exit:
        time.sleep(POLL_SECONDS)
        stop, last_busy = _should_stop(d, url, idle, last_busy)
        if stop:
            log.info("no thinair command for %.0f s: stopping the shared Prefect server %s", idle, url)
            server.should_exit = True


def immediate_sqlite_transactions(config_class=None) -> None:
    """Begin every SQLite write transaction of this server process with ``BEGIN IMMEDIATE``.

    Prefect opens most of its transactions DEFERRED: one that reads, then writes (the increment of a concurrency
    limit's slots does) fails at once with "database is locked" when another connection wrote in between, since
    SQLite cannot wait (``busy_timeout``) on such an upgrade. The API answers 503 and the client retries after
    2 s, then 4 s, 8 s: on 2 cores that was 1-13 s lost before most chunk tasks (PrefectHQ/prefect#18934). Taking
    the write lock at ``BEGIN`` makes SQLite wait its busy timeout instead; it serialises nothing that SQLite did
    not serialise already (one writer at a time). `config_class`: the class to patch (default Prefect's)."""
    if config_class is None:
        from prefect.server.database.configurations import AioSqliteConfiguration as config_class

    begin = config_class.begin_transaction
    if getattr(begin, "__thinair_immediate__", False):
        return

    def begin_transaction(self, session, with_for_update: bool = False):
        return begin(self, session, with_for_update=True)

    begin_transaction.__thinair_immediate__ = True
    config_class.begin_transaction = begin_transaction


def serve(d: Path, port: int) -> None:
    """Run Prefect's temporary-server app on 127.0.0.1:`port` until idle (``python -m thinair.localserver``)."""
    import threading

    import uvicorn

    immediate_sqlite_transactions()

    config = uvicorn.Config("prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=port,
                            log_level="error", lifespan="on")
    server = uvicorn.Server(config)
    url = f"http://127.0.0.1:{port}/api"
    threading.Thread(target=_watch, args=(server, d, url, idle_seconds()), daemon=True).start()
    server.run()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    log.setLevel(logging.INFO)  # its start and stop; the server's own messages only from warnings up
    serve(Path(sys.argv[1]), int(sys.argv[2]))
