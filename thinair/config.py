"""Typed, validated parameters.

Reads `params.yaml` (one `base` section plus one section per stage, named like the stage) and
validates it once into frozen pydantic models with ``extra="forbid"``: a misspelt key, a wrong type
or an out-of-range value raises :class:`ParamsError` naming the key, the bad value and what is
allowed. Nothing is written here.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from thinair.errors import ParamsError  # noqa: F401 - raised here; defined in thinair/errors.py

STAGES = ("ingest", "pretrain", "encode", "invert", "classenc", "search", "sample", "metrics", "cas", "report")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Base(_Section):
    seed: int = Field(0, ge=0, description="Root seed; every random draw derives from (seed, stage, chunk, index).")
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N | mps")
    dataset: str = Field("digits", description="digits | cifar10 | cifar100 | stl10 | imagenette | eurosat | "
                         "pathmnist | dermamnist | bloodmnist | retinamnist | folder:<path>")
    data_root: str = Field("~/.cache/thinair/datasets",
                           description="Where real datasets are read from / downloaded to.")
    generator: str = Field("generators/tiny-digits", description="A local diffusers SD directory or a hub id.")
    revision: str | None = Field(None, description="Hub revision of the generator (ignored for local directories).")
    gen_resolution: int = Field(16, ge=8, le=1024, description="Resolution (px) images are encoded and generated at.")
    save_resolution: int | None = Field(None, ge=4, le=1024, description="Resolution of saved synthetic images; "
                                        "null = the dataset's native resolution.")
    dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "float32", description="Weights/activations of the generator; float16/bfloat16 on GPUs (embeddings and "
        "their optimiser stay float32; latents are stored float32). bfloat16 also runs on the CPU (slowly: a check of "
        "the half-precision path), float16 does not.")
    chunk_size: int = Field(100, ge=1, description="Images per encode/invert/sample chunk (the unit of resume).")
    workers: int = Field(1, ge=1, le=64, description="Chunk tasks run at once (one per device).")
    task_runner: Literal["thread", "process", "dask", "ray"] = Field(
        "thread", description="Prefect task runner of the chunk fan-out: thread (default), process (one process "
        "per worker; on CPU each gets cores / workers threads), dask (prefect-dask) or ray (prefect-ray).")
    cluster_address: str | None = Field(None, description="dask: a scheduler address (tcp://host:8786); ray: a "
                                        "cluster address; null = a local cluster of base.workers workers.")
    attention: Literal["sdpa", "math"] = Field("sdpa", description="UNet/VAE attention: sdpa = PyTorch's fused "
                                               "scaled_dot_product_attention (fast path), math = plain matmuls.")
    channels_last: bool = Field(False, description="Run the UNet and VAE in channels_last memory format (GPU "
                                "fast path; results equal within float tolerance).")
    compile: bool = Field(False, description="torch.compile the UNet (GPU fast path; the first call compiles).")
    devices: int | None = Field(None, ge=1, le=64, description="Size of the global device concurrency limit: how "
                                "many device tasks run at once across every run sharing the Prefect server; null = the "
                                "visible CUDA GPUs (on CPU: base.workers).")
    gpu_limit: str = Field("gpu", pattern=r"^[a-z0-9][a-z0-9-]*$", description="Name of that Prefect global "
                           "concurrency limit (created automatically; every device task holds one slot, strict).")
    threads: int | None = Field(None, ge=1, le=256, description="torch CPU threads per chunk task; null = cores / "
                                "workers. Fix it to get bit-identical results across task runners.")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v):
            raise ValueError("must be one of auto, cpu, mps, cuda, cuda:N")
        return v


class Ingest(_Section):
    test_fraction: float = Field(0.2, gt=0, lt=1, description="Test share for datasets without an official split "
                                 "(EuroSAT, folders; digits has a fixed 80/20 split).")
    per_class_limit: int | None = Field(None, ge=1, description="Keep at most this many train images per class.")
    limit: int | None = Field(None, ge=1, description="Keep at most this many train images in total.")
    shard_size: int = Field(10000, ge=1, description="Images per ingest shard.")
    download: bool = Field(True, description="Try to download a missing dataset (torchvision / MedMNIST).")
    image_size: int | None = Field(None, ge=4, le=1024, description="Square size for sources of varied sizes.")
    corrupt: Literal["skip", "fail"] = Field("skip", description="Unreadable image-folder files: skip (listed in "
                                             "the manifest) or fail.")
    holdout_fraction: float = Field(0.0, ge=0, lt=1, description="Share of every class of the train split held out "
                                    "from the task as the pool a generator may be pretrained on (`pretrain.pool: "
                                    "holdout` with the same fraction); 0 = none. The task never sees the pool.")
    subset_seed: int | None = Field(None, ge=0, description="With per_class_limit: draw the kept images per class "
                                    "at random with this seed (null: the first ones, in order).")


class Pretrain(_Section):
    """The embedded generator. Independent of `base`: switching base.dataset never retrains it."""
    dataset: str = Field("digits", description="Trained on this dataset's train split only (never its test split): "
                         "any base.dataset spec (digits, a torchvision or MedMNIST name, folder:<path>), grey or "
                         "colour; folders and EuroSAT are split with ingest.test_fraction's default (0.2).")
    data_root: str = Field("~/.cache/thinair/datasets", description="Where pretrain.dataset is read from / "
                           "downloaded to.")
    download: bool = Field(True, description="Try to download a missing pretrain.dataset (torchvision / MedMNIST).")
    pool: Literal["all", "holdout"] = Field(
        "all", description="Images trained on: all = the dataset's whole train split; holdout = only the pool part "
        "of the stratified split rawdata.holdout_split(train labels, pretrain.holdout_fraction), disjoint from the "
        "task part ingest.holdout_fraction keeps (train_log.json lists the pool's image sha256).")
    holdout_fraction: float = Field(0.5, gt=0, lt=1, description="pool holdout: share of every class of the train "
                                    "split held out as the pretraining pool (ignored with pool all).")
    labels: bool = Field(True, description="Class-conditional: learned class tokens with label dropout to a learned "
                         "null context (saved as class_tokens.safetensors); false = unconditional, every step uses "
                         "the null context and no class tokens are saved.")
    output: str = Field("generators/tiny-digits", description="Directory the generator is saved to.")
    resolution: int = Field(16, ge=8, le=256, description="Image resolution the generator is trained at (px).")
    seed: int = Field(0, ge=0, description="Seed of the generator's training.")
    vae_steps: int = Field(2000, ge=1, description="VAE training steps (MSE + L1 + KL).")
    unet_steps: int = Field(5000, ge=1, description="UNet training steps (noise MSE, EMA weights kept).")
    batch_size: int = Field(128, ge=1, description="Images per training step.")
    vae_lr: float = Field(1e-3, gt=0, description="VAE AdamW learning rate (cosine decay).")
    unet_lr: float = Field(1e-3, gt=0, description="UNet AdamW learning rate (warm-up + cosine decay).")
    kl_weight: float = Field(1e-4, ge=0, description="Weight of the VAE's KL term.")
    num_tokens: int = Field(4, ge=1, description="Class-conditioning tokens.")
    cross_attention_dim: int = Field(64, ge=8, description="Conditioning width (SD v1: 768).")
    vae_channels: list[int] | None = Field(None, min_length=2, description="VAE block widths; factor 2^(n-1). "
                                           "null = sized from pretrain.resolution: factor 4 (3 levels) up to 32 px, "
                                           "8 (4 levels) above; 16 px: [16, 32, 64].")
    unet_channels: list[int] | None = Field(None, min_length=2, description="UNet block widths; null = sized from "
                                            "pretrain.resolution (16 px: [32, 64]).")
    label_dropout: float = Field(0.1, ge=0, lt=1, description="Share of steps trained on the null context.")
    immiscible: Literal["off", "assign", "knn"] = Field(
        "off", description="Immiscible noise pairing (seed 004): off | assign (linear assignment of the batch's "
        "noises to its latents by L2) | knn (knn_k noises per latent, the nearest kept).")
    knn_k: int = Field(4, ge=1, le=64, description="Candidate noises per latent for immiscible: knn.")
    threads: int | None = Field(None, ge=1, description="CPU threads (null: torch's default).")

    @field_validator("immiscible", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false


class Encode(_Section):
    batch_size: int = Field(64, ge=1, description="Images per VAE call.")
    interpolation: Literal["bicubic", "bilinear", "nearest"] = Field(
        "bicubic", description="Resize to base.gen_resolution (paper: bicubic).")
    fit_check: Literal["warn", "fail", "off"] = Field(
        "warn", description="Generator-fit check after encoding: the generator's autoencoder reconstructs the real "
        "test images and a classifier trained on real train images (metrics' domain classifier) labels them; "
        "below encode.fit_min_ratio of its accuracy on the originals the generator cannot represent this dataset: "
        "warn (log, report, Prefect artifact), fail (stop before invert) or off.")
    fit_min_ratio: float = Field(0.9, gt=0, le=1, description="Fit check threshold: accuracy on reconstructions / "
                                 "accuracy on originals (0.9: lose at most a tenth; a generator for another domain "
                                 "falls to chance).")

    @field_validator("fit_check", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false


class Invert(_Section):
    num_tokens: int = Field(5, ge=1, le=77, description="Tokens per learned embedding (paper: 5).")
    steps: int = Field(3000, ge=1, description="Per-embedding steps: updates of every embedding (paper: up to "
                       "3000; its reference code counts them so). A chunk of n images at batch b runs ceil(steps x n "
                       "/ b) optimiser steps, batches cut from one seeded permutation of the chunk per epoch.")
    batch_size: int = Field(50, ge=1, description="Images of the chunk per optimiser step (reference: 50 of 100, "
                            "i.e. 2 optimiser steps per per-embedding step).")
    lr: float = Field(0.03, gt=0, le=10, description="AdamW learning rate, constant, no warm-up (paper: 0.03).")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas (paper: 0.9, 0.999).")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay (paper: 0.01).")
    checkpoint_every: int = Field(1000, ge=1, description="Save the embeddings every this many per-embedding "
                                  "steps (and after the last); these are the resume points and the checkpoints "
                                  "sample can use (paper: 1000).")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="constant (paper) or cosine decay of invert.lr to 1 % over the run: with a higher lr, "
        "the cheaper inversion of issue 19 (benchmarks/invert_sweep.py).")
    warm_start: Literal["none", "class"] = Field(
        "none", description="none = every embedding starts from the reference's uniform init (paper); class = first "
        "learn one shared embedding per class of the chunk (invert.warm_start_steps optimiser steps on the chunk's "
        "images), then start each image's embedding from its class's.")
    warm_start_steps: int = Field(10, ge=1, description="Optimiser steps per chunk of the class phase of warm_start: "
                                  "class, each of invert.batch_size images: it costs warm_start_steps x batch / chunk "
                                  "size per-embedding steps' worth of UNet passes (10 x 100 / 100 = 10).")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in v):
            raise ValueError("both betas must be in [0, 1)")
        return v


class Classenc(_Section):
    tokens: int = Field(100, ge=1, le=256, description="Class-encoder context tokens (seed 002: 100).")
    hidden: int = Field(500, ge=1, description="Hidden width of the one-hot -> MLP encoder (seed 002: 500).")
    steps: int = Field(2000, ge=1, description="Encoder training steps against the frozen UNet (phase 1).")
    batch_size: int = Field(64, ge=1, description="Images per step (seed 002: 64).")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate, cosine decay (seed 002: 1e-4).")
    weight_decay: float = Field(0.004, ge=0, description="Decoupled weight decay (seed 002: 0.004).")
    grad_clip: float = Field(10.0, gt=0, description="Global gradient-norm clip (seed 002: 10).")
    label_dropout: float = Field(0.1, ge=0, lt=1, description="Share of labels replaced by the learned "
                                 "unconditional index, for classifier-free guidance.")
    immiscible: Literal["off", "assign", "knn"] = Field("off", description="Immiscible noise pairing (seed 004): "
                                                        "assign = linear assignment per batch, knn = nearest of k.")
    knn_k: int = Field(4, ge=1, description="Noises drawn per image for immiscible: knn.")
    finetune: Literal["none", "full", "lora"] = Field("none", description="Phase 2: fine-tune the pretrained UNet "
                                                       "with the encoder frozen (all weights, or peft LoRA).")
    finetune_steps: int = Field(500, ge=1, description="Phase 2 steps.")
    finetune_lr: float = Field(1e-5, gt=0, description="Phase 2 learning rate (seed 002: 1e-5).")
    finetune_batch_size: int | None = Field(None, ge=1, description="Phase 2 images per step (seed 002: 16); null = "
                                            "classenc.batch_size.")
    lora_rank: int = Field(4, ge=1, description="LoRA rank for finetune: lora.")
    checkpoint_every: int = Field(500, ge=1, description="Resume checkpoint interval (steps).")

    @field_validator("immiscible", mode="before")
    @classmethod
    def _yaml_off(cls, v):
        return "off" if v is False else v  # YAML 1.1 reads a bare `off` as false


class Sample(_Section):
    method: Literal["inversion", "class_encoder", "class_tokens", "prompts"] = Field(
        "inversion", description="How images are steered: inversion = Diffusion Inversion's per-image embeddings; "
        "class_encoder = the class encoder trained by the `classenc` stage (seed 002); class_tokens = the "
        "generator's own class tokens (the embedded generator's class-conditional prompts, the prompt baseline "
        "when a generator has no text encoder); prompts = text prompts of each image's class through the "
        "generator's text encoder (seed 003; e.g. CompVis/stable-diffusion-v1-4). Every method makes the same "
        "number of images per train image (before a CLIP filter).")
    checkpoints: list[int | Literal["final"]] = Field(
        ["final"], min_length=1, description="Embedding checkpoints to sample from, in per-embedding steps (as "
        "invert.steps), or final (paper: 1000, 2000, 3000).")
    guidance_scales: list[float] = Field([2.0], min_length=1, description="Classifier-free guidance scales w in "
                                         "eps_u + w (eps_c - eps_u), the convention of the reference code and "
                                         "diffusers (1 = no guidance; reference code: 2.0; paper: 2, studied 2, 3, "
                                         "4). The paper writes (1 + w) eps_c - w eps_u: its w is this w - 1.")
    samples_per_setting: int = Field(5, ge=1, description="Variants per embedding per (checkpoint, guidance); "
                                     "variants per embedding = checkpoints x guidance x this (paper: 45 in all).")
    noise: float = Field(0.1, ge=0, description="Gaussian perturbation strength lambda (paper: 0.1).")
    interpolation: float = Field(0.1, ge=0, le=1, description="Interpolation strength alpha toward a random other "
                                 "embedding of the same class (paper: 0.1).")
    partner: Literal["random", "nearest", "knn"] = Field(
        "random", description="Interpolation partner among the same class's other embeddings: random (paper), "
        "nearest (the closest embedding), knn (a random one of the sample.partner_k closest); never the image "
        "itself (thinair/variants.py).")
    partner_k: int = Field(3, ge=1, description="Neighbours for partner: knn and for noise_schedule: adaptive.")
    noise_schedule: Literal["fixed", "adaptive"] = Field(
        "fixed", description="fixed = lambda for every embedding (paper); adaptive = lambda x the embedding's mean "
        "distance to its partner_k nearest class mates / the median of those, within [lambda/4, 4 lambda]: "
        "isolated embeddings are perturbed more.")
    filter_min_confidence: float | None = Field(
        None, ge=0, le=1, description="Label-consistency filter: keep a synthetic image only if the domain "
        "classifier trained on the real train images predicts its own class with at least this probability; "
        "replaced by the next candidate of the same (embedding, checkpoint, guidance), so the count is unchanged "
        "(null = off).")
    filter_oversample: float = Field(2.0, ge=1, le=10, description="Filter on: candidates drawn per kept image "
                                     "(ceil(samples_per_setting x this) per setting).")
    allocation: Literal["uniform", "coverage"] = Field(
        "uniform", description="uniform = samples_per_setting images of every embedding (paper); coverage = the "
        "first half of that, then the rest of the same total to the embeddings whose real image no synthetic image "
        "covers yet (its k-NN ball among the real train images, metrics.k, domain classifier features).")
    start: Literal["noise", "image"] = Field(
        "noise", description="noise = sample from pure noise (paper); image = img2img from the image's own real "
        "latent (data/encode) noised to sample.strength, conditioned on its (perturbed) embedding: a "
        "semantics-preserving edit (DA-Fusion's augmentation with per-image conditioning).")
    uncond: Literal["dataset", "class", "chunk", "empty_prompt"] = Field(
        "dataset", description="Unconditional context = mean learned embedding over the dataset (paper), the "
        "image's class, or its chunk (the reference code's group); empty_prompt = the text encoder's embedding "
        "of \"\" (the paper's ablation; needs a generator with a text encoder).")
    scheduler: Literal["ddim", "pndm", "ddpm", "dpmsolver++", "unipc", "euler"] = Field(
        "pndm", description="Sampler (reference: PNDM).")
    steps: int = Field(100, ge=1, le=1000, description="Denoising steps (paper: 100).")
    batch_size: int = Field(256, ge=1, description="Images per UNet call (x2 with guidance) and per VAE decode.")
    guidance_interval: tuple[float, float] | None = Field(
        None, description="Classifier-free guidance only at noise levels t/T in [lo, hi] (T = the training "
        "timesteps, 1000 for SD); the other steps use the conditional prediction alone, one UNet pass per image "
        "instead of two (Kynkaanniemi et al. 2024 guide only a middle interval). null = every step (paper). "
        "benchmarks/steps_sweep.py measures CAS and recall per interval (configs sampler:steps:checkpoint:lo-hi).")
    batched_guidance: bool = Field(True, description="Conditional and unconditional passes in one batched UNet "
                                   "call (fast path) instead of two.")
    prompts_file: str | None = Field(None, description="method prompts: a prompt template file (YAML/JSON, format in "
                                     "thinair/prompt_templates.py; each job's class is a dataset class name); null = the "
                                     "baseline \"a photo of a {class}\" over the dataset's class names.")
    prompt_mode: Literal["txt2img", "img2img"] = Field(
        "txt2img", description="method prompts: txt2img = from pure noise; img2img = from the image's real latents "
        "(data/encode) noised to sample.strength, running the last part of the schedule (diffusers' img2img).")
    strength: float = Field(0.8, gt=0, le=1, description="prompt_mode img2img and start: image: share of the "
                            "schedule run from the noised real image (small keeps it, 1 = txt2img; DiffuGen and "
                            "diffusers: 0.8).")
    clip_model: str | None = Field(None, description="method prompts: a local transformers CLIPModel + CLIPProcessor "
                                   "directory; every image's CLIP score vs its prompt (100 x cosine, torchmetrics' "
                                   "CLIPScore) goes to provenance.csv.")
    clip_min_score: float | None = Field(None, ge=-100, le=100, description="Drop images whose CLIP score is below "
                                         "this (needs sample.clip_model); the manifest counts kept and dropped.")

    @field_validator("guidance_interval")
    @classmethod
    def _interval(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None and not 0 <= v[0] < v[1] <= 1:
            raise ValueError(f"needs 0 <= lo < hi <= 1 (noise levels t/T), got {list(v)}; e.g. [0.2, 0.8], or null "
                             "to guide every step")
        return v

    @model_validator(mode="after")
    def _prompts(self) -> "Sample":
        if self.method != "prompts":
            used = [k for k in ("prompts_file", "clip_model") if getattr(self, k) is not None]
            used += ["prompt_mode"] if self.prompt_mode == "img2img" else []
            if used:
                raise ValueError(f"sample.{used[0]} is used only by sample.method: prompts (method is "
                                 f"{self.method!r}); remove it or set sample.method: prompts")
        if self.method != "inversion":
            used = [k for k, off in (("partner", "random"), ("noise_schedule", "fixed")) if getattr(self, k) != off]
            if used:
                raise ValueError(f"sample.{used[0]} is used only by sample.method: inversion (method is "
                                 f"{self.method!r}); remove it")
        if self.allocation == "coverage" and self.samples_per_setting < 2:
            raise ValueError("sample.allocation: coverage splits samples_per_setting into two passes; set "
                             "sample.samples_per_setting >= 2 (or allocation: uniform)")
        if self.method == "prompts" and self.start == "image":
            raise ValueError("sample.start: image is for embeddings; with sample.method: prompts set "
                             "sample.prompt_mode: img2img instead")
        if self.clip_min_score is not None and not self.clip_model:
            raise ValueError("sample.clip_min_score needs sample.clip_model (a local CLIP directory to score with)")
        if (self.prompt_mode == "img2img" or self.start == "image") and int(self.steps * self.strength) < 1:
            raise ValueError(f"sample.strength={self.strength} x sample.steps={self.steps} runs no denoising step; "
                             "raise them so that steps x strength >= 1")
        return self


class Metrics(_Section):
    features: Literal["domain", "inception", "clip"] = Field(
        "inception", description="Feature space: inception = clean-fid's Inception-V3 (\"clean\" resize; its "
        "weights file must be present offline), domain = a classifier trained on the real train split (for tiny "
        "or non-photographic images), clip = the CLIP vision model at metrics.clip_model.")
    clip_model: str | None = Field(None, description="Local CLIP directory (transformers format) for features: clip.")
    k: int = Field(5, ge=1, description="Nearest neighbours for precision/recall/density/coverage (Naeem: 5).")
    feature_epochs: int = Field(20, ge=1, description="Epochs of the domain feature classifier.")
    max_samples: int | None = Field(None, ge=2, description="Subsample each set to at most this many.")
    kid_subsets: int = Field(100, ge=1, description="KID: random subsets averaged (clean-fid: 100).")
    kid_subset_size: int = Field(1000, ge=2, description="KID: samples per subset (clean-fid: 1000).")
    per_class: bool = Field(True, description="Also compute every metric per class.")

    @model_validator(mode="after")
    def _clip(self) -> "Metrics":
        if self.features == "clip" and not self.clip_model:
            raise ValueError("metrics.features: clip needs metrics.clip_model (a local CLIP directory)")
        return self


def real_ratio(fraction: float) -> str:
    """A real share per batch as the paper's real:synthetic ratio: 0.125 -> "1:7", 0.75 -> "3:1"."""
    from fractions import Fraction

    f = Fraction(fraction).limit_denominator(64)
    return f"{f.numerator}:{f.denominator - f.numerator}"


class Cas(_Section):
    model: Literal["smallcnn", "resnet18", "vgg16", "mobilenetv2", "shufflenetv2", "efficientnet_b0"] = Field(
        "resnet18", description="Classifier, torchvision definitions without pretrained weights (paper: ResNet-18; "
        "smallcnn for tiny images).")
    modes: list[Literal["real", "synthetic", "real+synthetic"]] = Field(
        ["real", "synthetic", "real+synthetic"], description="What the classifier is trained on.")
    width: int = Field(32, ge=4, le=512, description="Channel width of smallcnn (ignored by the other models).")
    epochs: int = Field(30, ge=1, description="Training epochs.")
    batch_size: int = Field(128, ge=1, description="Batch size (paper: 128).")
    optimizer: Literal["sgd", "adamw"] = Field("sgd", description="sgd (paper) or adamw (paper, MedMNIST: lr 1e-3).")
    lr: float = Field(0.1, gt=0, description="Peak learning rate (paper: 0.1 with SGD).")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (paper: 0.9).")
    weight_decay: float = Field(5e-4, ge=0, description="Weight decay (paper: 5e-4).")
    warmup_epochs: int = Field(1, ge=0, description="Linear warm-up from 0.1 % of lr, then cosine to 0.1 %.")
    steps: int | None = Field(None, ge=1, description="Train every mode for exactly this many optimiser steps, "
                              "whatever its train set size (reference code: 50000 at batch 128), warm-up + cosine "
                              "over them; replaces epochs and warmup_epochs. null = train cas.epochs epochs.")
    warmup_steps: int = Field(1000, ge=0, description="Warm-up in optimiser steps when cas.steps is set (reference "
                              "code: 1000); ignored otherwise.")
    crop_padding: int = Field(4, ge=0, description="Random-crop padding in px (paper: 4 at 32 px).")
    flip: bool = Field(True, description="Random horizontal flip (paper: on; off for digits).")
    real_fraction: float = Field(0.5, gt=0, lt=1, description="Share of real images per batch in real+synthetic "
                                 "(paper's ratios 1:7 .. 7:1 = 0.125 .. 0.875).")
    real_fractions: list[float] | None = Field(
        None, min_length=1, description="The paper's real + synthetic protocol: train real+synthetic once per share "
        "of real images per batch (paper: [0.125, 0.25, 0.5, 0.75, 0.875] = 1:7, 1:3, 1:1, 3:1, 7:1); cas.json "
        "reports each as mode real+synthetic@R:S and, under real+synthetic, the best one, chosen on the test split "
        "as the paper's Table 7 does (optimistic; flagged chosen_on: test). null = cas.real_fraction only.")
    augment: list[Literal["autoaugment", "randaugment", "augmix", "cutout", "mixup", "cutmix"]] = Field(
        [], description="Extra training augmentations on top of crop/flip.")
    seeds: int = Field(3, ge=1, le=20, description="Repeated trainings per mode (different seeds), reported as "
                       "mean +- std.")
    reconstructed_test: bool = Field(False, description="Also test on VAE-reconstructed test images (encode + "
                                     "decode by the generator's VAE): how much the autoencoder alone costs.")
    synthetic: Literal["pregenerated", "on_the_fly"] = Field(
        "pregenerated", description="Where the synthetic and real+synthetic modes' synthetic images come from: "
        "pregenerated = data/sample (paper: a fixed-size set made once); on_the_fly = fresh variants drawn per "
        "optimiser step with the sample section's settings (inversion only), never repeated, through a "
        "DataLoader-compatible stream (thinair/stream.py) on the same device; an epoch stands for the set sample "
        "would write. Costs one sampling per synthetic image trained on (issue 17: measured in the README). The "
        "scaling studies stay on data/sample.")
    scale_synthetic: list[int] = Field([1, 2, 3, 4, 5], description="Scaling study: synthetic-only CAS using the "
                                       "first this many variants of every embedding (at most all sampled; the "
                                       "paper's 45 = 3 checkpoints x 3 guidance x 5), taken sample by sample across "
                                       "every checkpoint x guidance setting in diagonal order (thinair/upstream.py "
                                       "variant_rank), so n >= 3 spans all checkpoints and guidance scales; [] = off.")
    scale_real: list[float] = Field([0.1, 0.25, 0.5, 1.0], description="Scaling study: CAS using the embeddings "
                                    "of this fraction of the real train images (synthetic-only, and real-only on "
                                    "the same images); [] = off.")

    @model_validator(mode="after")
    def _warmup(self) -> Cas:
        if self.steps is not None and self.warmup_steps > self.steps:
            raise ValueError(f"cas.warmup_steps={self.warmup_steps} exceeds cas.steps={self.steps}; lower it "
                             "(reference code: 1000 of 50000)")
        return self

    @model_validator(mode="after")
    def _ratios(self) -> Cas:
        if self.real_fractions is None:
            return self
        if not all(0 < f < 1 for f in self.real_fractions):
            raise ValueError(f"cas.real_fractions={self.real_fractions}: every share must be in (0, 1) "
                             "(paper: 0.125, 0.25, 0.5, 0.75, 0.875)")
        names = [real_ratio(f) for f in self.real_fractions]
        if len(set(names)) < len(names):
            raise ValueError(f"cas.real_fractions={self.real_fractions} repeats a ratio ({', '.join(names)})")
        if "real+synthetic" not in self.modes:
            raise ValueError("cas.real_fractions is used only by mode real+synthetic; add it to cas.modes or set "
                             "cas.real_fractions: null")
        return self

    @field_validator("scale_real")
    @classmethod
    def _fractions(cls, v: list[float]) -> list[float]:
        if not all(0 < f <= 1 for f in v):
            raise ValueError("fractions must be in (0, 1]")
        return v

    @field_validator("scale_synthetic")
    @classmethod
    def _counts(cls, v: list[int]) -> list[int]:
        if not all(n >= 1 for n in v):
            raise ValueError("counts must be >= 1")
        return v


class Report(_Section):
    images_per_class: int = Field(8, ge=1, le=64, description="Real and synthetic images per class in the grid.")
    upscale: int = Field(4, ge=1, le=16, description="Pixel upscaling of grid thumbnails.")


class Search(_Section):
    """Guided hyper-parameter search (seed 002, done right): Optuna TPE scored on a validation split of train."""
    trials: int = Field(0, ge=0, description="Trials to run (0: the `search` stage does nothing). More trials on a "
                        "re-run extend the same study; finished trials are never run again.")
    space: dict[str, list] = Field(
        {"sample.guidance_scales": ["float", 1.0, 4.0], "sample.steps": ["int", 5, 25],
         "sample.noise": ["float", 0.0, 0.3], "sample.interpolation": ["float", 0.0, 0.3],
         "sample.checkpoints": ["categorical", [100, 200, "final"]]},
        description="sample.<key>: [float|int, low, high(, log)] or [categorical, [choices]]; a list param "
        "(guidance_scales, checkpoints) gets the one value drawn (seed 002: checkpoint, steps [5, 50], guidance "
        "[0, 7.5]; Diffusion Inversion adds noise and interpolation strength).")
    fixed: dict[str, int | float | str | bool | list | None] = Field(
        {"sample.samples_per_setting": 1}, description="sample.<key> / cas.<key> overrides for every trial "
        "(e.g. fewer images per trial than the final run).")
    validation_fraction: float = Field(0.2, gt=0, lt=1, description="Share of each class of the TRAIN split held "
                                       "out to score trials (the test split is never read).")
    seeds: int = Field(3, ge=1, le=10, description="CAS trainings per trial (validation accuracy averaged; one "
                       "seed on a small validation part is too noisy to rank settings).")


class Export(_Section):
    """The optional `export` stage: `thinair export`'s options, so `dvc repro` writes and versions data/export."""
    format: Literal["imagefolder", "hf", "webdataset"] | None = Field(
        None, description="null: the `export` stage does nothing; imagefolder | hf | webdataset: it writes data/export "
        "as `thinair export --format <it>` writes an export, dataset card included (thinair/formats.py).")
    where: list[str] = Field([], description="Keep images whose provenance meets every COLUMN<op>VALUE (op = != < <= > "
                             ">=), e.g. checkpoint=-1, guidance>=2, method=inversion (as --where).")
    real: bool = Field(False, description="Add the real train split, provenance method real (as --real).")
    limit: int | None = Field(None, ge=1, description="At most this many images in all, a seeded draw (as --limit).")
    per_class: int | None = Field(None, ge=1, description="At most this many images per class, a seeded draw (as "
                                  "--per-class).")
    seed: int = Field(0, ge=0, description="Seed of the limit / per_class draws (as --seed).")
    shard_size: int = Field(10000, ge=1, description="Images per parquet file (hf) or tar shard (webdataset) (as "
                            "--shard-size).")

    @field_validator("where")
    @classmethod
    def _where(cls, v: list[str]) -> list[str]:
        for cond in v:  # the grammar of thinair.data.parse_where (not imported: it would pull pandas into every stage)
            m = re.match(r"([^<>=!]+)(>=|<=|!=|==|=|>|<)", cond)
            if m is None or not m.group(1).strip():
                raise ValueError(f"{cond!r} is not COLUMN<op>VALUE with op one of = != < <= > >=; write e.g. "
                                 "checkpoint=-1 or guidance>=2")
        return v


class Params(_Section):
    base: Base = Base()
    ingest: Ingest = Ingest()
    pretrain: Pretrain = Pretrain()
    encode: Encode = Encode()
    invert: Invert = Invert()
    classenc: Classenc = Classenc()
    sample: Sample = Sample()
    metrics: Metrics = Metrics()
    cas: Cas = Cas()
    report: Report = Report()
    search: Search = Search()
    export: Export = Export()

    @model_validator(mode="after")
    def _cross(self) -> "Params":
        if self.invert.checkpoint_every > self.invert.steps:
            object.__setattr__(self, "invert", self.invert.model_copy(update={"checkpoint_every": self.invert.steps}))
        for c in self.sample.checkpoints:
            if c != "final" and (c > self.invert.steps or c % self.invert.checkpoint_every):
                raise ValueError(
                    f"sample.checkpoints: step {c} is not saved by invert (saved every "
                    f"{self.invert.checkpoint_every} per-embedding steps up to {self.invert.steps}); use a multiple of "
                    "invert.checkpoint_every or 'final'")
        if self.cas.synthetic == "on_the_fly":
            s = self.sample
            bad = [f"{k}={v!r}" for k, v, ok in (
                ("sample.method", s.method, "inversion"), ("sample.filter_min_confidence", s.filter_min_confidence, None),
                ("sample.allocation", s.allocation, "uniform"), ("sample.start", s.start, "noise")) if v != ok]
            if bad:
                raise ValueError(f"cas.synthetic=on_the_fly draws Diffusion Inversion variants one batch at a time, "
                                 f"which {', '.join(bad)} cannot (they need the whole set or other inputs); set "
                                 "sample.method=inversion, filter_min_confidence=null, allocation=uniform, "
                                 "start=noise, or use cas.synthetic=pregenerated")
        from thinair.study import check_space

        try:
            check_space(self.search.space)
        except ValueError as err:
            raise ValueError(str(err).replace("search space ", "search.space: ", 1)) from None
        for where, keys, sections in (("search.space", self.search.space, ("sample",)),
                                      ("search.fixed", self.search.fixed, ("sample", "cas"))):
            for key in keys:
                section, _, name = key.partition(".")
                model = type(getattr(self, section, None))
                if section not in sections or name not in getattr(model, "model_fields", {}):
                    close = difflib.get_close_matches(name, list(getattr(model, "model_fields", {})), n=1)
                    hint = f" Did you mean '{section}.{close[0]}'?" if close and section in sections else ""
                    raise ValueError(f"{where}: {key!r} is not a parameter it can set.{hint} Use "
                                     f"{' or '.join(s + '.<key>' for s in sections)} with a key of that section "
                                     "(see `thinair params`)")
        return self


def _allowed(loc: tuple) -> list[str]:
    """Keys allowed beside the unknown key at `loc`."""
    model: type[BaseModel] = Params
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def _format(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} invalid parameter(s):"]
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = _allowed(e["loc"])
            close = difflib.get_close_matches(str(e["loc"][-1]), allowed, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            lines.append(f"  - {key}: unknown key (value {e['input']!r}).{hint} Allowed keys here: {', '.join(allowed)}")
        elif not e["loc"]:  # a check across sections: its message names the keys
            lines.append(f"  - {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"  - {key}: got {e.get('input')!r}; {e['msg']}")
    lines.append("Fix params.yaml (or the -S/--set override) and run again; nothing was written.")
    return "\n".join(lines)


def parse_params(raw: dict | None, source: str = "params") -> Params:
    """Validate a raw mapping into :class:`Params` or raise :class:`ParamsError`."""
    raw = raw or {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections ({', '.join(('base',) + STAGES)}), "
                          f"got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ParamsError(_format(err, source)) from None


def load_params(path: str | Path = "params.yaml", overrides: list[str] | None = None) -> Params:
    """Read, override (``section.key=yaml-value``) and validate a params file."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found. Run from the project root or pass --params PATH.")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ParamsError(f"override {item!r}: expected section.key=value, e.g. invert.steps=500")
        section, name = key.split(".", 1)
        raw.setdefault(section, {})
        if not isinstance(raw[section], dict):
            raise ParamsError(f"{path}: section {section!r} is not a mapping")
        raw[section][name] = yaml.safe_load(value)
    return parse_params(raw, str(path))


def params_table() -> str:
    """Markdown table of every parameter: section, key, code default (the paper's where it has one), meaning."""
    rows = ["| key | default | meaning |", "|---|---|---|"]
    for section, field in Params.model_fields.items():
        for key, f in field.annotation.model_fields.items():
            default = f.default if f.default is not None else "null"
            meaning = (f.description or "").replace("|", "\\|")
            rows.append(f"| `{section}.{key}` | `{default}` | {meaning} |")
    return "\n".join(rows)
