"""`classenc`: the class-encoder method (seed 002), an alternative to Diffusion Inversion's per-image embeddings.

Trains a class encoder (one-hot -> MLP -> ``classenc.tokens x cross_attention_dim``) against the frozen UNet on
the train latents, with label dropout so the unconditional context is learned (thinair/classenc.py); then,
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
import logging
from pathlib import Path

import torch
from prefect import task

from thinair import classenc as core
from thinair import faults, immiscible, io, paths
from thinair.caching import record
from thinair.config import Params
from thinair.devices import device_slot, set_threads
from thinair.generator import generator_for, generator_identity, runtime_key
from thinair.orchestration import task_options
from thinair.stage import clean_dir, content_key, files_under, inputs_digest, require, source_hash, upstream_chunks

STAGE = "classenc"
ENCODER, FULL_UNET, LORA_UNET = "encoder.safetensors", "unet.safetensors", "unet_lora.safetensors"
log = logging.getLogger(__name__)


def train_latents(params: Params, root: str | Path, scaling: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One latent per train image drawn from its VAE posterior (seeded), scaled; labels; number of classes."""
    d = paths.stage_dir("encode", root)
    gen = torch.Generator().manual_seed(io.seed_for(params.base.seed, STAGE, "latents"))
    zs, ys = [], []
    for rec in upstream_chunks("encode", root):
        t = io.load_tensors(require(d / rec["file"], "encode"))
        eps = torch.randn(t["mean"].shape, generator=gen)
        zs.append((t["mean"] + torch.exp(0.5 * t["logvar"]) * eps) * scaling)
        ys.append(t["labels"])
    manifest = io.read_json(require(paths.stage_dir("ingest", root) / io.MANIFEST, "ingest"))
    return torch.cat(zs), torch.cat(ys), len(manifest["class_names"])


def train(params: Params, root: str | Path = ".", device=None) -> dict:
    """Train the encoder (and fine-tune the UNet when asked) if `sample.method` is class_encoder."""
    from diffusers import DDPMScheduler

    p, b = params.classenc, params.base
    out = paths.stage_dir(STAGE, root)
    out.mkdir(parents=True, exist_ok=True)
    if params.sample.method != "class_encoder":
        clean_dir(out, {io.MANIFEST})
        manifest = {"trained": False, "reason": f"sample.method is {params.sample.method!r}, not 'class_encoder'"}
        io.write_json(out / io.MANIFEST, manifest)
        return manifest
    gen_model, device = generator_for(b, 0, device)
    latents, labels, n_classes = train_latents(params, root, gen_model.scaling_factor)
    sched = DDPMScheduler.from_config(gen_model.scheduler_config)
    key = stage_key(params, root)
    work = paths.work_dir(STAGE, root)
    work.mkdir(parents=True, exist_ok=True)
    rng = torch.Generator().manual_seed(io.seed_for(b.seed, STAGE, "init"))
    encoder = core.ClassEncoder(n_classes, p.tokens, gen_model.cross_attention_dim, p.hidden, generator=rng).to(device)

    def saver(phase: str):
        def save(step, state):
            with io.atomic_path(work / f"{key}-{phase}.pt") as tmp:
                torch.save(state, tmp)
        return save

    def resume(phase: str):
        f = work / f"{key}-{phase}.pt"
        if f.is_file():
            state = torch.load(f, weights_only=True)  # our own checkpoint
            log.info("classenc %s: resuming from step %s", phase, state.get("step"))
            return state
        return None

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
            batch_size=p.batch_size, lr=p.finetune_lr, mode=p.finetune, lora_rank=p.lora_rank,
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
    for f in work.glob(f"{key}-*.pt"):
        faults.point("unlink", f)
        f.unlink()
    return manifest


def unet_for(gen_model, params: Params, root: str | Path = "."):
    """The UNet the class-encoder method samples with: the generator's, or its fine-tuned copy."""
    d = paths.stage_dir(STAGE, root)
    if (d / FULL_UNET).is_file():
        unet = copy.deepcopy(gen_model.unet)
        unet.load_state_dict(io.load_tensors(d / FULL_UNET))
        return unet
    if (d / LORA_UNET).is_file():
        unet = copy.deepcopy(gen_model.unet)
        meta = io.load_metadata(d / LORA_UNET)
        core.add_lora(unet, int(meta["lora_rank"]), torch.Generator().manual_seed(0))
        missing = unet.load_state_dict(io.load_tensors(d / LORA_UNET), strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"{d / LORA_UNET}: LoRA weights do not fit this generator's UNet; re-run "
                             "`thinair classenc`")
        return unet.requires_grad_(False).eval()
    return gen_model.unet


def stage_key(params: Params, root: str | Path = ".") -> str:
    b = params.base
    return content_key(STAGE, source_hash(__name__), source_hash(core.__name__), source_hash(immiscible.__name__),
                       generator_identity(b), runtime_key(b), params.classenc.model_dump(mode="json"), b.seed,
                       params.sample.method, inputs_digest(root, "encode") if params.sample.method == "class_encoder"
                       else None)


@task(name="classenc", **task_options(retries=1, delay=10, cache=("classenc", stage_key)))
def classenc_task(params: Params, root: str = ".") -> dict:
    set_threads(params.base)
    with device_slot(params.base, root, "classenc") as device:
        manifest = train(params, root, device)
    return record(root, files_under(paths.stage_dir(STAGE, root)), manifest=manifest)
