"""`classenc`: the class-encoder method (seed 002), an alternative to Diffusion Inversion's per-image embeddings.

Trains a class encoder (one-hot -> MLP -> ``classenc.tokens x cross_attention_dim``) against the frozen UNet on
the train latents, with label dropout so the unconditional context is learned (thinair/class_encoder.py); then,
optionally, fine-tunes the *pretrained* UNet with the encoder frozen (``classenc.finetune``: full or LoRA).
Optional immiscible noise pairing (``classenc.immiscible``, seed 004). The `sample` stage generates with it when
``sample.method: class_encoder``; for any other method this stage trains nothing and says so in its manifest.

Reads ``data/encode`` (posterior mean/logvar, labels) and the generator. Writes ``data/classenc/encoder.safetensors``
(weights + shape), ``unet.safetensors`` (full fine-tune) or ``unet_lora.safetensors`` (LoRA), ``losses.json``
and ``manifest.json`` (last). Training checkpoints every ``classenc.checkpoint_every`` steps to
``.thinair/work/classenc`` and resumes from there after a kill.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from thinair import class_encoder as core
from thinair import io, paths, skips
from thinair.class_encoder import ENCODER, FULL_UNET, LORA_UNET
from thinair.config import Params
from thinair.generator import generator_for, generator_identity, runtime_key
from thinair.units import Checkpoint, clean_dir, unit_key
from thinair.upstream import inputs_digest, require, upstream_chunks

STAGE = "classenc"
RETRIES = (1, 10)


def train_latents(params: Params, root: str | Path, scaling: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One latent per train image drawn from its VAE posterior (seeded), scaled; labels; number of classes."""
    d = paths.stage_dir("encode", root)
    rng = torch.Generator().manual_seed(io.seed_for(params.base.seed, STAGE, "latents"))
    zs, ys = [], []
    for rec in upstream_chunks("encode", root):
        t = io.load_tensors(require(d / rec["file"], "encode"))
        eps = torch.randn(t["mean"].shape, generator=rng)
        zs.append((t["mean"] + torch.exp(0.5 * t["logvar"]) * eps) * scaling)
        ys.append(t["labels"])
    manifest = io.read_json(require(paths.stage_dir("ingest", root) / io.MANIFEST, "ingest"))
    return torch.cat(zs), torch.cat(ys), len(manifest["class_names"])


def train(params: Params, root: str | Path = ".", device=None, key: str = "") -> dict:
    """Train the encoder (and fine-tune the UNet when asked) if `sample.method` is class_encoder; `key` names its
    checkpoints."""
    from diffusers import DDPMScheduler

    p, b = params.classenc, params.base
    out = paths.stage_dir(STAGE, root)
    out.mkdir(parents=True, exist_ok=True)
    if (manifest := skips.write_if_skipped(STAGE, params, root)) is not None:
        return manifest  # another method: nothing to train
    key = key or unit_key(STAGE, params, units(params, root)[0], root)
    gen_model, device = generator_for(b, 0, device)
    latents, labels, n_classes = train_latents(params, root, gen_model.scaling_factor)
    sched = DDPMScheduler.from_config(gen_model.scheduler_config)
    rng = torch.Generator().manual_seed(io.seed_for(b.seed, STAGE, "init"))
    encoder = core.ClassEncoder(n_classes, p.tokens, gen_model.cross_attention_dim, p.hidden, generator=rng).to(device)
    work = {phase: Checkpoint(STAGE, key, root, phase) for phase in ("encoder", "finetune")}

    def saver(phase: str):
        return lambda step, state: work[phase].save(state)

    def resume(phase: str):
        return work[phase].load(f"classenc {phase}")

    common = {"generator": torch.Generator().manual_seed(io.seed_for(b.seed, STAGE, "encoder")),
              "immiscible": p.immiscible, "k": p.knn_k, "checkpoint_every": p.checkpoint_every}
    losses = {"encoder": core.train_encoder(
        gen_model.unet, sched, latents.to(device), labels.to(device), encoder, steps=p.steps,
        batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay, label_dropout=p.label_dropout,
        grad_clip=p.grad_clip, on_checkpoint=saver("encoder"), state=resume("encoder"), **common)}
    encoder.eval().requires_grad_(False)
    files = [out / ENCODER]
    core.save_encoder(out / ENCODER, encoder.cpu(), {"classes": n_classes, "generator": gen_model.identity})
    clean_dir(out, {io.MANIFEST, ENCODER, "losses.json"} | ({FULL_UNET} if p.finetune == "full" else set())
              | ({LORA_UNET} if p.finetune == "lora" else set()))
    if p.finetune != "none":
        unet = copy.deepcopy(gen_model.unet)  # never the shared, cached generator's UNet
        common["generator"] = torch.Generator().manual_seed(io.seed_for(b.seed, STAGE, "finetune"))
        losses["finetune"] = core.finetune_unet(
            unet, sched, latents.to(device), labels.to(device), encoder.to(device), steps=p.finetune_steps,
            batch_size=p.finetune_batch_size or p.batch_size, lr=p.finetune_lr, mode=p.finetune, lora_rank=p.lora_rank,
            weight_decay=p.weight_decay, grad_clip=p.grad_clip, label_dropout=p.label_dropout,
            init_generator=torch.Generator().manual_seed(io.seed_for(b.seed, STAGE, "lora")),
            on_checkpoint=saver("finetune"), state=resume("finetune"), **common)
        name = FULL_UNET if p.finetune == "full" else LORA_UNET
        weights = {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()
                   if p.finetune == "full" or "lora" in k}
        io.save_tensors(out / name, weights, {"finetune": p.finetune, "lora_rank": p.lora_rank})
        files.append(out / name)
    io.write_json(out / "losses.json", losses)
    manifest = {"trained": True, "classes": n_classes, "tokens": p.tokens, "images": int(len(labels)),
                "finetune": p.finetune, "immiscible": p.immiscible, "files": [f.name for f in files],
                "loss_first": losses["encoder"][0],
                "loss_last": sum(losses["encoder"][-50:]) / len(losses["encoder"][-50:])}
    io.write_json(out / io.MANIFEST, manifest)
    for w in work.values():
        w.clear()
    return manifest


def units(params: Params, root: str | Path = ".") -> list[dict]:
    """One unit: the whole stage (a training with checkpoints, not chunks)."""
    return [{"name": "train"}]


def key(params: Params, unit: dict, root: str | Path = ".") -> list:
    b = params.base
    return [generator_identity(b), runtime_key(b), params.classenc.model_dump(mode="json"), b.seed,
            params.sample.method, inputs_digest(root, "encode") if params.sample.method == "class_encoder" else None]


def compute(params: Params, unit: dict, out: Path, root: str | Path = ".", device=None) -> dict:
    return train(params, root, device, unit["key"])


def finish(params: Params, records: list[dict], root: str | Path = ".") -> dict:
    return records[0]["result"]
