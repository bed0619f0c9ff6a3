"""Flow `sample`: one task per chunk -> data/sample (see tasks/sample.py). Each chunk task
holds one slot of the `gpu` limit; finished chunks are Prefect cache hits."""
from prefect import flow

from thinair.config import Params
from thinair.flows._runner import resolve
from thinair.units import run_flow


@flow(name="sample")
def sample_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    return run_flow("sample", resolve(params, params_path), root)
