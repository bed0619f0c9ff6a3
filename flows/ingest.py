"""Flow `ingest`: dataset -> data/ingest (see tasks/ingest.py)."""
from prefect import flow

from thinair.config import Params
from thinair.flows._runner import resolve
from thinair.caching import bind
from thinair.tasks.ingest import ingest_task


@flow(name="ingest")
def ingest_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    return bind(ingest_task, root)(resolve(params, params_path), root)["manifest"]
