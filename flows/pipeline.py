"""Flows `pipeline` and `regenerate`: the whole DAG through DVC, for Prefect UI-triggered and scheduled runs.

`pipeline` applies the parameters given in the UI (validated; written into params.yaml like
``dvc exp run -S``), then reproduces exactly the stale stages, each as a task running ``thinair <stage>``
(whose own flow run shows in the UI tagged with this run's id), and records them in dvc.lock.
`regenerate` (the scheduled deployment) does the same with the params file as it is, and pushes the new
versions to the DVC remote; on an unchanged workspace it finishes in seconds having done nothing.
See thinair/dvcrun.py.
"""
from __future__ import annotations

import logging
import os
from typing import Any

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from thinair import dvcrun

log = logging.getLogger("thinair.pipeline")


def _server_url() -> str | None:
    """The API this run talks to, so the stage subprocesses report to it too (even a temporary server)."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if url:
        return url
    from prefect.server.api.server import SubprocessASGIServer

    running = [s for s in SubprocessASGIServer._instances.values() if s.running]
    return running[0].api_url if running else None


@task(name="dvc-status", cache_policy=NO_CACHE, retries=0)
def status_task(root: str) -> list[str]:
    stale = dvcrun.stale_stages(root)
    log.info("dvc status: %s", ", ".join(stale) if stale else "everything up to date")
    return stale


@task(name="dvc-repro", cache_policy=NO_CACHE, retries=0)
def stage_task(root: str, stage: str, env: dict, force: bool = False) -> bool:
    ran = dvcrun.reproduce_stage(root, stage, env, force)
    log.info("%s: %s", stage, "reproduced" if ran else "up to date, skipped")
    return ran


@task(name="dvc-push", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=10)
def push_task(root: str) -> int:
    n = dvcrun.push(root)
    log.info("dvc push: %d file(s) sent to the remote", n)
    return n


def run(root: str, overrides: list[str], push: bool, force: bool = False) -> dict:
    from prefect.runtime import flow_run

    changed = dvcrun.apply_overrides(root, overrides)
    if changed:
        log.info("params.yaml: set %s", ", ".join(changed))
    if not status_task(root) and not force:
        return {"changed_params": changed, "reproduced": [], "pushed": 0}
    env = {dvcrun.PARENT_RUN_ENV: str(flow_run.get_id() or "")}
    url = _server_url()
    if url:
        env["PREFECT_API_URL"] = url
    ran = [s for s in dvcrun.stage_order(root)
           if stage_task.with_options(task_run_name=f"dvc-repro-{s}")(root, s, env, force and s != "pretrain")]
    pushed = push_task(root) if push else 0
    return {"changed_params": changed, "reproduced": ran, "pushed": pushed}


@flow(name="pipeline", log_prints=True)
def pipeline_flow(dataset: str | None = None, generator: str | None = None, guidance_scales: list[float] | None = None,
                  samples_per_setting: int | None = None, invert_steps: int | None = None,
                  overrides: dict[str, Any] | None = None, push: bool = False, force: bool = False,
                  root: str = ".") -> dict:
    """The whole pipeline with its main knobs editable (None = as in params.yaml); `overrides` takes any other
    ``{"section.key": value}``. Only the stages these changes make stale are re-run; `force` re-runs every stage
    but the embedded generator's training (their finished tasks come from the Prefect cache)."""
    import json

    sets = {"base.dataset": dataset, "base.generator": generator, "sample.guidance_scales": guidance_scales,
            "sample.samples_per_setting": samples_per_setting, "invert.steps": invert_steps} | (overrides or {})
    items = [f"{k}={json.dumps(v)}" for k, v in sets.items() if v is not None]
    return run(os.path.abspath(root), items, push, force)


@flow(name="regenerate", log_prints=True)
def regenerate_flow(push: bool = True, root: str = ".") -> dict:
    """Scheduled regeneration: re-run exactly the stages a params/code/data change made stale, then dvc push."""
    return run(os.path.abspath(root), [], push)
