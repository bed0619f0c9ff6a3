"""Prefect plumbing shared by every flow: settings, retry policy, task runner.

Reads environment variables only. Prefect settings are put in the environment before Prefect is
imported (``configure()``), so every `thinair` command behaves the same without any user setup.
"""
from __future__ import annotations

import errno
import os

from thinair.errors import RunnerUnavailable, is_permanent


def configure() -> None:
    """Offline-friendly Prefect defaults; anything the user already set wins."""
    env = os.environ
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    env.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
    env.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "false")
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    env.setdefault("DO_NOT_TRACK", "1")
    env.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "thinair")
    # device-slot leases on disk, so a run can reclaim the slots of a killed run (see thinair/devices.py)
    env.setdefault("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", "prefect.server.concurrency.lease_storage.filesystem")


def retry_transient(task, task_run, state) -> bool:
    """Retry condition: retry I/O hiccups and device faults, never bad input or configuration."""
    try:
        state.result(raise_on_failure=True)
    except BaseException as err:  # noqa: BLE001 - we only classify it
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return False  # a full disk does not empty itself in 10 s
        return not is_permanent(err)  # the error's own `permanent` flag (thinair/errors.py)
    return False


def _init_worker(threads: int) -> None:
    """Runs once in every worker process: share the CPU cores out instead of oversubscribing them."""
    import logging

    import torch

    from thinair.progress import worker_log_format

    torch.set_num_threads(threads)
    # progress and cache messages of the stage code (the parent's logging setup is not inherited by spawn)
    logging.basicConfig(level=os.environ.get("THINAIR_LOG_LEVEL", "INFO"), format=worker_log_format())
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from thinair import redact

    redact.install()  # no tokens or passwords in the workers' log lines either


def task_runner(workers: int, kind: str = "thread", address: str | None = None):
    """The Prefect task runner for a stage's fan-out (chunks, trainings).

    thread: a thread pool in the flow's process. process: `workers` spawned processes with
    cores // workers torch threads each (small models run faster this way than on shared threads).
    dask / ray: prefect-dask / prefect-ray against `address`, or a local cluster of `workers` workers.
    """
    from prefect.task_runners import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=workers)
    if kind == "process":
        threads = max(1, (os.cpu_count() or 1) // workers)
        return ProcessPoolTaskRunner(max_workers=workers, initializer=_init_worker, initargs=(threads,))
    try:
        if kind == "dask":
            from prefect_dask import DaskTaskRunner

            if address:
                return DaskTaskRunner(address=address)
            return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1,
                                                  "processes": True, "dashboard_address": None})
        from prefect_ray import RayTaskRunner

        return RayTaskRunner(address=address) if address else RayTaskRunner()
    except ImportError:
        raise RunnerUnavailable(f"base.task_runner={kind!r} needs the prefect-{kind} package: pip install "
                           f"'thinair[{kind}]' (or prefect-{kind}), or use base.task_runner: thread | process") \
            from None


def task_options(retries: int = 2, delay: float = 10) -> dict:
    """Options every thinair task shares: retries with exponential back-off (10 s, 20 s, 40 s ... for I/O errors
    and device faults; never for bad input, see :func:`retry_transient`) and Prefect's own cache off (the unit
    tasks of thinair/units.py add their content-keyed, verified cache)."""
    from prefect.cache_policies import NO_CACHE
    from prefect.tasks import exponential_backoff

    return {"retries": retries, "retry_delay_seconds": exponential_backoff(delay) if retries else 0,
            "retry_jitter_factor": 0.2, "retry_condition_fn": retry_transient, "cache_policy": NO_CACHE,
            "persist_result": False}


def publish_tables(tables: dict[str, tuple[str, list[dict]]]) -> None:
    """Publish {key: (description, rows)} as Prefect table artifacts of the current flow run."""
    from prefect.artifacts import create_table_artifact

    for key, (description, rows) in tables.items():
        create_table_artifact(rows, key=key, description=description)
