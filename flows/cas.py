"""Flow `cas`: one task per classifier training (modes x seeds, scaling studies), tested on the real test
split -> data/cas (tasks/cas.py); publishes the CAS tables as Prefect artifacts."""
from prefect import flow

from thinair.config import Params
from thinair.flows._runner import resolve
from thinair.devices import ensure_limit
from thinair.orchestration import fan_out, publish_tables
from thinair.tasks.cas import cas_job_task, plan, summarize, tables


@flow(name="cas")
def cas_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    params = resolve(params, params_path)
    ensure_limit(params.base)
    jobs = plan(params, root)
    records = []
    # the mode runs first: the scaling studies' full-size points are the same trainings and then come from the cache
    for kind in ("mode", "scaling"):
        mine = [j for j in jobs if j["kind"] == kind]
        records += fan_out(cas_job_task, [(params, j, root) for j in mine], root, f"cas-{kind}",
                           [_name(j) for j in mine])
    out = summarize(params, [{k: v for k, v in r.items() if k != "outputs"} for r in records], root)
    publish_tables(tables(root))
    return out


def _name(job: dict) -> str:
    return f"cas-{job['mode']}-seed{job['seed']}" if job["kind"] == "mode" else f"cas-scaling-{job['index']}"

