"""Run stages through the same unit runner as the flows (thinair/units.py), without Prefect, in DAG order. Also a
child-process entry point for kill tests: ``python -m tests.stages PARAMS_YAML ROOT STAGE [STAGE ...]``."""
from __future__ import annotations

import logging
import sys

from thinair.units import run_local

ORDER = ("ingest", "encode", "invert", "classenc", "search", "sample", "metrics", "cas", "report")


def run_stage(stage: str, params, root):
    if stage == "pretrain":  # not a unit stage: it trains the embedded generator (DVC decides when)
        from thinair.tasks.pretrain import pretrain

        return pretrain(params, root)
    return run_local(stage, params, root)


def run_all(params, root, stages=ORDER):
    out = None
    for s in stages:
        out = run_stage(s, params, root)
    return out


if __name__ == "__main__":
    from thinair.config import load_params

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", force=True)
    run_all(load_params(sys.argv[1]), sys.argv[2], sys.argv[3:])
