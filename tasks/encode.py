"""`encode`: VAE-encode the train images at the generation resolution, keeping the posterior.

Reads ``data/ingest`` (train split) and the generator's VAE. Writes
``data/encode/train-NNNNN.safetensors`` per chunk of ``base.chunk_size`` images (keys ``mean`` and
``logvar`` of the diagonal Gaussian posterior, (n, 4, h, w) float32, so inversion re-samples a latent
every step; ``labels`` and ``index`` (n,) int64) and ``data/encode/manifest.json`` (written last).
Units are the chunks, cached by content (thinair/units.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

from thinair import io, paths
from thinair.config import Params
from thinair.devices import with_halving
from thinair.diffusion import check_resolution, encode_images
from thinair.generator import generator_for, generator_identity, runtime_key
from thinair.units import clean_dir
from thinair.upstream import chunk_ranges, read_split

STAGE = "encode"
_TRAIN: dict = {}  # per process: the train split of the last root read (every chunk's key and compute need it)


def _train(root: str | Path):
    f = paths.stage_dir("ingest", root) / io.MANIFEST
    memo = (str(Path(root).resolve()), io.file_sha256(f) if f.is_file() else "")
    if memo not in _TRAIN:
        _TRAIN.clear()
        _TRAIN[memo] = read_split("train", root)
    return _TRAIN[memo]


def units(params: Params, root: str | Path = ".") -> list[dict]:
    """One unit per chunk of ``base.chunk_size`` train images."""
    ranges = chunk_ranges(len(_train(root).labels), params.base.chunk_size)
    return [{"name": f"chunk-{i:03d}", "chunk": i, "start": s, "end": e,
             "file": paths.chunk_name("train", i, "safetensors")} for i, (s, e) in enumerate(ranges)]


def key(params: Params, unit: dict, root: str | Path = ".") -> list:
    """Everything that determines one chunk's latents besides code: generator, resolution, resize, its images."""
    b, p = params.base, params.encode
    return [generator_identity(b), runtime_key(b), b.gen_resolution, p.interpolation,
            _train(root).images[unit["start"]:unit["end"]]]


def compute(params: Params, unit: dict, out: Path, root: str | Path = ".", device=None) -> None:
    b, p = params.base, params.encode
    train, s, e = _train(root), unit["start"], unit["end"]
    gen_model, device = generator_for(b, unit["chunk"], device)
    check_resolution(b.gen_resolution, gen_model.vae_factor)
    post = with_halving(p.batch_size, lambda bs: encode_images(gen_model.vae, train.images[s:e], b.gen_resolution,
                                                               p.interpolation, bs, device),
                        f"encode chunk {unit['chunk']}")
    io.save_tensors(out, post | {"labels": torch.from_numpy(train.labels[s:e]),
                                 "index": torch.arange(s, e, dtype=torch.int64)})


def finish(params: Params, records: list[dict], root: str | Path = ".") -> dict:
    gen_model, _ = generator_for(params.base)
    out = paths.stage_dir(STAGE, root)
    chunks = [{k: r["unit"][k] for k in ("file", "start", "end")} for r in records]
    manifest = {"generator": gen_model.identity, "scaling_factor": gen_model.scaling_factor,
                "vae_factor": gen_model.vae_factor, "resolution": params.base.gen_resolution, "chunks": chunks}
    clean_dir(out, {c["file"] for c in chunks} | {io.MANIFEST})
    io.write_json(out / io.MANIFEST, manifest)
    return manifest
