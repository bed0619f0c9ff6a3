"""GPU smoke run: the real stage code in half precision on Stable Diffusion v1's exact architecture, run by hand.

    python benchmarks/gpu_smoke.py                                      # cuda: float16 and bfloat16, 256 px
    python benchmarks/gpu_smoke.py --device cpu --dtype bfloat16        # the CPU check (slow: ~1-3 min), 64 px

Builds SD v1's UNet and VAE (the configs of benchmarks/bench.py, 860M + 84M parameters) with random weights, so
nothing is downloaded, and saves them as a generator directory; writes a few tiny random images as an image-folder
dataset; then, once per dtype, runs the stages ingest -> encode -> invert -> sample -> cas (with the VAE-reconstructed
test) through :func:`thinair.units.run_local` for 2 steps each (inversion at batch 2 of a 4-image chunk, so the
per-embedding step path with several optimiser steps per update runs too). Every output is checked: finite float32
latents and embeddings, uint8 images that are not constant, CAS accuracies in [0, 1]. Prints one table row per stage
and dtype; exits 1 if any check fails. ``--arch tiny`` swaps in a small SD-layout model (the test suite's quick run of
this script). Writes only under ``--workdir`` (default: a temporary directory, removed afterwards).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench.py beside this file, however this one was loaded
from bench import SD_V1_UNET, SD_V1_VAE  # noqa: E402

from thinair import io  # noqa: E402
from thinair.config import parse_params  # noqa: E402
from thinair.generator import DTYPES, build_unet, build_vae, save_generator  # noqa: E402
from thinair.units import run_local  # noqa: E402

STAGES = ("ingest", "encode", "invert", "sample", "cas")


def build_generator(path: Path, arch: str, dtype: torch.dtype, seed: int = 0) -> int:
    """Save a random-weight generator of `arch` (sd-v1 | tiny) at `path`; returns its VAE factor."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(seed)
    if arch == "sd-v1":
        unet, vae = UNet2DConditionModel(**SD_V1_UNET), AutoencoderKL(**SD_V1_VAE)
    else:  # an SD-layout model small enough for the default test suite (VAE factor 4)
        unet = build_unet(8, [8, 16], cross_attention_dim=8, norm_groups=4, head_dim=4)
        vae = build_vae(32, [4, 8, 8], norm_groups=4)
    save_generator(path, unet.to(dtype), vae.to(dtype))
    return 2 ** (len(vae.config.block_out_channels) - 1)


def write_images(root: Path, classes: int = 2, per_class: int = 4, size: int = 32, seed: int = 0) -> Path:
    """A random image folder ``root/<class>/<i>.png`` (each class a different mean colour)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k in range(classes):
        (root / f"class{k}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = np.clip(rng.normal(64 + 128 * k, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"class{k}" / f"{i}.png")
    return root


def smoke_params(generator: Path, images: Path, device: str, dtype: str, resolution: int):
    """Two steps of everything on 4 train / 4 test images."""
    return parse_params({
        "base": {"generator": str(generator), "dataset": f"folder:{images}", "gen_resolution": resolution,
                 "device": device, "dtype": dtype, "chunk_size": 4, "workers": 1},
        "ingest": {"test_fraction": 0.5, "download": False},
        "encode": {"batch_size": 4, "fit_check": "off"},
        "invert": {"steps": 2, "batch_size": 2, "checkpoint_every": 1, "num_tokens": 2},
        "sample": {"steps": 2, "scheduler": "ddim", "checkpoints": [1, "final"], "guidance_scales": [2.0],
                   "samples_per_setting": 1, "batch_size": 4},
        "cas": {"model": "smallcnn", "width": 8, "modes": ["real", "synthetic"], "seeds": 1, "epochs": 1,
                "reconstructed_test": True, "scale_synthetic": [], "scale_real": []},
    }, "gpu_smoke")


def _finite_float32(t: torch.Tensor) -> bool:
    return t.dtype == torch.float32 and bool(torch.isfinite(t).all())


def check(stage: str, root: Path) -> str:
    """'' if `stage`'s outputs under `root` pass, else what failed."""
    d = root / "data" / stage
    if stage == "encode":
        t = io.load_tensors(d / "train-00000.safetensors")
        return "" if _finite_float32(t["mean"]) and _finite_float32(t["logvar"]) else "latents not finite float32"
    if stage == "invert":
        t = io.load_tensors(d / "train-00000.safetensors")
        bad = [k for k in ("embeddings", "step_1") if not _finite_float32(t[k])]
        return f"{bad} not finite float32" if bad else ""
    if stage == "sample":
        x = io.load_npz(d / "train-00000.npz")["images"]
        return "" if x.dtype == np.uint8 and len(x) == 8 and x.std() > 0 else f"images {x.dtype} {x.shape} constant?"
    if stage == "cas":
        cas = io.read_json(d / "cas.json")
        accs = [a["mean"] for table in ("accuracy", "reconstructed_accuracy") for a in cas[table].values()]
        return "" if all(0 <= a <= 1 for a in accs) else f"accuracies {accs}"
    return ""


def run_dtype(work: Path, generator: Path, images: Path, device: str, dtype: str, resolution: int) -> list[dict]:
    """The stages in one dtype; one row each {dtype, stage, seconds, result}. Stops at the first failure."""
    params, root, rows = smoke_params(generator, images, device, dtype, resolution), work / dtype, []
    for stage in STAGES:
        t0 = time.perf_counter()
        try:
            run_local(stage, params, root)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            problem = check(stage, root)
        except Exception as err:  # noqa: BLE001 - a smoke run reports every failure
            problem = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        rows.append({"dtype": dtype, "stage": stage, "seconds": time.perf_counter() - t0,
                     "result": "ok" if not problem else f"FAILED: {problem}"})
        if problem:
            break
    return rows


def smoke(work: Path, device: str, dtypes: list[str], resolution: int, arch: str = "sd-v1") -> list[dict]:
    """Build the generator and the images under `work`, run every dtype; returns the rows."""
    t0 = time.perf_counter()
    generator = work / f"generator-{arch}"
    build_generator(generator, arch, DTYPES[dtypes[0]])
    images = write_images(work / "images")
    rows = [{"dtype": dtypes[0], "stage": f"build {arch}", "seconds": time.perf_counter() - t0, "result": "ok"}]
    for dtype in dtypes:
        rows += run_dtype(work, generator, images, device, dtype, resolution)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", nargs="+", choices=["float16", "bfloat16", "float32"], default=None,
                    help="default: float16 bfloat16 on cuda, bfloat16 on cpu")
    ap.add_argument("--resolution", type=int, default=None, help="generation px (default: 256 on cuda, 64 on cpu)")
    ap.add_argument("--arch", choices=["sd-v1", "tiny"], default="sd-v1")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the run here (default: a temporary directory)")
    a = ap.parse_args(argv)
    cpu = a.device == "cpu"
    dtypes = a.dtype or (["bfloat16"] if cpu else ["float16", "bfloat16"])
    resolution = a.resolution or (64 if cpu else 256)
    work = a.workdir or Path(tempfile.mkdtemp(prefix="thinair-gpu-smoke-"))
    name = torch.cuda.get_device_name(0) if a.device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    print(f"device={a.device} ({name}, {torch.get_num_threads()} threads) arch={a.arch} px={resolution} "
          f"torch={torch.__version__}")
    try:
        rows = smoke(work, a.device, dtypes, resolution, a.arch)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print("| dtype | stage | seconds | result |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['stage']} | {r['seconds']:.1f} | {r['result']} |")
    failed = any(r["result"] != "ok" for r in rows) or len(rows) < 1 + len(dtypes) * len(STAGES)
    print("FAILED" if failed else "all stages passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
