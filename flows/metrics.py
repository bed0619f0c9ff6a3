"""Flow `metrics`: FID / KID / precision / recall / density / coverage, overall and per class -> data/metrics
(tasks/metrics.py); publishes the metric tables as Prefect artifacts."""
from prefect import flow

from thinair.config import Params
from thinair.flows._runner import resolve
from thinair.caching import bind
from thinair.devices import ensure_limit
from thinair.orchestration import publish_tables
from thinair.tasks.metrics import metrics_task, tables


@flow(name="metrics")
def metrics_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    params = resolve(params, params_path)
    ensure_limit(params.base)
    result = bind(metrics_task, root)(params, root)["result"]
    publish_tables(tables(result))
    return result
