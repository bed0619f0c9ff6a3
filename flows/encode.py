"""Flow `encode`: one task per chunk of train images -> data/encode (see tasks/encode.py). Each chunk task
holds one slot of the `gpu` limit; finished chunks are Prefect cache hits. A failed generator-fit check is published
as the `fit-check` markdown artifact, so the UI says it too."""
from prefect import flow

from thinair.config import Params
from thinair.flows._runner import resolve
from thinair.units import run_flow


@flow(name="encode")
def encode_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    manifest = run_flow("encode", resolve(params, params_path), root)
    if not manifest.get("fit", {}).get("ok", True):
        from prefect.artifacts import create_markdown_artifact

        from thinair import io, paths

        fit = io.read_json(paths.stage_dir("encode", root) / "fit.json")
        create_markdown_artifact(f"**Generator-fit check failed.** {fit['message']}", key="fit-check",
                                 description="The generator cannot represent this dataset")
    return manifest
