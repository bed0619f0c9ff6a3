"""Load (and build) the latent diffusion generator: VAE + conditional UNet + noise schedule.

Reads a diffusers Stable Diffusion directory layout (``model_index.json``, ``unet/``, ``vae/``,
``scheduler/``), either a local directory or a hub id such as ``CompVis/stable-diffusion-v1-4``. The
text encoder is never loaded: Diffusion Inversion learns the conditioning directly, and only the UNet's
``cross_attention_dim`` (768 for SD v1) sets the embedding width. Writes nothing.
"""
from __future__ import annotations

import hashlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from thinair.errors import GeneratorUnavailable  # noqa: F401 - raised here; defined in thinair/errors.py

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "pndm": "PNDMScheduler",
    "ddpm": "DDPMScheduler",
    "dpmsolver++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}


@dataclass
class Generator:
    unet: "torch.nn.Module"
    vae: "torch.nn.Module"
    scheduler_config: dict
    source: str
    identity: str  # hub id@revision, or a hash of the local directory's config and weights

    @property
    def cross_attention_dim(self) -> int:
        return int(self.unet.config.cross_attention_dim)

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def scheduler(self, name: str = "ddpm"):
        """A fresh scheduler instance (multistep schedulers are stateful: one per run)."""
        import diffusers

        cls = getattr(diffusers, SCHEDULERS[name])
        extra = {"algorithm_type": "dpmsolver++"} if name == "dpmsolver++" else {}
        return cls.from_config(self.scheduler_config, **extra)


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then CPU; an explicit device that is absent is a clear error."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise GeneratorUnavailable(f"base.device={device!r} but no CUDA device is visible; set base.device: auto "
                                   "or cpu, or check CUDA_VISIBLE_DEVICES and the driver")
    if device.startswith("cuda:") and int(device.split(":")[1]) >= torch.cuda.device_count():
        raise GeneratorUnavailable(f"base.device={device!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise GeneratorUnavailable("base.device='mps' but MPS is not available; use auto or cpu")
    return torch.device(device)


def local_identity(path: Path) -> str:
    """Content hash of a local generator directory (configs and weight files of unet/vae/scheduler)."""
    h = hashlib.sha256()
    for sub in ("unet", "vae", "scheduler"):
        for f in sorted((path / sub).glob("*")):
            if f.is_file():
                h.update(f.name.encode())
                h.update(f.read_bytes() if f.stat().st_size < (1 << 26) else str(f.stat().st_size).encode())
    return "sha256:" + h.hexdigest()[:16]


def load_generator(source: str, revision: str | None = None, device: str | torch.device = "cpu",
                   dtype: torch.dtype = torch.float32) -> Generator:
    """Load UNet, VAE and the noise-schedule config from a local SD directory or a hub id."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    path = Path(source).expanduser()
    is_local = path.exists() or source.startswith((".", "/", "~")) or source.count("/") != 1
    if is_local:
        if not path.is_dir():
            raise GeneratorUnavailable(
                f"base.generator={source!r}: no such directory. Give a diffusers Stable Diffusion directory "
                "(with unet/, vae/, scheduler/) or a hub id such as CompVis/stable-diffusion-v1-4; the embedded "
                "default is built by `thinair pretrain`.")
        missing = [s for s in ("unet", "vae", "scheduler") if not (path / s).is_dir()]
        if missing:
            raise GeneratorUnavailable(
                f"base.generator={source!r}: the directory lacks {', '.join(s + '/' for s in missing)}; it must have "
                "the diffusers Stable Diffusion layout (save it with pipeline.save_pretrained(DIR)).")
        kw = {"pretrained_model_name_or_path": str(path)}
        identity = local_identity(path)
    else:
        kw = {"pretrained_model_name_or_path": source, "revision": revision}
        identity = f"{source}@{revision or 'main'}"
    try:
        unet = UNet2DConditionModel.from_pretrained(subfolder="unet", torch_dtype=dtype, **kw)
        vae = AutoencoderKL.from_pretrained(subfolder="vae", torch_dtype=dtype, **kw)
        sched_cfg = _scheduler_config(kw)
    except (OSError, ValueError, EnvironmentError) as err:
        where = "local directory" if is_local else "hub model"
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else ""
        why = str(err).splitlines()[0].rstrip(".")
        raise GeneratorUnavailable(
            f"base.generator={source!r}: the {where} could not be loaded{offline}: {why}. "
            "Fix: on a machine with network access run once to fill the Hugging Face cache (or "
            "`huggingface-cli download` it), or point base.generator at a local diffusers directory.") from None
    unet.requires_grad_(False).eval().to(device)
    vae.requires_grad_(False).eval().to(device)
    return Generator(unet, vae, sched_cfg, source, identity)


def _scheduler_config(kw: dict) -> dict:
    from diffusers import DDPMScheduler

    cfg = dict(DDPMScheduler.load_config(subfolder="scheduler", **kw))
    # SD checkpoints ship a PNDM config with skip_prk_steps; DDPM keys are what training/inversion need.
    return {k: v for k, v in cfg.items() if not k.startswith("_")} | {"_class_name": cfg.get("_class_name")}


def sd_scheduler_config() -> dict:
    """Stable Diffusion v1's noise schedule (scaled_linear 0.00085 -> 0.012, 1000 steps, epsilon)."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                skip_prk_steps=True)


def build_unet(sample_size: int, channels: list[int], cross_attention_dim: int, norm_groups: int = 8,
               head_dim: int = 8, layers_per_block: int = 1):
    """A Stable-Diffusion-architecture UNet (cross-attention at every level) of any size."""
    from diffusers import UNet2DConditionModel

    n = len(channels)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=tuple(channels),
        layers_per_block=layers_per_block, down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n, cross_attention_dim=cross_attention_dim,
        attention_head_dim=head_dim, norm_num_groups=norm_groups)


def build_vae(sample_size: int, channels: list[int], norm_groups: int = 8, scaling_factor: float = 0.18215):
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=tuple(channels), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        latent_channels=4, norm_num_groups=norm_groups, sample_size=sample_size, scaling_factor=scaling_factor)


def save_generator(path: str | Path, unet, vae) -> None:
    """Save in the hub Stable Diffusion layout, loadable by :func:`load_generator` and by diffusers'
    ``StableDiffusionPipeline.from_pretrained`` (text encoder / tokenizer / safety checker absent)."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=PNDMScheduler.from_config(sd_scheduler_config()), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path), safe_serialization=True)


_LOADED: dict = {}
_LOCK = threading.Lock()
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def apply_fast_paths(gen: Generator, attention: str = "sdpa", channels_last: bool = False,
                     compile: bool = False) -> Generator:
    """Switch the UNet/VAE to the requested execution paths (same maths, different kernels/layout)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    proc = AttnProcessor2_0 if attention == "sdpa" else AttnProcessor
    for m in (gen.unet, gen.vae):
        m.set_attn_processor(proc())
        if channels_last:
            m.to(memory_format=torch.channels_last)
    if compile:
        gen.unet = torch.compile(gen.unet)  # (a wrapper: .config and .dtype still reach the UNet)
    return gen


def runtime_key(base) -> list:
    """What besides the weights can change a result's bits: part of every chunk's cache key."""
    return [base.dtype, base.attention, base.channels_last, base.compile]


def cached_generator(source: str, revision: str | None, device: str, dtype: str = "float32",
                     attention: str = "sdpa", channels_last: bool = False, compile: bool = False) -> Generator:
    """One loaded generator per (source, revision, device, dtype, fast paths) per process; chunk tasks share it
    read-only."""
    key = (source, revision, str(device), dtype, attention, channels_last, compile)
    with _LOCK:
        if key not in _LOADED:
            gen = load_generator(source, revision, device, DTYPES[dtype])
            _LOADED[key] = apply_fast_paths(gen, attention, channels_last, compile)
        return _LOADED[key]


def generator_for(base, chunk: int = 0, device: torch.device | None = None) -> tuple[Generator, torch.device]:
    """The generator and device a chunk runs with, from the `base` params (or on the given device: the one
    its device slot holds, see thinair/devices.py)."""
    device = device if device is not None else chunk_device(base.device, chunk)
    if base.dtype == "float16" and device.type == "cpu":  # bfloat16 runs on the CPU (slowly): the CPU check of GPU runs
        raise GeneratorUnavailable(f"base.dtype={base.dtype!r} is for GPUs; on the CPU use float32")
    return cached_generator(base.generator, base.revision, str(device), base.dtype, base.attention,
                            base.channels_last, base.compile), device


_IDENTITIES: dict = {}


def generator_identity(base) -> str:
    """What identifies the generator's weights without loading them: hub id@revision, or the content hash of a
    local directory (as :func:`load_generator` records it). Part of every chunk's cache key."""
    path = Path(base.generator).expanduser()
    if not path.is_dir():
        return f"{base.generator}@{base.revision or 'main'}"
    stamp = tuple((str(f), f.stat().st_mtime_ns, f.stat().st_size)
                  for sub in ("unet", "vae", "scheduler") for f in sorted((path / sub).glob("*")) if f.is_file())
    if _IDENTITIES.get(str(path), (None,))[0] != stamp:
        _IDENTITIES[str(path)] = (stamp, local_identity(path))
    return _IDENTITIES[str(path)][1]


def chunk_device(device: str, chunk: int) -> torch.device:
    """The device a chunk runs on: CUDA chunks are spread round-robin over the visible GPUs."""
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None and torch.cuda.device_count() > 1:
        return torch.device("cuda", chunk % torch.cuda.device_count())
    return dev


def encode_prompts(source: str, revision: str | None, prompts: list[str], device="cpu",
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """CLIP text embeddings (len(prompts), 77, D) from the generator's own tokenizer + text encoder.

    Used for the paper's ablation (empty-prompt unconditional context). A generator without a text
    encoder (such as the embedded tiny-digits) raises :class:`GeneratorUnavailable` saying so.
    """
    from transformers import CLIPTextModel, CLIPTokenizer

    path = Path(source).expanduser()
    kw = {"pretrained_model_name_or_path": str(path)} if path.is_dir() else \
        {"pretrained_model_name_or_path": source, "revision": revision}
    if path.is_dir() and not ((path / "text_encoder").is_dir() and (path / "tokenizer").is_dir()):
        raise GeneratorUnavailable(
            f"base.generator={source!r} has no text_encoder/ and tokenizer/; prompt embeddings (e.g. "
            "sample.uncond: empty_prompt) need a generator with a text encoder such as "
            "CompVis/stable-diffusion-v1-4. Use sample.uncond: dataset | class | chunk instead.")
    try:
        tok = CLIPTokenizer.from_pretrained(subfolder="tokenizer", **kw)
        enc = CLIPTextModel.from_pretrained(subfolder="text_encoder", torch_dtype=dtype, **kw).to(device).eval()
    except (OSError, ValueError) as err:
        raise GeneratorUnavailable(f"base.generator={source!r}: its tokenizer/text encoder could not be loaded: "
                                   f"{str(err).splitlines()[0]}") from None
    length = min(tok.model_max_length, enc.config.max_position_embeddings)  # 77 for SD v1
    ids = tok(prompts, padding="max_length", max_length=length, truncation=True,
              return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        return enc(ids).last_hidden_state.float().cpu()  # (P, 77, D)
