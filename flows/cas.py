"""Flow `cas`: one classifier per training mode, tested on the real test split -> data/cas (tasks/cas.py)."""
from prefect import flow

from thinair.config import Params
from thinair.flows._runner import resolve
from thinair.tasks.cas import cas_mode_task, summarize


@flow(name="cas")
def cas_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    params = resolve(params, params_path)
    futures = {m: cas_mode_task.submit(params, m, root) for m in params.cas.modes}
    return summarize(params, {m: f.result() for m, f in futures.items()}, root)
