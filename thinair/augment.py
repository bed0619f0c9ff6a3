"""Training-time augmentations for the CAS classifiers (`thinair.classifier.train`). No file I/O.

Per image: random crop with padding (+ flip), then AutoAugment (CIFAR-10 policy) / RandAugment / AugMix
(torchvision v2 ops on uint8 images), then CutOut (a square hole of 1/8 of the image's area); per batch: MixUp or CutMix with soft targets. All
randomness comes from the training's `torch.Generator` (the v2 ops run in a forked global RNG seeded
from it), so a training is reproducible from its seed and torch's global RNG is left alone.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from thinair.devices import one_thread

AUGMENTS = ("autoaugment", "randaugment", "augmix", "cutout", "mixup", "cutmix")
_POLICIES = ("autoaugment", "randaugment", "augmix")  # per-image torchvision v2 ops on uint8 images
_MIXES = ("mixup", "cutmix")  # batch-level, soft targets

def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `to_tensor`'s default normalisation: float (B, C, H, W) -> uint8 (B, C, H, W)."""
    return ((x * 0.5 + 0.5) * 255.0).round().clamp(0, 255).to(torch.uint8)

def _from_uint8(u: torch.Tensor) -> torch.Tensor:
    return (u.float() / 255.0 - 0.5) / 0.5

def crop_flip(x: torch.Tensor, padding: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop with padding by the batch minimum (+ optional horizontal flip), per image; x (B, C, H, W)."""
    if padding:
        b, _, h, w = x.shape
        xp = F.pad(x, (padding,) * 4, value=float(x.min()))
        dy = torch.randint(0, 2 * padding + 1, (b,), generator=gen)
        dx = torch.randint(0, 2 * padding + 1, (b,), generator=gen)
        rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(b, x.shape[1], h, w + 2 * padding)
        x = xp.gather(2, rows)
        cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(b, x.shape[1], h, w)
        x = x.gather(3, cols)
    if flip:
        m = torch.rand(x.shape[0], generator=gen) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(-1), x)
    return x

def check_augment(names) -> tuple[str, ...]:
    """Validate augmentation names; a single string counts as one name.

    Raises:
        ValueError: a name is not in `AUGMENTS`.
    """
    names = (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in names if n not in AUGMENTS]
    if unknown:
        raise ValueError(f"cas.augment: unknown augmentation(s) {unknown}; choose from {', '.join(AUGMENTS)}")
    return names

def make_policy(names) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """torchvision v2 AutoAugment (CIFAR-10 policy) / RandAugment / AugMix, composed in that order.

    They act on one uint8 (C, H, W) image, C = 1 or 3 (v2 supports grayscale: colour ops leave it as is).
    None when `names` selects none of them (then torchvision is not imported: 2 s of CPU per training process).
    """
    if not any(n in names for n in _POLICIES):
        return None
    from torchvision.transforms import v2

    ops = {"autoaugment": lambda: v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10),
           "randaugment": v2.RandAugment, "augmix": v2.AugMix}
    chosen = [ops[n]() for n in _POLICIES if n in names]
    return v2.Compose(chosen) if chosen else None

def apply_policy(x: torch.Tensor, policy, gen: torch.Generator) -> torch.Tensor:
    """Apply `policy` to each image of a normalised float batch x (B, C, H, W); same shape and dtype back.

    torchvision's ops draw from torch's global RNG: they run inside a forked global RNG seeded from `gen`
    (one draw per batch), so the result depends on `gen` alone and the global RNG is left untouched.
    The loop runs single-threaded: intra-op threads only slow down ops on tiny images.
    """
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=gen))
    u = _to_uint8(x.cpu())  # (B, C, H, W) uint8
    with torch.random.fork_rng(devices=[]), one_thread():
        torch.manual_seed(seed)
        u = torch.stack([policy(img) for img in u])
    return _from_uint8(u).to(x.device, x.dtype)

def cutout_side(h: int, w: int) -> int:
    """Default CutOut hole side: a square of 1/8 of the image's area, side round(sqrt(h * w / 8)) (>= 1).

    The paper's appendix: "a random square region, sized at 1/8 of the input image". The reference's CAS
    training (``src/train_net.py``) has no CutOut to settle whether that is 1/8 of the area or of the side, so
    we read it as the area: 32 px -> 11 px side (11.8 % of the image), 8 px -> 3 px. (1/8 of the side would be
    a 4 px hole at 32 px, 1.6 % of the image: next to no occlusion.)
    """
    return max(1, round(math.sqrt(h * w / 8)))

def cutout(x: torch.Tensor, gen: torch.Generator, size: int | None = None) -> torch.Tensor:
    """One square hole per image (DeVries & Taylor 2017), filled with 0 (the normalised mean grey).

    The hole's centre is uniform over the image and the hole is clipped at the borders; `size` (its side)
    defaults to `cutout_side`. x (B, C, H, W).
    """
    b, _, h, w = x.shape
    size = size or cutout_side(h, w)
    cy = torch.randint(0, h, (b,), generator=gen) - size // 2  # (B,) top row of the hole
    cx = torch.randint(0, w, (b,), generator=gen) - size // 2
    ys, xs = torch.arange(h), torch.arange(w)
    in_y = (ys[None] >= cy[:, None]) & (ys[None] < cy[:, None] + size)  # (B, H)
    in_x = (xs[None] >= cx[:, None]) & (xs[None] < cx[:, None] + size)  # (B, W)
    hole = in_y[:, :, None] & in_x[:, None, :]  # (B, H, W)
    return x.masked_fill(hole[:, None].to(x.device), 0.0)

def mix(x: torch.Tensor, kinds, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """MixUp (Zhang et al. 2018) or CutMix (Yun et al. 2019) of a batch with a random permutation of itself.

    lam ~ Beta(1, 1) = U(0, 1) (torchvision's and both papers' CIFAR default); with both kinds selected each
    batch picks one with probability 1/2 (torchvision's recipe). All draws come from `gen`.

    Returns:
        (mixed x (B, C, H, W), permutation (B,), lam): the target is lam * y + (1 - lam) * y[perm];
        for CutMix lam is the exact share of the image left unpasted.
    """
    b, _, h, w = x.shape
    kinds = [k for k in _MIXES if k in kinds]
    kind = kinds[int(torch.randint(0, len(kinds), (1,), generator=gen))] if len(kinds) > 1 else kinds[0]
    lam = float(torch.rand((), generator=gen))
    perm = torch.randperm(b, generator=gen)
    if kind == "mixup":
        return lam * x + (1 - lam) * x[perm], perm, lam
    ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = int(torch.randint(0, h, (1,), generator=gen)), int(torch.randint(0, w, (1,), generator=gen))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.clone()
    x[:, :, y0:y1, x0:x1] = x[perm][:, :, y0:y1, x0:x1]
    return x, perm, 1 - (y1 - y0) * (x1 - x0) / (h * w)

def soft_targets(y: torch.Tensor, perm: torch.Tensor, lam: float, n_classes: int) -> torch.Tensor:
    """lam * one_hot(y) + (1 - lam) * one_hot(y[perm]): (B,) int labels -> (B, n_classes) float."""
    one_hot = F.one_hot(y, n_classes).float()
    return lam * one_hot + (1 - lam) * one_hot[perm.to(y.device)]
