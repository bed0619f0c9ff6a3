"""Flow `classenc`: train the class encoder (seed 002) when sample.method is class_encoder -> data/classenc
(tasks/classenc.py); one task holding a `gpu` slot, a Prefect cache hit when nothing changed."""
from prefect import flow

from thinair.config import Params
from thinair.flows._runner import resolve
from thinair.units import run_flow


@flow(name="classenc")
def classenc_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    return run_flow("classenc", resolve(params, params_path), root)
