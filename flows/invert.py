"""Flow `invert`: one task per chunk, each learning its images' embeddings -> data/invert (tasks/invert.py)."""
from prefect import flow

from thinair.config import Params
from thinair.flows._runner import resolve
from thinair.tasks.invert import chunk_count, finalize, invert_chunk_task


@flow(name="invert")
def invert_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    params = resolve(params, params_path)
    futures = [invert_chunk_task.submit(params, i, root) for i in range(chunk_count(root))]
    return finalize(params, [f.result() for f in futures], root)
