"""The torchvision-backed loaders on tiny fixtures written in each dataset's genuine on-disk format.

Every fixture is built from the dataset's own documentation (byte layouts, pickle keys, folder names), not
from torchvision's code, so a wrong orientation, channel order, label offset or folder name shows up as a
failed round trip. All offline: download is always False.
"""
from __future__ import annotations

import logging
import pickle
import pickletools
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest

from thinair import datasets

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR100_NAMES = [f"fine_class_{i}" for i in range(100)]
TENCH, CHAINSAW = "n01440764", "n03000684"  # two of ImageNette's ten real WordNet ids


# ----------------------------------------------------------------------------------------------- helpers


def pattern(n: int, h: int, w: int, offset: int = 0) -> np.ndarray:
    """(n, h, w, 3) uint8 images whose every pixel differs by image, row, column and channel."""
    i, r, c, ch = np.meshgrid(np.arange(n) + offset, np.arange(h), np.arange(w), np.arange(3), indexing="ij")
    return ((i * 37 + r * 3 + c * 7 + ch * 101) % 256).astype(np.uint8)


def py2_pickle(obj, py2_strings: set[str]) -> bytes:
    """Pickle `obj` (protocol 2) as Python 2's cPickle wrote CIFAR: the strings in `py2_strings` become
    py2 ``str`` opcodes (SHORT_BINSTRING), which load as ``str`` with encoding="latin1" (torchvision) and
    as ``bytes`` with encoding="bytes" (the CIFAR website's snippet: ``batch[b'data']``)."""
    blob = pickle.dumps(obj, protocol=2)
    ops = list(pickletools.genops(blob))
    out = bytearray()
    for k, (op, arg, pos) in enumerate(ops):
        end = ops[k + 1][2] if k + 1 < len(ops) else len(blob)
        if op.name == "BINUNICODE" and arg in py2_strings:
            raw = arg.encode("latin1")
            out += (b"U" + bytes([len(raw)]) if len(raw) < 256 else b"T" + struct.pack("<i", len(raw))) + raw
        else:
            out += blob[pos:end]
    return bytes(out)


def cifar_rows(images: np.ndarray) -> np.ndarray:
    """CIFAR's documented row layout: 1024 red, then 1024 green, then 1024 blue values, each row-major."""
    n = len(images)
    rows = np.zeros((n, 3072), np.uint8)
    for ch in range(3):
        for r in range(32):
            for c in range(32):
                rows[:, ch * 1024 + r * 32 + c] = images[:, r, c, ch]
    return rows


def write_cifar_batch(path: Path, images: np.ndarray, labels: list[int], label_key: str) -> None:
    """Write one CIFAR batch file: a dict with 'batch_label', label_key, 'data' (n, 3072) uint8, 'filenames'."""
    names = [f"img_{i}.png" for i in range(len(labels))]
    batch = {"batch_label": path.name, label_key: labels, "data": cifar_rows(images), "filenames": names}
    path.write_bytes(py2_pickle(batch, {"batch_label", label_key, "data", "filenames", path.name, *names}))


def write_cifar10(root: Path, per_batch: int = 2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Write root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}; return the arrays written."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    tr_x, tr_y = [], []
    for b in range(1, 6):
        x, y = pattern(per_batch, 32, 32, offset=b * per_batch), [(b * per_batch + i) % 10 for i in range(per_batch)]
        write_cifar_batch(folder / f"data_batch_{b}", x, y, "labels")
        tr_x.append(x)
        tr_y += y
    te_x, te_y = pattern(3, 32, 32, offset=100), [9, 0, 4]
    write_cifar_batch(folder / "test_batch", te_x, te_y, "labels")
    meta = {"num_cases_per_batch": per_batch, "label_names": CIFAR10_NAMES, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(py2_pickle(meta, {"num_cases_per_batch", "label_names", "num_vis",
                                                            *CIFAR10_NAMES}))
    return np.concatenate(tr_x), np.asarray(tr_y), te_x, np.asarray(te_y)


def write_cifar100(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Write root/cifar-100-python/{train, test, meta} with fine and coarse labels; return the arrays written."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    tr_x, tr_y, te_x, te_y = pattern(5, 32, 32), [0, 99, 42, 7, 42], pattern(2, 32, 32, offset=50), [13, 98]
    for name, x, y in (("train", tr_x, tr_y), ("test", te_x, te_y)):
        batch = {"filenames": [f"{i}.png" for i in range(len(y))], "batch_label": name, "fine_labels": y,
                 "coarse_labels": [v // 5 for v in y], "data": cifar_rows(x)}
        (folder / name).write_bytes(py2_pickle(batch, {*batch, name, *batch["filenames"]}))
    meta = {"fine_label_names": CIFAR100_NAMES, "coarse_label_names": [f"super_{i}" for i in range(20)]}
    (folder / "meta").write_bytes(py2_pickle(meta, {*meta, *CIFAR100_NAMES, *meta["coarse_label_names"]}))
    return tr_x, np.asarray(tr_y), te_x, np.asarray(te_y)


def stl10_bytes(images: np.ndarray) -> bytes:
    """STL-10's documented layout: per image, the red, green and blue 96x96 planes, each column-major."""
    return b"".join(np.ascontiguousarray(img[:, :, ch].T).tobytes() for img in images for ch in range(3))


def write_stl10(root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Write root/stl10_binary/{train,test}_{X,y}.bin (labels 1-based) and class_names.txt; return 0-based."""
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    tr_x, tr_y, te_x, te_y = pattern(3, 96, 96), np.array([0, 9, 4]), pattern(2, 96, 96, offset=7), np.array([2, 2])
    for split, x, y in (("train", tr_x, tr_y), ("test", te_x, te_y)):
        (folder / f"{split}_X.bin").write_bytes(stl10_bytes(x))
        (folder / f"{split}_y.bin").write_bytes((y + 1).astype(np.uint8).tobytes())
    (folder / "class_names.txt").write_text("\n".join(datasets.STL10_CLASSES) + "\n")
    return tr_x, tr_y, te_x, te_y


def write_jpeg(path: Path, size: tuple[int, int], color: tuple[int, int, int]) -> None:
    """A solid-colour JPEG of (width, height) `size` (solid, so JPEG keeps the colour to within a few levels)."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, "JPEG", quality=95)


def write_imagenette(root: Path, colors: dict[str, tuple]) -> None:
    """Write root/imagenette2-320/{train,val}/<wnid>/*.JPEG with images of different (non-square) sizes."""
    for split, sizes in (("train", [(40, 30), (30, 50), (64, 64)]), ("val", [(50, 35)])):
        for wnid, color in colors.items():
            for k, size in enumerate(sizes):
                write_jpeg(root / "imagenette2-320" / split / wnid / f"{wnid}_{split}{k}.JPEG", size, color)


def write_eurosat(root: Path, colors: dict[str, tuple], n: int = 5) -> None:
    """Write root/eurosat/2750/<Class>/<Class>_<k>.jpg, n 64x64 JPEGs per class."""
    for cls, color in colors.items():
        for k in range(n):
            write_jpeg(root / "eurosat" / "2750" / cls / f"{cls}_{k + 1}.jpg", (64, 64), color)


def assert_colors(images: np.ndarray, labels: np.ndarray, colors: list[tuple]) -> None:
    """Every image is (close to) the solid colour of its label: images and labels stayed paired."""
    for img, y in zip(images, labels):
        assert np.abs(img.reshape(-1, 3).mean(0) - np.asarray(colors[y])).max() < 6


# ------------------------------------------------------------------------------------------------- CIFAR


def test_cifar_fixture_is_a_python2_pickle():
    """The fixture writer itself: keys load as bytes with encoding='bytes', as the CIFAR site documents."""
    blob = py2_pickle({"data": np.zeros((1, 3072), np.uint8), "labels": [3]}, {"data", "labels"})
    as_bytes, as_latin1 = pickle.loads(blob, encoding="bytes"), pickle.loads(blob, encoding="latin1")
    assert set(as_bytes) == {b"data", b"labels"} and set(as_latin1) == {"data", "labels"}
    assert as_bytes[b"data"].shape == (1, 3072) and as_latin1["labels"] == [3]


def test_cifar10_reads_the_genuine_batches(tmp_path, caplog):
    tr_x, tr_y, te_x, te_y = write_cifar10(tmp_path)
    with caplog.at_level(logging.WARNING, logger="thinair.datasets"):
        d = datasets.load("cifar10", tmp_path, download=False)
    assert d.train_images.shape == (10, 32, 32, 3) and d.test_images.shape == (3, 32, 32, 3)
    assert d.train_images.dtype == np.uint8 and d.train_labels.dtype == np.int64
    assert np.array_equal(d.train_images, tr_x) and np.array_equal(d.test_images, te_x)
    assert np.array_equal(d.train_labels, tr_y) and np.array_equal(d.test_labels, te_y)
    assert d.class_names == CIFAR10_NAMES
    assert "MD5" in caplog.text and "cifar-10-batches-py" in caplog.text  # the unverified path says so


def test_cifar10_with_matching_checksums_takes_torchvision_own_class(tmp_path, caplog, monkeypatch):
    """When the MD5 sums match (as for the real files) no fallback and no warning happen."""
    import torchvision.datasets as tvd
    from torchvision.datasets.utils import calculate_md5

    tr_x, *_ = write_cifar10(tmp_path)
    folder = tmp_path / "cifar-10-batches-py"

    def md5(name):
        return calculate_md5(str(folder / name))

    monkeypatch.setattr(tvd.CIFAR10, "train_list", [[f"data_batch_{b}", md5(f"data_batch_{b}")] for b in range(1, 6)])
    monkeypatch.setattr(tvd.CIFAR10, "test_list", [["test_batch", md5("test_batch")]])
    monkeypatch.setattr(tvd.CIFAR10, "meta", {**tvd.CIFAR10.meta, "md5": md5("batches.meta")})
    with caplog.at_level(logging.WARNING, logger="thinair.datasets"):
        d = datasets.load("cifar10", tmp_path, download=False)
    assert np.array_equal(d.train_images, tr_x) and caplog.text == ""


def test_cifar10_archive_is_unpacked_offline(tmp_path):
    """Placing cifar-10-python.tar.gz (as EXPECTED_FILES says) is enough, even with download off."""
    src = tmp_path / "src"
    tr_x, tr_y, _, _ = write_cifar10(src)
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    d = datasets.load("cifar10", root, download=False)
    assert np.array_equal(d.train_images, tr_x) and np.array_equal(d.train_labels, tr_y)


def test_cifar10_truncated_batch_is_reported_not_crashed(tmp_path):
    write_cifar10(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:200])
    with pytest.raises(datasets.DatasetUnavailable, match="could not be read"):
        datasets.load("cifar10", tmp_path, download=False)


def test_cifar100_reads_fine_labels_and_names(tmp_path):
    tr_x, tr_y, te_x, te_y = write_cifar100(tmp_path)
    d = datasets.load("cifar100", tmp_path, download=False)
    assert d.train_images.shape == (5, 32, 32, 3) and d.test_images.shape == (2, 32, 32, 3)
    assert np.array_equal(d.train_images, tr_x) and np.array_equal(d.test_images, te_x)
    assert np.array_equal(d.train_labels, tr_y) and np.array_equal(d.test_labels, te_y)
    assert d.class_names == CIFAR100_NAMES


# ------------------------------------------------------------------------------------------------ STL-10


def test_stl10_column_major_binaries_round_trip(tmp_path):
    tr_x, tr_y, te_x, te_y = write_stl10(tmp_path)
    assert not (tmp_path / "stl10_binary" / "unlabeled_X.bin").exists()  # 2.7 GB; the labelled splits skip it
    d = datasets.load("stl10", tmp_path, download=False)
    assert d.train_images.shape == (3, 96, 96, 3) and d.test_images.shape == (2, 96, 96, 3)
    assert d.train_images.dtype == np.uint8
    assert np.array_equal(d.train_images, tr_x) and np.array_equal(d.test_images, te_x)  # not transposed
    assert np.array_equal(d.train_labels, tr_y) and np.array_equal(d.test_labels, te_y)  # 1-based -> 0-based
    assert d.class_names == datasets.STL10_CLASSES


def test_stl10_without_class_names_file_uses_the_official_order(tmp_path):
    write_stl10(tmp_path)
    (tmp_path / "stl10_binary" / "class_names.txt").unlink()
    assert datasets.load("stl10", tmp_path, download=False).class_names == datasets.STL10_CLASSES


# ---------------------------------------------------------------------------------------------- ImageNette


def test_imagenette_folder_tree_gives_square_images_and_readable_names(tmp_path):
    colors = {TENCH: (200, 30, 30), CHAINSAW: (20, 40, 220)}
    write_imagenette(tmp_path, colors)
    d = datasets.load("imagenette", tmp_path, download=False, image_size=24)
    assert d.train_images.shape == (6, 24, 24, 3) and d.test_images.shape == (2, 24, 24, 3)
    assert d.class_names == ["tench", "chain saw"]  # sorted wnids, first synonym of each
    assert np.bincount(d.train_labels).tolist() == [3, 3] and np.bincount(d.test_labels).tolist() == [1, 1]
    assert_colors(d.train_images, d.train_labels, list(colors.values()))
    assert_colors(d.test_images, d.test_labels, list(colors.values()))


def test_imagenette_corrupt_jpeg_is_skipped_and_listed(tmp_path):
    write_imagenette(tmp_path, {TENCH: (200, 30, 30), CHAINSAW: (20, 40, 220)})
    bad = tmp_path / "imagenette2-320" / "train" / TENCH / "broken.JPEG"
    bad.write_bytes(b"not a jpeg")
    d = datasets.load("imagenette", tmp_path, download=False, image_size=16)
    assert len(d.train_labels) == 6 and [s["path"] for s in d.skipped] == [str(bad)]
    with pytest.raises(ValueError, match="broken.JPEG"):
        datasets.load("imagenette", tmp_path, download=False, image_size=16, corrupt="fail")


# ------------------------------------------------------------------------------------------------- EuroSAT


def test_eurosat_split_is_stratified_disjoint_and_fixed(tmp_path):
    colors = {"AnnualCrop": (180, 160, 60), "Forest": (20, 120, 30), "River": (40, 60, 200)}
    write_eurosat(tmp_path, colors, n=5)
    d = datasets.load("eurosat", tmp_path, download=False, test_fraction=0.4)
    again = datasets.load("eurosat", tmp_path, download=False, test_fraction=0.4)
    assert d.class_names == sorted(colors)
    assert d.train_images.shape == (9, 64, 64, 3) and d.test_images.shape == (6, 64, 64, 3)
    assert np.bincount(d.train_labels).tolist() == [3, 3, 3] and np.bincount(d.test_labels).tolist() == [2, 2, 2]
    assert np.array_equal(d.test_images, again.test_images)
    assert_colors(d.train_images, d.train_labels, list(colors.values()))
    assert_colors(d.test_images, d.test_labels, list(colors.values()))


# -------------------------------------------------------------------------------------------- missing data


def expected_file(name: str) -> str:
    """The archive (or folder) name torchvision itself uses for `name`, read from torchvision's classes."""
    import torchvision.datasets as tvd

    return {"cifar10": tvd.CIFAR10.filename, "cifar100": tvd.CIFAR100.filename, "stl10": tvd.STL10.filename,
            "imagenette": Path(tvd.Imagenette._ARCHIVES[datasets.IMAGENETTE_SIZE][0]).name,
            "eurosat": "eurosat/2750"}[name]


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10", "imagenette", "eurosat"])
def test_empty_root_without_download_names_dataset_dir_and_files(tmp_path, name):
    with pytest.raises(datasets.DatasetUnavailable) as err:
        datasets.load(name, tmp_path, download=False)
    msg = str(err.value)
    assert repr(name) in msg and str(tmp_path) in msg and expected_file(name) in msg
    assert list(tmp_path.iterdir()) == []  # nothing was written or downloaded
