"""Flow `pretrain`: train a generator on pretrain.dataset's train split (or its holdout pool; see tasks/pretrain.py)."""
from prefect import flow

from thinair.config import Params
from thinair.flows._runner import resolve
from thinair.tasks.pretrain import pretrain_task


@flow(name="pretrain")
def pretrain_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    log = pretrain_task(resolve(params, params_path), root)
    return {"seconds": log["seconds"], "vae_loss": log["vae"][-1], "unet_loss": log["unet"][-1]}
