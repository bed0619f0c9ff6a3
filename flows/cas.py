"""Flow `cas`: one task per classifier training (modes x seeds, then the scaling studies), tested on the real
test split -> data/cas (tasks/cas.py); publishes the CAS tables as Prefect artifacts."""
from prefect import flow

from thinair.config import Params
from thinair.flows._runner import resolve
from thinair.orchestration import publish_tables
from thinair.tasks.cas import tables
from thinair.units import run_flow


@flow(name="cas")
def cas_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    out = run_flow("cas", resolve(params, params_path), root)
    publish_tables(tables(root))
    return out
