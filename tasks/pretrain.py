"""`pretrain`: train the embedded generator (`tiny-digits`) on the ingest *train* split only.

A Stable-Diffusion-architecture latent diffusion model: diffusers ``AutoencoderKL`` (trained first,
MSE + KL) and ``UNet2DConditionModel`` with cross-attention, SD v1's DDPM noise schedule, conditioned
on learned class tokens (``num_tokens x cross_attention_dim``) with label dropout to a learned null
context so classifier-free guidance works. Reads ``data/ingest``. Writes the generator directory
``base.generator`` in the hub SD layout (plus ``class_tokens.safetensors`` and ``train_log.json``).
Resumable: phase results and UNet checkpoints live in ``.thinair/work/pretrain``.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

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

log = logging.getLogger(__name__)


def _batches(n: int, batch: int, gen: torch.Generator):
    while True:
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n - batch + 1, batch):
            yield perm[s:s + batch]


def norm_groups(channels: list[int]) -> int:
    """GroupNorm groups that divide every block width (8 for the default widths)."""
    return min(8, math.gcd(*channels))


def train_vae(x: torch.Tensor, p, gen: torch.Generator, log_every: int = 100):
    """x: (N, 3, R, R) in [-1, 1]. Returns the VAE (scaling factor set to 1/std of latents) and losses."""
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))  # module init is seeded too
    vae = build_vae(x.shape[-1], p.vae_channels, norm_groups=norm_groups(p.vae_channels))
    opt = torch.optim.AdamW(vae.parameters(), lr=p.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, p.vae_steps, eta_min=p.vae_lr * 0.05)
    losses, batches = [], _batches(len(x), min(p.batch_size, len(x)), gen)
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
            log.info("vae step %d/%d loss %.4f", step, p.vae_steps, loss.item())
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        mean = torch.cat([vae.encode(x[s:s + 256]).latent_dist.mean for s in range(0, len(x), 256)])
    vae.register_to_config(scaling_factor=float(1.0 / mean.std()))
    return vae, losses


def train_unet(latents: torch.Tensor, labels: torch.Tensor, n_classes: int, p, gen: torch.Generator,
               ckpt: Path | None = None, log_every: int = 100, ckpt_every: int = 500):
    """latents: (N, 4, h, w) already scaled. Returns EMA UNet, class tokens (C+1, T, D; last = null), losses."""
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
    for step in range(start + 1, p.unet_steps + 1):
        idx = next(batches)
        z0 = latents[idx]
        y = labels[idx].clone()
        y[torch.rand(len(y), generator=gen) < p.label_dropout] = n_classes  # null context
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
            log.info("unet step %d/%d loss %.4f", step, p.unet_steps, loss.item())
        if ckpt is not None and (step % ckpt_every == 0) and step < p.unet_steps:
            with io.atomic_path(ckpt) as tmp:
                torch.save({"unet": unet.state_dict(), "ema": ema.state_dict(), "tokens": tokens.data,
                            "opt": opt.state_dict(), "sched": sched.state_dict(), "rng": gen.get_state(),
                            "step": step, "losses": json.dumps(losses)}, tmp)
    return ema.eval(), tokens.detach(), losses


def class_samples(unet, vae, tokens: torch.Tensor, per_class: int, resolution: int, guidance: float = 2.0,
                  steps: int = 50, seed: int = 0) -> torch.Tensor:
    """Class-conditional samples (classes x per_class, 3, R, R) in [-1, 1], guided against the null context."""
    from diffusers import DDIMScheduler

    cond = tokens[:-1].repeat_interleave(per_class, 0)  # (C*k, T, D)
    uncond = tokens[-1:].expand_as(cond)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    lat = torch.randn(len(cond), 4, resolution // factor, resolution // factor,
                      generator=torch.Generator().manual_seed(seed))
    z = denoise(unet, DDIMScheduler.from_config(sd_scheduler_config()), lat, cond, uncond,
                torch.full((len(cond),), guidance), steps)
    with torch.no_grad():
        return vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1)


def pretrain(params: Params, root: str | Path = ".") -> dict:
    """Train VAE then UNet on the train split of `pretrain.dataset`; save the generator; return its log."""
    p = params.pretrain
    if p.threads:
        torch.set_num_threads(p.threads)
    t0 = time.time()
    out, old = Path(root) / p.output, Path(root) / (p.output.rstrip("/") + ".old")
    if old.is_dir() and not out.exists():  # killed mid-swap last time: put the previous generator back first
        old.rename(out)
    if p.resolution % 2 ** (len(p.vae_channels) - 1):
        raise ValueError(f"pretrain.resolution={p.resolution} is not divisible by the VAE factor "
                         f"{2 ** (len(p.vae_channels) - 1)} of pretrain.vae_channels")
    train = datasets.load(p.dataset, "")  # the bundled digits: needs no data root; train split only
    x = to_model(train.train_images, p.resolution)  # (N, 3, R, R)
    labels = torch.from_numpy(train.train_labels)
    work = paths.work_dir("pretrain", root)
    key = io.seed_for(p.model_dump_json(), x.shape)
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
        vae, vae_losses = train_vae(x, p, gen)
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
    unet, tokens, unet_losses = train_unet(lat, labels, len(train.class_names), p, gen, ckpt=work / f"unet-{key:x}.pt")
    train_log = {"vae": vae_losses, "unet": unet_losses, "seconds": round(time.time() - t0, 1),
                 "train_images": int(len(x)), "class_names": train.class_names,
                 "params": {"pretrain": p.model_dump()}}
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_generator(tmp, unet, vae)
    io.save_tensors(tmp / "class_tokens.safetensors", {"tokens": tokens},
                    metadata={"class_names": train.class_names, "null_index": len(train.class_names)})
    io.write_json(tmp / "train_log.json", train_log)
    grid = to_uint8(class_samples(unet, vae, tokens, 10, p.resolution), p.resolution, 3)
    io.write_bytes(tmp / "samples.png", png_bytes(tile(grid, 10, 2)))  # one row per class
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
