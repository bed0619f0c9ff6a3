"""Immiscible diffusion noise assignment (seed 004): pair each training latent with a nearby noise sample.

Instead of pairing a batch's latents with noise at random, the batch's noises are re-assigned to the latents by
a linear assignment minimising the summed L2 distance between flattened latent and noise
(``scipy.optimize.linear_sum_assignment``); training then proceeds as usual. The KNN variant draws ``k``
noises per latent and keeps the nearest one, which also works at batch size 1. Every random draw comes from the
caller's ``torch.Generator``. Pure functions: reads and writes nothing.
"""
from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment

MODES = ("off", "assign", "knn")


def assign(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The permutation ``perm`` (B,) such that ``noise[perm]`` paired row by row with ``latents`` minimises the
    summed L2 distance over all pairings. latents, noise: (B, ...) of equal shape."""
    if latents.shape != noise.shape:
        raise ValueError(f"immiscible.assign: latents {tuple(latents.shape)} and noise {tuple(noise.shape)} "
                         "must have the same shape")
    cost = torch.cdist(latents.flatten(1).double().cpu(), noise.flatten(1).double().cpu())  # (B, B)
    rows, cols = linear_sum_assignment(cost.numpy())  # rows == arange(B)
    return torch.as_tensor(cols[rows.argsort()], dtype=torch.long)


def nearest(latents: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Index (B,) of the candidate nearest to each latent. latents (B, ...), candidates (B, k, ...)."""
    diff = candidates.flatten(2).double() - latents.flatten(1).double().unsqueeze(1).to(candidates.device)
    return diff.norm(dim=2).argmin(dim=1)  # (B,)


def immiscible_noise(latents: torch.Tensor, generator: torch.Generator, mode: str = "off", k: int = 4
                     ) -> torch.Tensor:
    """Gaussian noise shaped like ``latents`` (B, ...), paired with them according to ``mode``.

    Args:
        generator: every draw comes from it (on its own device); the result is moved to ``latents.device``.
        mode: ``off``: one ``torch.randn(latents.shape)`` draw; ``assign``: the same draw, re-ordered by
            :func:`assign`; ``knn``: one ``(B, k, ...)`` draw, keeping each latent's nearest candidate.
        k: candidates per latent for ``knn``.
    Returns:
        float32 noise (B, ...).
    """
    if mode not in MODES:
        raise ValueError(f"immiscible mode {mode!r} is not one of {MODES}")
    shape = tuple(latents.shape)
    if mode == "knn":
        if k < 1:
            raise ValueError(f"immiscible knn: k={k} must be >= 1")
        cand = torch.randn((shape[0], k) + shape[1:], generator=generator, device=generator.device)  # (B, k, ...)
        noise = cand[torch.arange(shape[0], device=cand.device), nearest(latents, cand)]
    else:
        noise = torch.randn(shape, generator=generator, device=generator.device)  # (B, ...)
        if mode == "assign":
            noise = noise[assign(latents, noise).to(noise.device)]
    return noise.to(latents.device)
