"""Generator loading: the SD directory layout, and clear errors for every way it can be unusable."""
from __future__ import annotations

import shutil

import pytest
import torch

from thinair.generator import GeneratorUnavailable, load_generator, resolve_device


def test_local_sd_directory_loads_with_our_loader_and_diffusers(tiny_generator):
    from diffusers import StableDiffusionPipeline

    g = load_generator(str(tiny_generator))
    assert g.cross_attention_dim == 8 and g.vae_factor == 4 and g.identity.startswith("sha256:")
    assert g.scheduler_config["beta_schedule"] == "scaled_linear" and g.scheduler_config["num_train_timesteps"] == 1000
    assert not any(p.requires_grad for p in g.unet.parameters())  # frozen
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_generator), text_encoder=None, tokenizer=None)
    out = pipe(prompt_embeds=torch.randn(1, 3, 8), negative_prompt_embeds=torch.zeros(1, 3, 8), height=16,
               width=16, num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 16, 16, 3)


def test_identity_changes_with_weights(tiny_generator, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_generator, copy)
    a = load_generator(str(copy)).identity
    w = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    assert load_generator(str(copy)).identity != a


def test_missing_directory_is_clear(tmp_path):
    with pytest.raises(GeneratorUnavailable, match="no such directory"):
        load_generator(str(tmp_path / "nope"))


def test_missing_component_is_named(tiny_generator, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_generator, copy)
    shutil.rmtree(copy / "vae")
    with pytest.raises(GeneratorUnavailable, match="lacks vae/"):
        load_generator(str(copy))


def test_hub_id_offline_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GeneratorUnavailable) as err:
        load_generator("CompVis/stable-diffusion-v1-4")
    assert "CompVis/stable-diffusion-v1-4" in str(err.value) and "local diffusers directory" in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_gpu():
    with pytest.raises(GeneratorUnavailable, match="no CUDA device"):
        resolve_device("cuda")
    assert resolve_device("auto").type in ("cpu", "mps")
