"""Class-encoder adaptation (seed 002): a learned class encoder replaces the text encoder of a latent diffusion model.

Phase 1 (:func:`train_encoder`) trains only the encoder against the frozen UNet; phase 2 (:func:`finetune_unet`)
fine-tunes the *pretrained* UNet (all weights, or peft LoRA adapters on the attention projections) with the
encoder frozen. Both use the plain noise-prediction MSE, AdamW with decoupled weight decay, global grad-norm
clipping, cosine decay, label dropout (a dropped label becomes -1, the encoder's learned unconditional index, so
classifier-free guidance has a trained unconditional context) and optional immiscible noise pairing.
:func:`generate` samples class-conditional images with classifier-free guidance. Training latents are already
scaled (``z * vae.config.scaling_factor``), (N, 4, h, w). Every random draw comes from the caller's
``torch.Generator``. Reads and writes nothing itself except :func:`save_encoder` / :func:`load_encoder`
(safetensors with the encoder's shape in the metadata); checkpoints go to the caller's ``on_checkpoint``.
"""
from __future__ import annotations

import copy
import inspect
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from thinair import io
from thinair.immiscible import immiscible_noise
from thinair.errors import NonFiniteLoss  # noqa: F401 - raised here; defined in thinair/errors.py

UNCOND = -1  # the label meaning "no class": the encoder's extra, learned index
ADAPTER = "classenc"
# the `classenc` stage's output files in data/classenc
ENCODER, FULL_UNET, LORA_UNET = "encoder.safetensors", "unet.safetensors", "unet_lora.safetensors"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class ClassEncoder(nn.Module):
    """one-hot(C + 1) -> Linear(hidden) -> SiLU -> Linear(tokens * dim) -> (tokens, dim); index C = unconditional."""

    def __init__(self, num_classes: int, tokens: int, dim: int, hidden: int = 500,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.num_classes, self.tokens, self.dim, self.hidden = num_classes, tokens, dim, hidden
        self.net = nn.Sequential(nn.Linear(num_classes + 1, hidden), nn.SiLU(), nn.Linear(hidden, tokens * dim))
        if generator is not None:
            self.reset_parameters(generator)

    def reset_parameters(self, generator: torch.Generator) -> None:
        """PyTorch's default Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from `generator`."""
        with torch.no_grad():
            for lin in (self.net[0], self.net[2]):
                bound = 1.0 / math.sqrt(lin.in_features)
                for p in (lin.weight, lin.bias):
                    p.copy_((torch.rand(p.shape, generator=generator) * 2 - 1) * bound)

    def encode(self, labels) -> torch.Tensor:
        """Contexts (B, tokens, dim) for labels (B,) in [0, C), or -1 for the unconditional context."""
        weight = self.net[0].weight
        labels = torch.as_tensor(labels, dtype=torch.long).to(weight.device)
        if labels.numel() and (labels.min() < UNCOND or labels.max() >= self.num_classes):
            raise ValueError(f"ClassEncoder: labels must be in [0, {self.num_classes}) or -1 (unconditional), got "
                             f"{sorted(set(labels.tolist()))}")
        idx = torch.where(labels < 0, self.num_classes, labels)
        onehot = F.one_hot(idx, self.num_classes + 1).to(weight.dtype)  # (B, C + 1)
        return self.net(onehot).view(-1, self.tokens, self.dim)  # (B, T, D)

    forward = encode

    def config(self) -> dict:
        return {"num_classes": self.num_classes, "tokens": self.tokens, "dim": self.dim, "hidden": self.hidden}


def save_encoder(path: str | Path, encoder: ClassEncoder, metadata: dict | None = None) -> None:
    io.save_tensors(path, encoder.state_dict(), {"encoder": encoder.config()} | (metadata or {}))


def load_encoder(path: str | Path) -> ClassEncoder:
    enc = ClassEncoder(**io.load_metadata(path)["encoder"])
    enc.load_state_dict(io.load_tensors(path))
    return enc


def cosine_lr(step: int, steps: int, lr: float) -> float:
    """Cosine decay from `lr` (step 0) towards 0 (step `steps`)."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * step / max(steps, 1)))


def draw_batch(latents: torch.Tensor, labels: torch.Tensor, batch_size: int, label_dropout: float,
               num_timesteps: int, generator: torch.Generator, immiscible: str = "off", k: int = 4):
    """One training batch, drawn in a fixed order (images, dropout, noise, timesteps).

    Returns:
        z0 (B, 4, h, w), noise (B, 4, h, w), t (B,), labels (B,) with dropped labels set to -1.
    """
    b = min(batch_size, len(latents))
    idx = torch.randperm(len(latents), generator=generator)[:b]
    drop = torch.rand(b, generator=generator) < label_dropout  # drawn even at 0: same draws for every setting
    lab = torch.where(drop, UNCOND, torch.as_tensor(labels)[idx])
    z0 = latents[idx]
    noise = immiscible_noise(z0, generator, immiscible, k)
    t = torch.randint(0, num_timesteps, (b,), generator=generator)
    return z0, noise, t, lab


def noise_loss(unet, noise_sched, z0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor
               ) -> torch.Tensor:
    """The ordinary diffusion loss: MSE between the UNet's prediction and the target (noise, or v)."""
    p = next(unet.parameters())
    noisy = noise_sched.add_noise(z0, noise, t)  # (B, 4, h, w)
    target = noise_sched.get_velocity(z0, noise, t) if noise_sched.config.prediction_type == "v_prediction" else noise
    pred = unet(noisy.to(p.device, p.dtype), t.to(p.device), encoder_hidden_states=ctx.to(p.device, p.dtype)).sample
    return F.mse_loss(pred.float(), target.to(p.device).float())


@contextmanager
def trainable(module: nn.Module, predicate: Callable[[str], bool]) -> Iterator[list[nn.Parameter]]:
    """Set requires_grad by name for the block (yielding the trainable parameters), then restore the flags."""
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    for n, p in module.named_parameters():
        p.requires_grad_(predicate(n))
    try:
        yield [p for p in module.parameters() if p.requires_grad]
    finally:
        for n, p in module.named_parameters():
            p.requires_grad_(flags.get(n, False))


def _optimise(named: dict[str, nn.Parameter], batch_loss: Callable[[], torch.Tensor], *, steps: int, lr: float,
              weight_decay: float, grad_clip: float, generator: torch.Generator, on_checkpoint, checkpoint_every: int,
              state: dict | None, what: str) -> list[float]:
    """AdamW + cosine decay + clipping over `named` parameters; checkpoint/resume of params, optimiser, rng, step."""
    params = list(named.values())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    losses, start = [], 0
    if state is not None:
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(state["params"][n].to(p))
        opt.load_state_dict(state["opt"])
        generator.set_state(state["rng"])
        losses, start = [float(x) for x in state["losses"]], int(state["step"])
    for step in range(start + 1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step - 1, steps, lr)
        loss = batch_loss()
        if not torch.isfinite(loss):
            raise NonFiniteLoss(f"{what}: loss is {loss.item()} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        losses.append(loss.item())
        if on_checkpoint is not None and ((checkpoint_every and step % checkpoint_every == 0) or step == steps):
            on_checkpoint(step, {"params": {n: p.detach().cpu().clone() for n, p in named.items()},
                                 "opt": copy.deepcopy(opt.state_dict()), "rng": generator.get_state(),
                                 "losses": list(losses), "step": step})
    return losses


def train_encoder(unet, noise_sched, latents: torch.Tensor, labels: torch.Tensor, encoder: ClassEncoder, *,
                  steps: int, batch_size: int, lr: float, weight_decay: float, label_dropout: float, grad_clip: float,
                  generator: torch.Generator, immiscible: str = "off", k: int = 4, on_checkpoint=None,
                  checkpoint_every: int = 0, state: dict | None = None) -> list[float]:
    """Phase 1: train `encoder` in place against the frozen UNet (no UNet weight receives a gradient).

    Args:
        on_checkpoint: ``on_checkpoint(step, state)`` every `checkpoint_every` steps (0: never) and at the last step;
            `state` (encoder params, optimiser, rng, losses, step) is ``torch.save``-able and resumes via `state`.
    Returns:
        the loss of every step (including those before a resume).
    """
    n_t = noise_sched.config.num_train_timesteps

    def batch_loss():
        z0, noise, t, lab = draw_batch(latents, labels, batch_size, label_dropout, n_t, generator, immiscible, k)
        return noise_loss(unet, noise_sched, z0, noise, t, encoder(lab))

    with trainable(unet, lambda n: False), trainable(encoder, lambda n: True):
        return _optimise(dict(encoder.named_parameters()), batch_loss, steps=steps, lr=lr, weight_decay=weight_decay,
                         grad_clip=grad_clip, generator=generator, on_checkpoint=on_checkpoint,
                         checkpoint_every=checkpoint_every, state=state, what="train_encoder")


def add_lora(unet, rank: int, generator: torch.Generator, alpha: float | None = None) -> None:
    """Add LoRA adapters (peft) to the UNet's attention projections: A ~ N(0, 1/rank^2) from `generator`, B = 0, so
    the adapted UNet computes exactly what the pretrained one does until it is trained."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian",
                                target_modules=LORA_TARGETS), adapter_name=ADAPTER)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if f"lora_A.{ADAPTER}." in name:
                p.copy_(torch.randn(p.shape, generator=generator) / rank)
            elif f"lora_B.{ADAPTER}." in name:
                p.zero_()


def finetune_unet(unet, noise_sched, latents: torch.Tensor, labels: torch.Tensor, encoder: ClassEncoder, *,
                  steps: int, batch_size: int, lr: float, mode: str = "full", lora_rank: int = 4,
                  lora_alpha: float | None = None, weight_decay: float = 0.004, grad_clip: float = 10.0,
                  label_dropout: float = 0.1, generator: torch.Generator, init_generator: torch.Generator | None = None,
                  immiscible: str = "off", k: int = 4, on_checkpoint=None, checkpoint_every: int = 0,
                  state: dict | None = None) -> list[float]:
    """Phase 2: fine-tune the given pretrained UNet with the encoder frozen.

    ``mode="full"`` updates every UNet weight in place; ``mode="lora"`` adds LoRA adapters (:func:`add_lora`, drawn
    from `init_generator`, default seed 0, so `generator` draws only batches) and trains only them: the base
    weights stay as they were. ``losses[0]`` is the loss of the unmodified pretrained UNet on the first batch.
    Checkpoints/resume as in :func:`train_encoder` (the state holds only the trained parameters). On return every
    UNet parameter has ``requires_grad=False``.
    """
    if mode not in ("full", "lora"):
        raise ValueError(f"finetune_unet: mode {mode!r} must be 'full' or 'lora'")
    if mode == "lora":
        add_lora(unet, lora_rank, init_generator or torch.Generator().manual_seed(0), lora_alpha)
    is_trained = (lambda n: True) if mode == "full" else (lambda n: f".{ADAPTER}." in n and "lora_" in n)
    n_t = noise_sched.config.num_train_timesteps

    def batch_loss():
        z0, noise, t, lab = draw_batch(latents, labels, batch_size, label_dropout, n_t, generator, immiscible, k)
        with torch.no_grad():
            ctx = encoder(lab)
        return noise_loss(unet, noise_sched, z0, noise, t, ctx)

    try:
        with trainable(encoder, lambda n: False), trainable(unet, is_trained):
            named = {n: p for n, p in unet.named_parameters() if p.requires_grad}
            return _optimise(named, batch_loss, steps=steps, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip,
                             generator=generator, on_checkpoint=on_checkpoint, checkpoint_every=checkpoint_every,
                             state=state, what=f"finetune_unet ({mode})")
    finally:
        unet.requires_grad_(False)  # returned frozen, as load_generator gives it


@torch.no_grad()
def generate(unet, vae, scheduler, encoder: ClassEncoder, labels, *, guidance: float, steps: int,
             generator: torch.Generator, batch_size: int = 16) -> np.ndarray:
    """Class-conditional images with classifier-free guidance ``eps_u + w (eps_c - eps_u)``, the unconditional
    context being the encoder's learned index.

    All initial latents are drawn from `generator` first, so with a deterministic scheduler (DDIM) an image does not
    depend on `batch_size`; stochastic schedulers also draw their step noise from it.
    Returns:
        uint8 images (N, H, W, 3).
    """
    from thinair.images import to_uint8

    p = next(unet.parameters())
    labels = torch.as_tensor(labels, dtype=torch.long)
    size, channels = unet.config.sample_size, unet.config.in_channels
    lat0 = torch.randn(len(labels), channels, size, size, generator=generator)  # (N, 4, h, w)
    pass_gen = "generator" in inspect.signature(scheduler.step).parameters
    out = []
    for s in range(0, len(labels), batch_size):
        lab = labels[s:s + batch_size]
        ctx = torch.cat([encoder(torch.full_like(lab, UNCOND)), encoder(lab)]).to(p.device, p.dtype)  # (2B, T, D)
        scheduler.set_timesteps(steps, device=p.device)
        lat = lat0[s:s + batch_size].to(p.device) * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(torch.cat([lat, lat]), t).to(p.dtype)
            eps_u, eps_c = unet(inp, t, encoder_hidden_states=ctx).sample.float().chunk(2)
            kw = {"generator": generator} if pass_gen else {}
            lat = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, lat, **kw).prev_sample
        x = vae.decode((lat / vae.config.scaling_factor).to(next(vae.parameters()).dtype)).sample  # (B, 3, H, W)
        out.append(to_uint8(x, x.shape[-1], 3))
    return np.concatenate(out) if out else np.zeros((0, 0, 0, 3), np.uint8)
