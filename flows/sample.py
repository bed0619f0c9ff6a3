"""Flow `sample`: one task per chunk of embeddings -> data/sample (see tasks/sample.py)."""
from prefect import flow

from thinair.config import Params
from thinair.flows._runner import resolve
from thinair.tasks.sample import chunk_count, finalize, sample_chunk_task


@flow(name="sample")
def sample_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    params = resolve(params, params_path)
    futures = [sample_chunk_task.submit(params, i, root) for i in range(chunk_count(root))]
    return finalize(params, [f.result() for f in futures], root)
