"""Prompt-based generation (seed 003, DiffuGen) for generators with a text encoder: ``sample.method: prompts``.

Every bank row (one per real train image, the same rows and plan as the other methods) is generated from the
text-encoder context of a prompt for its class: a prompt of ``sample.prompts_file`` (the template format of
thinair/prompt_templates.py; each job's ``class`` must be one of the dataset's class names; each image picks one of its
class's jobs, so a prompt's ``count`` is its weight; the template's seeds are not used, the images keep the sample
plan's seeds) or, when that is null, the baseline ``"a photo of a {class}"``. The unconditional context is the
empty prompt's encoding. ``prompt_mode: img2img`` starts from the row's real image latents (posterior mean x
scaling factor) noised to ``sample.strength`` and runs the last part of the schedule only, like diffusers'
StableDiffusionImg2ImgPipeline. ``sample.clip_model`` scores every image against its prompt and
``sample.clip_min_score`` drops the images below it.

Reads the template file, the generator's ``tokenizer/`` + ``text_encoder/``, ``data/ingest/manifest.json``
(class names), ``data/encode`` (img2img only) and the CLIP directory. Writes only through
:func:`filter_summary` (``data/sample/clip_dropped.csv``); tasks/sample.py saves the arrays
:meth:`PromptSampler.finish` returns (``prompt``, ``clip_score``, ``dropped_*``).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from thinair import io, paths
from thinair.features import FeaturesUnavailable
from thinair.generator import GeneratorUnavailable, encode_prompts
from thinair.prompt_templates import expand, load_templates
from thinair.units import files_under
from thinair.upstream import require

BASELINE = "a photo of a {class}"
DROPPED = "clip_dropped.csv"
CLIP_FIX = ("point sample.clip_model at a local directory holding a transformers CLIPModel + CLIPProcessor (e.g. "
            "`hf download openai/clip-vit-base-patch32 --local-dir DIR` on a machine with network), or set "
            "sample.clip_model: null")
_CACHE: dict = {}  # (kind, key) -> loaded text contexts / CLIP model, one per process, shared read-only
_LOCK = threading.Lock()


# ---------------------------------------------------------------- prompts and their contexts

def require_text_encoder(base) -> None:
    """Fail at once (before any work) when a local generator has no text encoder to encode prompts with."""
    path = Path(base.generator).expanduser()
    if path.is_dir() and not ((path / "text_encoder").is_dir() and (path / "tokenizer").is_dir()):
        raise GeneratorUnavailable(
            f"sample.method: prompts needs a generator with a text encoder, but base.generator={base.generator!r} "
            "has no text_encoder/ and tokenizer/ (the embedded tiny-digits has none). Use sample.method: "
            "class_tokens, its prompt baseline (the generator's own class tokens), or a generator with a text "
            "encoder such as CompVis/stable-diffusion-v1-4.")


def _dir_identity(path: Path, subdirs=(".",)) -> list:
    return [[f.relative_to(path).as_posix(), io.file_sha256_memo(f)] for s in subdirs for f in files_under(path / s)]


def text_identity(base) -> list | str:
    """What identifies the prompt encoder: its files' hashes (local), or hub id@revision."""
    path = Path(base.generator).expanduser()
    return _dir_identity(path, ("tokenizer", "text_encoder")) if path.is_dir() else \
        f"{base.generator}@{base.revision or 'main'}"


def class_prompts(prompts_file: str | None, class_names: list[str]) -> list[list[str]]:
    """Per dataset label, the prompts of its class's jobs (a prompt appears `count` times: its weight)."""
    if prompts_file is None:
        return [[BASELINE.replace("{class}", n)] for n in class_names]
    try:
        jobs = expand(load_templates(Path(prompts_file).expanduser()))
    except ValueError as err:
        raise ValueError(f"sample.prompts_file={prompts_file!r}: {err}. Fix the file (format in "
                         "thinair/prompt_templates.py) or set sample.prompts_file: null for the baseline "
                         f"{BASELINE!r}") from None
    index = {n: k for k, n in enumerate(class_names)}
    unknown = sorted({j.class_name for j in jobs} - set(index))
    if unknown:
        raise ValueError(f"sample.prompts_file={prompts_file!r}: class(es) {unknown} are not classes of the dataset; "
                         f"a job's class must be one of {class_names}")
    table: list[list[str]] = [[] for _ in class_names]
    for j in jobs:
        table[index[j.class_name]].append(j.prompt)
    return table


def pick_prompts(plan: list[dict], labels: np.ndarray, table: list[list[str]]) -> None:
    """Give every plan record a prompt of its row's class, drawn with a generator seeded from the record's seed."""
    for r in plan:
        options = table[int(labels[r["row"]])]
        r["prompt"] = options[int(np.random.default_rng(io.seed_for(r["seed"], "prompt")).integers(len(options)))]


def prompt_contexts(base, prompts: list[str], device="cpu") -> dict[str, torch.Tensor]:
    """{prompt: (77, D) context} for the distinct `prompts` and "" (the unconditional), on the CPU."""
    distinct = sorted(set(prompts) | {""})
    key = ("text", base.generator, base.revision, str(device), tuple(distinct), str(text_identity(base)))
    with _LOCK:
        if key not in _CACHE:
            for k in [k for k in _CACHE if k[0] == "text"]:  # only the latest prompt set is reused
                del _CACHE[k]
            _CACHE[key] = dict(zip(distinct, encode_prompts(base.generator, base.revision, distinct, device)))
        return _CACHE[key]


# ---------------------------------------------------------------- img2img

def source_latents(root: str | Path, index: np.ndarray, gen, resolution: int) -> torch.Tensor:
    """The real images' latents (len(index), 4, h, w): data/encode's posterior means x the scaling factor."""
    d = paths.stage_dir("encode", root)
    manifest = io.read_json(require(d / io.MANIFEST, "encode"))
    if manifest.get("generator") != gen.identity or manifest.get("resolution") != resolution:
        raise ValueError(f"data/encode was made with generator {manifest.get('generator')} at "
                         f"{manifest.get('resolution')} px, not {gen.identity} at {resolution} px: re-run "
                         "`thinair encode` (or `dvc repro`) before sample.prompt_mode: img2img")
    want, found = set(int(i) for i in index), {}
    for c in manifest["chunks"]:
        if want.intersection(range(c["start"], c["end"])):
            t = io.load_tensors(require(d / c["file"], "encode"))
            found |= {i: m for i, m in zip(t["index"].tolist(), t["mean"]) if i in want}
    missing = sorted(want - set(found))
    if missing:
        raise ValueError(f"data/encode has no latents of train rows {missing[:5]}: re-run `thinair encode`")
    return torch.stack([found[int(i)] for i in index]).float() * gen.scaling_factor


# ---------------------------------------------------------------- CLIP score

def check_clip(path) -> Path:
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FeaturesUnavailable(f"sample.clip_model={str(path)!r}: no such directory; {CLIP_FIX}")
    cfg = p / "config.json"
    try:
        model_type = io.read_json(cfg).get("model_type") if cfg.is_file() else None
        why = f"holds a {model_type!r} model" if cfg.is_file() else "has no config.json"
    except ValueError:
        model_type, why = None, "has an unreadable config.json"
    if model_type != "clip":
        raise FeaturesUnavailable(f"sample.clip_model={str(path)!r} {why}, not a CLIP model (text and vision); "
                                  f"{CLIP_FIX}")
    return p


def load_clip(path, device="cpu"):
    """(model, processor) of a local CLIP directory, loaded once per process and device."""
    from transformers import CLIPModel, CLIPProcessor

    p = check_clip(path)
    key = ("clip", str(p), str(device), str(_dir_identity(p)))
    with _LOCK:
        if key not in _CACHE:
            try:
                model = CLIPModel.from_pretrained(p, local_files_only=True).to(device).eval()
                processor = CLIPProcessor.from_pretrained(p, local_files_only=True)
            except Exception as err:  # noqa: BLE001 - OSError, ValueError, KeyError...: all mean "unusable dir"
                raise FeaturesUnavailable(f"sample.clip_model={str(path)!r} could not be loaded as a CLIPModel + "
                                          f"CLIPProcessor: {str(err).splitlines()[0] if str(err) else err!r}; "
                                          f"{CLIP_FIX}") from None
            _CACHE[key] = (model, processor)
        return _CACHE[key]


@torch.no_grad()
def clip_scores(model, processor, images: np.ndarray, prompts: list[str], batch_size: int = 64) -> np.ndarray:
    """100 x cosine(CLIP image embedding, CLIP text embedding) per image: torchmetrics' CLIPScore of one pair
    (before its clamp of the mean at 0). images uint8 (N, H, W, C), C in {1, 3, 4} -> (N,) float32."""
    images = np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images[..., :3]
    length = model.config.text_config.max_position_embeddings
    out = [np.zeros(0, np.float32)]
    for s in range(0, len(images), batch_size):
        inp = processor(text=list(prompts[s:s + batch_size]), images=list(images[s:s + batch_size]),
                        return_tensors="pt", padding=True, truncation=True, max_length=length)
        o = model(**{k: v.to(model.device) for k, v in inp.items()})
        img, txt = F.normalize(o.image_embeds.float(), dim=-1), F.normalize(o.text_embeds.float(), dim=-1)
        out.append((100 * (img * txt).sum(-1)).cpu().numpy().astype(np.float32))
    return np.concatenate(out)


# ---------------------------------------------------------------- what tasks/sample.py calls

def key_parts(params, root: str | Path = ".") -> list:
    """Everything besides the sample params that determines a prompts chunk. Checks the inputs first, so a
    generator without a text encoder, a bad prompts file or CLIP directory fails before any work."""
    b, p = params.base, params.sample
    require_text_encoder(b)
    names = io.read_json(require(paths.stage_dir("ingest", root) / io.MANIFEST, "ingest"))["class_names"]
    parts = [text_identity(b), class_prompts(p.prompts_file, names)]
    if p.prompt_mode == "img2img":
        parts.append(_dir_identity(require(paths.stage_dir("encode", root), "encode")))
    if p.clip_model:
        parts.append(_dir_identity(check_clip(p.clip_model)))
    return parts


@dataclass
class PromptSampler:
    contexts: dict[str, torch.Tensor]  # prompt -> (77, D); "" is the unconditional
    table: list[list[str]]  # label -> its class's prompts
    latents: dict[int, torch.Tensor] | None  # bank row -> x0 latents (4, h, w) for img2img
    clip: tuple | None  # (model, processor)
    min_score: float | None
    device: torch.device
    batch_size: int = 64

    def pick(self, plan: list[dict], labels: np.ndarray) -> None:
        pick_prompts(plan, labels, self.table)

    def cond(self, recs: list[dict]) -> torch.Tensor:
        return torch.stack([self.contexts[r["prompt"]] for r in recs])  # (B, 77, D)

    def uncond(self, recs: list[dict]) -> torch.Tensor:
        return self.contexts[""].expand(len(recs), -1, -1)  # (B, 77, D)

    def init(self, recs: list[dict]) -> torch.Tensor | None:
        """img2img start latents (B, 4, h, w) on the device; None for txt2img."""
        return None if self.latents is None else torch.stack([self.latents[r["row"]] for r in recs]).to(self.device)

    def finish(self, arrays: dict, plan: list[dict]) -> dict:
        """Add the prompts; with CLIP, the scores, and drop the images below clip_min_score (kept as dropped_*)."""
        arrays = arrays | {"prompt": np.asarray([r["prompt"] for r in plan], dtype=str)}
        if self.clip is None:
            return arrays
        scores = clip_scores(*self.clip, arrays["images"], list(arrays["prompt"]), self.batch_size)
        keep = scores >= self.min_score if self.min_score is not None else np.ones(len(scores), bool)
        return ({k: v[keep] for k, v in arrays.items()} | {"clip_score": scores[keep]}
                | {f"dropped_{k}": arrays[k][~keep] for k in ("labels", "source_index", "seed", "prompt")}
                | {"dropped_clip_score": scores[~keep]})


def prepare(params, bank: dict, rows: np.ndarray, gen, root: str | Path = ".", device="cpu"):
    """The prompt sampler of one chunk (rows = its bank rows) and the sample params without perturbation."""
    b, p = params.base, params.sample
    require_text_encoder(b)
    names = io.read_json(require(paths.stage_dir("ingest", root) / io.MANIFEST, "ingest"))["class_names"]
    table = class_prompts(p.prompts_file, names)
    missing = sorted(names[k] for k in set(bank["labels"].tolist()) if not table[k])
    if missing:
        raise ValueError(f"sample.prompts_file={p.prompts_file!r} has no prompt for the class(es) {missing}; add "
                         "an entry whose class is each of them")
    contexts = prompt_contexts(b, [q for qs in table for q in qs], device)
    if contexts[""].shape[-1] != gen.cross_attention_dim:
        raise GeneratorUnavailable(f"base.generator={b.generator!r}: its text encoder gives {contexts[''].shape[-1]}"
                                   f"-wide contexts but the UNet's cross_attention_dim is {gen.cross_attention_dim}")
    latents = None
    if p.prompt_mode == "img2img":
        lat = source_latents(root, bank["index"].numpy()[rows], gen, b.gen_resolution)
        latents = dict(zip((int(r) for r in rows), lat))
    clip = load_clip(p.clip_model, device) if p.clip_model else None
    sampler = PromptSampler(contexts, table, latents, clip, p.clip_min_score, torch.device(device), p.batch_size)
    return sampler, p.model_copy(update={"interpolation": 0.0, "noise": 0.0})


def filter_summary(params, out: Path, files: list[str]) -> tuple[dict, set[str]]:
    """The CLIP filter's accounting for the sample manifest (every generated image is kept or dropped exactly
    once) and the files it wrote (the dropped images' table); ({}, set()) without a CLIP model."""
    import pandas as pd

    p = params.sample
    if p.method != "prompts" or not p.clip_model:
        return {}, set()
    kept, dropped, frames = {}, {}, []
    for f in files:
        z = io.load_npz(out / f)
        kept[f], dropped[f] = len(z["clip_score"]), len(z["dropped_clip_score"])
        frames.append(pd.DataFrame({"file": f, "label": z["dropped_labels"], "source_index": z["dropped_source_index"],
                                    "seed": z["dropped_seed"], "prompt": z["dropped_prompt"],
                                    "clip_score": z["dropped_clip_score"]}))
    with io.atomic_path(out / DROPPED) as tmp:
        (pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()).to_csv(tmp, index=False)
    info = {"model": p.clip_model, "min_score": p.clip_min_score, "generated": sum(kept.values()) +
            sum(dropped.values()), "kept": sum(kept.values()), "dropped": sum(dropped.values()),
            "dropped_per_chunk": dropped, "dropped_table": DROPPED}
    return {"clip_filter": info}, {DROPPED}
