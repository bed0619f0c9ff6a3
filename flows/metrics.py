"""Flow `metrics`: FID / KID / precision / recall / density / coverage, overall and per class -> data/metrics
(tasks/metrics.py); publishes the metric tables as Prefect artifacts."""
from prefect import flow

from thinair.config import Params
from thinair.flows._runner import resolve
from thinair.orchestration import publish_tables
from thinair.tasks.metrics import tables
from thinair.units import run_flow


@flow(name="metrics")
def metrics_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    result = run_flow("metrics", resolve(params, params_path), root)
    publish_tables(tables(result))
    return result
