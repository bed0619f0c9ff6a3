"""Flow `encode`: one task per chunk of train images -> data/encode (see tasks/encode.py). Each chunk task
holds one slot of the `gpu` limit; finished chunks are Prefect cache hits."""
from prefect import flow

from thinair.config import Params
from thinair.flows._runner import resolve
from thinair.units import run_flow


@flow(name="encode")
def encode_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    return run_flow("encode", resolve(params, params_path), root)
