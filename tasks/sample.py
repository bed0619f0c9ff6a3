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
from thinair.draws import (  # noqa: F401 - load_bank, mean_embeddings and denoise are this stage's API too
    ckpt_key, denoise, geometry, load_bank, mean_embeddings, perturbed_context, pick_partner, render_records,
    unconditional,
)
from thinair.config import Params
from thinair.devices import with_halving
from thinair.generator import generator_for, generator_identity, runtime_key
from thinair.steering import class_contexts, method_inputs, unet_for
from thinair.units import clean_dir
from thinair.upstream import inputs_digest, require, upstream_chunks

STAGE = "sample"
log = logging.getLogger(__name__)


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


def plan_order(plan: list[dict], rows: np.ndarray) -> list[int]:
    """Indices of `plan` in the files' order: setting, then the image's rank among its embedding's (by draw), then
    embedding (the unfiltered uniform plan is already in this order)."""
    pos = {int(r): i for i, r in enumerate(rows)}
    by_group: dict = {}
    for i in sorted(range(len(plan)), key=lambda i: plan[i]["s"]):
        by_group.setdefault((plan[i]["setting"], plan[i]["row"]), []).append(i)
    rank = {i: n for idx in by_group.values() for n, i in enumerate(idx)}
    return sorted(range(len(plan)), key=lambda i: (plan[i]["setting"], rank[i], pos[plan[i]["row"]]))


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


