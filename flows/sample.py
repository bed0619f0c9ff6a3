"""Flow `sample`: one task per chunk of embeddings -> data/sample (see tasks/sample.py). Each chunk task holds
one slot of the `gpu` limit; finished chunks are Prefect cache hits."""
from prefect import flow

from thinair.config import Params
from thinair.devices import ensure_limit
from thinair.flows._runner import resolve
from thinair.orchestration import fan_out
from thinair.tasks.sample import chunk_count, finalize, sample_chunk_task


@flow(name="sample")
def sample_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    params = resolve(params, params_path)
    ensure_limit(params.base)
    records = fan_out(sample_chunk_task, [(params, i, root) for i in range(chunk_count(root))], root, "sample")
    return finalize(params, records, root)
