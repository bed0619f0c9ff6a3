"""Helpers shared by the stage flows: load params once, pick the task runner."""
from __future__ import annotations

from thinair.config import Params, load_params


def resolve(params: Params | None, params_path: str) -> Params:
    return params if params is not None else load_params(params_path)
