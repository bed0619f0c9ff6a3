"""pretrain: the embedded generator's training writes a loadable SD-layout directory, and resumes."""
from __future__ import annotations

import pytest

from thinair import io
from thinair.config import ParamsError, parse_params
from thinair.generator import load_generator
from thinair.tasks.pretrain import pretrain

TINY = {"vae_steps": 4, "unet_steps": 4, "batch_size": 16, "unet_channels": [8, 16], "vae_channels": [4, 8, 8],
        "cross_attention_dim": 8, "num_tokens": 2}


def test_pretrain_writes_a_loadable_generator(tmp_path):
    p = parse_params({"pretrain": TINY | {"output": "gen"}})
    log = pretrain(p, tmp_path)
    g = load_generator(str(tmp_path / "gen"))
    assert g.cross_attention_dim == 8 and g.vae_factor == 4 and g.scaling_factor != 0.18215  # fitted to the data
    assert [r["step"] for r in log["unet"]] == [4] and log["train_images"] == 1438
    tokens = io.load_tensors(tmp_path / "gen" / "class_tokens.safetensors")["tokens"]
    assert tokens.shape == (11, 2, 8)  # 10 classes + the null context
    assert io.read_json(tmp_path / "gen" / "train_log.json")["params"]["pretrain"]["unet_steps"] == 4


def test_pretrain_resumes_from_its_unet_checkpoint(tmp_path, caplog):
    import logging

    import torch

    from thinair.tasks.pretrain import train_unet

    lat, labels = torch.randn(64, 4, 4, 4), torch.arange(64) % 10
    ckpt = tmp_path / "unet.pt"
    short = parse_params({"pretrain": TINY | {"unet_steps": 3}}).pretrain  # a run "killed" after its step-2 checkpoint
    train_unet(lat, labels, 10, short, torch.Generator().manual_seed(0), ckpt=ckpt, ckpt_every=2)
    assert ckpt.is_file()
    full = parse_params({"pretrain": TINY | {"unet_steps": 6}}).pretrain
    with caplog.at_level(logging.INFO):
        _, _, losses = train_unet(lat, labels, 10, full, torch.Generator().manual_seed(0), ckpt=ckpt, ckpt_every=2,
                                  log_every=1)
    assert "resuming unet training at step 2" in caplog.text
    assert [r["step"] for r in losses] == [3, 4, 5, 6]


def test_pretrain_rejects_resolution_not_divisible_by_vae_factor(tmp_path):
    with pytest.raises(ValueError, match="not divisible by the VAE factor 4"):
        pretrain(parse_params({"pretrain": TINY | {"resolution": 18}}), tmp_path)


def test_pretrain_is_reproducible(tmp_path):
    from thinair.generator import local_identity

    for name in ("a", "b"):
        pretrain(parse_params({"pretrain": TINY | {"output": name}}), tmp_path / name)
    assert local_identity(tmp_path / "a" / "a") == local_identity(tmp_path / "b" / "b")


def test_pretrain_immiscible_off_draws_the_plain_noise_and_assign_repairs_it():
    """`off` keeps the committed generator's bits (the same torch.randn draw); `assign` trains on a permutation
    of that draw that lowers the summed latent-noise distance, so its losses differ."""
    import torch

    from thinair.immiscible import immiscible_noise
    from thinair.tasks.pretrain import train_unet

    z0 = torch.randn(16, 4, 4, 4)
    plain = torch.randn(z0.shape, generator=torch.Generator().manual_seed(3))
    assert torch.equal(immiscible_noise(z0, torch.Generator().manual_seed(3), "off"), plain)
    paired = immiscible_noise(z0, torch.Generator().manual_seed(3), "assign")
    assert sorted(map(tuple, paired.flatten(1).tolist())) == sorted(map(tuple, plain.flatten(1).tolist()))
    assert (z0 - paired).flatten(1).norm(dim=1).sum() < (z0 - plain).flatten(1).norm(dim=1).sum()

    lat, labels = torch.randn(64, 4, 4, 4), torch.arange(64) % 10
    runs = {}
    for mode in ("off", "assign", "knn"):
        p = parse_params({"pretrain": TINY | {"unet_steps": 3, "immiscible": mode}}).pretrain
        runs[mode] = [r["loss"] for r in train_unet(lat, labels, 10, p, torch.Generator().manual_seed(0),
                                                      log_every=1)[2]]
    assert runs["off"] != runs["assign"] and runs["off"] != runs["knn"]


def test_pretrain_immiscible_bad_value_is_refused():
    from thinair.config import ParamsError

    with pytest.raises((ParamsError, ValueError), match="immiscible"):
        parse_params({"pretrain": TINY | {"immiscible": "sideways"}})


# --- issue 16: a generator for any dataset (folders grey/colour, unconditional, a pool disjoint from the task) ---

FAST = TINY | {"vae_steps": 2, "unet_steps": 2}  # whole pretrain runs below: the fewest steps that train


def _folder(root, mode: str, per_class=(6, 6, 6), size: int = 12, seed: int = 0):
    """An image folder root/<class>/<i>.png of random `mode` ("L" or "RGB") images, `per_class[c]` per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, n in enumerate(per_class):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n):
            shape = (size, size) if mode == "L" else (size, size, 3)
            im = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
            assert im.mode == mode
            im.save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_pretrain_on_an_image_folder_grey_or_colour(tmp_path, mode):
    data = _folder(tmp_path / "data", mode)
    p = parse_params({"pretrain": FAST | {"dataset": f"folder:{data}", "output": "gen"}})
    log = pretrain(p, tmp_path)
    g = load_generator(str(tmp_path / "gen"))  # the loader Stable Diffusion goes through
    assert g.cross_attention_dim == 8 and g.vae_factor == 4
    assert log["train_images"] == 15 and log["class_names"] == ["class0", "class1", "class2"]  # 3 x (6 - 1 test)
    assert log["conditional"] is True and log["pool"]["images"] == 15
    tokens = io.load_tensors(tmp_path / "gen" / "class_tokens.safetensors")["tokens"]
    assert tokens.shape == (4, 2, 8)  # 3 classes + the null context
    assert (tmp_path / "gen" / "samples.png").is_file()


def test_pretrain_unconditional_ships_no_class_tokens_and_class_tokens_sampling_refuses_it(tmp_path):
    import torch

    from thinair import steering
    from thinair.generator import GeneratorUnavailable
    from thinair.tasks.pretrain import train_unet

    data = _folder(tmp_path / "data", "RGB")
    p = parse_params({"pretrain": FAST | {"dataset": f"folder:{data}", "output": "gen", "labels": False}})
    pretrain(p, tmp_path)
    gen = tmp_path / "gen"
    load_generator(str(gen))
    assert not (gen / "class_tokens.safetensors").exists() and (gen / "samples.png").is_file()
    log = io.read_json(gen / "train_log.json")
    assert log["conditional"] is False and log["params"]["pretrain"]["labels"] is False
    params = parse_params({"base": {"generator": str(gen)}, "sample": {"method": "class_tokens"}})
    with pytest.raises(GeneratorUnavailable, match="class_tokens.safetensors"):
        steering.method_inputs(params, tmp_path)
    # the UNet only ever sees the null context: one learned context, no class rows
    _, tokens, _ = train_unet(torch.randn(8, 4, 4, 4), None, 0, p.pretrain.model_copy(update={"unet_steps": 2}),
                              torch.Generator().manual_seed(0))
    assert tokens.shape == (1, 2, 8)


def test_pretrain_pool_holdout_is_disjoint_from_the_task_side(tmp_path):
    """Proof by content: the sha256 of every pretraining image (train_log.json) against every image the task side
    may use (holdout_split's task part of train, and the whole test split). With pool all they overlap."""
    from thinair import datasets
    from thinair.rawdata import holdout_split, image_hashes

    spec = f"folder:{_folder(tmp_path / 'data', 'RGB', per_class=(8, 8, 8))}"
    raw = datasets.load(spec, "")
    task, pool = holdout_split(raw.train_labels, 0.5, seed=datasets.SPLIT_SEED)
    task_side = set(image_hashes(raw.train_images[task])) | set(image_hashes(raw.test_images))
    logged = {}
    for mode in ("holdout", "all"):
        pretrain(parse_params({"pretrain": FAST | {"dataset": spec, "pool": mode, "holdout_fraction": 0.5,
                                                   "output": mode}}), tmp_path)
        logged[mode] = io.read_json(tmp_path / mode / "train_log.json")["pool"]
    hold = logged["holdout"]
    assert hold["images"] == len(pool) == len(hold["sha256"]) and 0 < len(pool) < len(raw.train_labels)
    assert hold["sha256"] == sorted(image_hashes(raw.train_images[pool]))
    assert (hold["dataset"], hold["pool"], hold["holdout_fraction"]) == (spec, "holdout", 0.5)
    assert not task_side & set(hold["sha256"])
    assert task_side & set(logged["all"]["sha256"])  # the check above can fail
    assert logged["all"]["images"] == len(raw.train_labels)


def test_digits_holdout_pool_shares_no_image_with_the_task_side():
    """The same proof on the embedded dataset, without training (pool selection and hashing are pure)."""
    from thinair import datasets
    from thinair.rawdata import holdout_split, image_hashes
    from thinair.tasks.pretrain import pool_indices

    raw = datasets.load("digits", "")
    p = parse_params({"pretrain": {"pool": "holdout", "holdout_fraction": 0.3}}).pretrain
    pool = pool_indices(raw.train_labels, raw.class_names, p)
    task, _ = holdout_split(raw.train_labels, 0.3, seed=datasets.SPLIT_SEED)
    task_side = set(image_hashes(raw.train_images[task])) | set(image_hashes(raw.test_images))
    assert not task_side & set(image_hashes(raw.train_images[pool]))
    everything = pool_indices(raw.train_labels, raw.class_names, parse_params({}).pretrain)
    assert len(everything) == 1438 and task_side & set(image_hashes(raw.train_images[everything]))


def test_pretrain_holdout_leaving_a_class_empty_names_the_fraction(tmp_path):
    data = _folder(tmp_path / "data", "L", per_class=(6, 6, 1))  # class2: one train image, none held out at 0.5
    p = parse_params({"pretrain": FAST | {"dataset": f"folder:{data}", "pool": "holdout"}})
    with pytest.raises(ValueError, match=r"pretrain\.holdout_fraction=0\.5 leaves class 'class2'"):
        pretrain(p, tmp_path)
    assert not (tmp_path / "generators").exists()


def test_pretrain_dataset_that_cannot_be_loaded_is_clear(tmp_path):
    from thinair.datasets import DatasetUnavailable

    p = parse_params({"pretrain": FAST | {"dataset": "pathmnist", "data_root": str(tmp_path / "none"),
                                          "download": False}})
    with pytest.raises(DatasetUnavailable, match=r"pathmnist.*pretrain\.data_root.*pretrain\.download"):
        pretrain(p, tmp_path)
    with pytest.raises(ValueError, match="pretrain.dataset: unknown dataset 'mnist'"):
        pretrain(parse_params({"pretrain": FAST | {"dataset": "mnist"}}), tmp_path)
    with pytest.raises(ValueError, match="pretrain.dataset: image folder"):
        pretrain(parse_params({"pretrain": FAST | {"dataset": f"folder:{tmp_path / 'nope'}"}}), tmp_path)
    with pytest.raises(ParamsError, match="pretrain.holdout_fraction"):
        parse_params({"pretrain": {"pool": "holdout", "holdout_fraction": 1.0}})


def test_pretrain_defaults_are_the_shipped_generators_params():
    """The new keys' code defaults (digits, conditional, pool all, auto widths) reproduce params.yaml's pretrain
    section exactly, so the embedded generator's training path and its DVC params are unchanged."""
    from pathlib import Path

    from thinair.config import load_params
    from thinair.tasks.pretrain import architecture

    d = parse_params({}).pretrain
    assert (d.dataset, d.labels, d.pool, d.vae_channels, d.unet_channels) == ("digits", True, "all", None, None)
    shipped = load_params(Path(__file__).resolve().parents[1] / "params.yaml").pretrain
    assert architecture(d) == shipped
    assert not {"data_root", "download", "labels", "pool", "holdout_fraction"} & shipped.model_fields_set


@pytest.mark.parametrize("resolution, factor, unet_levels", [(8, 4, 2), (16, 4, 2), (32, 4, 2), (64, 8, 3),
                                                              (128, 8, 3), (256, 8, 3)])
def test_pretrain_auto_architecture_follows_the_resolution(resolution, factor, unet_levels):
    from thinair.tasks.pretrain import architecture

    a = architecture(parse_params({"pretrain": {"resolution": resolution}}).pretrain)
    assert 2 ** (len(a.vae_channels) - 1) == factor and len(a.unet_channels) == unet_levels
    explicit = architecture(parse_params({"pretrain": {"resolution": 64, "vae_channels": [8, 16, 16]}}).pretrain)
    assert explicit.vae_channels == [8, 16, 16] and explicit.unet_channels == [64, 128, 128]
    with pytest.raises(ValueError, match="not divisible by the VAE factor 8"):
        architecture(parse_params({"pretrain": {"resolution": 36}}).pretrain)


def test_pretrain_logs_progress_with_an_eta(caplog):
    import logging

    import torch

    from thinair.tasks.pretrain import duration, train_unet

    assert (duration(4.4), duration(190), duration(3725)) == ("4 s", "3 min 10 s", "1 h 02 min")
    p = parse_params({"pretrain": TINY | {"unet_steps": 4}}).pretrain
    with caplog.at_level(logging.INFO):
        train_unet(torch.randn(16, 4, 4, 4), torch.arange(16) % 10, 10, p, torch.Generator().manual_seed(0),
                   log_every=2)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("pretrain unet:")]
    assert len(lines) == 2 and lines[0].startswith("pretrain unet: step 2/4 (50 %) loss ") and " — ETA " in lines[0]
    assert lines[1].endswith("— ETA 0 s")
