"""Build the `textures` image-folder dataset: 16 px tiles of three photographed textures (brick, grass, gravel)
from scikit-image's bundled sample images, as ``<out>/<texture>/<row>-<col>.png``.

A dataset nobody tuned thinair on, of photographs rather than digits, loaded through the same `folder:` path a user's
own images take. Tiles do not overlap, so no two images share a pixel. Needs scikit-image (``pip install
'thinair[bench]'``); offline (the three images ship inside its wheel).

    python benchmarks/make_textures.py [--out .thinair/datasets/textures] [--tile 16]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

TEXTURES = ("brick", "grass", "gravel")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=".thinair/datasets/textures")
    ap.add_argument("--tile", type=int, default=16)
    args = ap.parse_args(argv)
    try:
        from skimage import data
    except ImportError:
        print("make_textures: needs scikit-image: pip install 'thinair[bench]' (or scikit-image)", file=sys.stderr)
        return 1
    from PIL import Image

    t, total = args.tile, 0
    for name in TEXTURES:
        img = getattr(data, name)()  # (512, 512) uint8 grey
        d = Path(args.out) / name
        d.mkdir(parents=True, exist_ok=True)
        for r in range(img.shape[0] // t):
            for c in range(img.shape[1] // t):
                Image.fromarray(img[r * t:(r + 1) * t, c * t:(c + 1) * t]).save(d / f"{r:02d}-{c:02d}.png")
                total += 1
    print(f"wrote {total} tiles of {t} px in {len(TEXTURES)} classes to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
