"""Flow `search`: guided search over the sampler, scored by CAS on a validation split of the train set -> data/search
(tasks/search.py); one task holding a `gpu` slot; publishes the trials table."""
from prefect import flow

from thinair.config import Params
from thinair.flows._runner import resolve
from thinair.orchestration import publish_tables
from thinair.tasks.search import tables
from thinair.units import run_flow


@flow(name="search")
def search_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    manifest = run_flow("search", resolve(params, params_path), root)
    publish_tables(tables(root))
    return manifest
