"""Flow `invert`: one task per chunk -> data/invert (see tasks/invert.py). Each chunk task
holds one slot of the `gpu` limit; finished chunks are Prefect cache hits."""
from prefect import flow

from thinair.config import Params
from thinair.flows._runner import resolve
from thinair.units import run_flow


@flow(name="invert")
def invert_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    return run_flow("invert", resolve(params, params_path), root)
