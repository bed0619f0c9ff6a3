"""Flow `export`: data/sample (with the real train split when export.real) as export.format, with its dataset card
-> data/export (tasks/export.py); one task, a Prefect cache hit when nothing changed. While export.format is null it
writes only a manifest saying the stage is off."""
from prefect import flow

from thinair.config import Params
from thinair.flows._runner import resolve
from thinair.units import run_flow


@flow(name="export")
def export_flow(params: Params | None = None, params_path: str = "params.yaml", root: str = ".") -> dict:
    return run_flow("export", resolve(params, params_path), root)
