"""ingest: the embedded digits split, real loaders on genuine on-disk formats, and clear refusals."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from thinair import datasets, io
from thinair.config import parse_params
from thinair.upstream import read_split
from thinair.tasks.ingest import ingest, limit_per_class


def test_digits_split_is_fixed_stratified_and_disjoint():
    a, b = datasets.load("digits", "/nonexistent"), datasets.load("digits", "/nonexistent")
    assert len(a.train_labels) == 1438 and len(a.test_labels) == 359
    assert np.array_equal(a.train_images, b.train_images)
    assert a.train_images.dtype == np.uint8 and a.train_images.shape[1:] == (8, 8, 1)
    train_counts = np.bincount(a.train_labels) / len(a.train_labels)
    test_counts = np.bincount(a.test_labels) / len(a.test_labels)
    assert np.abs(train_counts - test_counts).max() < 0.01
    train_rows = {x.tobytes() for x in a.train_images}
    assert sum(x.tobytes() in train_rows for x in a.test_images) < 5  # only true duplicates in the source


def test_ingest_shards_are_byte_stable(tmp_path):
    p = parse_params({"ingest": {"shard_size": 500}})
    m = ingest(p, tmp_path / "a")
    ingest(p, tmp_path / "b")
    assert m["splits"]["train"]["shards"] == ["train-00000.npz", "train-00001.npz", "train-00002.npz"]
    for f in (tmp_path / "a" / "data" / "ingest").iterdir():
        assert io.file_sha256(f) == io.file_sha256(tmp_path / "b" / "data" / "ingest" / f.name)
    split = read_split("train", tmp_path / "a")
    assert len(split.labels) == 1438 and split.class_names[3] == "3"


def test_per_class_and_total_limits():
    y = np.repeat(np.arange(3), 10)
    assert np.bincount(y[limit_per_class(y, 4, None, 0)]).tolist() == [4, 4, 4]
    assert len(limit_per_class(y, None, 7, 0)) == 7


def test_unknown_dataset_lists_the_choices():
    with pytest.raises(ValueError, match="cifar10"):
        datasets.load("cifar11", "/tmp")


def test_missing_torchvision_dataset_names_dir_and_files(tmp_path):
    with pytest.raises(datasets.DatasetUnavailable) as err:
        datasets.load("cifar10", tmp_path, download=False)
    assert str(tmp_path) in str(err.value) and "cifar-10-python.tar.gz" in str(err.value)


def test_medmnist_reads_the_library_npz_format(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {f"{s}_images": rng.integers(0, 255, (n, 28, 28, 3), dtype=np.uint8) for s, n in
              (("train", 12), ("val", 3), ("test", 5))}
    arrays |= {f"{s}_labels": rng.integers(0, 9, (n, 1)) for s, n in (("train", 12), ("val", 3), ("test", 5))}
    np.savez(tmp_path / "pathmnist.npz", **arrays)
    d = datasets.load("pathmnist", tmp_path, download=False)
    assert d.train_images.shape == (12, 28, 28, 3) and d.test_labels.shape == (5,)
    assert len(d.class_names) == 9 and "adipose" in d.class_names[0]


def test_missing_medmnist_names_the_file(tmp_path):
    with pytest.raises(datasets.DatasetUnavailable, match="bloodmnist.npz"):
        datasets.load("bloodmnist", tmp_path, download=False)


def _png_folder(root, classes=("cat", "dog"), n=4, size=(12, 10), mode="RGB"):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")


def test_image_folder_skips_and_lists_corrupt_files(tmp_path):
    _png_folder(tmp_path / "ds")
    (tmp_path / "ds" / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "ds" / "cat" / "empty.jpg").write_bytes(b"")
    p = parse_params({"base": {"dataset": f"folder:{tmp_path / 'ds'}"}, "ingest": {"test_fraction": 0.25}})
    m = ingest(p, tmp_path / "proj")
    assert sorted(s["path"].rsplit("/", 1)[1] for s in m["skipped"]) == ["broken.png", "empty.jpg"]
    assert m["class_names"] == ["cat", "dog"] and m["image_shape"] == [10, 10, 3]
    assert m["splits"]["train"]["count"] + m["splits"]["test"]["count"] == 8


def test_image_folder_fail_policy_names_the_file(tmp_path):
    _png_folder(tmp_path / "ds", mode="L")
    (tmp_path / "ds" / "dog" / "broken.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="broken.png"):
        datasets.load(f"folder:{tmp_path / 'ds'}", tmp_path, corrupt="fail")


def test_image_folder_refuses_symlinks_out_of_the_root(tmp_path):
    _png_folder(tmp_path / "ds")
    _png_folder(tmp_path / "secret", classes=("x",), n=1)
    (tmp_path / "ds" / "cat" / "leak.png").symlink_to(tmp_path / "secret" / "x" / "0.png")
    d = datasets.load(f"folder:{tmp_path / 'ds'}", tmp_path)
    assert any("outside the dataset root" in s["reason"] for s in d.skipped)


def test_single_class_folder_is_refused_and_nothing_written(tmp_path):
    _png_folder(tmp_path / "ds", classes=("only",))
    with pytest.raises(ValueError, match="need at least two"):
        ingest(parse_params({"base": {"dataset": f"folder:{tmp_path / 'ds'}"}}), tmp_path / "proj")
    assert not (tmp_path / "proj" / "data" / "ingest").exists()


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
@pytest.mark.parametrize("size, resolution", [(8, 16), (16, 8), (28, 128), (96, 32)])
def test_resize_is_torchvisions_bit_for_bit(interpolation, size, resolution):
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.functional import resize as tv_resize

    from thinair.images import resize

    x = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(size)) * 2 - 1
    theirs = tv_resize(x, [resolution, resolution], interpolation=InterpolationMode(interpolation), antialias=True)
    assert torch.equal(resize(x, resolution, interpolation), theirs)
    with pytest.raises(ValueError, match="choose one of bicubic, bilinear, nearest"):
        resize(x, resolution, "lanczos")
