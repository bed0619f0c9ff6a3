"""Flow `encode`: one task per chunk of train images -> data/encode (see tasks/encode.py). Each chunk task
holds one slot of the `gpu` limit; finished chunks are Prefect cache hits."""
from prefect import flow

from thinair.config import Params
from thinair.devices import ensure_limit
from thinair.flows._runner import resolve
from thinair.orchestration import fan_out
from thinair.tasks.encode import chunks, encode_chunk_task, finalize


@flow(name="encode")
def encode_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    params = resolve(params, params_path)
    ensure_limit(params.base)
    train, n = chunks(params, root)
    records = fan_out(encode_chunk_task, [(params, i, train, root) for i in range(n)], root, "encode")
    return finalize(params, records, root)
