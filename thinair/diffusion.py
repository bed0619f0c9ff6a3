"""The diffusion maths every stage shares: VAE encoding, guided denoising and the img2img start.

Pure functions of (models, tensors); no I/O. Used by encode, sample, cas (reconstructed test), pretrain (its sample
grid) and the prompt sampler (img2img).
"""
from __future__ import annotations

import numpy as np
import torch

from thinair.images import to_model, to_uint8


def check_resolution(resolution: int, factor: int) -> None:
    if resolution % factor:
        raise ValueError(f"base.gen_resolution={resolution} is not divisible by the generator's VAE factor {factor}; "
                         f"use a multiple of {factor}")


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


def reconstruct(vae, images, resolution: int, interpolation: str, batch_size: int, device):
    """uint8 (n, H, W, C) -> the same images after a round trip through the VAE (posterior mean -> decode), resized
    back to (H, W) with C channels: what the generator can represent of them."""
    h, _, c = images.shape[1:]
    out = []
    with torch.no_grad():
        for s in range(0, len(images), batch_size):
            post = encode_images(vae, images[s:s + batch_size], resolution, interpolation, batch_size, device)
            out.append(to_uint8(vae.decode(post["mean"].to(device, vae.dtype)).sample, h, c, interpolation))
    return np.concatenate(out) if out else images[:0].copy()


def img2img_start(scheduler, steps: int, strength: float, x0: torch.Tensor, noise: torch.Tensor):
    """Noised start latents and the timesteps left, as diffusers' StableDiffusionImg2ImgPipeline does it.

    x0, noise (B, 4, h, w). The schedule's last ``int(steps * strength)`` steps are run from x0 noised to the
    first of them; strength 1 starts from pure noise instead (as diffusers' inpaint pipeline), i.e. txt2img.
    """
    scheduler.set_timesteps(steps, device=x0.device)
    if strength >= 1.0:
        return noise * scheduler.init_noise_sigma, scheduler.timesteps
    t_start = (steps - min(int(steps * strength), steps)) * scheduler.order
    if t_start >= len(scheduler.timesteps):
        raise ValueError(f"sample.strength={strength} x sample.steps={steps} leaves no denoising step; raise either")
    timesteps = scheduler.timesteps[t_start:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(t_start)
    return scheduler.add_noise(x0, noise, timesteps[:1].repeat(len(x0))), timesteps


def guided(t, scheduler, interval: tuple[float, float] | None) -> bool:
    """Whether step `t` gets classifier-free guidance: always without an `interval`, else when the noise level
    t / T (T = the scheduler's training timesteps) lies in [lo, hi] (Kynkaanniemi et al. 2024, guidance interval)."""
    if interval is None:
        return True
    level = float(t) / scheduler.config.num_train_timesteps
    return interval[0] <= level <= interval[1]


def unet_evaluations(scheduler, steps: int, interval: tuple[float, float] | None = None) -> int:
    """UNet image evaluations per sampled image: two per guided step (uncond + cond), one per other step."""
    scheduler.set_timesteps(steps)
    return sum(2 if guided(t, scheduler, interval) else 1 for t in scheduler.timesteps)


@torch.no_grad()
def denoise(unet, scheduler, latents, cond, uncond, guidance, steps: int, batched: bool = True, init=None,
            strength: float = 1.0, interval: tuple[float, float] | None = None):
    """Classifier-free guidance sampling; cond/uncond (B, T, D), guidance (B,). Returns x0 latents.

    ``eps = eps_u + w (eps_c - eps_u)`` (the reference code's and diffusers' convention; the paper writes
    (1 + w') eps_c - w' eps_u, so its w' is this w - 1). ``batched``: one UNet call on the stacked uncond/cond
    batch (needs equal token counts) instead of two. ``init`` (B, 4, h, w): img2img from these latents noised to
    ``strength`` (`latents` is then the noise). ``interval`` (lo, hi): guidance only at noise levels t / T in
    [lo, hi]; the other steps take the conditional prediction alone, one UNet pass per image instead of two
    (:func:`guided`; None = every step, the paper's sampling).
    """
    if init is None:
        scheduler.set_timesteps(steps, device=latents.device)
        lat, timesteps = latents * scheduler.init_noise_sigma, scheduler.timesteps
    else:
        lat, timesteps = img2img_start(scheduler, steps, strength, init, latents)
    one_call = batched and uncond.shape[1] == cond.shape[1]
    ctx = torch.cat([uncond, cond]).to(unet.dtype) if one_call else None
    cond_ctx = cond.to(unet.dtype)  # the unguided steps' context
    w = guidance.view(-1, 1, 1, 1).to(lat)
    for t in timesteps:
        if not guided(t, scheduler, interval):
            inp = scheduler.scale_model_input(lat, t).to(unet.dtype)
            eps = unet(inp, t, encoder_hidden_states=cond_ctx).sample.float()
            lat = scheduler.step(eps, t, lat).prev_sample
            continue
        if one_call:
            inp = scheduler.scale_model_input(torch.cat([lat, lat]), t).to(unet.dtype)
            eps_u, eps_c = unet(inp, t, encoder_hidden_states=ctx).sample.float().chunk(2)
        else:
            inp = scheduler.scale_model_input(lat, t).to(unet.dtype)
            eps_u = unet(inp, t, encoder_hidden_states=uncond.to(unet.dtype)).sample.float()
            eps_c = unet(inp, t, encoder_hidden_states=cond_ctx).sample.float()
        lat = scheduler.step(eps_u + w * (eps_c - eps_u), t, lat).prev_sample
    return lat
