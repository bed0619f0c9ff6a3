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


def _with_text_encoder(tiny_generator, dst):
    """Copy the tiny generator and add a tiny random CLIP text encoder + a minimal real tokenizer."""
    import json
    import shutil

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    shutil.copytree(tiny_generator, dst)
    (dst / "tokenizer").mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "digit</w>": 3}
    (dst / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (dst / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(dst / "tokenizer" / "vocab.json"), str(dst / "tokenizer" / "merges.txt")).save_pretrained(
        str(dst / "tokenizer"))
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=4, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, max_position_embeddings=77, bos_token_id=0,
                                 eos_token_id=1, pad_token_id=1)).save_pretrained(str(dst / "text_encoder"))
    return dst


def test_empty_prompt_unconditional_ablation(tiny_generator, tmp_path):
    from tests.stages import run_all
    from thinair import io
    from thinair.generator import encode_prompts

    gen = _with_text_encoder(tiny_generator, tmp_path / "gen")
    assert encode_prompts(str(gen), None, [""]).shape == (1, 77, 8)
    p = parse_params(tiny_params(gen, sample={"uncond": "empty_prompt"}))
    run_all(p, tmp_path / "proj", ("ingest", "encode", "invert", "sample"))
    z = io.load_npz(tmp_path / "proj" / "data" / "sample" / "train-00000.npz")
    ref = parse_params(tiny_params(gen))
    run_all(ref, tmp_path / "ref", ("ingest", "encode", "invert", "sample"))
    z_ref = io.load_npz(tmp_path / "ref" / "data" / "sample" / "train-00000.npz")
    assert z["images"].shape == z_ref["images"].shape and not np.array_equal(z["images"], z_ref["images"])


def test_empty_prompt_without_text_encoder_is_a_clear_error(tiny_generator):
    from thinair.generator import GeneratorUnavailable, encode_prompts

    with pytest.raises(GeneratorUnavailable, match="has no text_encoder/ and tokenizer/"):
        encode_prompts(str(tiny_generator), None, [""])


def test_different_token_counts_take_two_unet_calls(tiny_generator):
    g = load_generator(str(tiny_generator))
    lat, cond = torch.randn(2, 4, 4, 4), torch.randn(2, 2, 8)
    long_uncond = torch.randn(2, 7, 8)
    out = denoise(g.unet, g.scheduler("ddim"), lat, cond, long_uncond, torch.full((2,), 2.0), 3)
    assert out.shape == lat.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("size", [24, 48])  # down from the generator's 32 px, and up
def test_synthetic_images_are_resized_with_the_named_filter_like_pil(size):
    """Issue 15 point 4: the reference brings synthetic images to the dataset size with PIL bicubic; a box filter
    (the former downsampling) differs from it by several levels, the named filter by at most one."""
    from PIL import Image

    from thinair.images import to_uint8

    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    img = np.array(Image.fromarray(img).resize((8, 8), Image.BILINEAR).resize((32, 32), Image.BICUBIC))  # smooth
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 127.5 - 1
    pil = np.asarray(Image.fromarray(img).resize((size, size), Image.BICUBIC)).astype(int)
    ours = to_uint8(x, size, 3, "bicubic")[0].astype(int)
    assert np.abs(ours - pil).max() <= 2 and np.abs(ours - pil).mean() < 0.5
    nearest = to_uint8(x, size, 3, "nearest")[0].astype(int)
    assert np.abs(nearest - pil).mean() > 1  # the filter really is the one named
    if size < 32:
        box = torch.nn.functional.interpolate(x, size=(size, size), mode="area")
        box = ((box.clamp(-1, 1) + 1) * 127.5).round()[0].permute(1, 2, 0).numpy().astype(int)
        assert np.abs(box - pil).max() > 2


def test_guidance_interval_guides_only_its_noise_levels_with_fewer_unet_evaluations(tiny_generator):
    """sample.guidance_interval (issue 19): [0, 1] is the plain sampler bit for bit; an interval that holds no step
    is the conditional prediction alone (guidance 1); a middle interval lies between, and the UNet sees exactly
    unet_evaluations() images per sampled image (two per guided step, one per other)."""
    from thinair.diffusion import unet_evaluations

    g = load_generator(str(tiny_generator))
    torch.manual_seed(0)
    lat, cond, unc, w = torch.randn(3, 4, 4, 4), torch.randn(3, 2, 8), torch.randn(3, 2, 8), torch.full((3,), 4.0)
    seen = []
    hook = g.unet.register_forward_pre_hook(lambda m, args: seen.append(len(args[0])))
    try:
        run = {iv: denoise(g.unet, g.scheduler("dpmsolver++"), lat, cond, unc, w, 6, interval=iv)
               for iv in (None, (0.0, 1.0), (0.0, 0.05), (0.3, 0.7))}
    finally:
        hook.remove()
    assert torch.equal(run[None], run[(0.0, 1.0)])
    cond_only = denoise(g.unet, g.scheduler("dpmsolver++"), lat, cond, unc, torch.ones(3), 6)
    assert torch.allclose(run[(0.0, 0.05)], cond_only, atol=1e-5)
    assert not torch.allclose(run[(0.3, 0.7)], run[None], atol=1e-4)
    assert not torch.allclose(run[(0.3, 0.7)], cond_only, atol=1e-4)
    per_run = [sum(seen[i * 6:(i + 1) * 6]) for i in range(4)]  # images through the UNet, 6 steps per run
    evals = [unet_evaluations(g.scheduler("dpmsolver++"), 6, iv) for iv in (None, (0.0, 1.0), (0.0, 0.05), (0.3, 0.7))]
    assert per_run == [3 * e for e in evals] and evals[0] == 12 and evals[2] == 6 and 6 < evals[3] < 12


@pytest.mark.parametrize("bad", [[0.8, 0.2], [0.0, 1.5], [-0.1, 0.5]])
def test_bad_guidance_interval_names_the_param(tiny_generator, bad):
    from thinair.errors import ParamsError

    with pytest.raises(ParamsError, match=r"sample.guidance_interval.*0 <= lo < hi <= 1"):
        parse_params(tiny_params(tiny_generator, sample={"guidance_interval": bad}))
