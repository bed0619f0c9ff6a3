"""`encode`: VAE-encode the train images at the generation resolution, keeping the posterior.

Reads ``data/ingest`` (train split) and the generator's VAE. Writes
``data/encode/train-NNNNN.safetensors`` per chunk of ``base.chunk_size`` images (keys ``mean`` and
``logvar`` of the diagonal Gaussian posterior, (n, 4, h, w) float32, so inversion re-samples a latent
every step; ``labels`` and ``index`` (n,) int64) and ``data/encode/manifest.json`` (written last).
Chunks already encoded with the same inputs come from the chunk cache.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from prefect import task

from thinair import io, paths
from thinair.config import Params
from thinair.caching import record
from thinair.devices import device_slot, set_threads, with_halving
from thinair.generator import generator_for, generator_identity, runtime_key
from thinair.images import to_model
from thinair.orchestration import task_options
from thinair.stage import ChunkCache, Split, chunk_ranges, clean_dir, content_key, source_hash, publish, read_split

STAGE = "encode"
log = logging.getLogger(__name__)


def encode_images(vae, images, resolution: int, interpolation: str, batch_size: int, device) -> dict:
    """uint8 (n, H, W, C) -> posterior mean/logvar (n, 4, R/f, R/f) float32 on CPU."""
    means, logvars = [], []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            x = to_model(images[s:s + batch_size], resolution, interpolation).to(device, vae.dtype)
            dist = vae.encode(x).latent_dist
            means.append(dist.mean.float().cpu())
            logvars.append(dist.logvar.float().cpu())
    return {"mean": torch.cat(means), "logvar": torch.cat(logvars)}


def check_resolution(resolution: int, factor: int) -> None:
    if resolution % factor:
        raise ValueError(f"base.gen_resolution={resolution} is not divisible by the generator's VAE factor {factor}; "
                         f"use a multiple of {factor}")


def chunk_key(params: Params, chunk: int, train: Split, root: str | Path = ".") -> str:
    """Everything that determines one chunk's latents: code, generator, resolution, resize and its images."""
    b, p = params.base, params.encode
    s, e = chunk_ranges(len(train.labels), b.chunk_size)[chunk]
    return content_key(STAGE, source_hash(__name__), generator_identity(b), runtime_key(b), b.gen_resolution,
                       p.interpolation, train.images[s:e])


def encode_chunk(params: Params, chunk: int, train: Split, root: str | Path = ".", device=None) -> dict:
    b, p = params.base, params.encode
    s, e = chunk_ranges(len(train.labels), b.chunk_size)[chunk]
    name = paths.chunk_name("train", chunk, "safetensors")
    key = chunk_key(params, chunk, train, root)
    cache = ChunkCache(STAGE, root)
    hit = cache.get(key, name)
    if hit is None:
        gen, device = generator_for(b, chunk, device)
        check_resolution(b.gen_resolution, gen.vae_factor)
        post = with_halving(p.batch_size, lambda bs: encode_images(gen.vae, train.images[s:e], b.gen_resolution,
                                                                   p.interpolation, bs, device),
                            f"encode chunk {chunk}")
        tmp = cache.dir / key / (name + ".part")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        io.save_tensors(tmp, post | {"labels": torch.from_numpy(train.labels[s:e]),
                                     "index": torch.arange(s, e, dtype=torch.int64)})
        hit = cache.put(key, name, tmp)
    else:
        log.info("%s chunk %d: reused from cache %s (not recomputed)", STAGE, chunk, key)
    out = paths.stage_dir(STAGE, root) / name
    publish(hit, out)
    return record(root, [out], file=name, start=s, end=e, key=key)


def finalize(params: Params, records: list[dict], root: str | Path = ".") -> dict:
    gen, _ = generator_for(params.base)
    out = paths.stage_dir(STAGE, root)
    manifest = {"generator": gen.identity, "scaling_factor": gen.scaling_factor, "vae_factor": gen.vae_factor,
                "resolution": params.base.gen_resolution, "chunks": [{k: r[k] for k in ("file", "start", "end")}
                                                                      for r in records]}
    clean_dir(out, {r["file"] for r in records} | {io.MANIFEST})
    io.write_json(out / io.MANIFEST, manifest)
    return manifest


def chunks(params: Params, root: str | Path = ".") -> tuple[Split, int]:
    train = read_split("train", root)
    return train, len(chunk_ranges(len(train.labels), params.base.chunk_size))


@task(name="encode-chunk", **task_options(retries=2, delay=10, cache=("encode-chunk", chunk_key)))
def encode_chunk_task(params: Params, chunk: int, train: Split, root: str = ".") -> dict:
    set_threads(params.base)
    with device_slot(params.base, root, f"encode chunk {chunk}") as device:
        return encode_chunk(params, chunk, train, root, device)
