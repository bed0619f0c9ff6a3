"""Flow `encode`: one task per chunk of train images -> data/encode (see tasks/encode.py)."""
from prefect import flow

from thinair.config import Params
from thinair.flows._runner import resolve
from thinair.tasks.encode import chunks, encode_chunk_task, finalize


@flow(name="encode")
def encode_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    params = resolve(params, params_path)
    train, n = chunks(params, root)
    futures = [encode_chunk_task.submit(params, i, train, root) for i in range(n)]
    return finalize(params, [f.result() for f in futures], root)
