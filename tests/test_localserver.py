"""The local Prefect server `thinair` commands share (thinair/localserver.py, thinair/launch.py): consecutive commands
use one server, a skipped stage starts none, a stage whose units are all cached needs no worker processes, the
server stops once idle, and a killed command's hold on it goes with the command."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from thinair import launch, localserver
from thinair.config import parse_params
from tests.conftest import tiny_params

HOLD = ("import sys, time; from pathlib import Path; from thinair import localserver\n"
        "localserver._register(Path(sys.argv[1])); print('held', flush=True); time.sleep(600)")


def test_a_client_hold_counts_while_its_process_lives_and_goes_with_it(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    assert localserver.live_clients(tmp_path) == 1
    proc.kill()  # SIGKILL: no clean-up ran, the OS released the lock
    proc.wait()
    assert localserver.live_clients(tmp_path) == 0
    assert not list((tmp_path / "clients").iterdir())  # the dead holder's file is removed


def test_the_server_stops_only_without_clients_for_the_idle_time(tmp_path):
    url = "http://127.0.0.1:1/api"
    (tmp_path / "server.json").write_text(json.dumps({"url": url}))
    now = time.monotonic()
    assert localserver._should_stop(tmp_path, url, idle=60, last_busy=now) == (False, now)
    localserver._register(tmp_path)  # a client (this process) holds it
    try:
        stop, busy = localserver._should_stop(tmp_path, url, idle=60, last_busy=now - 600)
        assert not stop and busy >= now
    finally:
        localserver._CLIENT_LOCKS.pop(tmp_path).close()
    stop, _ = localserver._should_stop(tmp_path, url, idle=60, last_busy=now - 61)
    assert stop and not (tmp_path / "server.json").exists()  # withdrawn first: no command connects to it now


def _thinair(proj: Path, env: dict, stage: str) -> subprocess.CompletedProcess:
    run = subprocess.run([sys.executable, "-m", "thinair.cli", stage], cwd=proj, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return run


def test_consecutive_commands_share_one_server_which_stops_when_idle(tiny_generator, tmp_path):
    proj, home = tmp_path / "proj", tmp_path / "prefect-home"
    proj.mkdir()
    raw = tiny_params(tiny_generator)
    (proj / "params.yaml").write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(home), THINAIR_SERVER_IDLE_SECONDS="2", THINAIR_SHARED_SERVER="1")
    skipped = _thinair(proj, env, "classenc")  # sample.method is inversion: nothing to train
    assert "Prefect not started" in skipped.stdout and not (home / "thinair-server").exists()
    assert json.loads((proj / "data/classenc/manifest.json").read_text())["trained"] is False
    state = Path(subprocess.run([sys.executable, "-c", "from thinair import launch; print(launch.shared_server_dir())"],
                                env=env, capture_output=True, text=True, check=True).stdout.strip())
    # this test holds the server too (as a third command would), so a slow machine's gap between two commands
    # cannot outlast the 2 s idle time
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(state)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        _thinair(proj, env, "ingest")
        first = json.loads((state / "server.json").read_text())
        params = parse_params(raw)
        assert launch.every_unit_cached("ingest", params, proj)
        again = _thinair(proj, env, "ingest")
        assert json.loads((state / "server.json").read_text()) == first  # the same server, not a new one
        assert "Cached" in again.stdout + again.stderr
    finally:
        holder.kill()
        holder.wait()
    t0 = time.time()
    while _alive(first["pid"]) or (state / "server.json").exists():  # idle: it stops, and withdraws its record
        assert time.time() - t0 < 120, "the idle server did not stop"
        time.sleep(0.5)
    (proj / "data/ingest/train-00000.npz").unlink()  # the cached record no longer verifies
    assert not launch.every_unit_cached("ingest", params, proj)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _read_then_write_race(tmp_path, immediate: bool) -> list[str]:
    """Two connections of one Prefect SQLite configuration: A reads, B writes and commits, then A writes (what
    the API's slot increment does while another task's state is written). Returns the errors raised."""
    import asyncio

    import sqlalchemy as sa
    from sqlalchemy.ext.asyncio import AsyncSession

    from prefect.server.database.configurations import AioSqliteConfiguration

    class Config(AioSqliteConfiguration):
        pass

    if immediate:
        localserver.immediate_sqlite_transactions(Config)
    tmp_path.mkdir(parents=True)
    config = Config(connection_url=f"sqlite+aiosqlite:///{tmp_path / 'race.db'}")

    async def race() -> list[str]:
        engine = await config.engine()
        async with engine.connect() as conn:
            await conn.exec_driver_sql("CREATE TABLE slots (id INTEGER PRIMARY KEY, active INTEGER)")
            await conn.exec_driver_sql("INSERT INTO slots VALUES (1, 0)")
        a_has_read, errors = asyncio.Event(), []

        async def a():
            async with AsyncSession(engine) as s:
                try:
                    async with config.begin_transaction(s):
                        await s.execute(sa.text("SELECT active FROM slots"))
                        a_has_read.set()
                        await asyncio.sleep(0.5)  # B writes meanwhile (or waits for A's write lock)
                        await s.execute(sa.text("UPDATE slots SET active = active + 1"))
                except sa.exc.OperationalError as e:
                    errors.append(f"A: {e.orig}")

        async def b():
            await a_has_read.wait()
            async with AsyncSession(engine) as s:
                try:
                    async with config.begin_transaction(s):
                        await s.execute(sa.text("UPDATE slots SET active = active + 1"))
                except sa.exc.OperationalError as e:
                    errors.append(f"B: {e.orig}")

        await asyncio.gather(a(), b())
        async with engine.connect() as conn:
            active = (await conn.exec_driver_sql("SELECT active FROM slots")).scalar()
        await engine.dispose()
        return errors if errors else [] if active == 2 else [f"active = {active}, not 2"]

    return asyncio.run(race())


def test_the_shared_server_makes_sqlite_wait_instead_of_failing_a_read_then_write(tmp_path):
    """Prefect's DEFERRED transactions fail at once ("database is locked", answered 503, retried after 2-8 s) when
    another connection writes between their read and their write; the shared server begins them IMMEDIATE."""
    deferred = _read_then_write_race(tmp_path / "deferred", immediate=False)
    assert deferred and "locked" in deferred[0]  # the failure this guards against is real on this SQLite
    assert _read_then_write_race(tmp_path / "immediate", immediate=True) == []


def test_a_single_unit_stage_runs_on_a_thread_a_chunked_one_on_worker_processes(tiny_generator, tmp_path):
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    from thinair.units import run_local

    raw = tiny_params(tiny_generator)
    raw["base"]["task_runner"] = "process"
    params = parse_params(raw)
    run_local("ingest", params, tmp_path)
    for stage in ("metrics", "report", "export"):  # one unit each: a worker process would only cost its start
        assert launch.single_unit(stage, params, tmp_path), stage
        assert isinstance(launch.task_runner_for(stage, params, tmp_path), ThreadPoolTaskRunner), stage
    assert not launch.single_unit("encode", params, tmp_path)  # two chunks, not cached: worker processes
    assert isinstance(launch.task_runner_for("encode", params, tmp_path), ProcessPoolTaskRunner)
