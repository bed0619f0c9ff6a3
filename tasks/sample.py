"""`sample`: generate variants of every learned embedding (Diffusion Inversion, stage 2).

For each embedding c_i, checkpoint, guidance scale w and sample s: the conditional context is
``c' = (1 - alpha) c_i + alpha c_j + lambda * N(0, I)`` with c_j a random *other* embedding of the
same class (never c_i), the unconditional context is the mean learned embedding (unperturbed), and
``eps = eps_u + w (eps_c - eps_u)`` in one batched UNet call. Every draw is seeded from
(seed, chunk, index, checkpoint, w, s), so results do not depend on batching. Images are generated at
``base.gen_resolution`` and resized to the save resolution. Reads ``data/invert`` and the generator.
Writes ``data/sample/train-NNNNN.npz`` (``images`` uint8 (M, H, W, C), ``labels``, ``source_index``,
``partner_index``, ``checkpoint`` (-1 = final), ``guidance``, ``seed``), ``data/sample/provenance.csv``
(one row per image: file, row, source, partner, alpha, lambda, guidance, guidance_interval, checkpoint,
scheduler, steps, seed) and ``data/sample/manifest.json`` (last). Files hold the plan's order: checkpoint, then guidance, then sample
index, then embedding (cas's scaling study re-ranks each embedding's variants across settings:
thinair/upstream.py ``variant_rank``). ``sample.method: prompts`` (text prompts through the generator's
text encoder, txt2img or img2img, optional CLIP-score filter) lives in thinair/prompt_sampling.py; it adds ``prompt`` (and
``clip_score`` / ``dropped_*``) arrays, provenance columns and ``clip_dropped.csv``.

Beyond the paper (thinair/variants.py; the paper's settings are the defaults): ``sample.partner`` nearest | knn,
``sample.noise_schedule`` adaptive (``noise_lambda`` per image), ``sample.filter_min_confidence`` (the domain
classifier's label-consistency filter at equal count: ``confidence`` per image, ``replaced_labels``, and
``label_filter`` in the manifest), ``sample.allocation: coverage`` (a second pass for uncovered real images) and
``sample.start: image`` (img2img from the image's own latent, data/encode). Issue 19: ``sample.guidance_interval``
guides only a band of noise levels (thinair/diffusion.py ``denoise``), one UNet pass per image on the other steps.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from thinair import io, paths, prompt_sampling, variants
from thinair.config import Params
from thinair.devices import with_halving
from thinair.diffusion import denoise
from thinair.generator import generator_for, generator_identity, runtime_key
from thinair.images import to_uint8
from thinair.steering import class_contexts, method_inputs, unet_for
from thinair.units import clean_dir
from thinair.upstream import inputs_digest, require, upstream_chunks

STAGE = "sample"
log = logging.getLogger(__name__)


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


def candidates(p, wanted: int) -> int:
    """Draws that make `wanted` images of one (embedding, setting): more when the label filter is on."""
    if p.filter_min_confidence is None:
        return wanted
    return int(np.ceil(wanted * p.filter_oversample))


def first_pass(p) -> int:
    """Images per (embedding, setting) drawn before coverage allocation spends the rest (all when uniform)."""
    return p.samples_per_setting if p.allocation == "uniform" else -(-p.samples_per_setting // 2)


def plan_variants(labels: np.ndarray, rows: np.ndarray, p, seed: int, chunk: int, neighbours: dict | None = None,
                  lambdas: dict | None = None, counts: dict | None = None, s0: int = 0) -> list[dict]:
    """One record per image to generate, for the bank rows `rows` (embeddings of this chunk).

    `neighbours` {checkpoint: {row: (class mates nearest first, distances)}} serves sample.partner nearest | knn;
    `lambdas` {checkpoint: (N,) noise per bank row} sample.noise_schedule adaptive (thinair/variants.py).
    `counts` {row: images wanted per setting} (default samples_per_setting), drawn as sample indices s0, s0 + 1, ..;
    a record is ``wanted`` unless it is one of the label filter's extra candidates."""
    plan = []
    want = {int(r): p.samples_per_setting if counts is None else counts[int(r)] for r in rows}
    draws = {r: candidates(p, n) for r, n in want.items()}
    for ci, c in enumerate(p.checkpoints):
        for wi, w in enumerate(p.guidance_scales):
            for s in range(s0, s0 + max(draws.values(), default=0)):
                for r in rows:
                    if s - s0 >= draws[int(r)]:
                        continue
                    rng = np.random.default_rng(io.seed_for(seed, STAGE, chunk, int(r), ci, wi, s))
                    partner = pick_partner(p, labels, int(r), neighbours and neighbours[c], rng)
                    lam = p.noise if lambdas is None else float(lambdas[c][int(r)])
                    plan.append({"row": int(r), "ckpt": c, "w": float(w), "partner": partner, "lambda": lam,
                                 "s": s, "setting": (ci, wi), "wanted": s - s0 < want[int(r)],
                                 "seed": io.seed_for(seed, STAGE, chunk, int(r), ci, wi, s, "draw")})
    return plan


def pick_partner(p, labels: np.ndarray, r: int, neighbours: dict | None, rng: np.random.Generator) -> int:
    """Bank row `r`'s interpolation partner (-1: none): a random other embedding of its class, or per sample.partner
    among `neighbours` {row: (class mates nearest first, distances)} of its checkpoint; never `r` itself."""
    if neighbours is None:
        mates = np.flatnonzero(labels == labels[r])
        mates = mates[mates != r]  # never interpolate an embedding with itself
    else:
        mates = neighbours[r][0]
    return variants.choose_partner(p.partner, mates, p.partner_k, rng) if len(mates) and p.interpolation > 0 else -1


def plan_order(plan: list[dict], rows: np.ndarray) -> list[int]:
    """Indices of `plan` in the files' order: setting, then the image's rank among its embedding's (by draw), then
    embedding (the unfiltered uniform plan is already in this order)."""
    pos = {int(r): i for i, r in enumerate(rows)}
    by_group: dict = {}
    for i in sorted(range(len(plan)), key=lambda i: plan[i]["s"]):
        by_group.setdefault((plan[i]["setting"], plan[i]["row"]), []).append(i)
    rank = {i: n for idx in by_group.values() for n, i in enumerate(idx)}
    return sorted(range(len(plan)), key=lambda i: (plan[i]["setting"], rank[i], pos[plan[i]["row"]]))


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


def label_filter(params: Params, arrays: dict, plan: list[dict], rows: np.ndarray, net) -> tuple[dict, list[dict]]:
    """sample.filter_min_confidence: score every candidate with the domain classifier `net` (real train images) and
    keep as many per (embedding, setting) as the plan wants, as thinair/variants.py ``select_consistent`` does, in
    the plan's order; adds ``confidence`` (kept) and ``replaced_labels`` (the wanted draws that were replaced)."""
    from thinair import classifier

    p = params.sample
    x = classifier.to_tensor(arrays["images"])
    with torch.no_grad():
        probs = torch.cat([net(x[s:s + 512]).softmax(1) for s in range(0, len(x), 512)]).numpy()
    pos = {int(r): i for i, r in enumerate(rows)}
    group = np.asarray([(r["setting"][0] * len(p.guidance_scales) + r["setting"][1]) * len(rows) + pos[r["row"]]
                        for r in plan])
    wanted = np.asarray([r["wanted"] for r in plan])
    keep = np.bincount(group[wanted], minlength=group.max() + 1 if len(group) else 0)
    kept = variants.select_consistent(group, np.asarray([r["s"] for r in plan]), arrays["labels"], probs, keep,
                                      p.filter_min_confidence)
    kept_set = {int(i) for i in kept}
    sub = [plan[i] for i in sorted(kept_set)]
    final = [sorted(kept_set)[j] for j in plan_order(sub, rows)]
    replaced = np.asarray([i for i in np.flatnonzero(wanted) if int(i) not in kept_set], np.int64)
    conf = probs[np.arange(len(plan)), arrays["labels"]]
    out = {k: v[final] for k, v in arrays.items()} | {"confidence": conf[final].astype(np.float32),
                                                      "replaced_labels": arrays["labels"][replaced]}
    return out, [plan[i] for i in final]


def coverage_counts(params: Params, arrays: dict, plan: list[dict], rows: np.ndarray, bank: dict, net, root) -> dict:
    """sample.allocation coverage: the images each row gets in the second pass (per setting), at equal total.

    A real train image is covered when a first-pass synthetic image of this chunk lies within its k-NN ball
    (metrics.k, in the domain classifier's feature space, among all real train images: Naeem et al.'s coverage,
    per image); the remaining budget goes to the uncovered ones (thinair/variants.py ``allocate``)."""
    from thinair import classifier
    from thinair.upstream import read_split

    p = params.sample
    train = read_split("train", root)
    real = classifier.features(net, classifier.to_tensor(train.images))
    fake = classifier.features(net, classifier.to_tensor(arrays["images"]))
    index = bank["index"].numpy()[rows]
    uncovered = variants.uncovered(real, index, fake, params.metrics.k)
    counts = variants.allocate((p.samples_per_setting - first_pass(p)) * len(rows), uncovered)
    log.info("sample chunk: %d of %d real images uncovered after the first pass", int(uncovered.sum()), len(rows))
    return {int(r): int(n) for r, n in zip(rows, counts)}


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


def units(params: Params, root: str | Path = ".") -> list[dict]:
    """One unit per chunk of learned embeddings."""
    return [{"name": f"chunk-{i:03d}", "chunk": i, "file": paths.chunk_name("train", i, "npz")}
            for i in range(len(upstream_chunks("invert", root)))]


def key(params: Params, unit: dict, root: str | Path = ".") -> list:
    """Everything that determines one chunk's images besides code: generator, params, seed, the resize filter, its
    embeddings and the whole embedding bank (interpolation partners and the mean embedding come from every chunk)."""
    b, p = params.base, params.sample
    inv_dir = paths.stage_dir("invert", root)
    inv_file = require(inv_dir / paths.chunk_name("train", unit["chunk"], "safetensors"), "invert")
    h, _, channels = io.read_json(require(paths.stage_dir("ingest", root) / io.MANIFEST, "ingest"))["image_shape"]
    bank = [io.file_sha256_memo(inv_dir / f) for f in upstream_chunks("invert", root)]
    return [generator_identity(b), runtime_key(b), p.model_dump(mode="json"), b.seed, unit["chunk"],
            b.save_resolution or h, channels, b.gen_resolution, params.encode.interpolation, inv_file, bank,
            *method_inputs(params, root), *option_inputs(params, root)]


def option_inputs(params: Params, root: str | Path = ".") -> list:
    """What the beyond-paper options read: the real train split and the domain classifier's budget (the label
    filter), the real latents (start: image)."""
    p, out = params.sample, []
    if p.filter_min_confidence is not None or p.allocation == "coverage":
        out += [inputs_digest(root, "ingest"), params.metrics.feature_epochs, params.metrics.k]
    if p.start == "image":
        out += [inputs_digest(root, "encode")]
    return out


def compute(params: Params, unit: dict, out: Path, root: str | Path = ".", device=None) -> None:
    """Generate every variant of one chunk's embeddings into `out` (npz)."""
    b, p, chunk = params.base, params.sample, unit["chunk"]
    ingest_manifest = io.read_json(require(paths.stage_dir("ingest", root) / io.MANIFEST, "ingest"))
    h, _, channels = ingest_manifest["image_shape"]
    save_res = b.save_resolution or h
    bank = load_bank(root, p.checkpoints)
    gen_model, device = generator_for(b, chunk, device)
    unet = gen_model.unet
    width = bank[p.checkpoints[0]].shape[-1]
    if p.method == "inversion" and width != gen_model.cross_attention_dim:
        raise ValueError(f"data/invert holds {width}-wide embeddings but base.generator={b.generator!r} has "
                         f"cross_attention_dim {gen_model.cross_attention_dim}: they were learned with another "
                         "generator. Re-run `thinair encode` and `thinair invert` (or `dvc repro`) with this one.")
    rows = torch.nonzero(bank["chunk"] == chunk).flatten().numpy()
    pg = None  # the prompt sampler of method prompts (thinair/prompt_sampling.py)
    unconds = None  # the unconditional context per checkpoint and bank row (methods other than prompts)
    if p.method == "inversion":
        unconds = {c: unconditional(bank[c], bank, p.uncond, b) for c in p.checkpoints}
    elif p.method == "prompts":  # every row's context is a text prompt of its class, no perturbation
        pg, p = prompt_sampling.prepare(params, bank, rows, gen_model, root, device)
    else:  # class-conditional: every row's context is its class's, no perturbation
        p, unconds = class_contexts(params, bank, root)
        if params.sample.method == "class_encoder":
            unet = unet_for(gen_model, params, root)
    labels = bank["labels"].numpy()
    neighbours, lambdas = geometry(bank, p, rows, b.seed)
    latent = b.gen_resolution // gen_model.vae_factor
    starts = None  # sample.start image: each row's own real latent (data/encode)
    if p.start == "image":
        lat = prompt_sampling.source_latents(root, bank["index"].numpy()[rows], gen_model, b.gen_resolution)
        starts = dict(zip((int(r) for r in rows), lat))
    ckpt_ids = {c: (-1 if c == "final" else int(c)) for c in p.checkpoints}

    def init(recs: list[dict]) -> torch.Tensor | None:
        if pg:
            return pg.init(recs)
        return None if starts is None else torch.stack([starts[r["row"]] for r in recs]).to(device)

    def render(plan: list[dict]) -> dict:
        """The images of `plan` (in its order) and their per-image arrays."""
        def generate(batch_size: int) -> list[np.ndarray]:
            return [render_records(plan[s:s + batch_size], bank, p, unconds, unet, gen_model, device, (latent,
                                   save_res, channels), params.encode.interpolation, pg, init)
                    for s in range(0, len(plan), batch_size)]

        images = with_halving(p.batch_size, generate, f"sample chunk {chunk}")
        return dict(images=np.concatenate(images), labels=labels[[r["row"] for r in plan]],
                    source_index=bank["index"].numpy()[[r["row"] for r in plan]],
                    partner_index=np.asarray([bank["index"][r["partner"]].item() if r["partner"] >= 0 else -1
                                              for r in plan], np.int64),
                    checkpoint=np.asarray([ckpt_ids[r["ckpt"]] for r in plan], np.int64),
                    guidance=np.asarray([r["w"] for r in plan], np.float32),
                    seed=np.asarray([r["seed"] for r in plan], np.int64),
                    noise_lambda=np.asarray([r.get("lambda", p.noise) for r in plan], np.float32))

    net = None  # the domain classifier (real train images) of the label filter and coverage allocation
    if p.filter_min_confidence is not None or p.allocation == "coverage":
        net = domain_net(params, root)

    def make(plan: list[dict]) -> tuple[dict, list[dict]]:
        if pg:
            pg.pick(plan, labels)
        arrays = render(plan)
        return label_filter(params, arrays, plan, rows, net) if p.filter_min_confidence is not None else (arrays,
                                                                                                           plan)

    arrays, plan = make(plan_variants(labels, rows, p, b.seed, chunk, neighbours, lambdas,
                                      {int(r): first_pass(p) for r in rows}))
    if p.allocation == "coverage":  # the rest of the budget where the first pass left real images uncovered
        counts = coverage_counts(params, arrays, plan, rows, bank, net, root)
        more, plan2 = make(plan_variants(labels, rows, p, b.seed, chunk, neighbours, lambdas, counts,
                                         s0=candidates(p, first_pass(p))))
        plan += plan2
        order = plan_order(plan, rows)
        arrays = {k: np.concatenate([arrays[k], more[k]])[order] for k in arrays if k != "replaced_labels"} | (
            {"replaced_labels": np.concatenate([arrays["replaced_labels"], more["replaced_labels"]])}
            if "replaced_labels" in arrays else {})
        plan = [plan[i] for i in order]
    io.save_npz(out, **(pg.finish(arrays, plan) if pg else arrays))


def domain_net(params: Params, root: str | Path = "."):
    """The domain classifier trained on the real train split (thinair/domain.py, cached by content)."""
    from thinair.domain import domain_classifier
    from thinair.upstream import read_split

    train = read_split("train", root)
    return domain_classifier(train.images, train.labels, len(train.class_names), params.metrics.feature_epochs,
                             params.base.seed, root)


PROVENANCE = "provenance.csv"


def provenance(params: Params, files: list[str], root: str | Path = "."):
    """One row per synthetic image: where it is and everything that made it."""
    import pandas as pd

    p, out, frames = params.sample, paths.stage_dir(STAGE, root), []
    for f in files:
        z = io.load_npz(out / f)
        n = len(z["labels"])
        alpha = np.where(z["partner_index"] >= 0, p.interpolation, 0.0)
        frames.append(pd.DataFrame({
            "file": f, "row": np.arange(n), "label": z["labels"], "source_index": z["source_index"],
            "partner_index": z["partner_index"], "alpha": alpha,
            "lambda": (z["noise_lambda"] if "noise_lambda" in z else p.noise) if p.method == "inversion" else 0.0,
            "method": p.method, "partner": p.partner if p.method == "inversion" else "none",
            "start": "image" if p.start == "image" or p.prompt_mode == "img2img" else "noise",
            "guidance": z["guidance"], "guidance_interval": "all" if p.guidance_interval is None
            else "{:g}-{:g}".format(*p.guidance_interval),
            "checkpoint": z["checkpoint"], "uncond": "empty_prompt" if p.method == "prompts" else p.uncond,
            "scheduler": p.scheduler, "steps": p.steps, "seed": z["seed"]}
            | {k: z[k] for k in ("prompt", "clip_score", "confidence") if k in z}))  # prompts; the label filter
    return pd.concat(frames, ignore_index=True)


def label_filter_summary(params: Params, out: Path, files: list[str], root: str | Path = ".") -> dict:
    """The label filter's accounting for the manifest (and the log): how many of the unfiltered picks each class
    had replaced by a later, label-consistent candidate."""
    p = params.sample
    if p.filter_min_confidence is None:
        return {}
    names = io.read_json(require(paths.stage_dir("ingest", root) / io.MANIFEST, "ingest"))["class_names"]
    replaced = np.concatenate([io.load_npz(out / f)["replaced_labels"] for f in files]) if files else np.zeros(0)
    per_class = {names[int(k)]: int((replaced == k).sum()) for k in np.unique(replaced)}
    log.info("sample: label filter (confidence >= %s) replaced %d image(s): %s", p.filter_min_confidence,
             len(replaced), ", ".join(f"{k} {v}" for k, v in per_class.items()) or "none")
    return {"label_filter": {"min_confidence": p.filter_min_confidence,
                             "candidates_per_image": p.filter_oversample,
                             "replaced": len(replaced), "replaced_per_class": per_class}}


def finish(params: Params, records: list[dict], root: str | Path = ".") -> dict:
    out = paths.stage_dir(STAGE, root)
    files = [r["unit"]["file"] for r in records]
    table = provenance(params, files, root)
    with io.atomic_path(out / PROVENANCE) as tmp:
        table.to_csv(tmp, index=False)
    counts = table.groupby("file", sort=False).size().to_dict()
    clip, written = prompt_sampling.filter_summary(params, out, files)  # the CLIP filter's counts (method prompts)
    clip |= label_filter_summary(params, out, files, root)
    manifest = {"chunks": files, "counts": {f: int(counts.get(f, 0)) for f in files}, "total": len(table),
                "variants_per_embedding": len(params.sample.checkpoints) * len(params.sample.guidance_scales)
                * params.sample.samples_per_setting, "params": params.sample.model_dump(mode="json"),
                "provenance": PROVENANCE} | clip
    clean_dir(out, set(files) | {io.MANIFEST, PROVENANCE} | written)
    io.write_json(out / io.MANIFEST, manifest)
    return manifest


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
    from thinair.stream import SyntheticStream

    draw = Stream(params, seed, root, device)
    return SyntheticStream(draw, draw.size, draw.image_shape, draw.key)
