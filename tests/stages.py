"""Run stages through their plain functions (no Prefect), in DAG order. Also a child-process entry point
for kill tests: ``python -m tests.stages PARAMS_YAML ROOT STAGE [STAGE ...]``."""
from __future__ import annotations

import logging
import sys

from thinair.tasks import cas, classenc, encode, ingest, invert, metrics, pretrain, report, sample, search

ORDER = ("ingest", "encode", "invert", "classenc", "search", "sample", "metrics", "cas", "report")


def run_stage(stage: str, params, root):
    if stage == "ingest":
        return ingest.ingest(params, root)
    if stage == "encode":
        train, n = encode.chunks(params, root)
        return encode.finalize(params, [encode.encode_chunk(params, i, train, root) for i in range(n)], root)
    if stage in ("invert", "sample"):
        mod = invert if stage == "invert" else sample
        run = mod.invert_chunk if stage == "invert" else mod.sample_chunk
        return mod.finalize(params, [run(params, i, root) for i in range(mod.chunk_count(root))], root)
    return {"pretrain": pretrain.pretrain, "classenc": classenc.train, "search": search.search, "metrics": metrics.metrics, "cas": cas.cas,
            "report": report.report}[stage](params, root)


def run_all(params, root, stages=ORDER):
    out = None
    for s in stages:
        out = run_stage(s, params, root)
    return out


if __name__ == "__main__":
    from thinair.config import load_params

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", force=True)
    run_all(load_params(sys.argv[1]), sys.argv[2], sys.argv[3:])
