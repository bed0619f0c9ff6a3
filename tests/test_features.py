"""Feature extractors: offline failure modes, a tiny random CLIP directory, the domain classifier wrapper."""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from thinair import classifier
from thinair.features import (
    FeaturesUnavailable,
    build,
    check_available,
    domain_extractor,
    inception_url,
    inception_weights_path,
)

weights_present = pytest.mark.skipif(inception_weights_path().is_file(),
                                     reason="clean-fid's Inception weights are present on this machine")


def _images(n, h, w, c, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


@weights_present
def test_inception_without_weights_names_the_file_url_and_path():
    with pytest.raises(FeaturesUnavailable) as err:
        check_available("inception", download=False)
    msg = str(err.value)
    assert "inception-2015-12-05.pt" in msg and inception_url() in msg and str(inception_weights_path()) in msg


@weights_present
def test_inception_offline_download_attempt_fails_fast():
    t0 = time.monotonic()
    try:
        build("inception")  # tries clean-fid's URL once; offline this fails at DNS / connect
    except FeaturesUnavailable as err:
        assert time.monotonic() - t0 < 30
        assert f"place inception-2015-12-05.pt from {inception_url()} at {inception_weights_path()}" in str(err)
    else:
        pytest.skip("online: the weights were downloaded")


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random 2-layer CLIP vision tower with projection (16 px input, 4-d embeds) and its processor."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip")
    cfg = CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                           image_size=16, patch_size=8, projection_dim=4)
    CLIPVisionModelWithProjection(cfg).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(path)
    return path


def test_clip_features_from_a_local_directory(tiny_clip):
    extract = build("clip", clip_model=tiny_clip)
    rgb = _images(5, 12, 10, 3)
    feats = extract(rgb)
    assert feats.shape == (5, 4) and feats.dtype == np.float32 and np.isfinite(feats).all()
    np.testing.assert_array_equal(feats, build("clip", clip_model=tiny_clip)(rgb))  # deterministic
    assert not np.allclose(feats[0], feats[1])
    gray = _images(3, 8, 8, 1, seed=1)  # grayscale is replicated to RGB
    np.testing.assert_allclose(extract(gray), extract(np.repeat(gray, 3, -1)), rtol=1e-6)
    with pytest.raises(ValueError, match="expected images"):
        extract(gray[..., 0])


def test_clip_missing_or_wrong_directory(tmp_path):
    with pytest.raises(FeaturesUnavailable, match="does not exist"):
        build("clip", clip_model=tmp_path / "nope")
    with pytest.raises(FeaturesUnavailable, match="not a Hugging Face CLIP directory"):
        build("clip", clip_model=tmp_path)
    with pytest.raises(FeaturesUnavailable, match="local CLIP model directory"):
        build("clip")


def test_domain_features_wrap_the_classifier():
    torch.manual_seed(0)
    net = classifier.SmallCNN(1, 3, width=4).eval()
    images = _images(7, 8, 8, 1)
    feats = domain_extractor(net, batch_size=3)(images)  # batches of 3 exercise the chunking
    assert feats.shape == (7, net.feature_dim) and feats.dtype == np.float32
    np.testing.assert_allclose(feats, classifier.features(net, classifier.to_tensor(images)), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(build("domain", domain_net=net)(images), domain_extractor(net)(images))


def test_unknown_or_incomplete_kinds():
    with pytest.raises(ValueError, match="domain, inception, clip"):
        build("vgg")
    with pytest.raises(ValueError, match="domain_net"):
        build("domain")
    with pytest.raises(TypeError, match="features"):
        domain_extractor(torch.nn.Linear(2, 2))


def test_the_domain_classifier_is_the_same_whatever_the_thread_count(tmp_path):
    """Trained with 2 threads its weights differed from 1 thread's (and with them every domain metric): the
    measuring instrument must not depend on the machine, or on which stage (encode's worker, metrics) trains it."""
    from thinair.domain import domain_classifier

    rng = np.random.default_rng(0)
    images, labels = _images(300, 8, 8, 1), rng.integers(0, 3, 300)
    threads = torch.get_num_threads()
    nets = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            nets.append(domain_classifier(images, labels, 3, 3, 0, tmp_path / f"t{n}").state_dict())
            assert torch.get_num_threads() == n  # the caller's setting is given back
    finally:
        torch.set_num_threads(threads)
    for k in nets[0]:
        torch.testing.assert_close(nets[0][k], nets[1][k], rtol=0, atol=0)
