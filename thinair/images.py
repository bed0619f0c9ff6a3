"""Conversions between stored uint8 images and model tensors. Pure functions, no I/O."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

_MODES = ("bicubic", "bilinear", "nearest")


def resize(x: torch.Tensor, resolution: int, interpolation: str) -> torch.Tensor:
    """float ``(N, C, H, W)`` -> ``(N, C, R, R)``: torchvision's tensor ``resize`` (antialiased bicubic / bilinear,
    plain nearest; bit for bit, tests/test_ingest.py), without importing torchvision, whose import pulls in
    torch._dynamo: 1.5 s in every worker process a stage starts."""
    if interpolation not in _MODES:
        raise ValueError(f"interpolation {interpolation!r}: choose one of {', '.join(_MODES)}")
    smooth = interpolation != "nearest"
    return F.interpolate(x, size=[resolution, resolution], mode=interpolation, align_corners=False if smooth else None,
                         antialias=smooth)


def to_model(images: np.ndarray, resolution: int, interpolation: str = "bicubic") -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` with C in {1, 3, 4} -> float ``(N, 3, R, R)`` in [-1, 1] (grey is replicated)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, C, H, W)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 4:
        x = x[:, :3]
    if x.shape[-2:] != (resolution, resolution):
        x = resize(x, resolution, interpolation)
    return x.clamp(-1, 1).contiguous()


def to_uint8(x: torch.Tensor, resolution: int, channels: int, interpolation: str = "bicubic") -> np.ndarray:
    """float ``(N, 3, H, W)`` in [-1, 1] -> uint8 ``(N, R, R, channels)`` (channels 1 = luminance mean).

    Resized with `interpolation` (``encode.interpolation``, the same filter that brought the real images to the
    generator's size), antialiased: bicubic matches PIL's ``Image.resize(..., BICUBIC)``, as the reference code
    resizes its synthetic images."""
    x = x.float().clamp(-1, 1)
    if x.shape[-2:] != (resolution, resolution):
        x = resize(x, resolution, interpolation)
    if channels == 1:
        x = x.mean(dim=1, keepdim=True)
    x = ((x.clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()  # (N, R, R, C)


def tile(images: np.ndarray, cols: int, upscale: int, pad: int = 1) -> np.ndarray:
    """uint8 (N, H, W, C) -> one uint8 (rows*(H+pad), cols*(W+pad), 3) mosaic, upscaled by pixel repeat."""
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    images = images.repeat(upscale, 1).repeat(upscale, 2)
    n, h, w, _ = images.shape
    rows = max(1, -(-n // cols))
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = im
    return canvas


def png_bytes(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return buf.getvalue()
