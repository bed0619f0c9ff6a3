"""sample: partner choice, classifier-free guidance maths, and batch-independent determinism."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from thinair.config import parse_params
from thinair.generator import load_generator
from thinair.tasks.sample import denoise, mean_embeddings, plan_variants
from tests.conftest import tiny_params


def test_partners_share_the_class_and_are_never_self(tiny_generator):
    p = parse_params(tiny_params(tiny_generator, sample={"samples_per_setting": 3, "guidance_scales": [2, 3]})).sample
    labels = np.array([0, 0, 0, 1, 1, 2])
    plan = plan_variants(labels, np.arange(6), p, seed=0, chunk=0)
    assert len(plan) == 2 * 2 * 3 * 6  # checkpoints x guidance x samples x embeddings
    for r in plan:
        if labels[r["row"]] == 2:
            assert r["partner"] == -1  # a class of one has no partner: noise only
        else:
            assert r["partner"] != r["row"] and labels[r["partner"]] == labels[r["row"]]
    assert plan == plan_variants(labels, np.arange(6), p, seed=0, chunk=0)
    assert plan != plan_variants(labels, np.arange(6), p, seed=1, chunk=0)


def test_guidance_one_equals_conditional_only(tiny_generator):
    g = load_generator(str(tiny_generator))
    torch.manual_seed(0)
    lat, cond, unc = torch.randn(3, 4, 4, 4), torch.randn(3, 2, 8), torch.randn(3, 2, 8)
    a = denoise(g.unet, g.scheduler("ddim"), lat, cond, unc, torch.ones(3), 3)
    b = denoise(g.unet, g.scheduler("ddim"), lat, cond, cond, torch.full((3,), 5.0), 3)
    c = denoise(g.unet, g.scheduler("ddim"), lat, cond, unc, torch.full((3,), 5.0), 3)
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-3)


def test_results_do_not_depend_on_batch_size(tiny_generator, tmp_path):
    from tests.test_pipeline import run_all
    from thinair import io

    outs = []
    for bs in (16, 7):
        p = parse_params(tiny_params(tiny_generator, sample={"batch_size": bs}))
        run_all(p, tmp_path / str(bs))
        outs.append(io.load_npz(tmp_path / str(bs) / "data" / "sample" / "train-00000.npz")["images"].astype(int))
    assert np.abs(outs[0] - outs[1]).max() <= 1 and np.mean(outs[0] != outs[1]) < 0.01


def test_unconditional_context_scopes():
    emb = torch.arange(4.0).view(4, 1, 1).expand(4, 2, 3).clone()  # rows 0..3
    labels, chunks = torch.tensor([0, 1, 0, 1]), torch.tensor([0, 0, 1, 1])
    assert torch.all(mean_embeddings(emb, labels, chunks, "dataset") == 1.5)
    assert mean_embeddings(emb, labels, chunks, "class")[:, 0, 0].tolist() == [1.0, 2.0, 1.0, 2.0]
    assert mean_embeddings(emb, labels, chunks, "chunk")[:, 0, 0].tolist() == [0.5, 0.5, 2.5, 2.5]


@pytest.mark.parametrize("name", ["ddim", "pndm", "ddpm", "dpmsolver++", "unipc", "euler"])
def test_every_scheduler_samples(tiny_generator, name):
    g = load_generator(str(tiny_generator))
    lat = denoise(g.unet, g.scheduler(name), torch.randn(2, 4, 4, 4), torch.randn(2, 2, 8), torch.zeros(2, 2, 8),
                  torch.full((2,), 2.0), 4)
    assert lat.shape == (2, 4, 4, 4) and torch.isfinite(lat).all()
