"""thinair against diffusers itself: the same generator, embeddings and scheduler, interleaved repetitions.

    python benchmarks/vs_diffusers.py                          # the embedded generator, data/invert's embeddings
    python benchmarks/vs_diffusers.py --interval 0.3-0.7 --reps 5 --device cuda --dtype bfloat16
    python benchmarks/vs_diffusers.py --interval 0.0-0.3 --fast-steps 8     # + thinair at 8 steps with the interval

Sampling: diffusers' ``StableDiffusionPipeline`` (the generator directory loaded with ``from_pretrained``, no text
encoder: ``prompt_embeds`` / ``negative_prompt_embeds`` are the learned embeddings and their mean, as the sample
stage conditions) against thinair's sampler (``thinair.diffusion.denoise`` + VAE decode, the code path of
tasks/sample.py), both with one fresh instance of the same scheduler, the same steps, guidance, start latents and
batch; thinair plain (guidance every step: checked to match diffusers' images to 1/255) and with
``sample.guidance_interval`` (``--interval``: fewer UNet evaluations, counted and printed). Each repetition times
every contender once, in turn, so load drifts hit all alike; the table gives the median images/s and the ratio to
diffusers.

Inversion: thinair's ``invert_loop`` (tasks/invert.py) against a plain loop written the way diffusers' textual-
inversion example trains an embedding (VAE posterior sample, DDPM add_noise, UNet forward, MSE, AdamW step) at the
same batch; image-steps/s.

Reads the generator directory and ``<root>/data/invert`` (and ``data/encode``; run ``dvc repro`` or ``thinair
invert`` first). Writes nothing unless ``--out`` names a JSON file.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch


def load_inputs(root: Path, n: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(embeddings (n, T, D) of data/invert's final checkpoint, their dataset mean (the unconditional context), the
    first encode chunk's posterior)."""
    from thinair import io, paths
    from thinair.upstream import require, upstream_chunks

    d = paths.stage_dir("invert", root)
    chunks = upstream_chunks("invert", root)
    emb = torch.cat([io.load_tensors(d / f)["embeddings"] for f in chunks])
    enc_dir = paths.stage_dir("encode", root)
    enc = io.load_tensors(require(enc_dir / upstream_chunks("encode", root)[0]["file"], "encode"))
    return emb[:n], emb.mean(0, keepdim=True), enc


def diffusers_pipeline(generator: str, scheduler, device, dtype):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(generator, text_encoder=None, tokenizer=None, safety_checker=None,
                                                   feature_extractor=None, requires_safety_checker=False,
                                                   torch_dtype=dtype)
    pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def sample_diffusers(pipe, scheduler_factory, cond, uncond, lat0, guidance: float, steps: int, res: int) -> np.ndarray:
    pipe.scheduler = scheduler_factory()
    out = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, latents=lat0, num_inference_steps=steps,
               guidance_scale=guidance, height=res, width=res, output_type="np").images  # (B, H, W, 3) in [0, 1]
    return np.round(out * 255).astype(np.uint8)


def sample_thinair(gen, scheduler_factory, cond, uncond, lat0, guidance: float, steps: int, res: int,
                   interval) -> np.ndarray:
    from thinair.diffusion import denoise

    w = torch.full((len(cond),), guidance, device=cond.device)
    lat = denoise(gen.unet, scheduler_factory(), lat0, cond, uncond, w, steps, True, interval=interval)
    with torch.no_grad():
        x = gen.vae.decode((lat / gen.scaling_factor).to(gen.vae.dtype)).sample
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> tuple[float, object]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def plain_inversion(unet, noise_sched, mean, logvar, scaling: float, batch: int, iters: int, lr: float, device):
    """The loop of diffusers' textual-inversion example, for per-image embeddings: image-steps/s."""
    import torch.nn.functional as F

    emb = torch.nn.Parameter(torch.zeros(len(mean), 5, unet.config.cross_attention_dim, device=device))
    opt = torch.optim.AdamW([emb], lr=lr)
    g = torch.Generator().manual_seed(0)
    mean, std = mean.to(device), torch.exp(0.5 * logvar).to(device)

    def step():
        idx = torch.randperm(len(mean), generator=g)[:batch]
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g).to(device)) * scaling
        noise = torch.randn(z0.shape, generator=g).to(device)
        t = torch.randint(0, 1000, (batch,), generator=g).to(device)
        pred = unet(noise_sched.add_noise(z0, noise, t).to(unet.dtype), t, encoder_hidden_states=emb[idx].to(unet.dtype))
        loss = F.mse_loss(pred.sample.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    seconds, _ = timed(lambda: [step() for _ in range(iters)], device)
    return batch * iters / seconds


def thinair_inversion(unet, noise_sched, mean, logvar, scaling: float, batch: int, iters: int, lr: float, device):
    from thinair.config import Invert
    from thinair.tasks.invert import invert_loop

    n = min(batch, len(mean))
    p = Invert(steps=iters + 1, batch_size=n, lr=lr, checkpoint_every=iters + 1, num_tokens=5)
    seconds, _ = timed(lambda: invert_loop(unet, noise_sched, mean[:n], logvar[:n], scaling, p,
                                           torch.Generator().manual_seed(0), 0, device=device), device)
    return n * (iters + 1) / seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--generator", default="generators/tiny-digits")
    ap.add_argument("--root", default=".", help="workspace with data/invert and data/encode")
    ap.add_argument("--n", type=int, default=256, help="embeddings (images per batch)")
    ap.add_argument("--scheduler", default="dpmsolver++")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--resolution", type=int, default=16, help="generation resolution (base.gen_resolution)")
    ap.add_argument("--interval", default="0.3-0.7", help="thinair's guidance interval lo-hi ('' = plain only)")
    ap.add_argument("--fast-steps", type=int, default=None, help="also time thinair at this many steps with "
                    "--interval (the steps sweep's fewer-steps setting; its quality is the sweep's, not compared here)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--invert-iters", type=int, default=10)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    from diffusers import DDPMScheduler

    from thinair.diffusion import unet_evaluations
    from thinair.generator import DTYPES, load_generator

    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    gen = load_generator(a.generator, device=device, dtype=dtype)
    cond, uncond_one, enc = load_inputs(Path(a.root), a.n)
    n = len(cond)
    cond, uncond = cond.to(device, dtype), uncond_one.expand(n, -1, -1).to(device, dtype)
    lat0 = torch.randn(n, 4, a.resolution // gen.vae_factor, a.resolution // gen.vae_factor,
                       generator=torch.Generator().manual_seed(0)).to(device, dtype)

    def factory():
        return gen.scheduler(a.scheduler)

    pipe = diffusers_pipeline(a.generator, factory(), device, dtype)
    interval = tuple(float(x) for x in a.interval.split("-")) if a.interval else None
    contenders = {"diffusers StableDiffusionPipeline": lambda: sample_diffusers(pipe, factory, cond, uncond, lat0,
                                                                                a.guidance, a.steps, a.resolution),
                  "thinair": lambda: sample_thinair(gen, factory, cond, uncond, lat0, a.guidance, a.steps, a.resolution,
                                                    None)}
    evals = {"diffusers StableDiffusionPipeline": unet_evaluations(factory(), a.steps),
             "thinair": unet_evaluations(factory(), a.steps)}
    if interval:
        name = f"thinair, guidance interval {a.interval}"
        contenders[name] = lambda: sample_thinair(gen, factory, cond, uncond, lat0, a.guidance, a.steps, a.resolution,
                                                  interval)
        evals[name] = unet_evaluations(factory(), a.steps, interval)
    if a.fast_steps:
        name = f"thinair, {a.fast_steps} steps" + (f", guidance interval {a.interval}" if interval else "")
        contenders[name] = lambda: sample_thinair(gen, factory, cond, uncond, lat0, a.guidance, a.fast_steps,
                                                  a.resolution, interval)
        evals[name] = unet_evaluations(factory(), a.fast_steps, interval)
    images = {k: f() for k, f in contenders.items()}  # warm-up, and the images compared
    ref = images["diffusers StableDiffusionPipeline"]
    diff = np.abs(images["thinair"].astype(int) - ref[..., :images["thinair"].shape[-1]].astype(int))
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(a.reps):
        for k, f in contenders.items():
            times[k].append(timed(f, device)[0])
    base = n / statistics.median(times["diffusers StableDiffusionPipeline"])
    print(f"sampling: {n} images, {a.scheduler} {a.steps} steps, guidance {a.guidance}, {a.resolution} px, "
          f"{a.device} {a.dtype}, {torch.get_num_threads()} threads, {a.reps} interleaved repetitions (median)")
    print(f"thinair plain vs diffusers: max |difference| {diff.max()} / 255, mean {diff.mean():.3f}")
    print("| sampler | UNet evaluations / image | images/s | vs diffusers |")
    print("|---|---|---|---|")
    rows = []
    for k in contenders:
        ips = n / statistics.median(times[k])
        rows.append({"sampler": k, "unet_evaluations": evals[k], "images_per_s": round(ips, 2),
                     "ratio": round(ips / base, 2), "seconds": [round(t, 4) for t in times[k]]})
        print(f"| {k} | {evals[k]} | {ips:.1f} | {ips / base:.2f}x |")
    noise_sched = DDPMScheduler.from_config(gen.scheduler_config)
    inv = {"plain loop (diffusers textual-inversion style)": [], "thinair invert_loop": []}
    for _ in range(max(1, a.reps // 2)):
        inv["plain loop (diffusers textual-inversion style)"].append(plain_inversion(
            gen.unet, noise_sched, enc["mean"], enc["logvar"], gen.scaling_factor, min(n, len(enc["mean"])),
            a.invert_iters, 0.03, device))
        inv["thinair invert_loop"].append(thinair_inversion(
            gen.unet, noise_sched, enc["mean"], enc["logvar"], gen.scaling_factor, min(n, len(enc["mean"])),
            a.invert_iters, 0.03, device))
    print(f"inversion: batch {min(n, len(enc['mean']))}, {a.invert_iters} steps per measurement")
    print("| inversion | image-steps/s | vs plain |")
    print("|---|---|---|")
    plain = statistics.median(inv["plain loop (diffusers textual-inversion style)"])
    for k, v in inv.items():
        print(f"| {k} | {statistics.median(v):.0f} | {statistics.median(v) / plain:.2f}x |")
    if a.out:
        Path(a.out).write_text(json.dumps({"config": vars(a), "max_abs_diff": int(diff.max()), "sampling": rows,
                                           "inversion": {k: [round(x, 1) for x in v] for k, v in inv.items()}},
                                          indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
