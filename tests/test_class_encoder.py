"""Class-encoder adaptation on a tiny in-process UNet: encoder training, pretrained fine-tuning, resume, sampling."""
from __future__ import annotations

import copy
import io as pyio

import numpy as np
import pytest
import torch

from thinair.class_encoder import (ClassEncoder, draw_batch, finetune_unet, generate, load_encoder, noise_loss,
                              save_encoder, train_encoder)
from thinair.generator import build_unet, build_vae, sd_scheduler_config

TOKENS, DIM = 2, 16


@pytest.fixture(scope="module")
def pretrained():
    torch.manual_seed(0)  # build_unet draws its init from the global RNG; stands in for a pretrained UNet
    return build_unet(sample_size=4, channels=[16, 32], cross_attention_dim=DIM).requires_grad_(False)


@pytest.fixture(scope="module")
def sched():
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(sd_scheduler_config())


@pytest.fixture(scope="module")
def data():
    """Two classes of 4x4x4 latents: a fixed pattern and its negative, plus a little noise."""
    g = torch.Generator().manual_seed(1)
    pattern = torch.randn(4, 4, 4, generator=g)
    labels = torch.arange(16) % 2
    latents = torch.where(labels.view(-1, 1, 1, 1) == 0, pattern, -pattern) + 0.1 * torch.randn(16, 4, 4, 4,
                                                                                                generator=g)
    return latents, labels


def _encoder(seed=0, classes=2):
    return ClassEncoder(classes, TOKENS, DIM, hidden=32, generator=torch.Generator().manual_seed(seed))


TRAIN = dict(steps=6, batch_size=8, lr=1e-2, weight_decay=0.004, label_dropout=0.2, grad_clip=10.0)


def test_encoder_contexts_and_unconditional_index():
    enc = _encoder()
    ctx = enc.encode(torch.tensor([0, 1, -1]))
    assert ctx.shape == (3, TOKENS, DIM)
    assert not torch.equal(ctx[2], ctx[0]) and not torch.equal(ctx[2], ctx[1])
    assert torch.equal(_encoder().encode(torch.tensor([0, 1, -1])), ctx)  # seeded init
    assert not torch.allclose(_encoder(seed=1).encode(torch.tensor([0, 1, -1])), ctx)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\) or -1"):
        enc.encode([2])
    with pytest.raises(ValueError, match="-1"):
        enc.encode([-2])


def test_save_and_load_encoder(tmp_path):
    enc = _encoder(classes=3)
    save_encoder(tmp_path / "enc.safetensors", enc, {"step": 5})
    back = load_encoder(tmp_path / "enc.safetensors")
    assert back.config() == enc.config()
    assert torch.equal(back.encode([0, 2, -1]), enc.encode([0, 2, -1]))


def _fixed_eval_loss(unet, sched, data, enc):
    latents, labels = data
    g = torch.Generator().manual_seed(123)
    losses = []
    for _ in range(4):
        z0, noise, t, lab = draw_batch(latents, labels, 16, 0.0, 1000, g)
        with torch.no_grad():
            losses.append(noise_loss(unet, sched, z0, noise, t, enc(lab)).item())
    return float(np.mean(losses))


def test_train_encoder_lowers_the_loss_and_leaves_the_unet_frozen(pretrained, sched, data):
    unet = copy.deepcopy(pretrained)
    with torch.no_grad():  # a louder output head: much of its error is removable through the context alone
        unet.conv_out.weight.mul_(4)
        unet.conv_out.bias.mul_(4)
    unet.requires_grad_(True)  # the flags must come back as the caller set them
    before_w = copy.deepcopy(unet.state_dict())
    enc = _encoder()
    before = _fixed_eval_loss(unet, sched, data, enc)
    losses = train_encoder(unet, sched, *data, enc, **(TRAIN | {"steps": 40, "lr": 3e-2}),
                           generator=torch.Generator().manual_seed(0))
    after = _fixed_eval_loss(unet, sched, data, enc)
    assert len(losses) == 40 and after < 0.8 * before, (before, after)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert all(p.grad is None for p in unet.parameters())
    assert all(p.requires_grad for p in unet.parameters())
    assert all(torch.equal(v, unet.state_dict()[k]) for k, v in before_w.items())


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(pretrained, sched, data):
    saved = {}

    def keep(step, state):  # through bytes, as a checkpoint file would go
        buf = pyio.BytesIO()
        torch.save(state, buf)
        saved[step] = buf.getvalue()

    enc_a = _encoder()
    losses_a = train_encoder(pretrained, sched, *data, enc_a, **TRAIN, generator=torch.Generator().manual_seed(4),
                             on_checkpoint=keep, checkpoint_every=2)
    assert sorted(saved) == [2, 4, 6]
    state = torch.load(pyio.BytesIO(saved[4]), weights_only=True)
    enc_b = _encoder(seed=99)  # whatever it starts from, the state overrides it
    losses_b = train_encoder(pretrained, sched, *data, enc_b, **TRAIN, generator=torch.Generator().manual_seed(77),
                             state=state)
    assert losses_b == losses_a
    for (k, va), vb in zip(enc_a.state_dict().items(), enc_b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_immiscible_option_changes_the_noise_pairing(pretrained, sched, data):
    latents, labels = data
    z_off, n_off, t_off, l_off = draw_batch(latents, labels, 16, 0.2, 1000, torch.Generator().manual_seed(2))
    z_im, n_im, t_im, l_im = draw_batch(latents, labels, 16, 0.2, 1000, torch.Generator().manual_seed(2), "assign")
    assert torch.equal(z_off, z_im) and torch.equal(t_off, t_im) and torch.equal(l_off, l_im)
    assert not torch.equal(n_off, n_im)
    assert sorted(map(tuple, n_im.flatten(1).tolist())) == sorted(map(tuple, n_off.flatten(1).tolist()))
    dist = lambda n: (z_off - n).flatten(1).norm(dim=1).sum()  # noqa: E731
    assert dist(n_im) < dist(n_off)
    off = train_encoder(pretrained, sched, *data, _encoder(), **TRAIN, generator=torch.Generator().manual_seed(3))
    im = train_encoder(pretrained, sched, *data, _encoder(), **TRAIN, generator=torch.Generator().manual_seed(3),
                       immiscible="knn")
    assert off != im


FT = dict(steps=3, batch_size=8, lr=1e-3, label_dropout=0.2)


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_finetune_starts_from_the_pretrained_unet(pretrained, sched, data, mode):
    enc = _encoder()
    g = torch.Generator().manual_seed(5)
    z0, noise, t, lab = draw_batch(*data, FT["batch_size"], FT["label_dropout"], 1000, g)
    with torch.no_grad():
        expected = noise_loss(pretrained, sched, z0, noise, t, enc(lab)).item()
        torch.manual_seed(1)
        fresh = noise_loss(build_unet(4, [16, 32], DIM), sched, z0, noise, t, enc(lab)).item()
    assert abs(fresh - expected) > 1e-3  # a re-initialised UNet (the reference's bug) would be caught

    unet = copy.deepcopy(pretrained)
    enc_before = copy.deepcopy(enc.state_dict())
    losses = finetune_unet(unet, sched, *data, enc, **FT, mode=mode, lora_rank=2,
                           generator=torch.Generator().manual_seed(5))
    assert len(losses) == 3 and losses[0] == pytest.approx(expected, abs=1e-6)
    assert all(not p.requires_grad for p in unet.parameters())
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in enc_before.items())  # encoder frozen
    base = {k.replace(".base_layer", ""): v for k, v in unet.state_dict().items() if "lora_" not in k}
    pre = pretrained.state_dict()
    assert base.keys() == pre.keys()
    changed = [k for k in pre if not torch.equal(pre[k], base[k])]
    if mode == "full":
        assert len(changed) > len(pre) // 2
    else:
        assert changed == []  # base weights untouched
        lora_b = [v for k, v in unet.state_dict().items() if "lora_B" in k]
        assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # the adapters did learn
        with torch.no_grad():
            unet.disable_adapters()
            assert noise_loss(unet, sched, z0, noise, t, enc(lab)).item() == expected
    with pytest.raises(ValueError, match="mode 'qlora'"):
        finetune_unet(unet, sched, *data, enc, **FT, mode="qlora", generator=g)


def test_finetune_immiscible_changes_the_run(pretrained, sched, data):
    runs = [finetune_unet(copy.deepcopy(pretrained), sched, *data, _encoder(), **(FT | {"steps": 2}), mode="full",
                          generator=torch.Generator().manual_seed(6), immiscible=m) for m in ("off", "assign")]
    assert runs[0] != runs[1]


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(2)
    return build_vae(8, [8, 8], norm_groups=4).requires_grad_(False)  # factor 2: 4x4 latents -> 8x8 images


def test_generate_shape_dtype_and_determinism(pretrained, vae):
    from diffusers import DDIMScheduler

    enc = _encoder(classes=3)

    def run(seed, labels=(0, 1, 2), guidance=3.0, batch_size=2):
        return generate(pretrained, vae, DDIMScheduler.from_config(sd_scheduler_config()), enc, list(labels),
                        guidance=guidance, steps=3, generator=torch.Generator().manual_seed(seed),
                        batch_size=batch_size)

    a = run(0)
    assert a.shape == (3, 8, 8, 3) and a.dtype == np.uint8
    assert np.array_equal(a, run(0))
    assert not np.array_equal(a, run(1))
    assert np.abs(a.astype(int) - run(0, batch_size=3)).max() <= 1  # latents drawn up front: batching-free
    # guidance 0 is the unconditional prediction alone: the label no longer matters
    assert np.array_equal(run(0, (0,), 0.0), run(0, (2,), 0.0))
    assert not np.array_equal(run(0, (0,), 3.0), run(0, (2,), 3.0))
