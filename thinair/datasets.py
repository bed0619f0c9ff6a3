"""Real-dataset loaders: every source becomes uint8 arrays ``(N, H, W, C)`` plus int labels.

Reads: scikit-learn's bundled digits (the embedded default, always available offline), torchvision's
CIFAR-10/100, STL-10, ImageNette and EuroSAT, MedMNIST npz files, or an image folder
``root/<class>/<image>``, all under ``base.data_root``. Writes nothing (the `ingest` stage does).
When a dataset is missing and cannot be downloaded, :class:`DatasetUnavailable` names the dataset, the
directory searched and the files to place there; a placed archive is unpacked without network.

torchvision's CIFAR-10/100 and STL-10 check the MD5 sums of the original files on every load. Files that
are present but do not match (a tiny fixture in the genuine format, a re-packed copy) are still read by
torchvision's own parsing code, through a subclass that checks only that they exist, with a warning.
"""
from __future__ import annotations

import logging
import pickle
from pathlib import Path

import numpy as np
from thinair.errors import DatasetUnavailable  # noqa: F401 - raised here; defined in thinair/errors.py
from thinair.rawdata import IMG_EXT, RawDataset, stratified_split  # noqa: F401 - re-exported
from thinair import imagefolder

log = logging.getLogger(__name__)

TORCHVISION = {"cifar10", "cifar100", "stl10", "imagenette", "eurosat"}
MEDMNIST = {"pathmnist", "dermamnist", "bloodmnist", "retinamnist", "octmnist", "pneumoniamnist",
            "breastmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist", "chestmnist"}
IMAGENETTE_SIZE = "320px"  # torchvision's Imagenette(size=...): archive imagenette2-320.tgz
IMAGENETTE_FOLDER = "imagenette2-320"  # = Path(archive URL).stem, holding train/<wnid>/*.JPEG and val/<wnid>/*.JPEG
EXPECTED_FILES = {
    "cifar10": "cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/)",
    "cifar100": "cifar-100-python.tar.gz (or its extracted cifar-100-python/)",
    "stl10": "stl10_binary.tar.gz (or its extracted stl10_binary/{train,test}_{X,y}.bin and class_names.txt)",
    "imagenette": f"{IMAGENETTE_FOLDER}.tgz (or its extracted {IMAGENETTE_FOLDER}/{{train,val}}/<wnid>/*.JPEG)",
    "eurosat": "eurosat/EuroSAT.zip (or its extracted eurosat/2750/<class>/*.jpg, EuroSAT RGB)",
}
# The archive torchvision downloads for each dataset, and the folder (under root) it is unpacked into.
ARCHIVES = {
    "cifar10": ("cifar-10-python.tar.gz", "."),
    "cifar100": ("cifar-100-python.tar.gz", "."),
    "stl10": ("stl10_binary.tar.gz", "."),
    "imagenette": (f"{IMAGENETTE_FOLDER}.tgz", "."),
    "eurosat": ("eurosat/EuroSAT.zip", "eurosat"),
}
CHECKSUMMED = {"cifar10", "cifar100", "stl10"}  # torchvision verifies these files' MD5 sums on every load
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
DIGITS_TEST_FRACTION = 0.2
SPLIT_SEED = 0  # splits we make are fixed, independent of base.seed


def dataset_names() -> list[str]:
    return sorted({"digits"} | TORCHVISION | MEDMNIST) + ["folder:<path>"]


def load(name: str, root: str | Path, *, test_fraction: float = 0.2, download: bool = True,
         image_size: int | None = None, corrupt: str = "skip", split_seed: int = SPLIT_SEED) -> RawDataset:
    """Load dataset `name` from `root` (downloading if allowed and possible)."""
    root = Path(root).expanduser()
    if name == "digits":
        return _digits()
    if name in TORCHVISION:
        return _torchvision(name, root, download, test_fraction, image_size, split_seed, corrupt)
    if name in MEDMNIST:
        return _medmnist(name, root, download)
    if name.startswith("folder:"):
        return imagefolder.load_folder(Path(name[len("folder:"):]).expanduser(), test_fraction=test_fraction,
                           image_size=image_size, corrupt=corrupt, split_seed=split_seed)
    raise ValueError(f"base.dataset: unknown dataset {name!r}; choose one of {', '.join(dataset_names())}")


def _digits() -> RawDataset:
    """The embedded default: a *fixed* stratified 80/20 split, so the embedded generator (trained on the
    train part) never saw a test image whatever the other params say."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]  # (1797, 8, 8, 1)
    labels = d.target.astype(np.int64)
    tr, te = stratified_split(labels, DIGITS_TEST_FRACTION, SPLIT_SEED)
    return RawDataset(images[tr], labels[tr], images[te], labels[te], [str(c) for c in d.target_names])


def _unavailable(name: str, root: Path, reason: str) -> DatasetUnavailable:
    return DatasetUnavailable(
        f"dataset {name!r} is not in {root} ({reason}). Place {EXPECTED_FILES.get(name, 'its files')} in {root} "
        "(base.data_root), or run once with network access and ingest.download: true.")


def _unreadable(name: str, root: Path, err: Exception) -> DatasetUnavailable:
    return DatasetUnavailable(
        f"dataset {name!r}: the files in {root} could not be read ({type(err).__name__}: {err}). Replace them with "
        f"the original {EXPECTED_FILES.get(name, 'files')}, or delete them and run with ingest.download: true.")


def _pil_to_array(images, size: int | None) -> np.ndarray:
    from PIL import Image

    out = []
    for im in images:
        im = im.convert("RGB")
        if size is not None and im.size != (size, size):
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            im = im.resize((size, size), Image.BICUBIC)
        out.append(np.asarray(im, dtype=np.uint8))
    return np.stack(out)


def _split_files(name: str, cls, part: str) -> list[Path]:
    """The files (or, for image-folder datasets, the directory) torchvision reads for `part`, relative to root."""
    if name in ("cifar10", "cifar100"):
        files = [f for f, _ in (cls.train_list if part == "train" else cls.test_list)] + [cls.meta["filename"]]
        return [Path(cls.base_folder) / f for f in files]
    if name == "stl10":  # train_list[2] is unlabeled_X.bin (2.7 GB), which the labelled splits never read
        return [Path(cls.base_folder) / f for f, _ in (cls.train_list[:2] if part == "train" else cls.test_list)]
    if name == "imagenette":
        return [Path(IMAGENETTE_FOLDER) / part]
    return [Path("eurosat") / "2750"]


def _extract_local_archive(name: str, root: Path) -> None:
    """Unpack the archive torchvision would have downloaded, when the user placed it in `root` (no network)."""
    archive, dest = ARCHIVES[name]
    path = root / archive
    if not path.is_file():
        return
    import tarfile
    import zipfile

    from torchvision.datasets.utils import extract_archive

    log.info("%s: extracting %s into %s", name, path, root / dest)
    try:
        extract_archive(str(path), str(root / dest))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, OSError) as err:
        raise _unreadable(name, root, err) from None


def _unverified(cls, files: list[Path]):
    """A subclass of torchvision dataset `cls` that checks only that `files` exist instead of their MD5 sums.

    Everything else (which files are opened, how they are unpickled or reshaped) is `cls`'s own code. Used
    only when the files are present but do not match torchvision's checksums (tiny fixtures, re-packed
    copies); the original files always go through `cls` itself."""
    attrs: dict = {"_check_integrity": lambda self: all(f.is_file() for f in files),
                   "__doc__": f"torchvision {cls.__name__} without the MD5 check (see thinair.datasets)."}
    if isinstance(getattr(cls, "meta", None), dict):  # CIFAR's _load_meta checks the meta file's md5 itself
        attrs["meta"] = {**cls.meta, "md5": None}  # check_integrity(path, None): the file exists
    return type(f"Unverified{cls.__name__}", (cls,), attrs)


def _open_torchvision(name: str, root: Path, cls, part: str, download: bool, **kw):
    """Instantiate torchvision dataset `cls` for `part` (train/test/val/all) from the files under `root`.

    Order: files present -> torchvision's own class (MD5-verified where torchvision verifies), falling back
    to :func:`_unverified` with a warning when the checksums do not match; files absent -> unpack a local
    archive if one was placed in `root`; still absent -> download if allowed, else DatasetUnavailable."""
    files = [root / f for f in _split_files(name, cls, part)]
    if not all(f.exists() for f in files):
        _extract_local_archive(name, root)
    missing = [f for f in files if not f.exists()]
    if missing:
        if not download:
            raise _unavailable(name, root, f"downloading is off and {missing[0]} is missing")
        root.mkdir(parents=True, exist_ok=True)
        try:
            return cls(str(root), download=True, **kw)
        except Exception as err:  # URLError, socket errors, checksum errors of the download
            raise _unavailable(name, root, f"the download failed: {type(err).__name__}: {err}") from None
    try:
        return cls(str(root), download=False, **kw)
    except (RuntimeError, FileNotFoundError, KeyError) as err:
        if name not in CHECKSUMMED:  # a folder dataset with no class folders / images, or unknown wnids
            raise _unreadable(name, root, err) from None
        log.warning("%s: the files in %s could not be verified against torchvision's MD5 checksums (%s); "
                    "reading them anyway with torchvision's own parser", name, files[0].parent, err)
    try:
        return _unverified(cls, files)(str(root), download=False, **kw)
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, OSError) as err:  # truncated / wrong files
        raise _unreadable(name, root, err) from None


def _read_images(name: str, ds, paths: list[str], size: int | None, corrupt: str) -> tuple:
    """Decode every image of torchvision folder dataset `ds` (whose files are `paths`), honouring `corrupt`."""
    from PIL import Image

    images, labels, skipped = [], [], []
    for i, path in enumerate(paths):
        try:
            image, label = ds[i]
        except (OSError, ValueError, Image.DecompressionBombError) as err:  # UnidentifiedImageError is an OSError
            if corrupt == "fail":
                raise ValueError(f"dataset {name!r}: cannot read {path} ({type(err).__name__}: {err}); fix or "
                                 "remove it, or set ingest.corrupt: skip") from None
            skipped.append({"path": path, "reason": f"{type(err).__name__}: {err}"})
            continue
        images.append(image)
        labels.append(label)
    if not images:
        raise ValueError(f"dataset {name!r}: none of the {len(paths)} images could be read")
    return _pil_to_array(images, size), np.asarray(labels, np.int64), skipped


def _torchvision(name, root, download, test_fraction, image_size, seed, corrupt) -> RawDataset:
    import torchvision.datasets as tvd

    def make(cls, part, **kw):  # `part`: which files to expect; kw go to torchvision (which has its own split=)
        return _open_torchvision(name, root, cls, part, download, **kw)

    if name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        tr, te = make(cls, "train", train=True), make(cls, "test", train=False)
        return RawDataset(np.asarray(tr.data, np.uint8), np.asarray(tr.targets, np.int64),
                          np.asarray(te.data, np.uint8), np.asarray(te.targets, np.int64), list(tr.classes))
    if name == "stl10":  # torchvision keeps (N, C, H, W), already transposed from the file's column-major order
        tr, te = make(tvd.STL10, "train", split="train"), make(tvd.STL10, "test", split="test")
        classes = getattr(tr, "classes", None)  # set only when stl10_binary/class_names.txt exists
        if classes is None:
            log.warning("stl10: %s/stl10_binary/class_names.txt is missing; using the official class order", root)
            classes = STL10_CLASSES
        return RawDataset(tr.data.transpose(0, 2, 3, 1).astype(np.uint8), tr.labels.astype(np.int64),
                          te.data.transpose(0, 2, 3, 1).astype(np.uint8), te.labels.astype(np.int64), list(classes))
    if name == "imagenette":  # official train/val split; classes are tuples of synonyms per wnid: keep the first
        size = image_size or 128
        tr = make(tvd.Imagenette, "train", split="train", size=IMAGENETTE_SIZE)
        te = make(tvd.Imagenette, "val", split="val", size=IMAGENETTE_SIZE)
        tr_x, tr_y, tr_skip = _read_images(name, tr, [p for p, _ in tr._samples], size, corrupt)
        te_x, te_y, te_skip = _read_images(name, te, [p for p, _ in te._samples], size, corrupt)
        names = [c[0] if isinstance(c, tuple) else str(c) for c in tr.classes]
        return RawDataset(tr_x, tr_y, te_x, te_y, names, tr_skip + te_skip)
    if name == "eurosat":  # one folder of 64x64 RGB JPEGs, no official split: ours is stratified and fixed
        ds = make(tvd.EuroSAT, "all")
        images, labels, skipped = _read_images(name, ds, [p for p, _ in ds.samples], image_size, corrupt)
        tr, te = stratified_split(labels, test_fraction, seed)
        return RawDataset(images[tr], labels[tr], images[te], labels[te], list(ds.classes), skipped)
    raise AssertionError(name)


def _medmnist(name: str, root: Path, download: bool) -> RawDataset:
    """MedMNIST 28 px, official splits, read straight from ``{root}/{name}.npz`` (the library's format)."""
    import medmnist
    from medmnist.info import INFO

    info = INFO[name]
    path = root / f"{name}.npz"
    if not path.is_file():
        if not download:
            raise _unavailable(name, root, f"downloading is off and {path} is missing")
        root.mkdir(parents=True, exist_ok=True)
        try:
            getattr(medmnist, info["python_class"])(split="train", root=str(root), download=True, size=28)
        except Exception as err:
            raise DatasetUnavailable(
                f"dataset {name!r}: {path} is missing and could not be downloaded ({type(err).__name__}: {err}). "
                f"Place {name}.npz (MedMNIST, 28 px) in {root} (base.data_root).") from None
    with np.load(path, allow_pickle=False) as z:
        tr_x, tr_y, te_x, te_y = (z["train_images"], z["train_labels"], z["test_images"], z["test_labels"])
    if info["task"].startswith("multi-label"):
        raise ValueError(f"dataset {name!r} is multi-label; thinair needs one class per image")

    def img(x):
        return x[..., None] if x.ndim == 3 else x

    names = [info["label"][k] for k in sorted(info["label"], key=int)]
    for split, y in (("train", tr_y), ("test", te_y)):
        if y.size and (y.min() < 0 or y.max() >= len(names)):
            raise ValueError(
                f"dataset {name!r}: {path} has {split} labels in [{y.min()}, {y.max()}] but {name} has {len(names)} "
                f"classes (labels 0..{len(names) - 1}), so it is not the original MedMNIST file. Replace it with the "
                f"original {name}.npz, or delete it and run with ingest.download: true.")
    return RawDataset(img(tr_x).astype(np.uint8), tr_y.reshape(-1).astype(np.int64),
                      img(te_x).astype(np.uint8), te_y.reshape(-1).astype(np.int64), names)
