"""Flow `report`: the self-contained HTML report -> data/report (tasks/report.py)."""
from prefect import flow

from thinair.config import Params
from thinair.flows._runner import resolve
from thinair.caching import bind
from thinair.tasks.report import report_task


@flow(name="report")
def report_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> str:
    return bind(report_task, root)(resolve(params, params_path), root)["page"]
