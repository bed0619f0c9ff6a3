"""The beyond-paper sampling options (issue 17): partner choice, adaptive noise, the label-consistency filter and
img2img from the image's own latent (thinair/variants.py, tasks/sample.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from thinair.tasks.sample import load_bank, plan_variants

from tests.conftest import tiny_params
from tests.stages import run_all
from thinair import io, variants
from thinair.config import parse_params
from thinair.diffusion import reconstruct
from thinair.generator import load_generator
from thinair.upstream import read_split

# three same-class points on a line and one of another class: 0 --1-- 1 ----3---- 2 ; 3 far away
POINTS = torch.tensor([[0.0], [1.0], [4.0], [100.0]])
LABELS = np.array([0, 0, 0, 1])


def test_partner_kinds():
    nb = variants.class_neighbours(POINTS, LABELS, range(4))
    assert nb[0][0].tolist() == [1, 2] and nb[2][0].tolist() == [1, 0] and nb[3][0].tolist() == []
    rng = np.random.default_rng(0)
    assert variants.choose_partner("nearest", nb[2][0], 1, rng) == 1
    assert {variants.choose_partner("knn", nb[0][0], 1, rng) for _ in range(20)} == {1}
    assert {variants.choose_partner("knn", nb[0][0], 2, rng) for _ in range(50)} == {1, 2}
    assert variants.choose_partner("random", nb[3][0], 2, rng) == -1  # a class of one has no partner
    # random is the paper's draw: the same rng call on the same ascending mates, whatever the distance order
    a, b = np.random.default_rng(7), np.random.default_rng(7)
    assert variants.choose_partner("random", nb[2][0], 3, a) == int(b.choice(np.array([0, 1])))


def test_paper_settings_plan_is_unchanged_by_the_options_code(tiny_generator):
    """partner random + fixed lambda draw exactly what the code drew before the options existed (same rng calls)."""
    p = parse_params(tiny_params(tiny_generator, sample={"samples_per_setting": 3})).sample
    labels = np.array([0, 0, 0, 1, 1, 2])
    plan = plan_variants(labels, np.arange(6), p, seed=0, chunk=0)
    for r in plan:
        ci, wi = r["setting"]
        rng = np.random.default_rng(io.seed_for(0, "sample", 0, r["row"], ci, wi, r["s"]))
        mates = np.flatnonzero(labels == labels[r["row"]])
        mates = mates[mates != r["row"]]
        assert r["partner"] == (int(rng.choice(mates)) if len(mates) else -1) and r["lambda"] == p.noise


def test_adaptive_lambda_grows_with_isolation():
    pts = torch.tensor([[0.0], [1.0], [2.0], [3.0], [30.0]])
    lam = variants.adaptive_lambdas(pts, np.zeros(5, int), 0.1, 1)
    assert lam[4] > lam[2] and lam[4] == pytest.approx(0.1 * variants.NOISE_CLIP)  # isolated, clipped at 4x
    assert lam.min() >= 0.1 / variants.NOISE_CLIP and np.median(lam) == pytest.approx(0.1)
    assert np.all(variants.adaptive_lambdas(pts, np.arange(5), 0.1, 1) == 0.1)  # no mates anywhere: fixed lambda


def test_the_filter_keeps_the_count_and_prefers_consistent_images():
    # two groups of 3 candidates, keep 2 each; labels 0; probs of class 0 per candidate
    groups, order = np.array([0, 0, 0, 1, 1, 1]), np.array([0, 1, 2, 0, 1, 2])
    p0 = np.array([0.9, 0.2, 0.8, 0.1, 0.3, 0.05])
    probs = np.stack([p0, 1 - p0], 1)
    kept = variants.select_consistent(groups, order, np.zeros(6, int), probs, 2, 0.5)
    assert kept.tolist() == [0, 2, 3, 4]  # group 0: the two consistent ones; group 1: none passes -> most confident
    assert variants.select_consistent(groups, order, np.zeros(6, int), probs, 2, 0.0).tolist() == [0, 2, 3, 4]
    assert variants.select_consistent(groups, order, np.ones(6, int), probs, 2, 0.5).tolist() == [1, 2, 3, 4]  # all pass: draw order


def test_coverage_finds_the_uncovered_and_spends_the_rest_there():
    real = np.array([[0.0], [1.0], [2.0], [10.0], [11.0]])  # k=1 radii: 1, 1, 1, 1, 1
    fake = np.array([[0.5], [1.9]])
    assert variants.uncovered(real, np.arange(5), fake, 1).tolist() == [False, False, False, True, True]
    assert variants.uncovered(real, np.array([3]), np.zeros((0, 1)), 1).tolist() == [True]
    assert variants.allocate(5, np.array([False, True, False, True])).tolist() == [0, 3, 0, 2]
    assert variants.allocate(6, np.zeros(3, bool)).tolist() == [2, 2, 2]  # all covered: uniform


@pytest.mark.parametrize("bad, says", [
    ({"method": "class_tokens", "partner": "knn"}, "sample.partner is used only by sample.method: inversion"),
    ({"method": "class_tokens", "noise_schedule": "adaptive"}, "sample.noise_schedule is used only"),
    ({"method": "prompts", "start": "image"}, "sample.prompt_mode: img2img"),
    ({"start": "image", "steps": 2, "strength": 0.2}, "runs no denoising step"),
    ({"allocation": "coverage", "samples_per_setting": 1}, "samples_per_setting >= 2"),
    ({"filter_min_confidence": 1.5}, "filter_min_confidence"),
    ({"partner": "closest"}, "partner"),
])
def test_bad_option_values_name_the_param(tiny_generator, bad, says):
    with pytest.raises((ValidationError, ValueError), match=says):
        parse_params(tiny_params(tiny_generator, sample=bad))


def _sample(tmp_path, gen, name, stages=("sample",), **sample):
    raw = tiny_params(gen, sample={"samples_per_setting": 2, "checkpoints": ["final"]} | sample,
                      ingest={"per_class_limit": 2}, encode={"fit_check": "off"}, metrics={"feature_epochs": 1, "features": "domain"})
    run_all(parse_params(raw), tmp_path, stages)
    d = tmp_path / "data" / "sample"
    z = [io.load_npz(d / f) for f in io.read_json(d / io.MANIFEST)["chunks"]]
    return {k: np.concatenate([x[k] for x in z]) for k in z[0]}, io.read_json(d / io.MANIFEST)


def test_every_option_end_to_end(tiny_generator, tmp_path):
    ws = tmp_path / "ws"
    paper, _ = _sample(ws, tiny_generator, "paper", stages=("ingest", "encode", "invert", "sample"))
    # nearest partner: every partner is the image's closest class mate in the (projected) bank
    near, _ = _sample(ws, tiny_generator, "near", partner="nearest", noise_schedule="adaptive")
    assert len(near["images"]) == len(paper["images"]) and np.all(near["partner_index"] >= 0)
    bank = load_bank(ws, ["final"])
    nb = variants.class_neighbours(variants.project(bank["final"]), bank["labels"].numpy(), range(len(bank["index"])))
    row_of = {int(i): r for r, i in enumerate(bank["index"].tolist())}
    expected = [int(bank["index"][nb[row_of[int(i)]][0][0]]) for i in near["source_index"]]
    assert near["partner_index"].tolist() == expected
    assert near["noise_lambda"].std() > 0 and np.all(paper["noise_lambda"] == np.float32(0.1))
    # the filter: same count, a confidence per image, replaced ones accounted per class
    filt, manifest = _sample(ws, tiny_generator, "filter", filter_min_confidence=0.5)
    assert len(filt["images"]) == len(paper["images"])
    assert filt["confidence"].shape == filt["labels"].shape
    lf = manifest["label_filter"]
    assert lf["candidates_per_image"] == 2.0 and lf["replaced"] == sum(lf["replaced_per_class"].values())
    assert np.bincount(filt["source_index"]).tolist() == np.bincount(paper["source_index"]).tolist()
    # coverage allocation: the same total, the second half of the budget on the embeddings left uncovered
    cov, _ = _sample(ws, tiny_generator, "coverage", allocation="coverage", samples_per_setting=4)
    per_image = np.bincount(cov["source_index"])
    assert per_image.sum() == 2 * len(paper["images"]) and per_image.min() >= 2  # the uniform first pass: 2 each
    first = {int(x): i for i, x in enumerate(cov["seed"])}  # the first pass draws the paper's images exactly
    assert all(np.array_equal(cov["images"][first[int(x)]], paper["images"][i]) for i, x in enumerate(paper["seed"]))
    # start image at a small strength stays near the real image as the generator sees it (its VAE round trip)
    real = read_split("train", ws)
    img, _ = _sample(ws, tiny_generator, "img", start="image", strength=0.5, noise=0.0, interpolation=0.0)
    g = load_generator(str(tiny_generator))
    src = reconstruct(g.vae, real.images, 16, "bicubic", 64, "cpu")[img["source_index"]].astype(float)
    err_img = np.abs(img["images"].astype(float) - src).mean()
    err_noise = np.abs(paper["images"].astype(float) - src).mean()
    assert err_img < 0.5 * err_noise, (err_img, err_noise)
