"""Every fast path (its param in brackets) gives the plain path's result within float tolerance, on CPU."""
from __future__ import annotations

import shutil

import pytest
import torch

from thinair.generator import apply_fast_paths, load_generator


@pytest.fixture
def gen(tiny_generator):
    return load_generator(str(tiny_generator))


def _inputs(gen, n=6, tokens=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(n, 4, 4, 4, generator=g)
    ctx = torch.randn(n, tokens, gen.cross_attention_dim, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    return lat, t, ctx


@torch.no_grad()
def test_sdpa_attention_equals_math_attention(gen):  # [base.attention]
    lat, t, ctx = _inputs(gen)
    fast = apply_fast_paths(gen, attention="sdpa").unet(lat, t, encoder_hidden_states=ctx).sample
    plain = apply_fast_paths(gen, attention="math").unet(lat, t, encoder_hidden_states=ctx).sample
    assert torch.allclose(fast, plain, atol=1e-5)
    x = torch.randn(2, 3, 16, 16)
    vae_fast = apply_fast_paths(gen, attention="sdpa").vae.decode(gen.vae.encode(x).latent_dist.mean).sample
    vae_plain = apply_fast_paths(gen, attention="math").vae.decode(gen.vae.encode(x).latent_dist.mean).sample
    assert torch.allclose(vae_fast, vae_plain, atol=1e-5)


@torch.no_grad()
def test_channels_last_equals_contiguous(gen):  # [base.channels_last]
    lat, t, ctx = _inputs(gen)
    plain = gen.unet(lat, t, encoder_hidden_states=ctx).sample
    fast = apply_fast_paths(gen, channels_last=True).unet(lat.to(memory_format=torch.channels_last), t,
                                                          encoder_hidden_states=ctx).sample
    assert torch.allclose(fast, plain, atol=1e-5)


def test_batched_guidance_equals_two_calls(gen):  # [sample.batched_guidance]
    from thinair.tasks.sample import denoise

    lat, _, cond = _inputs(gen, n=4)
    uncond = cond.mean(0, keepdim=True).expand_as(cond)
    w = torch.full((4,), 2.0)
    one = denoise(gen.unet, gen.scheduler("dpmsolver++"), lat, cond, uncond, w, steps=5, batched=True)
    two = denoise(gen.unet, gen.scheduler("dpmsolver++"), lat, cond, uncond, w, steps=5, batched=False)
    assert torch.allclose(one, two, atol=1e-5)


@torch.no_grad()
def test_batched_vae_decode_equals_one_by_one(gen):  # [sample.batch_size]
    z = torch.randn(5, 4, 4, 4)
    batched = gen.vae.decode(z).sample
    single = torch.cat([gen.vae.decode(z[i:i + 1]).sample for i in range(5)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_batched_inversion_step_equals_per_image_gradients(gen):  # [invert.batch_size]
    """One step over B embeddings gives each embedding the gradient it gets alone (scaled by 1/B)."""
    from thinair.tasks.invert import embedding_grads

    lat, t, ctx = _inputs(gen, n=4)
    noise = torch.randn_like(lat)
    batched = embedding_grads(gen.unet, lat, noise, t, ctx)
    single = torch.cat([embedding_grads(gen.unet, lat[i:i + 1], noise[i:i + 1], t[i:i + 1], ctx[i:i + 1]) / 4
                        for i in range(4)])
    assert torch.allclose(batched, single, atol=1e-6)


def test_frozen_weight_backward_gives_the_same_embedding_gradient(gen):  # always on: weights never get grads
    from thinair.tasks.invert import embedding_grads

    lat, t, ctx = _inputs(gen, n=3)
    noise = torch.randn_like(lat)
    frozen = embedding_grads(gen.unet, lat, noise, t, ctx)
    assert all(p.grad is None and not p.requires_grad for p in gen.unet.parameters())
    gen.unet.requires_grad_(True)
    try:
        full = embedding_grads(gen.unet, lat, noise, t, ctx)
        assert any(p.grad is not None for p in gen.unet.parameters())
    finally:
        gen.unet.requires_grad_(False)
        gen.unet.zero_grad(set_to_none=True)
    assert torch.allclose(frozen, full, atol=1e-7)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler")
@torch.no_grad()
def test_compiled_unet_equals_eager(tiny_generator):  # [base.compile]
    gen = load_generator(str(tiny_generator))
    lat, t, ctx = _inputs(gen)
    plain = gen.unet(lat, t, encoder_hidden_states=ctx).sample
    fast = apply_fast_paths(load_generator(str(tiny_generator)), compile=True).unet(
        lat, t, encoder_hidden_states=ctx).sample
    assert torch.allclose(fast, plain, atol=1e-4)
