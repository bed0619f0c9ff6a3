"""A stream of fresh labelled images for classifier training: on-the-fly generation (``cas.synthetic: on_the_fly``).

The paper pre-generates a fixed-size synthetic set because "on-the-fly data generation is ideal, [but]
computationally costly". With a 10-step sampler and a small generator it no longer is. :class:`SyntheticStream` is a
``torch.utils.data.IterableDataset``: iterated (directly or through ``DataLoader(stream, batch_size=None)``) it yields
``(x, y)`` batches, x float (n, C, H, W) normalised as ``thinair.classifier.to_tensor`` does and y int64 (n,), drawn
by a ``draw(step, n) -> (uint8 (n, H, W, C), labels (n,))`` callable (:class:`thinair.draws.Stream`: the sample
stage's variants). Step t of a stream is the same images whatever happened before it (the draw is seeded by position), so a
training resumed after a kill continues with exactly the images it would have seen, and no image is drawn twice.

Pure: reads and writes nothing; the draw callable does the generating.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset

from thinair.classifier import to_tensor


class SyntheticStream(IterableDataset):
    """Endless batches of `per_step` fresh images from `draw`, starting at step `start`.

    Args:
        draw: ``draw(step, n)`` -> (uint8 images (n, H, W, C), int labels (n,)); must be deterministic in (step, n)
            and never repeat an image across steps.
        size: the number of images the stream stands in for (a pre-generated set's size): ``len(stream)``, which
            sets a training's epoch length, so epochs and schedules match the pre-generated run.
        image_shape: (H, W, C) of the images drawn.
        key: JSON-able parts identifying the stream's content (generator, embeddings, settings, seed): part of a
            training's cache key in place of the images.
        per_step: images per yielded batch (see :meth:`at`).
        start: the first step yielded.

    ``stats`` (shared by every copy made with :meth:`at`) counts the images drawn and the seconds spent drawing.
    """

    def __init__(self, draw: Callable[[int, int], tuple[np.ndarray, np.ndarray]], size: int, image_shape: tuple,
                 key: list, per_step: int = 1, start: int = 0):
        super().__init__()
        if size < 1 or per_step < 1 or start < 0:
            raise ValueError(f"SyntheticStream: size and per_step must be >= 1 and start >= 0, got size={size}, "
                             f"per_step={per_step}, start={start}")
        self.draw, self.size, self.image_shape, self.key = draw, int(size), tuple(image_shape), key
        self.per_step, self.start = int(per_step), int(start)
        self.stats = {"images": 0, "seconds": 0.0}

    def __len__(self) -> int:
        return self.size

    def at(self, per_step: int, start: int) -> SyntheticStream:
        """A copy yielding `per_step` images per batch from step `start` (stats shared with this one)."""
        if per_step < 1 or start < 0:
            raise ValueError(f"SyntheticStream.at: per_step must be >= 1 and start >= 0, got {per_step}, {start}")
        other = copy.copy(self)
        other.per_step, other.start = int(per_step), int(start)
        return other

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch `step`: (x float (n, C, H, W) in [-1, 1], y int64 (n,))."""
        t0 = time.perf_counter()
        images, labels = self.draw(step, self.per_step)
        if images.shape != (self.per_step, *self.image_shape) or images.dtype != np.uint8 or len(labels) != len(images):
            raise ValueError(f"SyntheticStream: draw({step}, {self.per_step}) gave images {images.dtype} "
                             f"{images.shape} and {len(labels)} labels; expected uint8 "
                             f"{(self.per_step, *self.image_shape)} and as many labels")
        x = to_tensor(images)
        self.stats["images"] += len(images)
        self.stats["seconds"] += time.perf_counter() - t0
        return x, torch.as_tensor(np.asarray(labels), dtype=torch.int64)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step = self.start
        while True:
            yield self.batch(step)
            step += 1

