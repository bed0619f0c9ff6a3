"""Image classifiers for CAS and for domain features, and their training loop. No file I/O.

`smallcnn` suits tiny images (digits 8 px, MedMNIST 28 px); `resnet18` is torchvision's ResNet-18
with the CIFAR stem (3x3 conv, no max-pool) for images <= 64 px, as in the paper's protocol.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


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
    def __init__(self, in_ch: int, n_classes: int, image_size: int):
        super().__init__()
        from torchvision.models import resnet18

        net = resnet18(weights=None, num_classes=n_classes)
        if image_size <= 64:  # CIFAR-style stem
            net.conv1 = nn.Conv2d(in_ch, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        elif in_ch != 3:
            net.conv1 = nn.Conv2d(in_ch, 64, 7, 2, 3, bias=False)
        self.head = net.fc
        net.fc = nn.Identity()
        self.body = net
        self.feature_dim = 512

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.head(self.features(x))


def build(name: str, in_ch: int, n_classes: int, image_size: int, seed: int = 0) -> nn.Module:
    """A freshly initialised classifier; the initial weights come from `seed` (reproducible runs)."""
    torch.manual_seed(seed)
    if name == "smallcnn":
        return SmallCNN(in_ch, n_classes)
    if name == "resnet18":
        return ResNet18(in_ch, n_classes, image_size)
    raise ValueError(f"cas.model: unknown classifier {name!r}")


def to_tensor(images: np.ndarray, mean: float = 0.5, std: float = 0.5) -> torch.Tensor:
    """uint8 (N, H, W, C) -> float (N, C, H, W), normalised."""
    return (torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def augment(x: torch.Tensor, padding: int, flip: bool, gen: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding (+ optional horizontal flip), per image; x (B, C, H, W)."""
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


def train(model: nn.Module, sources: list[tuple[torch.Tensor, torch.Tensor, float]], *, epochs: int,
          batch_size: int, optimizer: str, lr: float, momentum: float, weight_decay: float, warmup_epochs: int,
          padding: int, flip: bool, seed: int, device="cpu", on_epoch=None) -> nn.Module:
    """Train on one or more (x, y, share) sources; each batch takes `share` of its images from each.

    An epoch is as many batches as the largest source needs to be seen once at its share.
    Schedule: linear warm-up then cosine decay to 0.1 % of lr (the paper's protocol).
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model.to(device).train()
    params = [{"params": [p for n, p in model.named_parameters() if p.ndim > 1], "weight_decay": weight_decay},
              {"params": [p for n, p in model.named_parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    opt = (torch.optim.SGD(params, lr=lr, momentum=momentum) if optimizer == "sgd"
           else torch.optim.AdamW(params, lr=lr))
    per_batch = [max(1, round(batch_size * share)) for _, _, share in sources]
    steps_per_epoch = max(math.ceil(len(x) / k) for (x, _, _), k in zip(sources, per_batch))
    total, warm = epochs * steps_per_epoch, warmup_epochs * steps_per_epoch

    def lr_at(step):
        if step < warm:
            return 0.001 + (1 - 0.001) * step / warm
        return 0.001 + (1 - 0.001) * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    for epoch in range(epochs):
        perms = [torch.randperm(len(x), generator=gen) for x, _, _ in sources]
        for step in range(steps_per_epoch):
            xs, ys = [], []
            for (x, y, _), k, perm in zip(sources, per_batch, perms):
                idx = perm[(torch.arange(k) + step * k) % len(x)]
                xs.append(x[idx])
                ys.append(y[idx])
            xb = augment(torch.cat(xs), padding, flip, gen).to(device)
            loss = F.cross_entropy(model(xb), torch.cat(ys).to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        if on_epoch is not None:
            on_epoch(epoch + 1, loss.item())
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 512, device="cpu") -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[s:s + batch].to(device)).argmax(1).cpu() for s in range(0, len(x), batch)])


@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor, batch: int = 512, device="cpu") -> np.ndarray:
    model.eval()
    return torch.cat([model.features(x[s:s + batch].to(device)).float().cpu()
                      for s in range(0, len(x), batch)]).numpy()
