"""Flow `metrics`: FID / precision / recall / density / coverage -> data/metrics (tasks/metrics.py)."""
from prefect import flow

from thinair.config import Params
from thinair.flows._runner import resolve
from thinair.tasks.metrics import metrics_task


@flow(name="metrics")
def metrics_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    return metrics_task(resolve(params, params_path), root)
