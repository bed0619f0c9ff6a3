"""Flow `search`: the Optuna study over the sampler's hyper-parameters, scored by CAS on a validation split of
the train set -> data/search (tasks/search.py); one task holding a `gpu` slot; publishes the trials table."""
from prefect import flow

from thinair.caching import bind
from thinair.config import Params
from thinair.devices import ensure_limit
from thinair.flows._runner import resolve
from thinair.orchestration import publish_tables
from thinair.tasks.search import search_task, tables


@flow(name="search")
def search_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    params = resolve(params, params_path)
    ensure_limit(params.base)
    manifest = bind(search_task, root)(params, root)["manifest"]
    publish_tables(tables(root))
    return manifest
