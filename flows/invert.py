"""Flow `invert`: one task per chunk, each learning its images' embeddings -> data/invert (tasks/invert.py).
Each chunk task holds one slot of the `gpu` limit; finished chunks are Prefect cache hits."""
from prefect import flow

from thinair.config import Params
from thinair.devices import ensure_limit
from thinair.flows._runner import resolve
from thinair.orchestration import fan_out
from thinair.tasks.invert import chunk_count, finalize, invert_chunk_task


@flow(name="invert")
def invert_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    params = resolve(params, params_path)
    ensure_limit(params.base)
    records = fan_out(invert_chunk_task, [(params, i, root) for i in range(chunk_count(root))], root, "invert")
    return finalize(params, records, root)
