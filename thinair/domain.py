"""The domain classifier: a small CNN trained on the real train split, shared by the metrics (its penultimate
layer is the ``domain`` feature space) and the generator-fit check of `encode` (its accuracy on reconstructions).

Cached by content (code, epochs, seed, images, labels) in ``.thinair/cache/domain``, so it is trained once per
dataset whichever stage asks first. Reads nothing else; writes only its cache file.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from thinair import classifier, io
from thinair.devices import one_thread
from thinair.units import cached, code_key, content_key

CACHE = "domain"
MIN_STEPS = 200  # a few images' epochs are a handful of steps: train at least this many (large sets: unchanged)


def domain_classifier(train_images: np.ndarray, train_labels: np.ndarray, n_classes: int, epochs: int, seed: int,
                      root: str | Path = "."):
    """The trained classifier (eval mode) for uint8 (N, H, W, C) train images; trained only on a cache miss."""
    from safetensors.torch import load_file, save_file

    h, _, c = train_images.shape[1:]
    net_seed = io.seed_for(seed, "metrics")  # the seed the metrics stage has always used
    net = classifier.build("smallcnn", c, n_classes, h, net_seed)
    key = content_key(CACHE, code_key(__name__), epochs, seed, train_images, train_labels)

    steps_per_epoch = -(-len(train_labels) // 128)
    budget = {"epochs": epochs} if epochs * steps_per_epoch >= MIN_STEPS else {"steps": MIN_STEPS, "warmup_steps": 10}

    def fit(out: Path) -> None:
        # one intra-op thread on the CPU: with 2 threads the weights differ from 1 thread's by up to 0.45 (summation
        # order, amplified by training), and with them every domain metric (FID 2.6 vs 2.8 on the default run); the
        # feature network is a measuring instrument, so it is the same whatever the machine or stage trains it
        with one_thread():
            classifier.train(net, [(classifier.to_tensor(train_images), torch.from_numpy(train_labels), 1.0)],
                             **budget, batch_size=128, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4,
                             warmup_epochs=1, padding=1, flip=False, seed=net_seed)
        save_file(net.state_dict(), str(out))

    net.load_state_dict(load_file(str(cached(CACHE, key, "classifier.safetensors", fit, root, "domain classifier"))))
    return net.eval()


def accuracy(net, images: np.ndarray, labels: np.ndarray) -> float:
    return float((classifier.predict(net, classifier.to_tensor(images)).numpy() == labels).mean())
