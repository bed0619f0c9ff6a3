"""The class-conditional methods in the DAG: the `classenc` stage trains (or, for another method, skips with a
reason) and `sample.method` class_encoder / class_tokens generate the same number of images as inversion, with
class contexts and no perturbation; a generator without class tokens is a clear error."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from thinair import io
from thinair.config import parse_params
from tests.conftest import tiny_params
from tests.stages import run_all

CLASSENC = {"tokens": 2, "hidden": 16, "steps": 6, "batch_size": 8, "checkpoint_every": 3}


def _sample(params, root):
    from thinair.units import run_local

    return run_local("sample", params, root)


@pytest.mark.parametrize("finetune", ["none", "lora"])
def test_class_encoder_method_trains_then_samples_as_many_images_as_inversion(tiny_generator, tmp_path, finetune):
    from thinair.tasks import classenc

    inv = parse_params(tiny_params(tiny_generator))
    run_all(inv, tmp_path, ("ingest", "encode", "invert"))
    skipped = classenc.train(inv, tmp_path)
    assert skipped["trained"] is False and "inversion" in skipped["reason"]
    n_inv = _sample(inv, tmp_path)["total"]

    params = parse_params(tiny_params(tiny_generator, sample={"method": "class_encoder"},
                                      classenc=CLASSENC | {"finetune": finetune, "finetune_steps": 2}))
    manifest = classenc.train(params, tmp_path)
    assert manifest["trained"] and manifest["classes"] == 10 and manifest["tokens"] == 2
    d = tmp_path / "data" / "classenc"
    assert (d / "encoder.safetensors").is_file() and (d / "unet_lora.safetensors").is_file() == (finetune == "lora")
    out = _sample(params, tmp_path)
    assert out["total"] == n_inv  # equal synthetic count
    z = io.load_npz(tmp_path / "data" / "sample" / "train-00000.npz")
    assert z["images"].dtype == np.uint8 and (z["partner_index"] == -1).all()
    prov = (tmp_path / "data" / "sample" / "provenance.csv").read_text()
    assert "class_encoder" in prov


def test_class_tokens_method_needs_the_generators_class_tokens(tiny_generator, tmp_path):
    from thinair.generator import GeneratorUnavailable

    gen = tmp_path / "gen"
    shutil.copytree(tiny_generator, gen)
    params = parse_params(tiny_params(gen, sample={"method": "class_tokens"}))
    run_all(params, tmp_path, ("ingest", "encode", "invert"))
    with pytest.raises(GeneratorUnavailable, match="class_tokens.safetensors"):
        _sample(params, tmp_path)
    tokens = torch.randn(11, 2, 8, generator=torch.Generator().manual_seed(0))  # 10 classes + null, T=2, D=8
    io.save_tensors(gen / "class_tokens.safetensors", {"tokens": tokens}, {"null_index": 10})
    out = _sample(params, tmp_path)
    assert out["total"] == 40 * len(params.sample.checkpoints)  # 4 digits x 10 classes, one variant per setting
