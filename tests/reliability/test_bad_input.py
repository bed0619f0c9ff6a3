"""Bad input, kind by kind: every refusal exits non-zero (2 = invalid params, 1 = any other failure), prints a
message that names the problem and the fix, and leaves everything computed before untouched (the sha256 of
every file under the workspace's data/ is the same after the failed run). Inputs whose right handling is
conversion (grey, RGBA, 16-bit, mixed sizes) are accepted: those tests check the conversion instead."""
from __future__ import annotations

import errno
import io as _io
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from thinair import io
from thinair.cli import main
from tests.conftest import tiny_params

PARAMS_FIX = "Fix params.yaml (or the -S/--set override) and run again; nothing was written."
READ_FIX = "fix or remove it, or set ingest.corrupt: skip"


# ---------------------------------------------------------------------------------------------------- helpers
def _raw(generator, **sections) -> dict:
    """tiny_params with one chunk of 40 train images (digits, 4 per class): the fastest full path."""
    return tiny_params(generator, base={"chunk_size": 40} | sections.pop("base", {}), **sections)


def _run(root: Path, stage: str, raw: dict | None, capsys, *extra: str) -> tuple[int, str]:
    """`thinair --params <root>/../params.yaml --root <root> <stage>` in-process: (exit code, stderr)."""
    f = root.parent / "params.yaml"
    if raw is not None:
        f.write_text(yaml.safe_dump(raw))
    capsys.readouterr()
    rc = main(["--params", str(f), "--root", str(root), *extra, stage])
    err = capsys.readouterr().err
    if os.environ.get("THINAIR_MESSAGES"):  # collect every refusal's exact message (for the issue note)
        with open(os.environ["THINAIR_MESSAGES"], "a") as fh:
            test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0].split("::")[-1]
            fh.write(json.dumps({"test": test, "stage": stage, "rc": rc, "stderr": err.strip()}) + "\n")
    return rc, err


def _hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): io.file_sha256(p) for p in sorted((root / "data").rglob("*"))
            if p.is_file()}


def _first_line(err: str) -> str:
    return next((line for line in err.splitlines() if line.startswith("thinair")), err)


def _folder(root: Path, classes=("cat", "dog"), n: int = 4, size=(12, 10), mode: str = "RGB", seed: int = 0) -> Path:
    """root/<class>/<i>.png, n random images per class of `size` (w, h) and PIL `mode`."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            if mode == "I;16":  # 16-bit grey, full range
                im = Image.fromarray(rng.integers(0, 65535, (size[1], size[0]), dtype=np.uint16))
            else:
                im = Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
            im.save(root / c / f"{i}.png")
    return root


def _png_bytes(size: int = 16) -> bytes:
    from PIL import Image

    buf = _io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _huge_png_header(side: int = 20000) -> bytes:
    """A small file that is a valid PNG *declaring* side x side pixels (what a decompression bomb looks like)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def baseline(prefect_server, tiny_generator, tmp_path_factory) -> Path:
    """A workspace where ingest, encode and invert have run (what a failed later run must not damage)."""
    root = tmp_path_factory.mktemp("baseline") / "ws"
    root.mkdir()
    f = root.parent / "params.yaml"
    f.write_text(yaml.safe_dump(_raw(tiny_generator)))
    for stage in ("ingest", "encode", "invert"):
        assert main(["--params", str(f), "--root", str(root), stage]) == 0, stage
    return root


@pytest.fixture
def ws(baseline, tmp_path) -> Path:
    """A fresh copy of the baseline's data/ (no caches: every run really recomputes)."""
    root = tmp_path / "ws"
    shutil.copytree(baseline / "data", root / "data")
    return root


@pytest.fixture(scope="module")
def wide_generator(tmp_path_factory) -> Path:
    """Like tiny_generator (same VAE), but a UNet whose cross-attention width is 16 instead of 8."""
    from thinair.generator import build_unet, build_vae, save_generator

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("gen-wide") / "tiny-wide"
    save_generator(path, build_unet(4, [8, 16], cross_attention_dim=16, norm_groups=4, head_dim=4),
                   build_vae(16, [4, 8, 8], norm_groups=4, scaling_factor=1.0))
    return path


def _refused(ws: Path, stage: str, raw: dict, capsys, code: int, *expected: str, extra=()) -> str:
    """Run `stage`, assert exit `code`, every `expected` substring in stderr and data/ untouched; return stderr."""
    before = _hashes(ws)
    assert before, "the baseline workspace is empty: the check below would prove nothing"
    rc, err = _run(ws, stage, raw, capsys, *extra)
    assert rc == code, err
    for s in expected:
        assert s in err, f"{s!r} not in stderr:\n{err}"
    assert _hashes(ws) == before, "a failed run changed or deleted earlier outputs"
    assert not list(ws.rglob("*.tmp")), "a partial file was left behind"
    return err


# ------------------------------------------------------------------------------------ invalid params: exit 2
def test_unknown_key(ws, tiny_generator, capsys):
    raw = _raw(tiny_generator)
    raw["base"]["colour"] = "blue"
    _refused(ws, "ingest", raw, capsys, 2, "base.colour: unknown key (value 'blue')", "Allowed keys here: attention",
             PARAMS_FIX)


def test_unknown_section(ws, tiny_generator, capsys):
    raw = _raw(tiny_generator)
    raw["sampling"] = {"steps": 3}
    _refused(ws, "ingest", raw, capsys, 2, "sampling: unknown key", "Did you mean 'sample'?", PARAMS_FIX)


def test_misspelt_key_suggests_the_right_one(ws, tiny_generator, capsys):
    raw = _raw(tiny_generator)
    raw["invert"]["stpes"] = 4
    _refused(ws, "invert", raw, capsys, 2, "invert.stpes: unknown key", "Did you mean 'steps'?", PARAMS_FIX)


def test_ill_typed_value(ws, tiny_generator, capsys):
    raw = _raw(tiny_generator, invert={"steps": "many"})
    _refused(ws, "invert", raw, capsys, 2, "invert.steps: got 'many'", "valid integer", PARAMS_FIX)


def test_out_of_range_value(ws, tiny_generator, capsys):
    raw = _raw(tiny_generator, invert={"lr": 1.0e6})
    _refused(ws, "invert", raw, capsys, 2, "invert.lr: got 1000000.0", "less than or equal to 10", PARAMS_FIX)


def test_value_not_among_the_choices(ws, tiny_generator, capsys):
    raw = _raw(tiny_generator, ingest={"corrupt": "error"})  # the policies are skip | fail
    _refused(ws, "ingest", raw, capsys, 2, "ingest.corrupt: got 'error'", "'skip' or 'fail'", PARAMS_FIX)


def test_malformed_device_string(ws, tiny_generator, capsys):
    raw = _raw(tiny_generator, base={"device": "gpu0"})
    _refused(ws, "encode", raw, capsys, 2, "base.device: got 'gpu0'", "auto, cpu, mps, cuda, cuda:N", PARAMS_FIX)


def test_inconsistent_params_sample_checkpoint_never_saved(ws, tiny_generator, capsys):
    raw = _raw(tiny_generator, sample={"checkpoints": [3, "final"]})  # invert saves every 2 steps up to 4
    _refused(ws, "sample", raw, capsys, 2, "sample.checkpoints: step 3 is not saved by invert",
             "use a multiple of invert.checkpoint_every or 'final'")


def test_malformed_set_override(ws, tiny_generator, capsys):
    _refused(ws, "invert", _raw(tiny_generator), capsys, 2, "override 'steps=5': expected section.key=value",
             "e.g. invert.steps=500", extra=("-S", "steps=5"))


def test_params_file_missing(ws, capsys):
    (ws.parent / "params.yaml").unlink(missing_ok=True)
    _refused(ws, "ingest", None, capsys, 2, "params file not found", "pass --params PATH")


# ---------------------------------------------------------------------------- unusable datasets: exit 1
def _folder_params(generator, folder: Path, **ingest) -> dict:
    return _raw(generator, base={"dataset": f"folder:{folder}"}, ingest={"test_fraction": 0.25, **ingest})


def test_unknown_dataset_name(ws, tiny_generator, capsys):
    _refused(ws, "ingest", _raw(tiny_generator, base={"dataset": "cifar11"}), capsys, 1,
             "base.dataset: unknown dataset 'cifar11'", "choose one of", "folder:<path>")


def test_image_folder_that_does_not_exist(ws, tiny_generator, tmp_path, capsys):
    _refused(ws, "ingest", _folder_params(tiny_generator, tmp_path / "nope"), capsys, 1,
             f"image folder {tmp_path / 'nope'} does not exist", "expected", "/<class>/<image files>")


def test_empty_image_folder(ws, tiny_generator, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    _refused(ws, "ingest", _folder_params(tiny_generator, tmp_path / "empty"), capsys, 1,
             "found 0 class folder(s)", "need at least two subfolders")


def test_images_without_class_folders(ws, tiny_generator, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(4):
        (flat / f"{i}.png").write_bytes(_png_bytes())
    _refused(ws, "ingest", _folder_params(tiny_generator, flat), capsys, 1,
             "found 0 class folder(s)", f"need at least two subfolders {flat}/<class>/ with images")


def test_one_class_only(ws, tiny_generator, tmp_path, capsys):
    folder = _folder(tmp_path / "one", classes=("only",))
    _refused(ws, "ingest", _folder_params(tiny_generator, folder), capsys, 1,
             "found 1 class folder(s)", "need at least two subfolders")


def test_class_folder_with_no_images(ws, tiny_generator, tmp_path, capsys):
    folder = _folder(tmp_path / "ds")
    (folder / "bird").mkdir()
    (folder / "bird" / "notes.txt").write_text("not an image")
    _refused(ws, "ingest", _folder_params(tiny_generator, folder), capsys, 1,
             "class folder 'bird' has no readable images", "add", "or remove that folder")


def test_class_folder_whose_images_are_all_unreadable(ws, tiny_generator, tmp_path, capsys):
    folder = _folder(tmp_path / "ds")
    (folder / "bird").mkdir()
    for i in range(3):
        (folder / "bird" / f"{i}.png").write_bytes(b"junk")
    _refused(ws, "ingest", _folder_params(tiny_generator, folder, corrupt="skip"), capsys, 1,
             "class folder 'bird' has no readable images", "3 image file(s), none readable",
             "or remove that folder")


@pytest.mark.parametrize("kind, data, problem", [pytest.param(*case, id=case[0]) for case in (
    ("corrupt", b"\x89PNG\r\n\x1a\n then garbage", "UnidentifiedImageError: cannot identify image file"),
    ("truncated", _png_bytes()[:80], "OSError: image file is truncated"),
    ("zero-byte", b"", "UnidentifiedImageError: cannot identify image file"),
    ("non-image", b"name,label\ncat,0\n", "UnidentifiedImageError: cannot identify image file"),
    ("huge", _huge_png_header(), "DecompressionBombError: Image size (400000000 pixels) exceeds limit"),
)])
def test_unreadable_file_with_corrupt_fail(ws, tiny_generator, tmp_path, capsys, kind, data, problem):
    folder = _folder(tmp_path / "ds")
    bad = folder / "dog" / f"bad-{kind}.png"
    bad.write_bytes(data)
    _refused(ws, "ingest", _folder_params(tiny_generator, folder, corrupt="fail"), capsys, 1,
             f"image folder: cannot read {bad}", problem, READ_FIX)


def test_labels_out_of_range(ws, tiny_generator, tmp_path, capsys):
    rng = np.random.default_rng(0)
    arrays = {f"{s}_images": rng.integers(0, 255, (n, 28, 28, 3), dtype=np.uint8) for s, n in
              (("train", 12), ("val", 3), ("test", 6))}
    arrays |= {f"{s}_labels": (np.arange(n) % 9).reshape(-1, 1) for s, n in (("train", 12), ("val", 3), ("test", 6))}
    arrays["train_labels"][0] = 11  # pathmnist has 9 classes: 0..8
    np.savez(tmp_path / "pathmnist.npz", **arrays)
    raw = _raw(tiny_generator, base={"dataset": "pathmnist", "data_root": str(tmp_path)}, ingest={"download": False})
    _refused(ws, "ingest", raw, capsys, 1, "dataset 'pathmnist'", "train labels", "has 9 classes (labels 0..8)",
             "Replace it with the original pathmnist.npz")


# ------------------------------------------------------------------- accepted and converted: exit 0
@pytest.mark.parametrize("mode, channels", [("L", 1), ("RGBA", 3), ("I;16", 1), ("P", 3)])
def test_grey_rgba_16bit_and_palette_images_are_converted(prefect_server, tiny_generator, tmp_path, capsys,
                                                          mode, channels):
    folder = _folder(tmp_path / "ds", mode=mode, size=(10, 10))
    rc, err = _run(tmp_path / "ws", "ingest", _folder_params(tiny_generator, folder), capsys)
    assert rc == 0, err
    m = io.read_json(tmp_path / "ws" / "data" / "ingest" / "manifest.json")
    assert m["image_shape"] == [10, 10, channels] and m["skipped"] == []
    x = io.load_npz(tmp_path / "ws" / "data" / "ingest" / "train-00000.npz")["images"]
    assert x.dtype == np.uint8 and x.shape[1:] == (10, 10, channels)
    if mode == "I;16":  # 16-bit values are scaled to the 8-bit range, not clipped
        assert x.max() > 200 and x.min() < 50


def test_mixed_grey_and_colour_images_become_colour(prefect_server, tiny_generator, tmp_path, capsys):
    folder = _folder(tmp_path / "ds", classes=("cat",), mode="L", size=(10, 10))
    _folder(folder, classes=("dog",), mode="RGB", size=(10, 10))
    rc, err = _run(tmp_path / "ws", "ingest", _folder_params(tiny_generator, folder), capsys)
    assert rc == 0, err
    assert io.read_json(tmp_path / "ws" / "data" / "ingest" / "manifest.json")["image_shape"] == [10, 10, 3]


@pytest.mark.parametrize("image_size, expected", [(None, 10), (8, 8)])
def test_mismatched_image_sizes_are_cropped_and_resized(prefect_server, tiny_generator, tmp_path, capsys,
                                                        image_size, expected):
    folder = _folder(tmp_path / "ds", size=(12, 10))  # most common size: 12 x 10 -> 10 x 10 squares
    _folder(folder, classes=("cat",), n=2, size=(40, 16), seed=1)  # overwrites 0.png, 1.png of cat
    _folder(folder, classes=("dog",), n=1, size=(3, 30), seed=2)  # a thin strip
    rc, err = _run(tmp_path / "ws", "ingest", _folder_params(tiny_generator, folder, image_size=image_size), capsys)
    assert rc == 0, err
    m = io.read_json(tmp_path / "ws" / "data" / "ingest" / "manifest.json")
    assert m["image_shape"] == [expected, expected, 3]
    assert m["splits"]["train"]["count"] + m["splits"]["test"]["count"] == 8


# ---------------------------------------------------------------------- unusable generator / device: exit 1
def test_generator_directory_missing_a_component(ws, tiny_generator, tmp_path, capsys):
    gen = tmp_path / "gen-novae"
    shutil.copytree(tiny_generator, gen)
    shutil.rmtree(gen / "vae")
    _refused(ws, "encode", _raw(gen), capsys, 1, f"base.generator='{gen}': the directory lacks vae/",
             "save it with pipeline.save_pretrained(DIR)")


def test_hub_id_while_offline(ws, capsys):
    _refused(ws, "encode", _raw(Path("some-org/some-model")), capsys, 1,
             "base.generator='some-org/some-model': the hub model could not be loaded (HF_HUB_OFFLINE is set)",
             "config.json. Fix:",
             "Fix: on a machine with network access", "point base.generator at a local diffusers directory")


def test_gen_resolution_not_divisible_by_the_vae_factor(ws, tiny_generator, capsys):
    _refused(ws, "encode", _raw(tiny_generator, base={"gen_resolution": 18}), capsys, 1,
             "base.gen_resolution=18 is not divisible by the generator's VAE factor 4", "use a multiple of 4")


def test_half_precision_on_the_cpu(ws, tiny_generator, capsys):
    _refused(ws, "encode", _raw(tiny_generator, base={"dtype": "float16"}), capsys, 1,
             "base.dtype='float16' is for GPUs", "on the CPU use float32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_cuda_device_without_a_gpu(ws, tiny_generator, capsys):
    _refused(ws, "encode", _raw(tiny_generator, base={"device": "cuda"}), capsys, 1,
             "base.device='cuda' but no CUDA device is visible", "set base.device: auto or cpu")


def test_non_finite_loss(ws, tiny_generator, monkeypatch, capsys):
    import thinair.tasks.invert as invert

    def nan_loss(unet, noisy, noise, t, ctx):
        return (ctx * float("nan")).mean()  # what a diverging optimisation ends in

    monkeypatch.setattr(invert, "denoising_loss", nan_loss)
    _refused(ws, "invert", _raw(tiny_generator, invert={"lr": 5.0}), capsys, 1,
             "invert chunk 0: loss is nan at step 1", "lower invert.lr")


def test_non_finite_loss_in_the_class_encoder(ws, tiny_generator, monkeypatch, capsys):
    """The class encoder's NaN is the same error as inversion's: a clean exit 1 with the fix, no traceback."""
    import thinair.class_encoder as core

    monkeypatch.setattr(core, "noise_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    err = _refused(ws, "classenc", _raw(tiny_generator, sample={"method": "class_encoder"}), capsys, 1,
                   "thinair classenc: failed:", "loss is nan at step 1", "lower the learning rate")
    assert "Traceback" not in err


def test_incompatible_generator_embedding_width(ws, wide_generator, monkeypatch, capsys):
    """Embeddings learnt with a cross_attention_dim-8 generator, sampled with a cross_attention_dim-16 one."""
    from thinair import units

    task = units.unit_task("sample").with_options(retry_delay_seconds=0)
    monkeypatch.setattr(units, "unit_task", lambda stage: task)
    before = _hashes(ws)
    rc, err = _run(ws, "sample", _raw(wide_generator), capsys)
    assert rc == 1, err
    assert "cross_attention_dim 16" in err and "8-wide embeddings" in err and "thinair invert" in err
    assert _hashes(ws) == before


def test_disk_full_removes_the_partial_file_and_keeps_earlier_outputs(ws, tiny_generator, monkeypatch, capsys):
    import safetensors.torch

    from thinair import units

    calls = []

    def full_disk(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 1000)  # some bytes made it to disk, then the disk was full
        calls.append(filename)
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    task = units.unit_task("encode").with_options(retry_delay_seconds=0)
    monkeypatch.setattr(units, "unit_task", lambda stage: task)
    err = _refused(ws, "encode", _raw(tiny_generator, encode={"interpolation": "bilinear"}), capsys, 1,
                   "thinair encode: failed: [Errno 28] No space left on device")
    assert calls and not any(Path(c).exists() for c in calls)  # every partial file was removed
    assert "free space" in err and "finished chunks are kept" in err
