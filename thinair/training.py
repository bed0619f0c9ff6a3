"""One classifier training, as CAS defines it: train on some sources, test on real splits; cached and resumable.

Used by the `cas` stage (one unit per training) and the `search` stage (validation scores). A training is keyed by
its content (:func:`training_parts`: the training fields of ``cas``, the seed, every image and label), so the same
training asked for twice (e.g. a scaling study's full-size point and a mode run) is done once. It checkpoints every
epoch through :class:`thinair.units.Checkpoint` and resumes after a kill. Writes the result JSON it is given a path
for, and the checkpoint under ``.thinair/work/<stage>``.
"""
from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np
import torch

from thinair import classifier, io
from thinair.classifier import is_stream
from thinair.devices import current_device
from thinair.units import Checkpoint, cached, code_key, content_key

# The fields of `cas` that change a training's result (seeds/modes/scaling lists only choose which to run).
TRAIN_FIELDS = ("model", "width", "epochs", "steps", "warmup_steps", "batch_size", "optimizer", "lr", "momentum",
                "weight_decay", "warmup_epochs", "crop_padding", "flip", "augment")
CHECKPOINT_SECONDS = 30.0  # a training in progress is checkpointed at most this often (and after its first epoch)
log = logging.getLogger(__name__)
_TRAIN_LOCK = threading.Lock()  # trainings seed torch's global RNG: one at a time per process, so threads can't mix


def training_parts(params, seed: int, sources: list, tests: dict) -> list:
    """What determines a training's result besides code: its training fields, seed, sources and test sets."""
    p = params.cas
    return [{f: getattr(p, f) for f in TRAIN_FIELDS}, seed,
            [(["stream", x.key, x.size], share) if is_stream(x) else (x, y, share) for x, y, share in sources],
            {k: (t.images, t.labels) for k, t in tests.items()}]


def _image_shape(x) -> tuple:
    """(H, W, C) of a source's images: a uint8 (N, H, W, C) array or a stream."""
    return x.image_shape if is_stream(x) else x.shape[1:]


def train_and_test(params, tag: str, seed: int, sources: list[tuple[np.ndarray, np.ndarray, float]], tests: dict,
                   n_classes: int, out: Path, work: Checkpoint) -> dict:
    """Train one classifier on `sources` [(uint8 images, labels, batch share)], test it on each of `tests`
    ({name: LabelledImages}) and write the result JSON to `out`. Checkpoints every epoch to `work`."""
    p = params.cas
    resume = work.load(f"cas {tag} seed {seed}")
    if resume is not None:
        log.info("cas %s seed %d: resuming after epoch %d", tag, seed, int(resume["epoch"]))

    last_save = [float("-inf")]

    def on_epoch(epoch, loss, state):
        # With cas.steps on a small set an epoch is a step or two: checkpoint at most every CHECKPOINT_SECONDS
        # (and after the first epoch), not every epoch; a resumed run is identical either way.
        log.info("cas %s seed %d: epoch %d/%d loss %.4f", tag, seed, epoch, state["epochs"], loss)
        now = time.monotonic()
        if epoch < state["epochs"] and (epoch == 1 or now - last_save[0] >= CHECKPOINT_SECONDS):
            work.save(state)
            last_save[0] = now

    h, _, c = _image_shape(sources[0][0])
    t0 = time.perf_counter()
    with _TRAIN_LOCK:
        net = classifier.build(p.model, c, n_classes, h, seed, p.width)
        classifier.train(net, [(x, None, share) if is_stream(x) else (classifier.to_tensor(x), torch.from_numpy(y),
                                                                       share) for x, y, share in sources],
                         epochs=p.epochs, steps=p.steps, warmup_steps=p.warmup_steps, batch_size=p.batch_size,
                         optimizer=p.optimizer, lr=p.lr,
                         momentum=p.momentum, weight_decay=p.weight_decay, warmup_epochs=p.warmup_epochs,
                         padding=p.crop_padding, flip=p.flip, augment=tuple(p.augment), seed=seed,
                         device=current_device(params.base), resume=resume, on_epoch=on_epoch)
    streams = [x for x, _, _ in sources if is_stream(x)]
    drawn = sum(x.stats["images"] for x in streams)
    result = {"tag": tag, "seed": seed,
              "train_images": int(drawn + sum(len(x) for x, _, _ in sources if not is_stream(x))),
              "seconds": round(time.perf_counter() - t0, 2)}
    if streams:  # on-the-fly: images drawn this run (all distinct) and the time spent drawing them
        result["on_the_fly"] = {"images": int(drawn), "seconds": round(sum(x.stats["seconds"] for x in streams), 2)}
    for name, t in tests.items():
        pred = classifier.predict(net.cpu(), classifier.to_tensor(t.images)).numpy()
        result[name] = {"accuracy": float((pred == t.labels).mean()),
                        "per_class_accuracy": [float((pred[t.labels == k] == k).mean()) for k in range(n_classes)]}
    io.write_json(out, result)
    work.clear()
    return result


def cached_training(params, stage: str, tag: str, seed: int, sources: list, tests: dict, n_classes: int,
                    root: str | Path = ".") -> dict:
    """:func:`train_and_test` through `stage`'s content cache (a scratch workspace's, for the search)."""
    key = content_key(stage, code_key(__name__), training_parts(params, seed, sources, tests))
    f = cached(stage, key, "result.json", lambda out: train_and_test(params, tag, seed, sources, tests, n_classes,
                                                                      out, Checkpoint(stage, key, root)),
               root, f"{stage} {tag} seed {seed}")
    return io.read_json(f) | {"tag": tag}
