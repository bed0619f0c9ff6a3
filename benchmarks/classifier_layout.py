"""CAS classifier training step: NCHW against channels_last on the CPU, interleaved repetitions.

    python benchmarks/classifier_layout.py                       # smallcnn at 8 px (the embedded default's CAS)
    python benchmarks/classifier_layout.py --model resnet18 --size 32 --channels 3 --threads 2

Times one optimiser step (crop, forward, cross-entropy, backward, SGD) of `thinair.classifier` models on random
data in both memory formats; `thinair.classifier.train` uses channels_last on the CPU (`_layout`). Prints ms per
step (median over repetitions) and the ratio. Reads and writes nothing.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F


def step_ms(model, x, y, fmt, steps: int) -> float:
    from thinair.augment import crop_flip

    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(steps):
        xb = crop_flip(x, 1, False, gen).contiguous(memory_format=fmt)
        loss = F.cross_entropy(model(xb), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) * 1000 / steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smallcnn")
    ap.add_argument("--size", type=int, default=8)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--width", type=int, default=16, help="smallcnn width (cas.width)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=50, help="steps per measurement")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    from thinair.classifier import build

    torch.set_num_threads(a.threads)
    x = torch.randn(a.batch, a.channels, a.size, a.size)
    y = torch.randint(0, 10, (a.batch,))
    formats = {"NCHW (contiguous)": torch.contiguous_format, "channels_last": torch.channels_last}
    models = {k: build(a.model, a.channels, 10, a.size, seed=0, width=a.width).to(memory_format=f).train()
              for k, f in formats.items()}
    for k, f in formats.items():  # warm-up
        step_ms(models[k], x, y, f, 2)
    times: dict[str, list[float]] = {k: [] for k in formats}
    for _ in range(a.reps):
        for k, f in formats.items():
            times[k].append(step_ms(models[k], x, y, f, a.steps))
    base = statistics.median(times["NCHW (contiguous)"])
    print(f"{a.model} {a.channels}x{a.size}x{a.size}, batch {a.batch}, {a.threads} thread(s), CPU, "
          f"{a.reps} interleaved repetitions of {a.steps} steps (median)")
    print("| memory format | ms / step | speed-up |")
    print("|---|---|---|")
    for k in formats:
        ms = statistics.median(times[k])
        print(f"| {k} | {ms:.2f} | {base / ms:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
