"""`encode`: VAE-encode the train images at the generation resolution, keeping the posterior.

Reads ``data/ingest`` (train split) and the generator's VAE. Writes
``data/encode/train-NNNNN.safetensors`` per chunk of ``base.chunk_size`` images (keys ``mean`` and
``logvar`` of the diagonal Gaussian posterior, (n, 4, h, w) float32, so inversion re-samples a latent
every step; ``labels`` and ``index`` (n,) int64; the generator's identity, VAE scaling factor and downsampling factor
in its metadata), ``data/encode/fit.json`` (the generator-fit check, unless ``encode.fit_check: off``) and
``data/encode/manifest.json`` (written last). Units are the fit check (first: it trains a classifier, the longest
unit) and the chunks, each cached by content (thinair/units.py); the flow's own process never loads the generator.

The fit check asks whether the generator can represent this dataset at all, before hours of inversion: its
autoencoder reconstructs the real test images (at most ``FIT_IMAGES``, a seeded draw) and the domain classifier
(thinair/domain.py, trained on the real train split) labels originals and reconstructions. A generator for another
domain (the embedded digits generator on photographs) turns every image into its own domain and the accuracy on
reconstructions falls toward chance. Below ``encode.fit_min_ratio`` of the originals' accuracy the check warns (log,
``fit.json``, the report's first line, a Prefect artifact) or, with ``encode.fit_check: fail``, stops the stage.
"""
from __future__ import annotations

from pathlib import Path

import logging

import numpy as np
import torch

from thinair import io, paths
from thinair.config import Params
from thinair.devices import current_device, with_halving
from thinair.diffusion import check_resolution, encode_images, reconstruct
from thinair.domain import accuracy, domain_classifier
from thinair.errors import GeneratorMisfit
from thinair.generator import generator_for, generator_identity, runtime_key
from thinair.units import clean_dir
from thinair.upstream import chunk_ranges, inputs_digest, memoized, read_split

STAGE = "encode"
FIT = "fit.json"
FIT_IMAGES = 2000  # test images the fit check reconstructs at most (a seeded draw)
CONCLUSIVE_MARGIN = 0.25  # the domain classifier must beat chance by this share of the way to 100 % to judge
log = logging.getLogger(__name__)

def _train(root: str | Path):
    """The train split, read once per process (every chunk's key and compute need it)."""
    return memoized("train", root, ("ingest",), lambda: read_split("train", root))


def units(params: Params, root: str | Path = ".") -> list[dict]:
    """The fit check (unless ``encode.fit_check: off``), then one unit per chunk of ``base.chunk_size`` train
    images."""
    ranges = chunk_ranges(len(_train(root).labels), params.base.chunk_size)
    fit = [{"name": "fit-check", "fit": True, "file": FIT}] if params.encode.fit_check != "off" else []
    return fit + [{"name": f"chunk-{i:03d}", "chunk": i, "start": s, "end": e,
                   "file": paths.chunk_name("train", i, "safetensors")} for i, (s, e) in enumerate(ranges)]


def key(params: Params, unit: dict, root: str | Path = ".") -> list:
    """Everything that determines one chunk's latents besides code: generator, resolution, resize, its images. The
    fit check: the generator, seed, resolution, encode and classifier params, and the ingested data."""
    b, p = params.base, params.encode
    if unit.get("fit"):
        return ["fit", generator_identity(b), runtime_key(b), b.generator, b.seed, b.gen_resolution,
                p.model_dump(mode="json"), params.metrics.feature_epochs, inputs_digest(root, "ingest")]
    return [generator_identity(b), runtime_key(b), b.gen_resolution, p.interpolation,
            _train(root).images[unit["start"]:unit["end"]]]


def compute(params: Params, unit: dict, out: Path, root: str | Path = ".", device=None) -> None:
    b, p = params.base, params.encode
    if unit.get("fit"):
        io.write_json(out, fit_check(params, root, device))
        return
    train, s, e = _train(root), unit["start"], unit["end"]
    gen_model, device = generator_for(b, unit["chunk"], device)
    check_resolution(b.gen_resolution, gen_model.vae_factor)
    post = with_halving(p.batch_size, lambda bs: encode_images(gen_model.vae, train.images[s:e], b.gen_resolution,
                                                               p.interpolation, bs, device),
                        f"encode chunk {unit['chunk']}")
    io.save_tensors(out, post | {"labels": torch.from_numpy(train.labels[s:e]),
                                 "index": torch.arange(s, e, dtype=torch.int64)},
                    metadata={"generator": gen_model.identity, "scaling_factor": gen_model.scaling_factor,
                              "vae_factor": gen_model.vae_factor})


def fit_check(params: Params, root: str | Path = ".", device=None) -> dict:
    """How much of the real test images the generator's autoencoder keeps: pixel error, and the domain
    classifier's accuracy on reconstructions vs originals. Returns the record written to fit.json."""
    b, p = params.base, params.encode
    train, test = _train(root), read_split("test", root)
    rows = np.arange(len(test.labels))
    if len(rows) > FIT_IMAGES:
        rows = np.sort(np.random.default_rng(io.seed_for(b.seed, STAGE, "fit")).choice(rows, FIT_IMAGES, replace=False))
    images, labels = test.images[rows], test.labels[rows]
    gen_model, device = generator_for(b, device=device if device is not None else current_device(b))
    rec = reconstruct(gen_model.vae, images, b.gen_resolution, p.interpolation, p.batch_size, device)
    net = domain_classifier(train.images, train.labels, len(train.class_names), params.metrics.feature_epochs,
                            b.seed, root)
    err = np.abs(rec.astype(np.float64) - images.astype(np.float64)) / 255.0
    mse = float((err ** 2).mean())
    acc_orig, acc_rec = accuracy(net, images, labels), accuracy(net, rec, labels)
    ratio = acc_rec / acc_orig if acc_orig > 0 else 0.0
    chance = 1.0 / len(train.class_names)
    # a classifier barely above chance on the originals cannot tell what the autoencoder lost: no verdict
    conclusive = acc_orig >= chance + CONCLUSIVE_MARGIN * (1 - chance)
    fit = {"ok": ratio >= p.fit_min_ratio or not conclusive, "conclusive": conclusive, "images": int(len(rows)), "accuracy_originals": acc_orig,
           "accuracy_reconstructions": acc_rec, "ratio": ratio, "min_ratio": p.fit_min_ratio,
           "chance": chance, "mean_abs_error": float(err.mean()),
           "psnr_db": float(10 * np.log10(1.0 / max(mse, 1e-12))), "generator": gen_model.identity,
           "dataset": io.read_json(paths.stage_dir("ingest", root) / io.MANIFEST)["dataset"]}
    fit["message"] = None if fit["ok"] else misfit_message(fit, b.generator)
    if not conclusive:
        fit["message"] = (f"inconclusive: the domain classifier labels only {100 * acc_orig:.1f} % of real test images "
                          f"right (chance {100 * chance:.1f} %) after training on {len(train.labels)} images, too "
                          "few to judge what the generator's autoencoder loses; pixel error "
                          f"{100 * fit['mean_abs_error']:.1f} %, PSNR {fit['psnr_db']:.1f} dB")
        log.warning("generator-fit check %s", fit["message"])
    return fit


def misfit_message(fit: dict, generator: str) -> str:
    return (f"the generator {generator!r} cannot represent this dataset ({fit['dataset']}): a classifier trained on "
            f"the real train images labels {100 * fit['accuracy_originals']:.1f} % of real test images right but only "
            f"{100 * fit['accuracy_reconstructions']:.1f} % of the same images after the generator's autoencoder "
            f"(ratio {fit['ratio']:.2f} < encode.fit_min_ratio {fit['min_ratio']}; chance is "
            f"{100 * fit['chance']:.1f} %; pixel error {100 * fit['mean_abs_error']:.1f} %, PSNR "
            f"{fit['psnr_db']:.1f} dB). Synthetic data from it would not look like this dataset. Fix: pretrain a "
            f"generator on images of this domain (`thinair pretrain -S pretrain.dataset={fit['dataset']} -S "
            "pretrain.output=generators/mine`, then base.generator: generators/mine) or use a real Stable Diffusion "
            "(base.generator: CompVis/stable-diffusion-v1-4).")


def finish(params: Params, records: list[dict], root: str | Path = ".") -> dict:
    """The manifest (the VAE's facts from the first chunk's metadata: this process loads no generator); stops on a
    failed fit check when ``encode.fit_check: fail``."""
    out = paths.stage_dir(STAGE, root)
    chunks = [{k: r["unit"][k] for k in ("file", "start", "end")} for r in records if "chunk" in r["unit"]]
    vae = io.load_metadata(out / chunks[0]["file"])
    manifest = {"generator": vae["generator"], "scaling_factor": vae["scaling_factor"],
                "vae_factor": vae["vae_factor"], "resolution": params.base.gen_resolution, "chunks": chunks}
    written = {c["file"] for c in chunks} | {io.MANIFEST}
    fit = None
    if params.encode.fit_check != "off":
        fit = io.read_json(out / FIT)
        written.add(FIT)
        manifest["fit"] = {k: fit[k] for k in ("ok", "ratio", "accuracy_originals", "accuracy_reconstructions")}
    clean_dir(out, written)
    io.write_json(out / io.MANIFEST, manifest)
    if fit is not None and not fit["ok"]:
        if params.encode.fit_check == "fail":
            raise GeneratorMisfit(fit["message"] + " (encode.fit_check: fail stopped the run before invert; set it "
                                  "to warn to go on anyway)")
        log.warning("GENERATOR-FIT CHECK FAILED: %s", fit["message"])
    return manifest
