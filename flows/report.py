"""Flow `report`: one HTML page with everything a reader needs -> data/report (see tasks/report.py)."""
from prefect import flow

from thinair.config import Params
from thinair.flows._runner import resolve
from thinair.units import run_flow


@flow(name="report")
def report_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> str:
    return str(run_flow("report", resolve(params, params_path), root))
