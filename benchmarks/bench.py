"""Sampling and inversion throughput, run by hand; prints one table row per measurement.

    python benchmarks/bench.py --model tiny                    # the embedded generator (CPU)
    python benchmarks/bench.py --model sd-v1 --device cuda --dtype bfloat16 --resolution 128 256

`sd-v1` builds Stable Diffusion v1's exact UNet and VAE architectures from their configs with random
weights (speed does not depend on the weights, so nothing is downloaded). Sampling = classifier-free
guidance with one batched UNet call per step + VAE decode, the code path of `tasks/sample.py`;
inversion = forward + backward to the embeddings only (frozen UNet), as `tasks/invert.py`. FLOPs come
from `torch.utils.flop_counter` on one UNet forward. Reads the generator directory for `tiny`; writes
nothing.
"""
from __future__ import annotations

import argparse
import resource
import time

import torch

from thinair.generator import DTYPES, Generator, apply_fast_paths, load_generator, sd_scheduler_config
from thinair.diffusion import denoise

SD_V1_UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, norm_num_groups=32)
SD_V1_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
                 block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512)


def build(model: str, device, dtype):
    """(unet, vae, scheduler config, latent factor, context tokens)."""
    if model == "tiny":
        g = load_generator("generators/tiny-digits", device=device, dtype=dtype)
        return g.unet, g.vae, g.scheduler_config, g.vae_factor, 5
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD_V1_UNET).to(device, dtype).eval().requires_grad_(False)
    vae = AutoencoderKL(**SD_V1_VAE).to(device, dtype).eval().requires_grad_(False)
    return unet, vae, sd_scheduler_config(), 8, 5


def unet_flops(unet, latent: int, tokens: int, device, dtype) -> float:
    """FLOPs of one UNet forward on one image."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 4, latent, latent, device=device, dtype=dtype)
    ctx = torch.randn(1, tokens, unet.config.cross_attention_dim, device=device, dtype=dtype)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, torch.tensor([500], device=device), encoder_hidden_states=ctx)
    return float(counter.get_total_flops())


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def bench_sample(unet, vae, sched_cfg, factor, tokens, res, batch, steps, device, dtype, scheduler="ddim") -> float:
    """Images/s of guided sampling + VAE decode."""

    latent = res // factor
    lat = torch.randn(batch, 4, latent, latent, device=device)
    cond = torch.randn(batch, tokens, unet.config.cross_attention_dim, device=device)
    w = torch.full((batch,), 2.0, device=device)

    def once():
        sched = Generator(unet, vae, sched_cfg, "", "").scheduler(scheduler)
        z = denoise(unet, sched, lat, cond, cond.mean(0, keepdim=True).expand_as(cond), w, steps)
        with torch.no_grad():
            vae.decode((z / 0.18215).to(dtype)).sample

    once()  # warm-up
    sync(device)
    t0 = time.perf_counter()
    once()
    sync(device)
    return batch / (time.perf_counter() - t0)


def bench_invert(unet, factor, tokens, res, batch, iters, device, dtype) -> float:
    """Image-steps/s of embedding optimisation (forward + backward to the embeddings only)."""
    latent = res // factor
    emb = torch.nn.Parameter(torch.zeros(batch, tokens, unet.config.cross_attention_dim, device=device))
    opt = torch.optim.AdamW([emb], lr=0.03)
    x = torch.randn(batch, 4, latent, latent, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (batch,), device=device)

    def step():
        loss = unet(x, t, encoder_hidden_states=emb.to(dtype)).sample.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return batch * iters / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["tiny", "sd-v1"], default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="float32")
    ap.add_argument("--resolution", type=int, nargs="+", default=None)
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 100])
    ap.add_argument("--scheduler", nargs="+", default=["ddim"], help="samplers to time, e.g. pndm dpmsolver++ unipc")
    ap.add_argument("--attention", choices=["sdpa", "math"], default="sdpa")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--invert-iters", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=None, help="device peak, to print the fraction reached")
    a = ap.parse_args()
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    unet, vae, cfg, factor, tokens = build(a.model, device, dtype)
    fast = apply_fast_paths(Generator(unet, vae, cfg, a.model, ""), a.attention, a.channels_last, a.compile)
    unet, vae = fast.unet, fast.vae
    resolutions = a.resolution or ([16] if a.model == "tiny" else [128, 256])
    batch = a.batch or (512 if a.model == "tiny" else 32)
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads) dtype={a.dtype} model={a.model} batch={batch} "
          f"attention={a.attention} channels_last={a.channels_last} compile={a.compile}")
    print("| what | px | sampler | steps | throughput | UNet GFLOP/fwd | achieved TFLOP/s | of peak | peak mem GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for res in resolutions:
        gflop = unet_flops(unet, res // factor, tokens, device, dtype) / 1e9
        for sched in a.scheduler:
            for steps in a.steps:
                ips = bench_sample(unet, vae, cfg, factor, tokens, res, batch, steps, device, dtype, sched)
                tflops = ips * steps * 2 * gflop / 1e3  # 2 = conditional + unconditional rows per step
                frac = f"{tflops / a.peak_tflops:.1%}" if a.peak_tflops else "-"
                print(f"| sample | {res} | {sched} | {steps} | {ips:.4g} img/s | {gflop:.4g} | {tflops:.3g} | {frac} | "
                      f"{peak_memory_gib(device):.2f} |")
        isps = bench_invert(unet, factor, tokens, res, batch, a.invert_iters, device, dtype)
        tflops = isps * 3 * gflop / 1e3  # backward ~ 2x forward
        frac = f"{tflops / a.peak_tflops:.1%}" if a.peak_tflops else "-"
        print(f"| invert | {res} | - | - | {isps:.4g} img-steps/s | {gflop:.4g} | {tflops:.3g} | {frac} | "
              f"{peak_memory_gib(device):.2f} |")


if __name__ == "__main__":
    main()
