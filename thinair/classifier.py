"""Image classifiers for CAS and for domain features, and their training loop. No file I/O.

Models (`MODELS`, built by `build`), all from torchvision definitions with ``weights=None`` except
`smallcnn`:

* ``smallcnn`` suits tiny images (digits 8 px, MedMNIST 28 px).
* ``resnet18``: ResNet-18 (the paper's classifier).
* ``vgg16``: ``vgg16_bn`` (the batch-norm variant: plain VGG-16 barely trains from scratch with SGD 0.1).
* ``mobilenetv2``, ``shufflenetv2`` (x1.0), ``efficientnet_b0``.

Stems follow the Diffusion Inversion reference (``src/models/*.py`` of yongchao97/diffusion_inversion, built by
``get_network`` in ``src/train_net.py`` with ``resolution`` 28/32 for MedMNIST/CIFAR, 96 for STL-10, 256 for
ImageNette). Its ResNet switches on the exact resolution; its other models take no resolution. We map any
size onto its three tiers: <= 64 px (`SMALL`, the reference's 28/32 px), 65..128 px (`MEDIUM`, its 96 px) and
larger (its 256 px). Total downsampling (map side before global pooling at 32 / 96 / 256 px):

* ResNet-18 (``resnet.py`` lines 80-92, 112-113): <= 64 px 3x3 stride-1 conv, no max-pool (x8: 4); 65..128
  px torchvision's 7x7 stride-2 conv but no max-pool (x16: 6); larger the full torchvision stem, 7x7
  stride 2 + 3x3 stride-2 max-pool (x32: 8).
* VGG-16 (``vgg.py``): every size ends in global average pooling + one linear layer on 512 features (the
  reference's ``AdaptiveAvgPool2d((1, 1))`` + ``Linear(512, n)``, not torchvision's 7x7 pool + 4096-wide MLP);
  all five max-pools (x32: 1 / 3 / 8), except that images too small for them drop the earliest ones until the
  last map is at least 1x1 (8 px: 3 pools left, 28 px: 4).
* MobileNetV2 (``mobilenetv2.py`` lines 42-54): the stem conv has stride 1 at every size; the first 24-channel
  block keeps stride 1 at <= 64 px (the file's commented "change stride 2 -> 1 for CIFAR10" line) and stride
  2 above (the line "change for STL10" that the file runs): x8 / x16 / x16: 4 / 6 / 16.
* ShuffleNetV2 (``shufflenetv2.py`` lines 102-123): stem conv stride 1 at every size; no max-pool at <= 64 px
  (as in the CIFAR original the reference edited, kuangliu/pytorch-cifar, where that line is commented out),
  the 3x3 stride-2 max-pool above (the reference's line 123): x8 / x16 / x16: 4 / 6 / 16. (The reference
  builds width x0.5; we keep x1.0.)
* EfficientNet-B0 (``efficientnet.py`` lines 111-116, 160): stem conv stride 1, stage strides as torchvision
  (1, 2, 2, 2, 1, 2, 1) at every size: x16: 2 / 6 / 16.

The reference's ResNet at 28 px pads its 3x3 stem by 3 (a 32x32 map); we keep padding 1 at every small size.
Every model exposes ``features(x) -> (B, feature_dim)`` and ``forward(x) = head(features(x))``.
"""
from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset

from thinair.augment import (  # noqa: F401 - re-exported: the augmentations belong to the training API
    _MIXES, AUGMENTS, apply_policy, check_augment, crop_flip, cutout, make_policy, mix, soft_targets,
)

SMALL = 64  # images up to this side: the reference's CIFAR / MedMNIST stems (28, 32 px)
MEDIUM = 128  # up to this side: its STL-10 stems (96 px); larger: its ImageNette stems (256 px)


class SmallCNN(nn.Module):
    def __init__(self, in_ch: int, n_classes: int, width: int = 32):
        super().__init__()

        def block(i, o):
            return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

        self.body = nn.Sequential(block(in_ch, width), block(width, width), nn.MaxPool2d(2),
                                  block(width, 2 * width), block(2 * width, 2 * width), nn.MaxPool2d(2),
                                  block(2 * width, 4 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, n_classes)
        self.feature_dim = 4 * width

    def features(self, x):
        return self.body(x)  # (B, 4w)

    def forward(self, x):
        return self.head(self.features(x))


class ResNet18(nn.Module):
    """torchvision's ResNet-18 with the reference's stem for `image_size` (see the module docstring)."""

    def __init__(self, in_ch: int, n_classes: int, image_size: int):
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None, num_classes=n_classes)
        if image_size <= SMALL:  # CIFAR stem: 3x3 stride 1, no max-pool
            net.conv1 = nn.Conv2d(in_ch, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        elif in_ch != 3:
            net.conv1 = nn.Conv2d(in_ch, 64, 7, 2, 3, bias=False)
        if SMALL < image_size <= MEDIUM:  # the reference's 96 px stem: 7x7 stride 2, no max-pool
            net.maxpool = nn.Identity()
        self.head = net.fc
        net.fc = nn.Identity()
        self.body = net
        self.feature_dim = 512

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


class Net(nn.Module):
    """A torchvision network split into `body` (image -> (B, feature_dim)) and `head` (-> logits)."""

    def __init__(self, body: nn.Module, head: nn.Module, feature_dim: int):
        super().__init__()
        self.body, self.head, self.feature_dim = body, head, feature_dim

    def features(self, x):
        return self.body(x)  # (B, feature_dim)

    def forward(self, x):
        return self.head(self.features(x))  # (B, n_classes)


def _stem(conv: nn.Conv2d, in_ch: int, stride1: bool, kaiming: bool) -> nn.Conv2d:
    """The first conv for `in_ch` input channels, with stride 1 when `stride1`.

    A new conv (initialised like torchvision does for that model when `kaiming`) replaces `conv` when the
    channel count changes; otherwise only the stride changes, which leaves the weights as built.
    """
    if in_ch != conv.in_channels:
        conv = nn.Conv2d(in_ch, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                         bias=conv.bias is not None)
        if kaiming:
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)
    if stride1:
        conv.stride = (1, 1)
    return conv


def _unstride(module: nn.Module) -> None:
    """Set stride 1 on every stride-2 conv in `module` (a stage whose first block downsamples)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d) and m.stride != (1, 1):
            m.stride = (1, 1)


def _pools_that_fit(image_size: int, n: int) -> int:
    """How many of `n` 2x2 max-pools an `image_size` map survives without dropping below 1x1."""
    k = 0
    while k < n and image_size >= 2:
        image_size //= 2
        k += 1
    return k


def _vgg16(in_ch: int, n_classes: int, image_size: int) -> Net:
    """vgg16_bn features (max-pools that fit) + global average pooling + one linear layer, at every size."""
    from torchvision.models import vgg16_bn

    feats = vgg16_bn(weights=None, num_classes=n_classes).features
    feats[0] = _stem(feats[0], in_ch, False, kaiming=True)  # already 3x3 stride 1
    pools = [i for i, m in enumerate(feats) if isinstance(m, nn.MaxPool2d)]
    for i in pools[:len(pools) - _pools_that_fit(image_size, len(pools))]:  # drop the earliest ones
        feats[i] = nn.Identity()
    head = nn.Linear(512, n_classes)
    nn.init.normal_(head.weight, 0, 0.01)  # torchvision's VGG init for linear layers
    nn.init.zeros_(head.bias)
    return Net(nn.Sequential(feats, nn.AdaptiveAvgPool2d(1), nn.Flatten()), head, 512)  # (B, 512)


def _mobilenetv2(in_ch: int, n_classes: int, image_size: int) -> Net:
    """torchvision's MobileNetV2 with a stride-1 stem; the first 24-channel block unstrided up to `SMALL`."""
    from torchvision.models import mobilenet_v2

    net = mobilenet_v2(weights=None, num_classes=n_classes)
    net.features[0][0] = _stem(net.features[0][0], in_ch, True, kaiming=True)
    if image_size <= SMALL:
        _unstride(net.features[2])  # first 24-channel block: total stride 16 -> 8
    body = nn.Sequential(net.features, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Net(body, net.classifier, net.last_channel)


def _shufflenetv2(in_ch: int, n_classes: int, image_size: int) -> Net:
    """torchvision's ShuffleNetV2 x1.0 with a stride-1 stem; its max-pool only above `SMALL`."""
    from torchvision.models import shufflenet_v2_x1_0

    net = shufflenet_v2_x1_0(weights=None, num_classes=n_classes)
    net.conv1[0] = _stem(net.conv1[0], in_ch, True, kaiming=False)  # torchvision keeps default init here
    if image_size <= SMALL:
        net.maxpool = nn.Identity()  # total stride 16 -> 8
    body = nn.Sequential(net.conv1, net.maxpool, net.stage2, net.stage3, net.stage4, net.conv5,
                         nn.AdaptiveAvgPool2d(1), nn.Flatten())
    return Net(body, net.fc, net.fc.in_features)


def _efficientnet_b0(in_ch: int, n_classes: int, image_size: int) -> Net:
    """torchvision's EfficientNet-B0 with a stride-1 stem (total stride 16) at every `image_size`."""
    from torchvision.models import efficientnet_b0

    net = efficientnet_b0(weights=None, num_classes=n_classes)
    net.features[0][0] = _stem(net.features[0][0], in_ch, True, kaiming=True)
    body = nn.Sequential(net.features, net.avgpool, nn.Flatten())
    return Net(body, net.classifier, net.classifier[-1].in_features)


_BUILDERS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "smallcnn": lambda c, n, s: SmallCNN(c, n),
    "resnet18": ResNet18,
    "vgg16": _vgg16,
    "mobilenetv2": _mobilenetv2,
    "shufflenetv2": _shufflenetv2,
    "efficientnet_b0": _efficientnet_b0,
}
MODELS = tuple(_BUILDERS)


def build(name: str, in_ch: int, n_classes: int, image_size: int, seed: int = 0, width: int = 32) -> nn.Module:
    """A freshly initialised classifier; the initial weights come from `seed` (reproducible runs).

    Args:
        name: one of `MODELS`.
        in_ch: image channels (1 or 3).
        n_classes: number of logits.
        image_size: image side in px; selects the stem (`SMALL`, `MEDIUM`; works down to 8 px).
        seed: seeds torch's global RNG before the weights are drawn.
        width: channel width of `smallcnn` (its features are 4 x width); ignored by the torchvision models.

    Raises:
        ValueError: `name` is not in `MODELS`.
    """
    if name not in _BUILDERS:
        raise ValueError(f"cas.model: unknown classifier {name!r}; choose one of {', '.join(MODELS)}")
    torch.manual_seed(seed)
    if name == "smallcnn":
        return SmallCNN(in_ch, n_classes, width)
    return _BUILDERS[name](in_ch, n_classes, image_size)


def to_tensor(images: np.ndarray, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W), normalised."""
    return (torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weights only, not on biases and norm parameters."""
    return [{"params": [p for n, p in model.named_parameters() if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for n, p in model.named_parameters() if p.ndim <= 1], "weight_decay": 0.0}]


def _lr_lambda(total: int, warm: int) -> Callable[[int], float]:
    """Linear warm-up from 0.1 % of lr over `warm` steps, then cosine decay to 0.1 % at `total`."""

    def lr_at(step):
        if step < warm:
            return 0.001 + (1 - 0.001) * step / warm
        return 0.001 + (1 - 0.001) * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return lr_at


def _takes_state(fn) -> bool:
    """Whether `on_epoch` requires a third positional argument (the checkpoint state) or takes *args.

    Parameters with defaults do not count, so ``lambda e, loss, out=out: ...`` keeps the two-argument call.
    """
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): the old two-argument call
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in positional and p.default is inspect.Parameter.empty]
    return len(required) >= 3 or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)


def _plan(sources, batch_size: int, epochs: int | None, warmup_epochs: int, steps: int | None,
          warmup_steps: int) -> dict:
    """The run's shape: images per batch from each source, epochs, steps per epoch, total and warm-up steps.

    An epoch is as many batches as the largest source needs to be seen once at its share. With `steps`
    the run is that many optimiser steps whatever the data size (the last epoch cut short) with `warmup_steps`
    of warm-up; without, `epochs` whole epochs with `warmup_epochs` of warm-up.

    Raises:
        ValueError: neither `epochs` nor `steps`, or a count below its minimum.
    """
    if steps is None and epochs is None:
        raise ValueError("train: give epochs or steps")
    if (steps is not None and steps < 1) or min(warmup_epochs, warmup_steps) < 0:
        raise ValueError(f"train: steps must be >= 1 and warm-ups >= 0, got steps={steps}, "
                         f"warmup_epochs={warmup_epochs}, warmup_steps={warmup_steps}")
    per_batch = [max(1, round(batch_size * share)) for _, _, share in sources]
    per_epoch = max(math.ceil(len(x) / k) for (x, _, _), k in zip(sources, per_batch))
    total, warm = (epochs * per_epoch, warmup_epochs * per_epoch) if steps is None else (steps, warmup_steps)
    return {"per_batch": per_batch, "epochs": math.ceil(total / per_epoch), "steps_per_epoch": per_epoch,
            "total_steps": total, "warmup_steps": warm}


_SHAPE = ("epochs", "steps_per_epoch", "total_steps", "warmup_steps")  # what a checkpoint must agree on


def _snapshot(epoch: int, plan: dict, model, opt, sched, gen, device) -> dict:
    """Everything needed to continue after `epoch` completed epochs (copies, safe to keep or save)."""
    state = {"epoch": epoch, **{k: plan[k] for k in _SHAPE},
             "model": copy.deepcopy(model.state_dict()), "optimizer": copy.deepcopy(opt.state_dict()),
             "scheduler": copy.deepcopy(sched.state_dict()), "generator": gen.get_state(),
             "torch_rng": torch.get_rng_state()}
    if torch.device(device).type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    return state


def _restore(state: dict, plan: dict, model, opt, sched, gen, device) -> int:
    """Load a `_snapshot` into the training objects; returns the epoch to continue from.

    A checkpoint from before `total_steps` / `warmup_steps` were recorded is checked on what it has.
    """
    theirs = {k: state[k] for k in _SHAPE if k in state}
    ours = {k: plan[k] for k in theirs}
    if theirs != ours:
        raise ValueError(f"resume: checkpoint is for {theirs}, this run has {ours}")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.device(device).type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)
    return state["epoch"]


def _batch(sources, per_batch: list[int], perms: list, step: int, feeds: dict | None = None,
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch `step` of an epoch: the next `per_batch[i]` images of each source in its order `perms[i]`, or the next
    batch of its feed (``feeds[i]``, an iterator over a stream source's DataLoader)."""
    xs, ys = [], []
    for i, ((x, y, _), k, perm) in enumerate(zip(sources, per_batch, perms)):
        if feeds and i in feeds:
            xb, yb = next(feeds[i])
            xs.append(xb)
            ys.append(yb)
            continue
        idx = perm[(torch.arange(k) + step * k) % len(x)]
        xs.append(x[idx])
        ys.append(y[idx])
    return torch.cat(xs), torch.cat(ys)  # (B, C, H, W), (B,)


def is_stream(x) -> bool:
    """Whether a training source's images are a stream of batches (thinair/stream.py) rather than a tensor."""
    return isinstance(x, IterableDataset)


def _feeds(sources, per_batch: list[int], first_step: int) -> dict:
    """{source index: iterator of batches} for the stream sources (thinair/stream.py), from optimiser step
    `first_step` on, each through a ``DataLoader`` (``batch_size=None``: the stream yields whole batches)."""
    return {i: iter(DataLoader(x.at(k, first_step), batch_size=None))
            for i, ((x, _, _), k) in enumerate(zip(sources, per_batch)) if is_stream(x)}


def _layout(device) -> torch.memory_format:
    """The memory format training runs in: channels_last on the CPU, where oneDNN's convolutions, batch norm and
    max pooling take a smallcnn step on 8 px digits at batch 128 from 11.4 to 8.0 ms (one thread); the GPU keeps
    PyTorch's default. Same maths, other summation order: results differ from the NCHW ones in the last bits."""
    return torch.channels_last if torch.device(device).type == "cpu" else torch.preserve_format


def _loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, augment: tuple[str, ...], policy, mixes: list[str],
          gen: torch.Generator, device) -> torch.Tensor:
    """Cross-entropy of `model` on the cropped batch after the `augment` options (soft targets when mixed)."""
    if policy is not None:
        xb = apply_policy(xb, policy, gen)
    if "cutout" in augment:
        xb = cutout(xb, gen)
    mixed = mix(xb, mixes, gen) if mixes else None
    fmt = _layout(device)
    if mixed is None:
        return F.cross_entropy(model(xb.to(device, memory_format=fmt)), yb.to(device))
    logits = model(mixed[0].to(device, memory_format=fmt))  # (B, n_classes)
    return F.cross_entropy(logits, soft_targets(yb.to(device), mixed[1], mixed[2], logits.shape[1]))


def train(model: nn.Module, sources: list[tuple[torch.Tensor, torch.Tensor, float]], *, epochs: int | None = None,
          batch_size: int, optimizer: str, lr: float, momentum: float, weight_decay: float, warmup_epochs: int = 0,
          padding: int, flip: bool, seed: int, device="cpu", on_epoch=None, augment: tuple[str, ...] = (),
          resume: dict | None = None, steps: int | None = None, warmup_steps: int = 0) -> nn.Module:
    """Train on one or more (x, y, share) sources; each batch takes `share` of its images from each.

    An epoch is as many batches as the largest source needs to be seen once at its share. The run is
    `epochs` epochs, or, given `steps`, exactly `steps` optimiser steps whatever the data size (the reference's
    protocol: 50,000 steps, 1,000 warm-up steps); the last epoch is then cut short.
    Schedule: linear warm-up then cosine decay to 0.1 % of lr over the whole run (the paper's protocol).

    Per batch: crop + flip (`padding`, `flip`), then the `augment` options in this order: AutoAugment /
    RandAugment / AugMix per image, cutout per image, MixUp or CutMix over the batch (the loss then takes
    soft targets). x must be normalised as `to_tensor` does by default (mean 0.5, std 0.5) for the uint8 ops.

    Determinism: all data randomness (order, crop, flip, every `augment` option) comes from a generator
    seeded with `seed`; torch's global RNG is seeded with `seed` too and only the model draws from it
    (dropout, stochastic depth). With ``augment=()`` the random draws are exactly those of the code before
    `augment` existed, so default runs are bit-identical to it.

    Args:
        model: from `build`; trained in place on `device`.
        sources: (x (N, C, H, W) float, y (N,) int64, share of each batch); or (a
            :class:`thinair.stream.SyntheticStream`, None, share): fresh images every step, read through a
            ``DataLoader``; its ``len`` sets the epoch length as a set of that size would, and step t of the run
            reads the stream's step t, so a resumed run sees the images an uninterrupted one does.
        epochs: total epochs, also when resuming; ignored when `steps` is given.
        warmup_epochs: warm-up length in epochs (with `epochs`).
        steps: total optimiser steps, also when resuming; None trains `epochs` epochs.
        warmup_steps: warm-up length in optimiser steps (with `steps`).
        augment: names from `AUGMENTS`, combinable.
        on_epoch: called after each epoch as ``on_epoch(epoch, loss)`` (epoch counts from 1, loss of the last
            batch), or as ``on_epoch(epoch, loss, state)`` when its signature has a third positional parameter
            without default (or ``*args``); the state is only built then.
            `state` is a dict of copies (model, optimizer, LR scheduler, data generator and RNG states, the
            epoch number) that can be kept or written with ``torch.save``; ``state["epochs"]`` is the number
            of epochs of the run (with `steps`: ceil(steps / steps per epoch)), the last one needs no saving.
        resume: such a `state`; training continues from the epoch after it and ends with exactly the weights
            of an uninterrupted run (same arguments; on GPU only as far as its kernels are deterministic).
            `model` may be freshly built: its weights are replaced.

    Raises:
        ValueError: unknown `augment` name; neither `epochs` nor `steps`; `resume` from a run of another shape
            (epochs, steps per epoch, total or warm-up steps).
    """
    augment = check_augment(augment)
    policy, mixes = make_policy(augment), [a for a in augment if a in _MIXES]
    plan = _plan(sources, batch_size, epochs, warmup_epochs, steps, warmup_steps)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device, memory_format=_layout(device)).train()
    opt = (torch.optim.SGD(_param_groups(model, weight_decay), lr=lr, momentum=momentum) if optimizer == "sgd"
           else torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(plan["total_steps"], plan["warmup_steps"]))
    start = 0 if resume is None else _restore(resume, plan, model, opt, sched, gen, device)
    wants_state = on_epoch is not None and _takes_state(on_epoch)
    per_epoch = plan["steps_per_epoch"]
    feeds = _feeds(sources, plan["per_batch"], start * per_epoch)
    for epoch in range(start, plan["epochs"]):
        perms = [None if is_stream(x) else torch.randperm(len(x), generator=gen) for x, _, _ in sources]
        for step in range(min(per_epoch, plan["total_steps"] - epoch * per_epoch)):
            xb, yb = _batch(sources, plan["per_batch"], perms, step, feeds)
            loss = _loss(model, crop_flip(xb, padding, flip, gen), yb, augment, policy, mixes, gen, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if wants_state:
            on_epoch(epoch + 1, loss.item(), _snapshot(epoch + 1, plan, model, opt, sched, gen, device))
        elif on_epoch is not None:
            on_epoch(epoch + 1, loss.item())
    return model.to(memory_format=torch.contiguous_format).eval()  # contiguous weights, as safetensors saves them


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 512, device="cpu") -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[s:s + batch].to(device)).argmax(1).cpu() for s in range(0, len(x), batch)])


@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor, batch: int = 512, device="cpu") -> np.ndarray:
    model.eval()
    return torch.cat([model.features(x[s:s + batch].to(device)).float().cpu()
                      for s in range(0, len(x), batch)]).numpy()
