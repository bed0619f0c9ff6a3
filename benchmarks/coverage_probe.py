"""How many real train images does a synthetic set leave uncovered? (evidence for ``sample.allocation: coverage``)

For a workspace that has run ingest and sample (e.g. a low-data benchmark cell,
``.thinair/lowdata/digits/cond/k5/s0``), prints, for the first n synthetic images (the files' order: sample
index outermost, so the first n are the first draws of every embedding), how many real train images have no
synthetic image within their k-NN ball among the real train images, in the domain classifier's feature space: the
per-image coverage that ``sample.allocation: coverage`` spends its second half on (thinair/variants.py).

    python benchmarks/coverage_probe.py .thinair/lowdata/digits/cond/k5/s0 [--counts 50,250,500] [--k 5]
"""
from __future__ import annotations

import argparse
import sys

import numpy as np


def main(argv: list[str] | None = None) -> int:
    from thinair import classifier, variants
    from thinair.config import load_params
    from thinair.tasks.sample import domain_net
    from thinair.upstream import read_split, read_synthetic

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("workspaces", nargs="+")
    ap.add_argument("--counts", default="50,250,500", help="first n synthetic images to test, comma list")
    ap.add_argument("--k", type=int, default=5, help="nearest neighbours of the ball (metrics.k)")
    ap.add_argument("--params", default="params.yaml")
    args = ap.parse_args(argv)
    params = load_params(args.params)
    for ws in args.workspaces:
        train, syn = read_split("train", ws), read_synthetic(ws)
        net = domain_net(params, ws)
        real = classifier.features(net, classifier.to_tensor(train.images))
        for n in (int(c) for c in args.counts.split(",")):
            fake = classifier.features(net, classifier.to_tensor(syn.images[:n])) if n else real[:0]
            u = variants.uncovered(real, np.arange(len(train.labels)), fake, args.k)
            print(f"{ws}: first {min(n, len(syn.labels))} synthetic images leave {int(u.sum())} of {len(u)} real "
                  f"train images uncovered (k={args.k})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
