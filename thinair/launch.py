"""How a `thinair <stage>` command reaches Prefect cheaply: which API server, which task runner.

* **The API.** A configured server (``PREFECT_API_URL``, e.g. ``thinair server``) is used as it is. Without one, the
  local server `thinair` commands share (thinair/localserver.py: started by the first command, stopped when idle),
  so the stages of one ``dvc repro`` pay a server's start-up once instead of once each. ``THINAIR_SHARED_SERVER=0``
  (or a shared server that cannot start) gives the command Prefect's own temporary server, shared with its worker
  processes. Either way the worker processes are pointed at it through ``PREFECT_API_URL``, and they reclaim killed
  runs' device slots there (thinair/devices.py): neither server runs Prefect's lease repossessor.
* **The task runner.** ``base.task_runner``, except that two kinds of stage run their tasks on threads of the
  command's own process, where a worker process would cost a start (3-5 s on 2 cores: torch, Prefect, the flow's
  pool shutting down) for nothing: a stage whose every unit already has a verified cached result (the worker would
  only find it there), and, with the ``process`` runner, a stage of a single unit (``ingest``, ``metrics``,
  ``report``, ``export``: nothing to run beside it). The tasks, their states and the outputs are the same.

Reads the stage's cached task records (``.thinair/prefect/results``); writes nothing but what the shared server
writes.
"""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

log = logging.getLogger(__name__)


def prefect_api(params=None) -> str | None:
    """Without a configured Prefect server: the url of the shared local server (started if none is up), also set for
    this command's worker processes. None when a server is configured, and when this command uses a temporary server
    of its own (``THINAIR_SHARED_SERVER=0``, or the shared one cannot start)."""
    from prefect.settings import get_current_settings

    from thinair import localserver
    from thinair.devices import TEMPORARY_SERVER_ENV

    if get_current_settings().api.url:
        return None
    if localserver.enabled():
        home, server_env = server_settings()
        try:
            url = localserver.connect(home, server_env, get_current_settings().server.ephemeral.startup_timeout_seconds)
        except (RuntimeError, OSError) as err:
            log.warning("%s: using a temporary server of this command instead", err)
        else:
            os.environ["PREFECT_API_URL"] = url  # inherited by spawned workers
            os.environ[TEMPORARY_SERVER_ENV] = url  # no repossessor there either: they reclaim killed runs' slots
            return url
    if params is not None and params.base.task_runner != "thread":
        share_temporary_server()
    return None


def server_settings() -> tuple[Path, dict[str, str]]:
    """This process's Prefect home and the server settings a shared server runs with (set ones only)."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    env = settings.to_environment_variables(exclude_unset=True)
    return settings.home, {k: v for k, v in env.items() if k.startswith("PREFECT_SERVER_") and "EPHEMERAL" not in k}


def shared_server_dir() -> Path:
    """The folder of the shared server this process would use (``python -c`` it with a command's environment)."""
    from thinair import localserver
    from thinair.orchestration import configure

    configure()
    return localserver.state_dir(*server_settings())


@contextlib.contextmanager
def api_url_everywhere(url: str):
    """Point every Prefect client of this process at `url`, in every thread (Prefect's worker threads start with an
    empty context, so ``temporary_settings`` would not reach them): Prefect read its settings at import, before the
    url was known. ``prefect_test_harness`` does the same with its server."""
    from prefect.context import SettingsContext, _temporary_global_settings_context, get_settings_context
    from prefect.settings import PREFECT_API_URL

    ctx = get_settings_context()
    settings = ctx.settings.copy_with_update(updates={PREFECT_API_URL: url})
    with _temporary_global_settings_context(SettingsContext(profile=ctx.profile, settings=settings)):
        yield


def share_temporary_server() -> None:
    """Start Prefect's temporary server now and point worker processes at it: each spawned worker would otherwise
    start a server of its own (seconds each, and a second view of the run)."""
    from prefect.server.api.server import SubprocessASGIServer

    from thinair.devices import TEMPORARY_SERVER_ENV

    server = SubprocessASGIServer()  # the instance this process's own flow run uses too (stopped at exit)
    server.start(timeout=int(os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")))
    os.environ["PREFECT_API_URL"] = server.api_url  # inherited by spawned workers
    os.environ[TEMPORARY_SERVER_ENV] = server.api_url  # so they still reclaim killed runs' device slots


def _units(stage: str, params, root: str | Path = ".") -> list[dict] | None:
    """`stage`'s units, or None when it is not a unit stage (pretrain) or cannot list them yet (missing inputs and
    the like: the flow says so in its own words)."""
    from thinair import units
    from thinair.errors import ThinairError

    mod = units.stage_module(stage)
    if not hasattr(mod, "units"):
        return None
    try:
        return mod.units(params, root)
    except (ThinairError, OSError, ValueError):
        return None


def every_unit_cached(stage: str, params, root: str | Path = ".", stage_units: list[dict] | None = None) -> bool:
    """Whether every unit of `stage` (`stage_units`, when the caller has them) has a cached task record whose
    outputs verify (what its task would find)."""
    from thinair import paths, units
    from thinair.errors import ThinairError

    stage_units = stage_units if stage_units is not None else _units(stage, params, root)
    if stage_units is None:
        return False
    mod = units.stage_module(stage)
    try:
        with warnings.catch_warnings():  # a dropped record's warning, outside a flow run: Prefect's API handler
            warnings.simplefilter("ignore", UserWarning)  # warns that it cannot send it; the log line stays
            for unit in stage_units:
                key = units.unit_key(mod, params, unit, root)
                stored = units.verified_key(mod.STAGE, None, {"root": str(root), "unit": unit, "key": key})
                if not (paths.prefect_results(root) / stored).is_file():
                    return False
    except (ThinairError, OSError, ValueError):  # missing inputs and the like: the flow says so in its own words
        return False
    return True


def single_unit(stage: str, params, root: str | Path = ".") -> bool:
    """Whether `stage` runs exactly one task (its inputs must be there to tell: False otherwise)."""
    stage_units = _units(stage, params, root)
    return stage_units is not None and len(stage_units) == 1


def task_runner_for(stage: str, params, root: str | Path = "."):
    """The stage's Prefect task runner: ``base.task_runner``, or threads when every unit is cached or (with the
    process runner) when the stage has a single unit."""
    from thinair.orchestration import task_runner

    b = params.base
    if b.task_runner == "thread":
        return task_runner(b.workers, "thread")
    stage_units = _units(stage, params, root)
    if stage_units is not None and every_unit_cached(stage, params, root, stage_units):
        log.debug("%s: every unit is cached: its tasks run on threads, without worker processes", stage)
        return task_runner(b.workers, "thread")
    if b.task_runner == "process" and stage_units is not None and len(stage_units) == 1:
        log.debug("%s: one unit: its task runs on a thread of this process, without a worker process", stage)
        return task_runner(b.workers, "thread")
    return task_runner(b.workers, b.task_runner, b.cluster_address)
