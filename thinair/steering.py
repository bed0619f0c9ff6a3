"""The contexts of the steering methods besides Diffusion Inversion, and what each method reads.

``class_encoder`` (seed 002: the `classenc` stage's encoder and, if fine-tuned, its UNet), ``class_tokens`` (the
class tokens a class-conditional `thinair pretrain` generator ships) and ``prompts`` (text prompts, in
thinair/prompt_sampling.py). Reads ``data/classenc`` and the generator's ``class_tokens.safetensors``; writes nothing.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from thinair import class_encoder, io, paths, prompt_sampling
from thinair.config import Params
from thinair.errors import GeneratorUnavailable
from thinair.upstream import inputs_digest, require


def class_contexts(params: Params, bank: dict, root: str | Path = "."):
    """For the class-conditional methods: replace every bank row's embedding by its class's context (the
    `classenc` stage's encoder, or the generator's class tokens) and return the sample params without
    perturbation (interpolation and noise 0) plus the unconditional contexts (the learned null context)."""
    p = params.sample
    if p.method == "class_encoder":
        f = require(paths.stage_dir("classenc", root) / class_encoder.ENCODER, "classenc")
        enc = class_encoder.load_encoder(f)
        with torch.no_grad():
            table, null = enc.encode(torch.arange(enc.num_classes)), enc.encode(torch.tensor([-1]))[0]
    else:
        f = class_tokens_file(params.base)
        tokens = io.load_tensors(f)["tokens"]  # (C + 1, T, D), the last row is the null context
        table, null = tokens[:-1], tokens[-1]
    if int(bank["labels"].max()) >= len(table):
        raise ValueError(f"{f} has contexts for {len(table)} classes but the dataset has labels up to "
                         f"{int(bank['labels'].max())}; re-run `thinair classenc` (or use sample.method: inversion)")
    for c in p.checkpoints:
        bank[c] = table[bank["labels"]]
    unconds = {c: null.expand_as(bank[c]) for c in p.checkpoints}
    return p.model_copy(update={"interpolation": 0.0, "noise": 0.0}), unconds


def class_tokens_file(base) -> Path:
    f = Path(base.generator).expanduser() / "class_tokens.safetensors"
    if not f.is_file():
        raise GeneratorUnavailable(
            f"sample.method: class_tokens needs the generator's class tokens ({f} is missing): only a generator "
            "trained class-conditionally by `thinair pretrain` has them. With Stable Diffusion use sample.method: "
            "class_encoder (a trained class encoder) or inversion.")
    return f


def method_inputs(params: Params, root: str | Path = ".") -> list:
    """What the steering method reads besides the embedding bank (checked here, so bad inputs fail at once)."""
    method = params.sample.method
    if method == "class_encoder":
        return [inputs_digest(root, "classenc")]
    if method == "class_tokens":
        return [io.file_sha256_memo(class_tokens_file(params.base))]
    if method == "prompts":
        return prompt_sampling.key_parts(params, root)
    return []


def unet_for(gen_model, params: Params, root: str | Path = "."):
    """The UNet the class-encoder method samples with: the generator's, or its fine-tuned copy."""
    d = paths.stage_dir("classenc", root)
    if (d / class_encoder.FULL_UNET).is_file():
        unet = copy.deepcopy(gen_model.unet)
        unet.load_state_dict(io.load_tensors(d / class_encoder.FULL_UNET))
        return unet
    if (d / class_encoder.LORA_UNET).is_file():
        unet = copy.deepcopy(gen_model.unet)
        meta = io.load_metadata(d / class_encoder.LORA_UNET)
        class_encoder.add_lora(unet, int(meta["lora_rank"]), torch.Generator().manual_seed(0))
        missing = unet.load_state_dict(io.load_tensors(d / class_encoder.LORA_UNET), strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"{d / class_encoder.LORA_UNET}: LoRA weights do not fit this generator's UNet; re-run "
                             "`thinair classenc`")
        return unet.requires_grad_(False).eval()
    return gen_model.unet
