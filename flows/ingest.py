"""Flow `ingest`: dataset -> data/ingest (see tasks/ingest.py); one task, a Prefect cache hit when nothing changed."""
from prefect import flow

from thinair.config import Params
from thinair.flows._runner import resolve
from thinair.units import run_flow


@flow(name="ingest")
def ingest_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    return run_flow("ingest", resolve(params, params_path), root)
