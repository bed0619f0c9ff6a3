"""The sample stage's draws, shared with on-the-fly generation: the embedding bank, each variant's perturbed
context and partner, the unconditional context, and rendering plan records into images (Diffusion Inversion).

``tasks/sample.py`` plans and writes the pre-generated set with these; :class:`Stream` draws the same kind of
variant one classifier step at a time for ``cas.synthetic: on_the_fly`` (``tasks/cas.py``), through
:class:`thinair.stream.SyntheticStream`. Reads ``data/invert`` (the bank), ``data/ingest``'s manifest and the
generator; writes nothing.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from thinair import io, paths, variants
from thinair.config import Params
from thinair.diffusion import denoise
from thinair.generator import generator_for, generator_identity, runtime_key
from thinair.images import to_uint8
from thinair.stream import SyntheticStream
from thinair.upstream import require, upstream_chunks


def ckpt_key(c) -> str:
    return "embeddings" if c == "final" else f"step_{c}"


def load_bank(root: str | Path, checkpoints) -> dict:
    """All chunks' embeddings per checkpoint: {ckpt: (N, T, D)}, plus labels/index (N,) and chunk ids."""
    d = paths.stage_dir("invert", root)
    manifest = io.read_json(require(d / io.MANIFEST, "invert"))
    bank = {"labels": [], "index": [], "chunk": []} | {c: [] for c in checkpoints}
    for i, f in enumerate(manifest["chunks"]):
        t = io.load_tensors(d / f)
        for c in checkpoints:
            if ckpt_key(c) not in t:
                raise ValueError(f"sample.checkpoints: {c!r} is not in {d / f}; invert saved "
                                 f"{sorted(k for k in t if k.startswith('step_'))}")
            bank[c].append(t[ckpt_key(c)])
        bank["labels"].append(t["labels"])
        bank["index"].append(t["index"])
        bank["chunk"].append(torch.full_like(t["labels"], i))
    return {k: torch.cat(v) for k, v in bank.items()}


def pick_partner(p, labels: np.ndarray, r: int, neighbours: dict | None, rng: np.random.Generator) -> int:
    """Bank row `r`'s interpolation partner (-1: none): a random other embedding of its class, or per sample.partner
    among `neighbours` {row: (class mates nearest first, distances)} of its checkpoint; never `r` itself."""
    if neighbours is None:
        mates = np.flatnonzero(labels == labels[r])
        mates = mates[mates != r]  # never interpolate an embedding with itself
    else:
        mates = neighbours[r][0]
    return variants.choose_partner(p.partner, mates, p.partner_k, rng) if len(mates) and p.interpolation > 0 else -1


def perturbed_context(bank: dict, rec: dict, p, rng: torch.Generator) -> torch.Tensor:
    c = bank[rec["ckpt"]][rec["row"]]  # (T, D)
    if rec["partner"] >= 0:
        c = (1 - p.interpolation) * c + p.interpolation * bank[rec["ckpt"]][rec["partner"]]
    return c + rec.get("lambda", p.noise) * torch.randn(c.shape, generator=rng)


def render_records(recs: list[dict], bank: dict, p, unconds: dict | None, unet, gen_model, device, shape: tuple,
                   interpolation: str, pg=None, init=None) -> np.ndarray:
    """uint8 (B, H, W, C) images of plan records `recs` in one batched denoising; `shape` = (latent size, save
    resolution, channels). Each record's seed draws its perturbation and start latent, so an image does not depend
    on its batch. Serves the stage (`compute`) and the on-the-fly stream (:class:`Stream`)."""
    latent, out_shape = shape[0], shape[1:]
    rngs = [torch.Generator().manual_seed(r["seed"]) for r in recs]
    cond = pg.cond(recs) if pg else torch.stack([perturbed_context(bank, r, p, rng) for r, rng in zip(recs, rngs)])
    lat0 = torch.stack([torch.randn(4, latent, latent, generator=rng) for rng in rngs])  # (B, 4, h, w)
    uncond = pg.uncond(recs) if pg else torch.stack([unconds[r["ckpt"]][r["row"]] for r in recs])
    w = torch.tensor([r["w"] for r in recs])
    lat = denoise(unet, gen_model.scheduler(p.scheduler), lat0.to(device), cond.to(device), uncond.to(device),
                  w.to(device), p.steps, p.batched_guidance, init(recs) if init else None, p.strength,
                  p.guidance_interval)
    with torch.no_grad():
        x = gen_model.vae.decode((lat / gen_model.scaling_factor).to(gen_model.vae.dtype)).sample
    return to_uint8(x, *out_shape, interpolation)


def geometry(bank: dict, p, rows: np.ndarray, seed: int) -> tuple[dict | None, dict | None]:
    """The neighbour lists (partner nearest | knn) and per-row lambdas (noise_schedule adaptive) of the bank, per
    checkpoint; (None, None) with the paper's random partner and fixed lambda."""
    if p.method != "inversion" or (p.partner == "random" and p.noise_schedule == "fixed"):
        return None, None
    labels = bank["labels"].numpy()
    points = {c: variants.project(bank[c], seed) for c in p.checkpoints}
    neighbours = {c: variants.class_neighbours(points[c], labels, rows) for c in p.checkpoints}
    lambdas = None
    if p.noise_schedule == "adaptive":
        lambdas = {c: variants.adaptive_lambdas(points[c], labels, p.noise, p.partner_k) for c in p.checkpoints}
    return neighbours, lambdas


def mean_embeddings(emb: torch.Tensor, labels: torch.Tensor, chunks: torch.Tensor, scope: str) -> torch.Tensor:
    """The unconditional context of every bank row: the mean embedding of its scope. (N, T, D) -> (N, T, D)."""
    if scope == "dataset":
        return emb.mean(0, keepdim=True).expand_as(emb)
    groups = labels if scope == "class" else chunks
    out = torch.empty_like(emb)
    for g in groups.unique():
        m = groups == g
        out[m] = emb[m].mean(0)
    return out


def unconditional(emb: torch.Tensor, bank: dict, scope: str, base) -> torch.Tensor:
    """Unconditional context per bank row: (N, T, D), or (N, 77, D) for the empty-prompt ablation."""
    if scope == "empty_prompt":
        from thinair.generator import encode_prompts

        return encode_prompts(base.generator, base.revision, [""]).expand(len(emb), -1, -1)
    return mean_embeddings(emb, bank["labels"], bank["chunk"], scope)


class Stream:
    """The sample stage's Diffusion Inversion variants drawn on the fly, one classifier step at a time
    (``cas.synthetic: on_the_fly``): a ``draw(step, n)`` for :class:`thinair.stream.SyntheticStream`.

    Image number ``pos = step * n + j`` of the stream takes embedding ``order[pos % N]`` of a fresh seeded
    permutation per pass over the N embeddings (so every embedding is used equally, as in the pre-generated set),
    the pass's checkpoint x guidance setting in turn, a partner and lambda as ``plan_variants`` chooses them
    (sample.partner, sample.noise_schedule), and its own perturbation and start latent, all seeded by (seed, pos):
    a position never repeats, so no image is drawn twice, and step t is the same images whatever the batch before.
    Reads data/ingest's manifest and data/invert (on the first draw), and the generator; writes nothing.
    """

    def __init__(self, params: Params, seed: int, root: str | Path = ".", device=None):
        b, p = params.base, params.sample
        self.params, self.seed, self.root, self.device = params, int(seed), root, device
        manifest = io.read_json(require(paths.stage_dir("ingest", root) / io.MANIFEST, "ingest"))
        h, _, channels = manifest["image_shape"]
        self.n = int(manifest["splits"]["train"]["count"])
        self.settings = [(ci, c, wi, float(w)) for ci, c in enumerate(p.checkpoints)
                         for wi, w in enumerate(p.guidance_scales)]
        self.image_shape = (b.save_resolution or h, b.save_resolution or h, channels)
        self.size = self.n * len(self.settings) * p.samples_per_setting  # the set `sample` would write
        inv = paths.stage_dir("invert", root)
        self.key = ["on_the_fly", generator_identity(b), runtime_key(b), p.model_dump(mode="json"), b.seed,
                    self.seed, list(self.image_shape), b.gen_resolution, params.encode.interpolation,
                    [io.file_sha256_memo(inv / f) for f in upstream_chunks("invert", root)]]
        self._ready = None

    def _setup(self) -> dict:
        b, p = self.params.base, self.params.sample
        bank = load_bank(self.root, p.checkpoints)
        if len(bank["labels"]) != self.n:
            raise ValueError(f"data/invert holds {len(bank['labels'])} embeddings but data/ingest {self.n} train "
                             "images: re-run `thinair invert` (or `dvc repro`)")
        gen_model, device = generator_for(b, 0, self.device)
        width = bank[p.checkpoints[0]].shape[-1]
        if width != gen_model.cross_attention_dim:
            raise ValueError(f"data/invert holds {width}-wide embeddings but base.generator={b.generator!r} has "
                             f"cross_attention_dim {gen_model.cross_attention_dim}: re-run `thinair encode` and "
                             "`thinair invert` (or `dvc repro`) with this one.")
        neighbours, lambdas = geometry(bank, p, np.arange(self.n), b.seed)
        return {"bank": bank, "gen": gen_model, "device": device, "labels": bank["labels"].numpy(),
                "neighbours": neighbours, "lambdas": lambdas,
                "unconds": {c: unconditional(bank[c], bank, p.uncond, b) for c in p.checkpoints},
                "shape": (b.gen_resolution // gen_model.vae_factor, *self.image_shape[1:])}

    def records(self, step: int, n: int, labels: np.ndarray, neighbours=None, lambdas=None) -> list[dict]:
        """The plan records of the stream's images step * n .. step * n + n - 1 (see the class docstring)."""
        p, recs, orders = self.params.sample, [], {}
        for pos in range(step * n, step * n + n):
            rnd = pos // self.n
            if rnd not in orders:
                orders[rnd] = np.random.default_rng(io.seed_for(self.seed, "stream", "order", rnd)).permutation(self.n)
            r = int(orders[rnd][pos % self.n])
            ci, c, wi, w = self.settings[rnd % len(self.settings)]
            rng = np.random.default_rng(io.seed_for(self.seed, "stream", pos))
            partner = pick_partner(p, labels, r, neighbours and neighbours[c], rng)
            recs.append({"row": r, "ckpt": c, "w": w, "partner": partner, "setting": (ci, wi), "s": rnd,
                         "lambda": p.noise if lambdas is None else float(lambdas[c][r]),
                         "seed": io.seed_for(self.seed, "stream", pos, "draw")})
        return recs

    def __call__(self, step: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n, H, W, C) images and their labels: the stream's step `step` of `n` images."""
        if self._ready is None:
            self._ready = self._setup()
        s, p = self._ready, self.params.sample
        recs = self.records(step, n, s["labels"], s["neighbours"], s["lambdas"])
        images = render_records(recs, s["bank"], p, s["unconds"], s["gen"].unet, s["gen"], s["device"], s["shape"],
                                self.params.encode.interpolation)
        return images, s["labels"][[r["row"] for r in recs]]


def stream(params: Params, seed: int, root: str | Path = ".", device=None):
    """A :class:`thinair.stream.SyntheticStream` of :class:`Stream`'s draws (cas.synthetic on_the_fly)."""
    draw = Stream(params, seed, root, device)
    return SyntheticStream(draw, draw.size, draw.image_shape, draw.key)
