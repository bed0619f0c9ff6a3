"""classifier: architectures on tiny images, augmentations, the unchanged default path, exact resume."""
from __future__ import annotations

import hashlib
import io
import itertools

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from thinair import augment as A
from thinair import classifier as C

# Map side before global pooling at (8 px, 32 px): the small-image stems downsample by 8, VGG as far as
# the image allows (8 px: 3 pools, 32 px: 5), SmallCNN by 4.
POOLED_SIDE = {"smallcnn": (2, 8), "resnet18": (1, 4), "vgg16": (1, 1), "mobilenetv2": (1, 4),
               "shufflenetv2": (1, 4), "efficientnet_b0": (1, 2)}

# Map side before the head (global pooling) at 32 / 96 / 256 px: the reference's stems per resolution
# (total stride ResNet-18 8/16/32, VGG-16 32, MobileNetV2 and ShuffleNetV2 8/16/16, EfficientNet-B0 16).
HEAD_SIDE = {"smallcnn": (8, 24, 64), "resnet18": (4, 6, 8), "vgg16": (1, 3, 8), "mobilenetv2": (4, 6, 16),
             "shufflenetv2": (4, 6, 16), "efficientnet_b0": (2, 6, 16)}

# Captured before the per-resolution stems existed: (state_dict digest, conv/pool layout digest) of
# `C.build(*args, seed=0)`; the small-image networks must stay the same, bit for bit.
SMALL_NETS = {
    ("resnet18", 3, 10, 32): ("42a57b68b29a11a03a101e691e68a91230c44a222097be0cad5238a16dbdeceb",
                              "52bd1a3e3d1205b411970dda8b7ca15027e9249a4af887866fc3a5e6a9ad99dc"),
    ("resnet18", 1, 9, 28): ("25f78010adfba7a98206a9b900d15c36ba5a70147976fd1458c3e7c2cef92036",
                             "52bd1a3e3d1205b411970dda8b7ca15027e9249a4af887866fc3a5e6a9ad99dc"),
    ("smallcnn", 1, 10, 8): ("239bb9ca3e150c21245a38d72ed2df5ac69368cc9769c53c74c732bf097ad5e9",
                             "cd14d78ab312211f6eae0d36cf102a8fd911f121beab36783724f1ad1125f99c"),
}

# Captured with the code before `augment` / `resume` existed (smallcnn, 8 px, 2 epochs, see `_default_run`):
# sha256 of every batch the model saw, sum of all float state, first 4 stem weights, per-epoch losses.
BEFORE = {
    1: ("e383843dcb1cd25807d0932dfbaa39dd3206ad70ce37aa7ec4bab5405a806d2e", 459.38661914504934,
        [-0.32463744282722473, -0.25780850648880005, -0.17358851432800293, -0.2995814085006714],
        [1.5103763341903687, 1.4134856462478638]),
    2: ("1f29ba772c78dd8d68b791dd24ae59cd698200a8b41886db63db356f23fb4e63", 640.1476246589575,
        [-0.3252665102481842, -0.16697213053703308, -0.1260717213153839, -0.33845457434654236],
        [1.5518327951431274, 1.1504005193710327]),
}
PROTOCOL = {"batch_size": 16, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
            "warmup_epochs": 1}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: intra-op threads only add overhead (seconds per call when the cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(n: int, c: int, side: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random normalised images in [-1, 1) (B, C, H, W) and labels (B,)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, side, side, generator=g) * 2 - 1, torch.randint(0, k, (n,), generator=g)


def _images(n: int, c: int, side: int, seed: int) -> torch.Tensor:
    """Random images exactly on the uint8 grid, normalised like `to_tensor` (B, C, H, W)."""
    g = torch.Generator().manual_seed(seed)
    return A._from_uint8(torch.randint(0, 256, (n, c, side, side), generator=g, dtype=torch.uint8))


def _spy(net: nn.Module) -> list[torch.Tensor]:
    """Record every batch `net` is called with."""
    seen, forward = [], net.forward

    def recording(x):
        seen.append(x.detach().clone())
        return forward(x)

    net.forward = recording
    return seen


def _train(net, sources, epochs=1, padding=1, flip=True, seed=7, **kw):
    return C.train(net, sources, epochs=epochs, padding=padding, flip=flip, seed=seed, **PROTOCOL, **kw)


def _tiny_dropout_net(in_ch: int, n_classes: int) -> C.Net:
    """A tiny model that also draws from torch's global RNG (dropout)."""
    body = nn.Sequential(nn.Conv2d(in_ch, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Dropout(0.3))
    return C.Net(body, nn.Linear(32, n_classes), 32)


@pytest.mark.parametrize("name", C.MODELS)
def test_models_build_for_tiny_and_cifar_images(name):
    for (in_ch, side), pooled_side in zip([(1, 8), (3, 32)], POOLED_SIDE[name]):
        net = C.build(name, in_ch, 5, side, seed=0).eval()
        pooled = []
        pool = [m for m in net.modules() if isinstance(m, nn.AdaptiveAvgPool2d)][-1]
        pool.register_forward_hook(lambda m, i, o, seen=pooled: seen.append(i[0].shape[-1]))
        x = torch.randn(2, in_ch, side, side)
        with torch.no_grad():
            f, y = net.features(x), net(x)
        assert f.shape == (2, net.feature_dim) and y.shape == (2, 5)
        assert torch.isfinite(y).all()
        assert pooled == [pooled_side, pooled_side]


def _side_before_head(net: nn.Module, side: int) -> int:
    """Side of the feature map that the last pooling (global, right before the head) receives."""
    seen = []
    pool = [m for m in net.modules() if isinstance(m, nn.AdaptiveAvgPool2d)][-1]
    pool.register_forward_hook(lambda m, i, o: seen.append((i[0].shape[-2:], o.shape[-2:])))
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 3, side, side))
    (h, w), pooled = seen[0]
    assert out.shape == (1, 4) and h == w and pooled == (1, 1)
    return h


@pytest.mark.parametrize("name", C.MODELS)
def test_map_side_before_the_head_follows_the_reference_per_resolution(name):
    sides = tuple(_side_before_head(C.build(name, 3, 4, side, seed=0), side) for side in (32, 96, 256))
    assert sides == HEAD_SIDE[name]


def _state_digest(net: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in net.state_dict().items():
        h.update(f"{k} {v.dtype} {tuple(v.shape)}".encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


def _layout_digest(net: nn.Module) -> str:
    """Kernel, stride, padding of every conv and pool: what a state_dict does not show."""
    rows = [(n, type(m).__name__, *(str(getattr(m, a, None)) for a in ("kernel_size", "stride", "padding", "output_size")))
            for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d))]
    return hashlib.sha256(repr(rows).encode()).hexdigest()


@pytest.mark.parametrize("args", SMALL_NETS)
def test_small_image_networks_are_unchanged_bit_for_bit(args):
    net = C.build(*args, seed=0, **({"width": 16} if args[0] == "smallcnn" else {}))
    assert (_state_digest(net), _layout_digest(net)) == SMALL_NETS[args]


def test_unknown_model_raises_with_the_allowed_names():
    with pytest.raises(ValueError, match="efficientnet_b0"):
        C.build("alexnet", 3, 10, 32)


def _default_run(n_sources: int):
    net = C.build("smallcnn", 1, 4, 8, seed=3)
    seen = _spy(net)
    x, y = _data(64, 1, 8, 4, 1)
    sources = [(x, y, 1.0)]
    if n_sources == 2:
        x2, y2 = _data(40, 1, 8, 4, 2)
        sources = [(x, y, 0.25), (x2, y2, 0.75)]
    losses = []
    _train(net, sources, epochs=2, on_epoch=lambda e, loss: losses.append(loss))
    return net, seen, losses


@pytest.mark.parametrize("n_sources", [1, 2])
def test_default_path_unchanged(n_sources):
    """augment=() draws exactly the old random numbers: identical batches (bit for bit), same weights."""
    digest, total, stem, losses_before = BEFORE[n_sources]
    net, seen, losses = _default_run(n_sources)
    h = hashlib.sha256()
    for xb in seen:
        h.update(xb.numpy().tobytes())
    assert h.hexdigest() == digest
    sd = net.state_dict()
    # the weights as before up to summation order (training runs channels_last on the CPU since issue 19)
    assert sum(float(v.double().sum()) for v in sd.values() if v.is_floating_point()) == pytest.approx(total, rel=1e-4)
    assert sd["body.0.0.weight"].flatten()[:4].tolist() == pytest.approx(stem, abs=2e-3)
    assert losses == pytest.approx(losses_before, rel=5e-3)
    assert torch.rand(1).item() == pytest.approx(0.5349225401878357)  # global RNG: seeded with 7, never drawn


def test_unknown_augment_raises_with_the_allowed_names():
    x, y = _data(16, 1, 8, 4, 0)
    with pytest.raises(ValueError, match="autoaugment.*cutmix"):
        _train(C.build("smallcnn", 1, 4, 8), [(x, y, 1.0)], augment=("mixup", "blur"))
    assert C.check_augment("mixup") == ("mixup",)
    assert C.check_augment(["cutout", "augmix"]) == ("cutout", "augmix")


@pytest.mark.parametrize("name", C.AUGMENTS)
def test_each_augmentation_trains_and_changes_the_batch(name):
    x, y = _images(64, 1, 8, 0), torch.randint(0, 4, (64,))
    batches = {}
    for aug in [(), (name,)]:
        net = C.build("smallcnn", 1, 4, 8, seed=0)
        seen = _spy(net)
        losses = []
        _train(net, [(x, y, 1.0)], padding=0, flip=False, augment=aug, on_epoch=lambda e, loss, to=losses: to.append(loss))
        assert len(seen) == 4 and len(losses) == 1 and losses[0] == losses[0]  # 64 / 16 steps, finite loss
        batches[aug] = seen[0]
    plain, augmented = batches[()], batches[(name,)]
    assert augmented.shape == plain.shape and augmented.dtype == plain.dtype == torch.float32
    assert not torch.equal(augmented, plain)


@pytest.mark.parametrize("name", ["autoaugment", "randaugment", "augmix"])
def test_policies_on_rgb_keep_shape_and_leave_global_rng_alone(name):
    x = _images(4, 3, 32, 1)
    rng = torch.get_rng_state()
    out = C.apply_policy(x, C.make_policy((name,)), torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), rng)
    assert out.shape == x.shape and out.dtype == x.dtype and not torch.equal(out, x)
    again = C.apply_policy(x, C.make_policy((name,)), torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # seeded by the generator alone
    assert torch.equal(A._from_uint8(A._to_uint8(x)), x)  # the uint8 round trip is exact


@pytest.mark.parametrize("side, hole_side", [(8, 3), (32, 11), (96, 34)])
def test_cutout_hole_is_one_eighth_of_the_image_area(side, hole_side):
    """The paper's "square region, sized at 1/8 of the input image", read as 1/8 of the area."""
    x = torch.ones(64, 3, side, side)
    out = C.cutout(x, torch.Generator().manual_seed(0))
    holes = (out == 0).all(1)  # (B, H, W)
    area = holes.sum((-2, -1))  # (B,)
    assert holes.any(-1).any(-1).all()  # every image has a hole
    assert area.max() == hole_side ** 2  # the largest are whole squares...
    assert abs(area.max() / side ** 2 - 1 / 8) < 0.025  # ...of about 1/8 of the image
    rows, cols = holes.any(-1).sum(-1), holes.any(-2).sum(-1)
    assert (rows <= hole_side).all() and (cols <= hole_side).all()
    assert torch.equal(area, rows * cols)  # rectangles: one hole, clipped at the borders
    assert A.cutout_side(side, side) == hole_side


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mix_gives_soft_targets_matching_the_mixed_images(kind):
    x = torch.arange(4.0)[:, None, None, None].expand(4, 1, 8, 8).contiguous()  # image i is all i
    y = torch.tensor([0, 1, 2, 3])
    mixed, perm, lam = C.mix(x, (kind,), torch.Generator().manual_seed(3))
    t = C.soft_targets(y, perm, lam, 5)
    assert mixed.shape == x.shape and t.shape == (4, 5) and 0 <= lam <= 1
    assert torch.allclose(t.sum(1), torch.ones(4))
    expected = (lam * x + (1 - lam) * x[perm]).mean((1, 2, 3))  # the image mean encodes the label mix
    assert torch.allclose(mixed.mean((1, 2, 3)), expected, atol=1e-5)
    logits = torch.randn(4, 5)
    ce = nn.functional.cross_entropy
    assert torch.allclose(ce(logits, t), lam * ce(logits, y) + (1 - lam) * ce(logits, y[perm]))


def test_mix_training_uses_soft_targets(monkeypatch):
    targets, ce = [], nn.functional.cross_entropy

    def spy(logits, target, *a, **kw):
        targets.append(target)
        return ce(logits, target, *a, **kw)

    monkeypatch.setattr(C.F, "cross_entropy", spy)
    x, y = _data(32, 1, 8, 4, 0)
    _train(C.build("smallcnn", 1, 4, 8), [(x, y, 1.0)], augment=("mixup", "cutmix"))
    assert all(t.shape == (16, 4) and t.dtype == torch.float32 for t in targets)
    assert all(torch.allclose(t.sum(1), torch.ones(16)) for t in targets)


def _resume_case():
    x, y = _images(48, 1, 8, 2), torch.randint(0, 3, (48,))
    kw = {"epochs": 4, "augment": ("randaugment", "cutout", "mixup")}
    return [(x, y, 1.0)], kw


def test_resume_gives_the_weights_of_an_uninterrupted_run():
    sources, kw = _resume_case()
    torch.manual_seed(0)
    full = _train(_tiny_dropout_net(1, 3), sources, **kw)

    states, old_style = {}, []
    torch.manual_seed(0)
    _train(_tiny_dropout_net(1, 3), sources, on_epoch=lambda e, loss, state: states.setdefault(e, state), **kw)
    _train(_tiny_dropout_net(1, 3), sources, on_epoch=lambda e, loss: old_style.append(e), **kw)
    assert old_style == [1, 2, 3, 4]  # two-argument callbacks still work
    assert not C._takes_state(lambda e, loss, out=old_style: None) and C._takes_state(lambda *a: None)

    buf = io.BytesIO()
    torch.save(states[2], buf)  # what a caller would write to disk
    buf.seek(0)
    torch.manual_seed(123)  # a fresh model with other weights
    resumed = _train(_tiny_dropout_net(1, 3), sources, resume=torch.load(buf, weights_only=True), **kw)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k


def test_resume_of_another_run_length_raises():
    sources, _ = _resume_case()
    states = {}
    _train(C.build("smallcnn", 1, 3, 8), sources, epochs=2, on_epoch=lambda e, loss, s: states.setdefault(e, s))
    with pytest.raises(ValueError, match="resume"):
        _train(C.build("smallcnn", 1, 3, 8), sources, epochs=3, resume=states[1])


def _count_steps(net, sources, **kw) -> tuple[list[float], list[tuple[int, int]]]:
    """Train; returns the learning rate of every optimiser step and the (epoch, run's epochs) of each callback."""
    lrs, epochs = [], []
    hook = register_optimizer_step_post_hook(lambda opt, args, kwargs: lrs.append(opt.param_groups[0]["lr"]))
    try:
        _train(net, sources, on_epoch=lambda e, loss, state: epochs.append((e, state["epochs"])), **kw)
    finally:
        hook.remove()
    return lrs, epochs


@pytest.mark.parametrize("n, epochs", [(40, 4), (100, 2)])  # 3 and 7 batches of 16 per epoch
def test_steps_train_a_fixed_number_of_optimiser_steps_whatever_the_data_size(n, epochs):
    x, y = _data(n, 1, 8, 4, 0)
    lrs, seen = _count_steps(C.build("smallcnn", 1, 4, 8, width=4), [(x, y, 1.0)], epochs=50, steps=10,
                             warmup_steps=2)
    assert len(lrs) == 10  # `epochs` is ignored
    assert seen == [(e, epochs) for e in range(1, epochs + 1)]  # the last epoch is cut short
    peak = PROTOCOL["lr"]
    assert lrs[:3] == pytest.approx([peak * 0.001, peak * (0.001 + 0.999 / 2), peak])  # warm-up over 2 steps
    assert lrs == pytest.approx([peak * C._lr_lambda(10, 2)(i) for i in range(10)])  # then cosine over the rest
    assert all(a > b for a, b in itertools.pairwise(lrs[2:]))


def test_steps_equal_to_whole_epochs_give_the_epoch_run():
    x, y = _data(40, 1, 8, 4, 0)  # 3 steps per epoch
    by_epochs = _train(C.build("smallcnn", 1, 4, 8, width=4), [(x, y, 1.0)], epochs=2)  # warm-up 1 epoch
    by_steps = _train(C.build("smallcnn", 1, 4, 8, width=4), [(x, y, 1.0)], steps=6, warmup_steps=3)
    for (k, a), b in zip(by_epochs.state_dict().items(), by_steps.state_dict().values()):
        assert torch.equal(a, b), k


def test_steps_resume_mid_run_gives_the_uninterrupted_weights():
    x, y = _images(40, 1, 8, 2), torch.randint(0, 3, (40,))
    kw = {"steps": 8, "warmup_steps": 2, "augment": ("cutout",)}  # 3 + 3 + 2 steps
    torch.manual_seed(0)
    full = _train(_tiny_dropout_net(1, 3), [(x, y, 1.0)], **kw)
    states = {}
    torch.manual_seed(0)
    _train(_tiny_dropout_net(1, 3), [(x, y, 1.0)], on_epoch=lambda e, loss, s: states.setdefault(e, s), **kw)
    assert sorted(states) == [1, 2, 3] and states[1]["total_steps"] == 8
    resumed = _train(_tiny_dropout_net(1, 3), [(x, y, 1.0)], resume=states[2], **kw)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(ValueError, match="resume.*total_steps"):
        _train(_tiny_dropout_net(1, 3), [(x, y, 1.0)], resume=states[1], steps=9, warmup_steps=2)
    with pytest.raises(ValueError, match="give epochs or steps"):
        C.train(_tiny_dropout_net(1, 3), [(x, y, 1.0)], padding=0, flip=False, seed=0, **PROTOCOL)


def test_resume_accepts_a_checkpoint_from_before_total_steps_were_recorded():
    sources, _ = _resume_case()
    states = {}
    _train(C.build("smallcnn", 1, 3, 8, width=4), sources, epochs=2, on_epoch=lambda e, loss, s: states.setdefault(e, s))
    old = {k: v for k, v in states[1].items() if k not in ("total_steps", "warmup_steps")}
    _train(C.build("smallcnn", 1, 3, 8, width=4), sources, epochs=2, resume=old)


def test_a_default_training_process_imports_neither_torchvision_nor_diffusers():
    """torchvision's import (torch._dynamo with it) and diffusers' cost 2 s and 8 s of CPU in every CAS worker here;
    a training without AutoAugment-style policies, and the cas stage's keys, need neither."""
    import subprocess
    import sys

    code = ("import sys; from thinair.augment import make_policy; from thinair.tasks import cas; "
            "assert make_policy([]) is None and make_policy(['cutout']) is None; "
            "print(sorted(m for m in ('torchvision', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
