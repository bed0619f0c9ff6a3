"""Load a user's image folder ``root/<class>/<image>`` (PNG/JPEG/..., any size, grey or colour).

Reads image files under `root` only: symlinks that resolve outside `root` are refused. Unreadable
files are skipped and listed (policy ``skip``) or stop the load naming the file (policy ``fail``).
Images of varied sizes are centre-cropped and resized to ``image_size`` (default: the most common
size). Writes nothing.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from thinair.rawdata import IMG_EXT, RawDataset, stratified_split


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def load_folder(root: Path, *, test_fraction: float, image_size: int | None, corrupt: str,
                split_seed: int) -> RawDataset:
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise ValueError(f"base.dataset: image folder {root} does not exist; expected {root}/<class>/<image files>")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and _inside(d, root))
    if len(classes) < 2:
        raise ValueError(f"image folder {root}: found {len(classes)} class folder(s); need at least two "
                         f"subfolders {root}/<class>/ with images")
    images, labels, skipped = [], [], []
    for k, cls in enumerate(classes):
        files = sorted(f for f in (root / cls).rglob("*") if f.suffix.lower() in IMG_EXT and not f.is_dir())
        n_before = len(images)
        for f in files:
            if not _inside(f, root):
                skipped.append({"path": str(f), "reason": "symlink pointing outside the dataset root"})
                continue
            try:
                with Image.open(f) as im:
                    im.load()
                    mode = "L" if im.mode in ("1", "L", "I;16", "I", "LA") else "RGB"
                    images.append(im.convert(mode) if mode == "RGB" else _to_l(im))
                    labels.append(k)
            except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as err:
                if corrupt == "fail":
                    raise ValueError(f"image folder: cannot read {f} ({type(err).__name__}: {err}); fix or remove "
                                     "it, or set ingest.corrupt: skip") from None
                skipped.append({"path": str(f), "reason": f"{type(err).__name__}: {err}"})
        if len(images) == n_before:
            found = f"{len(files)} image file(s), none readable" if files else \
                f"no {'/'.join(sorted(e[1:] for e in IMG_EXT))} files"
            raise ValueError(f"image folder {root}: class folder {cls!r} has no readable images ({found}); add "
                             f"images to {root / cls} or remove that folder")
    size = image_size or min(Counter(im.size for im in images).most_common(1)[0][0])
    grey = all(im.mode == "L" for im in images)
    arr = np.stack([_square(im if grey else im.convert("RGB"), size) for im in images])
    if grey:
        arr = arr[..., None]
    y = np.asarray(labels, np.int64)
    tr, te = stratified_split(y, test_fraction, split_seed)
    return RawDataset(arr[tr], y[tr], arr[te], y[te], classes, skipped)


def _to_l(im):
    """Grey of any depth (incl. 16-bit) -> 8-bit L."""
    if im.mode in ("I;16", "I"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if a.max() > 255 else 255.0
        from PIL import Image

        return Image.fromarray(np.clip(a / hi * 255.0, 0, 255).astype(np.uint8), "L")
    return im.convert("L")


def _square(im, size: int) -> np.ndarray:
    from PIL import Image

    w, h = im.size
    if (w, h) != (size, size):
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)).resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8)
