"""`invert`: learn one conditioning embedding per train image against the frozen UNet (Diffusion Inversion).

Per chunk of ``base.chunk_size`` images: embeddings (n, num_tokens, cross_attention_dim) initialised
U(-1/sqrt(n), 1/sqrt(n)) (the reference's bias-free linear layer), AdamW (lr 0.03, constant), each step
a batch of the chunk's images with a latent re-sampled from the VAE posterior, t ~ U{0..T-1} and the
plain noise MSE. Reads ``data/encode`` and the generator. Writes ``data/invert/train-NNNNN.safetensors``
(``embeddings`` = final, ``step_<k>`` checkpoints, ``labels``, ``index``), ``data/invert/losses.json``
and ``data/invert/manifest.json`` (last). Work in progress is checkpointed to ``.thinair/work/invert``
at every saved checkpoint, so a killed run resumes from the latest one; finished chunks come from the chunk cache.

**Steps count updates per embedding** (the reference code's and the paper's "3K steps"; its sampler loads
``learned_embeds-steps-{train_steps*2}.bin`` for groups of 100 at batch 50). With n images in a chunk and batch b
(``min(invert.batch_size, n)``) a chunk runs ``ceil(invert.steps * n / b)`` optimiser steps; its batches are cut from
a stream of seeded permutations of the chunk (one epoch each), so every embedding gets ``steps`` updates (one more
for some when b does not divide steps * n). ``invert.checkpoint_every``, the ``step_<k>`` keys, the manifest's
``checkpoints``, ``sample.checkpoints`` and the x of every loss point (``[updates per embedding, loss]``, one point
per optimiser step) are in the same per-embedding units. With b = n (the embedded default) one optimiser step is one
update of every embedding.

**Cheaper inversion (issue 19, off by default):** ``invert.lr_schedule: cosine`` decays ``invert.lr`` to 1 % over the
run; ``invert.warm_start: class`` first learns one shared embedding per class of the chunk for
``invert.warm_start_steps`` optimiser steps and starts every image's embedding from its class's
(benchmarks/invert_sweep.py measures UNet passes against CAS and the final denoising loss).
"""
from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from thinair import io, paths
from thinair.config import Params
from thinair.devices import with_halving
from thinair.errors import NonFiniteLoss
from thinair.generator import generator_for, generator_identity, runtime_key
from thinair.units import Checkpoint, clean_dir
from thinair.upstream import require, upstream_chunks

STAGE = "invert"
log = logging.getLogger(__name__)


def init_embeddings(n: int, tokens: int, dim: int, rng: torch.Generator) -> torch.Tensor:
    bound = 1.0 / math.sqrt(n)
    return (torch.rand(n, tokens, dim, generator=rng) * 2 - 1) * bound  # (n, T, D)


def denoising_loss(unet, noisy, noise, t, ctx) -> torch.Tensor:
    """The plain noise-prediction MSE of the frozen UNet for contexts `ctx` (B, T, D) on noisy latents (B, 4, h, w).

    The UNet's weights have ``requires_grad=False``, so backward computes only input (embedding) gradients. Latents
    and contexts are cast to the UNet's dtype (float16/bfloat16 generators); the loss is computed in float32.
    """
    pred = unet(noisy.to(unet.dtype), t, encoder_hidden_states=ctx.to(unet.dtype)).sample
    return F.mse_loss(pred.float(), noise.float())


def embedding_grads(unet, noisy, noise, t, ctx) -> torch.Tensor:
    """d loss / d ctx for one batch (what one inversion step sees): (B, T, D)."""
    ctx = ctx.detach().clone().requires_grad_(True)
    denoising_loss(unet, noisy, noise, t, ctx).backward()
    return ctx.grad


def optimiser_steps(updates: int, n: int, batch: int) -> int:
    """Optimiser steps of batch `batch` that give each of `n` embeddings `updates` updates: ceil(updates * n / batch)."""
    return -(-updates * n // batch)


def per_embedding(step: int, n: int, batch: int) -> int | float:
    """Updates per embedding after `step` optimiser steps (an int when whole, so b = n keeps integer steps)."""
    whole, rest = divmod(step * batch, n)
    return whole if rest == 0 else round(step * batch / n, 4)


def checkpoint_updates(p) -> list[int]:
    """The per-embedding update counts saved as ``step_<k>``: every ``checkpoint_every``, and ``steps``."""
    return sorted(set(range(p.checkpoint_every, p.steps + 1, p.checkpoint_every)) | {p.steps})


def next_rows(stream: dict, n: int, batch: int, rng: torch.Generator) -> torch.Tensor:
    """The next `batch` rows of a stream of seeded permutations of ``range(n)`` (one epoch each), drawn lazily.

    `stream` ({"perm": (n,) int64, "pos": int}) is updated in place and saved in the resume checkpoint. A batch that
    crosses an epoch boundary takes the rest of one permutation and the start of the next.
    """
    parts, need = [], batch
    while need:
        if stream["pos"] >= n:
            stream["perm"], stream["pos"] = torch.randperm(n, generator=rng), 0
        take = stream["perm"][stream["pos"]:stream["pos"] + need]
        stream["pos"] += len(take)
        need -= len(take)
        parts.append(take)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def noisy_batch(noise_sched, mean, std, scaling: float, idx, rng: torch.Generator, device):
    """(noisy latents, noise, t) of rows `idx`: a fresh posterior sample, noise and t ~ U{0..T-1} (one draw order)."""
    eps_z = torch.randn(mean[idx].shape, generator=rng).to(device)
    z0 = (mean[idx] + std[idx] * eps_z) * scaling  # posterior re-sampled every step, (B, 4, h, w)
    noise = torch.randn(z0.shape, generator=rng).to(device)
    t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=rng).to(device)
    return noise_sched.add_noise(z0, noise, t), noise, t


def class_warm_start(unet, noise_sched, mean, std, scaling: float, labels, p, rng: torch.Generator, chunk: int,
                     device) -> tuple[torch.Tensor, float]:
    """invert.warm_start class: one shared embedding per class of the chunk, learned like the per-image ones for
    ``p.warm_start_steps`` optimiser steps of ``p.batch_size`` images; returns each image's start (n, T, D) and the
    last loss."""
    n = len(mean)
    classes, inverse = torch.unique(torch.as_tensor(labels), return_inverse=True)
    shared = torch.nn.Parameter(init_embeddings(n, p.num_tokens, unet.config.cross_attention_dim, rng)[:len(classes)]
                                .to(device))
    opt = torch.optim.AdamW([shared], lr=p.lr, betas=p.betas, weight_decay=p.weight_decay)
    stream, batch, loss = {"perm": torch.arange(n), "pos": n}, min(p.batch_size, n), float("nan")
    for step in range(p.warm_start_steps):
        idx = next_rows(stream, n, batch, rng)
        noisy, noise, t = noisy_batch(noise_sched, mean, std, scaling, idx, rng, device)
        opt.zero_grad(set_to_none=True)
        part = denoising_loss(unet, noisy, noise, t, shared[inverse[idx].to(device)])
        if not torch.isfinite(part):
            raise NonFiniteLoss(f"invert chunk {chunk}: class warm start loss is {part.item()} at step {step}; "
                                "lower invert.lr")
        part.backward()
        opt.step()
        loss = part.item()
    return shared.detach()[inverse.to(device)].clone(), loss


def lr_factor(p, step: int, total: int) -> float:
    """invert.lr_schedule at optimiser step `step` (1-based) of `total`: 1 (constant) or cosine from 1 to 0.01."""
    if p.lr_schedule == "constant":
        return 1.0
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (step - 1) / max(1, total - 1)))


def invert_loop(unet, noise_sched, mean, logvar, scaling: float, p, rng: torch.Generator, chunk: int,
                state: dict | None = None, on_checkpoint=None, device="cpu", labels=None):
    """Optimise embeddings for the latents of one chunk: ``p.steps`` updates per embedding (module docstring).

    Args:
        mean, logvar: VAE posterior of the chunk's images, (n, 4, h, w).
        labels: the images' classes (n,), needed by ``invert.warm_start: class``.
        rng: the torch.Generator every draw comes from (its state is part of the checkpoint).
        state: a checkpoint from `on_checkpoint` to resume from, or None.
        on_checkpoint: called as ``on_checkpoint(k, state)`` at every saved checkpoint but the last (k in updates per
            embedding; ``state["step"]`` is the optimiser step).
    Returns:
        (final embeddings (n, T, D), {k: embeddings} checkpoints by updates per embedding,
        losses [[updates per embedding, loss]] one per optimiser step).
    """
    n = len(mean)
    dim = unet.config.cross_attention_dim
    emb = torch.nn.Parameter(init_embeddings(n, p.num_tokens, dim, rng).to(device))
    std = torch.exp(0.5 * logvar).to(device)
    if p.warm_start == "class" and state is None:  # (a resumed run restores the embeddings and the rng after it)
        if labels is None:
            raise ValueError("invert.warm_start=class needs the chunk's labels")
        start, warm_loss = class_warm_start(unet, noise_sched, mean.to(device), std, scaling, labels, p, rng, chunk,
                                            device)
        emb.data.copy_(start)
        log.info("invert chunk %d: class warm start, loss %.4f after %d steps", chunk, warm_loss, p.warm_start_steps)
    opt = torch.optim.AdamW([emb], lr=p.lr, betas=p.betas, weight_decay=p.weight_decay)
    ckpts, losses, start = {}, [], 0
    stream = {"perm": torch.arange(n), "pos": n}  # exhausted: the first step draws the first permutation
    if state is not None:
        emb.data.copy_(state["embeddings"].to(device))
        opt.load_state_dict(state["opt"])
        rng.set_state(state["rng"])
        ckpts = {int(k): v for k, v in state["ckpts"].items()}
        losses, start = json.loads(state["losses"]), int(state["step"])
        stream = {"perm": state["perm"], "pos": int(state["pos"])}
    mean = mean.to(device)
    batch = min(p.batch_size, n)
    saves = {optimiser_steps(k, n, batch): k for k in checkpoint_updates(p)}  # optimiser step -> updates/embedding
    micro = batch  # halved on out-of-memory: the same step as micro-batches with accumulated gradients
    total = optimiser_steps(p.steps, n, batch)
    for step in range(start + 1, total + 1):
        idx = next_rows(stream, n, batch, rng)
        noisy, noise, t = noisy_batch(noise_sched, mean, std, scaling, idx, rng, device)
        for group in opt.param_groups:
            group["lr"] = p.lr * lr_factor(p, step, total)

        def step_loss(m: int) -> float:
            nonlocal micro
            micro = m
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for s in range(0, batch, m):
                sl = slice(s, s + m)
                part = denoising_loss(unet, noisy[sl], noise[sl], t[sl], emb[idx[sl]])
                if not torch.isfinite(part):
                    raise NonFiniteLoss(f"invert chunk {chunk}: loss is {part.item()} at step {step}; lower "
                                        "invert.lr or check the generator and the encoded latents")
                w = len(idx[sl]) / batch
                (part * w).backward() if m < batch else part.backward()
                total += part.item() * w
            return total

        loss = with_halving(micro, step_loss, f"invert chunk {chunk} step {step}")
        opt.step()
        losses.append([per_embedding(step, n, batch), round(loss, 6)])
        if step in saves:
            k = saves[step]
            ckpts[k] = emb.detach().cpu().clone()
            if on_checkpoint is not None and k < p.steps:
                on_checkpoint(k, {"embeddings": emb.detach().cpu().clone(), "opt": copy.deepcopy(opt.state_dict()),
                                  "rng": rng.get_state(), "ckpts": {str(k): v for k, v in ckpts.items()},
                                  "losses": json.dumps(losses), "step": step, "perm": stream["perm"].clone(),
                                  "pos": stream["pos"]})
    return emb.detach().cpu(), ckpts, losses


def units(params: Params, root: str | Path = ".") -> list[dict]:
    """One unit per chunk of encoded latents."""
    return [{"name": f"chunk-{i:03d}", "chunk": i, "file": paths.chunk_name("train", i, "safetensors")}
            for i in range(len(upstream_chunks("encode", root)))]


def key(params: Params, unit: dict, root: str | Path = ".") -> list:
    """Everything that determines one chunk's embeddings besides code: generator, params, seed and its latents."""
    b = params.base
    enc_file = require(paths.stage_dir("encode", root) / unit["file"], "encode")
    return [generator_identity(b), runtime_key(b), params.invert.model_dump(mode="json"), b.seed, unit["chunk"],
            enc_file]


def compute(params: Params, unit: dict, out: Path, root: str | Path = ".", device=None) -> None:
    """Invert one chunk into `out`, checkpointing every ``invert.checkpoint_every`` updates per embedding (resumed
    after a kill)."""
    from diffusers import DDPMScheduler

    b, p, chunk = params.base, params.invert, unit["chunk"]
    gen_model, device = generator_for(b, chunk, device)
    enc = io.load_tensors(require(paths.stage_dir("encode", root) / unit["file"], "encode"))
    work = Checkpoint(STAGE, unit["key"], root)
    rng = torch.Generator().manual_seed(io.seed_for(b.seed, STAGE, chunk))
    noise_sched = DDPMScheduler.from_config(gen_model.scheduler_config)
    emb, ckpts, losses = invert_loop(gen_model.unet, noise_sched, enc["mean"], enc["logvar"],
                                     gen_model.scaling_factor, p, rng, chunk, work.load(f"invert chunk {chunk}"),
                                     lambda step, state: work.save(state), device, enc["labels"])
    tensors = {"embeddings": emb, "labels": enc["labels"], "index": enc["index"]}
    tensors |= {f"step_{k}": v for k, v in sorted(ckpts.items())}
    io.save_tensors(out, tensors, metadata={"losses": losses, "generator": gen_model.identity})
    work.clear()


def finish(params: Params, records: list[dict], root: str | Path = ".") -> dict:
    """Write the loss summary (mean loss over the first / last ``window`` updates per embedding) and the manifest
    (``checkpoints`` in updates per embedding); drop stale chunk files."""
    out = paths.stage_dir(STAGE, root)
    files = [r["unit"]["file"] for r in records]
    curves = {f: io.load_metadata(out / f)["losses"] for f in files}
    steps = params.invert.steps
    window = max(1, steps // 20)  # in updates per embedding, like the curves' x

    def mean_loss(points: list) -> float:
        return sum(l for _, l in points) / len(points)

    summary = {f: {"first": mean_loss([q for q in c if q[0] <= window]),
                   "last": mean_loss([q for q in c if q[0] > steps - window])} for f, c in curves.items()}
    io.write_json(out / "losses.json", {"window": window, "chunks": summary, "curves": curves})
    manifest = {"chunks": files, "steps": steps, "checkpoints": checkpoint_updates(params.invert),
                "num_tokens": params.invert.num_tokens}
    clean_dir(out, set(files) | {io.MANIFEST, "losses.json"})
    io.write_json(out / io.MANIFEST, manifest)
    return manifest
