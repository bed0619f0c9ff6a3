"""Real-dataset loaders: every source becomes uint8 arrays ``(N, H, W, C)`` plus int labels.

Reads: scikit-learn's bundled digits (the embedded default, always available offline), torchvision's
CIFAR-10/100, STL-10, ImageNette and EuroSAT, MedMNIST npz files, or an image folder
``root/<class>/<image>``, all under ``base.data_root``. Writes nothing (the `ingest` stage does).
When a dataset is missing and cannot be downloaded, :class:`DatasetUnavailable` names the dataset, the
directory searched and the files to place there.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

TORCHVISION = {"cifar10", "cifar100", "stl10", "imagenette", "eurosat"}
MEDMNIST = {"pathmnist", "dermamnist", "bloodmnist", "retinamnist", "octmnist", "pneumoniamnist",
            "breastmnist", "tissuemnist", "organamnist", "organcmnist", "organsmnist", "chestmnist"}
EXPECTED_FILES = {
    "cifar10": "cifar-10-python.tar.gz (or its extracted cifar-10-batches-py/)",
    "cifar100": "cifar-100-python.tar.gz (or its extracted cifar-100-python/)",
    "stl10": "stl10_binary.tar.gz (or its extracted stl10_binary/)",
    "imagenette": "imagenette2.tgz (or its extracted imagenette2/)",
    "eurosat": "eurosat/2750/<class>/*.jpg (EuroSAT RGB)",
}
DIGITS_TEST_FRACTION = 0.2
SPLIT_SEED = 0  # splits we make are fixed, independent of base.seed
IMG_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}


class DatasetUnavailable(RuntimeError):
    """The dataset is neither on disk nor downloadable; the message says where to put which files."""


@dataclass
class RawDataset:
    train_images: np.ndarray  # (N, H, W, C) uint8
    train_labels: np.ndarray  # (N,) int64
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]
    skipped: list[dict] = field(default_factory=list)  # unreadable files, by path and reason


def dataset_names() -> list[str]:
    return sorted({"digits"} | TORCHVISION | MEDMNIST) + ["folder:<path>"]


def load(name: str, root: str | Path, *, test_fraction: float = 0.2, download: bool = True,
         image_size: int | None = None, corrupt: str = "skip", split_seed: int = SPLIT_SEED) -> RawDataset:
    """Load dataset `name` from `root` (downloading if allowed and possible)."""
    root = Path(root).expanduser()
    if name == "digits":
        return _digits()
    if name in TORCHVISION:
        return _torchvision(name, root, download, test_fraction, image_size, split_seed)
    if name in MEDMNIST:
        return _medmnist(name, root, download)
    if name.startswith("folder:"):
        from thinair.imagefolder import load_folder

        return load_folder(Path(name[len("folder:"):]).expanduser(), test_fraction=test_fraction,
                           image_size=image_size, corrupt=corrupt, split_seed=split_seed)
    raise ValueError(f"base.dataset: unknown dataset {name!r}; choose one of {', '.join(dataset_names())}")


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test) with every class split in the same proportion, deterministically."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        n_test = int(round(len(idx) * test_fraction))
        if len(idx) > 1:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _digits() -> RawDataset:
    """The embedded default: a *fixed* stratified 80/20 split, so the embedded generator (trained on the
    train part) never saw a test image whatever the other params say."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.rint(d.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]  # (1797, 8, 8, 1)
    labels = d.target.astype(np.int64)
    tr, te = stratified_split(labels, DIGITS_TEST_FRACTION, SPLIT_SEED)
    return RawDataset(images[tr], labels[tr], images[te], labels[te], [str(c) for c in d.target_names])


def _unavailable(name: str, root: Path, err: Exception) -> DatasetUnavailable:
    return DatasetUnavailable(
        f"dataset {name!r} is not in {root} and could not be downloaded ({type(err).__name__}: {err}). "
        f"Place {EXPECTED_FILES.get(name, 'its files')} in {root} (base.data_root), or run once with network "
        "access and ingest.download: true.")


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


def _torchvision(name, root, download, test_fraction, image_size, seed) -> RawDataset:
    import torchvision.datasets as tvd

    root.mkdir(parents=True, exist_ok=True)

    def make(cls, **kw):
        try:
            return cls(str(root), download=False, **kw)
        except (RuntimeError, FileNotFoundError) as err:
            if not download:
                raise _unavailable(name, root, err) from None
        try:
            return cls(str(root), download=True, **kw)
        except Exception as err:  # URLError, socket errors, checksum errors
            raise _unavailable(name, root, err) from None

    if name in ("cifar10", "cifar100"):
        cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
        tr, te = make(cls, train=True), make(cls, train=False)
        return RawDataset(tr.data, np.asarray(tr.targets, np.int64), te.data, np.asarray(te.targets, np.int64),
                          list(tr.classes))
    if name == "stl10":
        tr, te = make(tvd.STL10, split="train"), make(tvd.STL10, split="test")
        return RawDataset(tr.data.transpose(0, 2, 3, 1), tr.labels.astype(np.int64),
                          te.data.transpose(0, 2, 3, 1), te.labels.astype(np.int64), list(tr.classes))
    if name == "imagenette":
        size = image_size or 128
        tr, te = make(tvd.Imagenette, split="train", size="320px"), make(tvd.Imagenette, split="val", size="320px")
        names = [c[0] if isinstance(c, tuple) else str(c) for c in tr.classes]
        return RawDataset(_pil_to_array((tr[i][0] for i in range(len(tr))), size),
                          np.asarray([y for _, y in tr._samples], np.int64),
                          _pil_to_array((te[i][0] for i in range(len(te))), size),
                          np.asarray([y for _, y in te._samples], np.int64), names)
    if name == "eurosat":
        ds = make(tvd.EuroSAT)
        labels = np.asarray(ds.targets, np.int64)
        images = _pil_to_array((ds[i][0] for i in range(len(ds))), image_size)
        tr, te = stratified_split(labels, test_fraction, seed)
        return RawDataset(images[tr], labels[tr], images[te], labels[te], list(ds.classes))
    raise AssertionError(name)


def _medmnist(name: str, root: Path, download: bool) -> RawDataset:
    """MedMNIST 28 px, official splits, read straight from ``{root}/{name}.npz`` (the library's format)."""
    import medmnist
    from medmnist.info import INFO

    info = INFO[name]
    path = root / f"{name}.npz"
    if not path.is_file():
        if not download:
            raise _unavailable(name, root, FileNotFoundError(path))
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
    return RawDataset(img(tr_x).astype(np.uint8), tr_y.reshape(-1).astype(np.int64),
                      img(te_x).astype(np.uint8), te_y.reshape(-1).astype(np.int64), names)
