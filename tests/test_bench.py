"""The benchmark script's measuring functions run (smoke), so the hand-run benchmark cannot rot silently."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from thinair.generator import load_generator

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_functions_measure_the_tiny_generator(tiny_generator):
    bench = _bench()
    g = load_generator(str(tiny_generator))
    cpu = torch.device("cpu")
    assert bench.unet_flops(g.unet, 4, 2, cpu, torch.float32) > 0
    assert bench.bench_sample(g.unet, g.vae, g.scheduler_config, 4, 2, 16, 2, 2, cpu, torch.float32) > 0
    assert bench.bench_invert(g.unet, 4, 2, 16, 2, 1, cpu, torch.float32) > 0
    assert bench.SD_V1_UNET["cross_attention_dim"] == 768 and bench.SD_V1_VAE["latent_channels"] == 4
