"""Flow `classenc`: train the class encoder (seed 002) when sample.method is class_encoder -> data/classenc
(tasks/classenc.py); one task holding a `gpu` slot, a Prefect cache hit when nothing changed."""
from prefect import flow

from thinair.caching import bind
from thinair.config import Params
from thinair.devices import ensure_limit
from thinair.flows._runner import resolve
from thinair.tasks.classenc import classenc_task


@flow(name="classenc")
def classenc_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    params = resolve(params, params_path)
    ensure_limit(params.base)
    return bind(classenc_task, root)(params, root)["manifest"]
