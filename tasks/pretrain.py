"""`pretrain`: train a small generator (the embedded `tiny-digits`) on a pool of a dataset's *train* split.

A Stable-Diffusion-architecture latent diffusion model: diffusers ``AutoencoderKL`` (trained first,
MSE + KL) and ``UNet2DConditionModel`` with cross-attention, SD v1's DDPM noise schedule, conditioned
on learned class tokens (``num_tokens x cross_attention_dim``) with label dropout to a learned null
context so classifier-free guidance works, or (``pretrain.labels: false``) on the null context alone.
Reads ``pretrain.dataset`` (any ``base.dataset`` spec, train split only; ``pretrain.pool: holdout`` keeps
only the part :func:`thinair.rawdata.holdout_split` holds out from the task). Writes the generator
directory ``pretrain.output`` in the hub SD layout (plus ``class_tokens.safetensors`` when conditional,
``train_log.json`` with the pool's image hashes, and ``samples.png``).
Resumable: phase results and UNet checkpoints live in ``.thinair/work/pretrain``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from prefect import task

from thinair import faults, io, paths
from thinair.config import Params
from thinair.generator import build_unet, build_vae, sd_scheduler_config, save_generator
from thinair.diffusion import denoise
from thinair.images import png_bytes, tile, to_model, to_uint8
from thinair.immiscible import immiscible_noise
from thinair.orchestration import task_options
from thinair import datasets
from thinair.rawdata import RawDataset, holdout_split, image_hashes
from thinair.progress import duration

log = logging.getLogger(__name__)


def _batches(n: int, batch: int, gen: torch.Generator):
    while True:
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n - batch + 1, batch):
            yield perm[s:s + batch]


def norm_groups(channels: list[int]) -> int:
    """GroupNorm groups that divide every block width (8 for the default widths)."""
    return min(8, math.gcd(*channels))


def auto_channels(resolution: int) -> tuple[list[int], list[int]]:
    """(VAE, UNet) block widths sized from the image resolution: VAE factor 4 (3 levels) up to 32 px, factor 8
    (4 levels) above, so latents stay 2-32 px; widths grow modestly (16 px: the embedded generator's)."""
    if resolution <= 16:
        return [16, 32, 64], [32, 64]
    if resolution <= 32:
        return [32, 64, 64], [64, 128]
    if resolution <= 64:
        return [32, 64, 128, 128], [64, 128, 128]
    return [64, 128, 256, 256], [128, 256, 256]


def architecture(p):
    """`p` with vae_channels / unet_channels filled in where null (auto); checks the resolution fits the VAE."""
    vae, unet = auto_channels(p.resolution)
    p = p.model_copy(update={"vae_channels": p.vae_channels or vae, "unet_channels": p.unet_channels or unet})
    factor = 2 ** (len(p.vae_channels) - 1)
    if p.resolution % factor:
        raise ValueError(f"pretrain.resolution={p.resolution} is not divisible by the VAE factor {factor} of "
                         f"pretrain.vae_channels={p.vae_channels}; use a multiple of {factor}")
    return p


def progress(phase: str, step: int, total: int, loss: float, since: float, first: int) -> None:
    """One INFO line: ``pretrain unet: step 1200/5000 (24 %) loss 0.0810 — ETA 3 min 10 s`` (ETA from the steps
    run since `first`, this process's first step, and the seconds since `since`)."""
    done = step - first + 1
    eta = (time.monotonic() - since) / done * (total - step)
    log.info("pretrain %s: step %d/%d (%d %%) loss %.4f — ETA %s", phase, step, total, 100 * step // total, loss,
             duration(eta))


def load_dataset(p) -> RawDataset:
    """`pretrain.dataset` from `pretrain.data_root`; load errors name the pretrain keys, not base's/ingest's."""
    try:
        return datasets.load(p.dataset, p.data_root, download=p.download)
    except (datasets.DatasetUnavailable, ValueError) as err:
        msg = str(err)
        for old, new in (("base.dataset", "pretrain.dataset"), ("base.data_root", "pretrain.data_root"),
                         ("ingest.download", "pretrain.download")):
            msg = msg.replace(old, new)
        raise type(err)(msg) from None


def pool_indices(labels: np.ndarray, class_names: list[str], p) -> np.ndarray:
    """Indices into the train split that pretrain trains on: all of them, or holdout_split's pool part (the task
    side keeps the other part with the same function and seed, so the two are disjoint by construction)."""
    if p.pool == "all":
        return np.arange(len(labels))
    _, pool = holdout_split(labels, p.holdout_fraction, seed=datasets.SPLIT_SEED)
    if not len(pool):
        raise ValueError(f"pretrain.holdout_fraction={p.holdout_fraction} leaves the pretraining pool empty; raise it "
                         "or use pretrain.pool: all")
    if p.labels:  # a class without pool images would get an untrained class token
        for c in np.unique(labels):
            if not (labels[pool] == c).any():
                raise ValueError(
                    f"pretrain.holdout_fraction={p.holdout_fraction} leaves class {class_names[c]!r} "
                    f"({int((labels == c).sum())} train image(s)) with no image in the pretraining pool; raise "
                    "pretrain.holdout_fraction, add images of that class, or use pretrain.pool: all")
    return pool


def train_vae(x: torch.Tensor, p, gen: torch.Generator, log_every: int = 100):
    """x: (N, 3, R, R) in [-1, 1]. Returns the VAE (scaling factor set to 1/std of latents) and losses."""
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))  # module init is seeded too
    vae = build_vae(x.shape[-1], p.vae_channels, norm_groups=norm_groups(p.vae_channels))
    opt = torch.optim.AdamW(vae.parameters(), lr=p.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, p.vae_steps, eta_min=p.vae_lr * 0.05)
    losses, batches = [], _batches(len(x), min(p.batch_size, len(x)), gen)
    since = time.monotonic()
    for step in range(1, p.vae_steps + 1):
        xb = x[next(batches)]
        post = vae.encode(xb).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        loss = F.mse_loss(rec, xb) + 0.5 * F.l1_loss(rec, xb) + p.kl_weight * post.kl().mean() / xb[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == p.vae_steps:
            losses.append({"step": step, "loss": loss.item()})
            progress("vae", step, p.vae_steps, loss.item(), since, 1)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        mean = torch.cat([vae.encode(x[s:s + 256]).latent_dist.mean for s in range(0, len(x), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    return vae, losses


def train_unet(latents: torch.Tensor, labels: torch.Tensor | None, n_classes: int, p, gen: torch.Generator,
               ckpt: Path | None = None, log_every: int = 100, ckpt_every: int = 500):
    """latents: (N, 4, h, w) already scaled; labels (N,), or None to train unconditionally (every step on the
    null context; pass n_classes 0). Returns EMA UNet, tokens (C+1, T, D; last = null), losses."""
    from diffusers import DDPMScheduler

    groups = norm_groups(p.unet_channels)
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))  # module init is seeded too
    unet = build_unet(latents.shape[-1], p.unet_channels, p.cross_attention_dim, norm_groups=groups)
    ema = build_unet(latents.shape[-1], p.unet_channels, p.cross_attention_dim, norm_groups=groups)
    tokens = torch.nn.Parameter(torch.randn(n_classes + 1, p.num_tokens, p.cross_attention_dim, generator=gen))
    opt = torch.optim.AdamW(list(unet.parameters()) + [tokens], lr=p.unet_lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 200) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * s / p.unet_steps))))
    noise_sched = DDPMScheduler.from_config(sd_scheduler_config())
    start, losses = 0, []
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, weights_only=True)  # our own checkpoint; tensors only
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        tokens.data.copy_(state["tokens"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        gen.set_state(state["rng"])
        start, losses = int(state["step"]), json.loads(state["losses"])
        log.info("resuming unet training at step %d", start)
    else:
        ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    batches = _batches(len(latents), min(p.batch_size, len(latents)), gen)
    since = time.monotonic()
    for step in range(start + 1, p.unet_steps + 1):
        idx = next(batches)
        z0 = latents[idx]
        if labels is not None:
            y = labels[idx].clone()
            y[torch.rand(len(y), generator=gen) < p.label_dropout] = n_classes  # null context
        else:  # unconditional: the null context (row n_classes = 0), every step
            y = torch.full((len(idx),), n_classes, dtype=torch.long)
        noise = immiscible_noise(z0, gen, p.immiscible, p.knn_k)  # "off": the plain torch.randn draw
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(z0),), generator=gen)
        pred = unet(noise_sched.add_noise(z0, noise, t), t, encoder_hidden_states=tokens[y]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pu in zip(ema.parameters(), unet.parameters()):
                pe.lerp_(pu, 1 - decay)
        if step % log_every == 0 or step == p.unet_steps:
            losses.append({"step": step, "loss": loss.item()})
            progress("unet", step, p.unet_steps, loss.item(), since, start + 1)
        if ckpt is not None and (step % ckpt_every == 0) and step < p.unet_steps:
            with io.atomic_path(ckpt) as tmp:
                torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "tokens": tokens.data,
                            "opt": opt.state_dict(), "sched": sched.state_dict(), "rng": gen.get_state(),
                            "step": step, "losses": json.dumps(losses)}, tmp)
    return ema.eval(), tokens.detach(), losses


def class_samples(unet, vae, tokens: torch.Tensor, per_class: int, resolution: int, guidance: float = 2.0,
                  steps: int = 50, seed: int = 0) -> torch.Tensor:
    """Class-conditional samples (classes x per_class, 3, R, R) in [-1, 1], guided against the null context."""
    cond = tokens[:-1].repeat_interleave(per_class, 0)  # (C*k, T, D)
    return _samples(unet, vae, cond, tokens[-1:].expand_as(cond), guidance, resolution, steps, seed)


def unconditional_samples(unet, vae, null: torch.Tensor, n: int, resolution: int, steps: int = 50,
                          seed: int = 0) -> torch.Tensor:
    """Samples (n, 3, R, R) in [-1, 1] of an unconditional generator: the null context (T, D), no guidance."""
    ctx = null[None].expand(n, -1, -1)  # (n, T, D)
    return _samples(unet, vae, ctx, ctx, 1.0, resolution, steps, seed)


def _samples(unet, vae, cond, uncond, guidance: float, resolution: int, steps: int, seed: int) -> torch.Tensor:
    from diffusers import DDIMScheduler

    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    lat = torch.randn(len(cond), 4, resolution // factor, resolution // factor,
                      generator=torch.Generator().manual_seed(seed))
    z = denoise(unet, DDIMScheduler.from_config(sd_scheduler_config()), lat, cond, uncond,
                torch.full((len(cond),), guidance), steps)
    with torch.no_grad():
        return vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)


def pretrain(params: Params, root: str | Path = ".") -> dict:
    """Train VAE then UNet on the pool of `pretrain.dataset`'s train split; save the generator; return its log."""
    p = params.pretrain
    if p.threads:
        torch.set_num_threads(p.threads)
    t0 = time.time()
    out, old = Path(root) / p.output, Path(root) / (p.output.rstrip("/") + ".old")
    if old.is_dir() and not out.exists():  # killed mid-swap last time: put the previous generator back first
        old.rename(out)
    arch = architecture(p)  # p with the auto widths filled in
    train = load_dataset(p)  # train split only: the test split is never read
    pool = pool_indices(train.train_labels, train.class_names, p)
    images = train.train_images[pool]  # (N, H, W, C) uint8
    hashes = image_hashes(images)
    x = to_model(images, p.resolution)  # (N, 3, R, R)
    labels = torch.from_numpy(train.train_labels[pool]) if p.labels else None
    n_classes = len(train.class_names) if p.labels else 0
    work = paths.work_dir("pretrain", root)
    # every param and the pool's content (in training order): a changed pool never resumes another run's work
    key = io.seed_for(p.model_dump_json(), x.shape, hashlib.sha256("".join(hashes).encode()).hexdigest())
    vae_dir = work / f"vae-{key:x}"
    gen = torch.Generator().manual_seed(io.seed_for(p.seed, "pretrain"))
    if (vae_dir / "config.json").is_file():
        from diffusers import AutoencoderKL

        from diffusers.configuration_utils import FrozenDict

        vae = AutoencoderKL.from_pretrained(str(vae_dir)).eval().requires_grad_(False)
        # from_pretrained records where it loaded from; drop it so a resumed run saves the same config bytes
        vae._internal_dict = FrozenDict({k: v for k, v in vae.config.items() if k != "_name_or_path"})
        vae_losses = io.read_json(vae_dir / "losses.json")
        gen.manual_seed(io.seed_for(p.seed, "pretrain-unet"))
    else:
        vae, vae_losses = train_vae(x, arch, gen)
        part = vae_dir.with_name(vae_dir.name + ".part")  # complete or absent: renamed only once fully written
        shutil.rmtree(part, ignore_errors=True)
        vae.save_pretrained(str(part))
        io.write_json(part / "losses.json", vae_losses)
        faults.point("write-synced", vae_dir)
        part.rename(vae_dir)
        gen.manual_seed(io.seed_for(p.seed, "pretrain-unet"))
    with torch.no_grad():
        lat = torch.cat([vae.encode(x[s:s + 256]).latent_dist.mean for s in range(0, len(x), 256)])
        lat = lat * vae.config.scaling_factor  # (N, 4, h, w), unit variance
    unet, tokens, unet_losses = train_unet(lat, labels, n_classes, arch, gen, ckpt=work / f"unet-{key:x}.pt")
    train_log = {"vae": vae_losses, "unet": unet_losses, "seconds": round(time.time() - t0, 1),
                 "train_images": int(len(x)), "class_names": train.class_names, "conditional": p.labels,
                 "architecture": {"vae_channels": arch.vae_channels, "unet_channels": arch.unet_channels},
                 "pool": {"dataset": p.dataset, "pool": p.pool, "holdout_fraction": p.holdout_fraction,
                          "images": len(hashes), "sha256": sorted(hashes)},
                 "params": {"pretrain": p.model_dump()}}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_generator(tmp, unet, vae)
    if p.labels:  # an unconditional generator has no class tokens: sample.method class_tokens refuses it
        io.save_tensors(tmp / "class_tokens.safetensors", {"tokens": tokens},
                        metadata={"class_names": train.class_names, "null_index": len(train.class_names)})
    io.write_json(tmp / "train_log.json", train_log)
    if p.labels:
        samples = class_samples(unet, vae, tokens, 10, p.resolution)  # one row per class
    else:
        samples = unconditional_samples(unet, vae, tokens[-1], 100, p.resolution)
    io.write_bytes(tmp / "samples.png", png_bytes(tile(to_uint8(samples, p.resolution, 3), 10, 2)))
    # swap: a kill leaves the new generator, or the old one (as .old until the next run puts it back)
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    faults.point("write-synced", out)
    tmp.rename(out)
    faults.point("write-renamed", out)
    shutil.rmtree(old, ignore_errors=True)
    return train_log


@task(name="pretrain", **task_options(retries=1, delay=5))
def pretrain_task(params: Params, root: str = ".") -> dict:
    return pretrain(params, root)
