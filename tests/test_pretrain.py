"""pretrain: the embedded generator's training writes a loadable SD-layout directory, and resumes."""
from __future__ import annotations

import pytest

from thinair import io
from thinair.config import parse_params
from thinair.generator import load_generator
from thinair.tasks.pretrain import pretrain

TINY = {"vae_steps": 4, "unet_steps": 4, "batch_size": 16, "unet_channels": [8, 16], "vae_channels": [4, 8, 8],
        "cross_attention_dim": 8, "num_tokens": 2}


def test_pretrain_writes_a_loadable_generator(tmp_path):
    p = parse_params({"pretrain": TINY | {"output": "gen"}})
    log = pretrain(p, tmp_path)
    g = load_generator(str(tmp_path / "gen"))
    assert g.cross_attention_dim == 8 and g.vae_factor == 4 and g.scaling_factor != 0.18215  # fitted to the data
    assert [r["step"] for r in log["unet"]] == [4] and log["train_images"] == 1438
    tokens = io.load_tensors(tmp_path / "gen" / "class_tokens.safetensors")["tokens"]
    assert tokens.shape == (11, 2, 8)  # 10 classes + the null context
    assert io.read_json(tmp_path / "gen" / "train_log.json")["params"]["pretrain"]["unet_steps"] == 4


def test_pretrain_resumes_from_its_unet_checkpoint(tmp_path, caplog):
    import logging

    import torch

    from thinair.tasks.pretrain import train_unet

    lat, labels = torch.randn(64, 4, 4, 4), torch.arange(64) % 10
    ckpt = tmp_path / "unet.pt"
    short = parse_params({"pretrain": TINY | {"unet_steps": 3}}).pretrain  # a run "killed" after its step-2 checkpoint
    train_unet(lat, labels, 10, short, torch.Generator().manual_seed(0), ckpt=ckpt, ckpt_every=2)
    assert ckpt.is_file()
    full = parse_params({"pretrain": TINY | {"unet_steps": 6}}).pretrain
    with caplog.at_level(logging.INFO):
        _, _, losses = train_unet(lat, labels, 10, full, torch.Generator().manual_seed(0), ckpt=ckpt, ckpt_every=2,
                                  log_every=1)
    assert "resuming unet training at step 2" in caplog.text
    assert [r["step"] for r in losses] == [3, 4, 5, 6]


def test_pretrain_rejects_resolution_not_divisible_by_vae_factor(tmp_path):
    with pytest.raises(ValueError, match="not divisible by the VAE factor 4"):
        pretrain(parse_params({"pretrain": TINY | {"resolution": 18}}), tmp_path)


def test_pretrain_is_reproducible(tmp_path):
    from thinair.generator import local_identity

    for name in ("a", "b"):
        pretrain(parse_params({"pretrain": TINY | {"output": name}}), tmp_path / name)
    assert local_identity(tmp_path / "a" / "a") == local_identity(tmp_path / "b" / "b")


def test_pretrain_immiscible_off_draws_the_plain_noise_and_assign_repairs_it():
    """`off` keeps the committed generator's bits (the same torch.randn draw); `assign` trains on a permutation
    of that draw that lowers the summed latent-noise distance, so its losses differ."""
    import torch

    from thinair.immiscible import immiscible_noise
    from thinair.tasks.pretrain import train_unet

    z0 = torch.randn(16, 4, 4, 4)
    plain = torch.randn(z0.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(immiscible_noise(z0, torch.Generator().manual_seed(3), "off"), plain)
    paired = immiscible_noise(z0, torch.Generator().manual_seed(3), "assign")
    assert sorted(map(tuple, paired.flatten(1).tolist())) == sorted(map(tuple, plain.flatten(1).tolist()))
    assert (z0 - paired).flatten(1).norm(dim=1).sum() < (z0 - plain).flatten(1).norm(dim=1).sum()

    lat, labels = torch.randn(64, 4, 4, 4), torch.arange(64) % 10
    runs = {}
    for mode in ("off", "assign", "knn"):
        p = parse_params({"pretrain": TINY | {"unet_steps": 3, "immiscible": mode}}).pretrain
        runs[mode] = [r["loss"] for r in train_unet(lat, labels, 10, p, torch.Generator().manual_seed(0),
                                                      log_every=1)[2]]
    assert runs["off"] != runs["assign"] and runs["off"] != runs["knn"]


def test_pretrain_immiscible_bad_value_is_refused():
    from thinair.config import ParamsError

    with pytest.raises((ParamsError, ValueError), match="immiscible"):
        parse_params({"pretrain": TINY | {"immiscible": "sideways"}})
