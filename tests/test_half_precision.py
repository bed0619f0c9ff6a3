"""Half precision: every GPU stage (encode, invert, sample, cas's reconstructed test) runs with a bfloat16 generator,
here on the CPU with the tiny random generator; results are finite, shaped as in float32 and stored as float32."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import tiny_params
from tests.stages import run_all
from thinair import io
from thinair.config import parse_params
from thinair.errors import GeneratorUnavailable
from thinair.generator import generator_for, load_generator
from thinair.tasks.invert import denoising_loss


def test_inversion_loss_casts_float32_latents_to_a_bfloat16_unet(tiny_generator):
    g = load_generator(str(tiny_generator), dtype=torch.bfloat16)
    noisy, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)  # float32, as invert_loop makes them
    ctx = torch.randn(2, 2, 8, requires_grad=True)
    loss = denoising_loss(g.unet, noisy, noise, torch.tensor([10, 500]), ctx)
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert ctx.grad.dtype == torch.float32 and torch.isfinite(ctx.grad).all() and ctx.grad.abs().sum() > 0


def test_float16_stays_refused_on_the_cpu(tiny_generator):
    p = parse_params(tiny_params(tiny_generator, base={"dtype": "float16"}))
    with pytest.raises(GeneratorUnavailable, match="base.dtype='float16' is for GPUs; on the CPU use float32"):
        generator_for(p.base)


def test_every_gpu_stage_runs_in_bfloat16(tiny_generator, tmp_path):
    params = parse_params(tiny_params(tiny_generator, base={"dtype": "bfloat16"},
                                      cas={"modes": ["real"], "seeds": 1, "reconstructed_test": True,
                                           "scale_synthetic": [], "scale_real": []}))
    assert generator_for(params.base)[0].unet.dtype == torch.bfloat16
    run_all(params, tmp_path, ("ingest", "encode", "invert", "sample", "cas"))
    data = tmp_path / "data"
    enc = io.load_tensors(data / "encode" / "train-00000.safetensors")
    assert enc["mean"].shape == (20, 4, 4, 4) and enc["mean"].dtype == enc["logvar"].dtype == torch.float32
    assert torch.isfinite(enc["mean"]).all() and torch.isfinite(enc["logvar"]).all()
    inv = io.load_tensors(data / "invert" / "train-00000.safetensors")
    assert {k for k in inv if k.startswith("step_")} == {"step_2", "step_4"}
    for k in ("embeddings", "step_2"):
        assert inv[k].shape == (20, 2, 8) and inv[k].dtype == torch.float32 and torch.isfinite(inv[k]).all()
    assert all(np.isfinite(loss) for _, loss in io.load_metadata(data / "invert" / "train-00000.safetensors")["losses"])
    syn = io.load_npz(data / "sample" / "train-00000.npz")
    assert syn["images"].shape == (40, 8, 8, 1) and syn["images"].dtype == np.uint8  # 20 x (2 checkpoints) x 1
    assert syn["images"].std() > 0  # not a constant (NaN-cast) image set
    cas = io.read_json(data / "cas" / "cas.json")
    assert 0 <= cas["reconstructed_accuracy"]["real"]["mean"] <= 1 and 0 <= cas["accuracy"]["real"]["mean"] <= 1
