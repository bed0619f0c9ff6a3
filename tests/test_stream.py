"""On-the-fly generation (issue 17, point 5; ``cas.synthetic: on_the_fly``): thinair/stream.py's SyntheticStream, its
use as a classifier-training source, tasks/sample.py's Stream draws and the cas stage end to end."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import tiny_params
from tests.stages import run_stage
from thinair import classifier, io
from thinair.config import parse_params
from thinair.errors import ParamsError
from thinair.stream import SyntheticStream
from thinair.draws import Stream, stream

SHAPE = (6, 6, 1)


def counting_draw(calls: list):
    """A draw whose images encode (step, j): pixel value = (7 * step + j) % 256, label = (step + j) % 3."""
    def draw(step, n):
        calls.append((step, n))
        vals = (7 * step + np.arange(n)) % 256
        return (np.broadcast_to(vals[:, None, None, None], (n, *SHAPE)).astype(np.uint8).copy(),
                (step + np.arange(n)) % 3)
    return draw


def test_stream_yields_the_draws_in_order_through_a_dataloader():
    calls = []
    s = SyntheticStream(counting_draw(calls), size=50, image_shape=SHAPE, key=["t"])
    assert len(s) == 50
    it = iter(DataLoader(s.at(4, 3), batch_size=None))
    batches = [next(it) for _ in range(3)]
    assert calls == [(3, 4), (4, 4), (5, 4)]
    x, y = batches[1]
    assert x.shape == (4, 1, 6, 6) and x.dtype == torch.float32 and y.dtype == torch.int64
    expect = classifier.to_tensor(counting_draw([])(4, 4)[0])
    assert torch.equal(x, expect) and y.tolist() == [1, 2, 0, 1]
    assert s.stats["images"] == 12 and s.stats["seconds"] > 0  # copies share the counters


def test_stream_rejects_a_draw_of_the_wrong_shape_and_bad_sizes():
    s = SyntheticStream(lambda step, n: (np.zeros((n, 5, 5, 1), np.uint8), np.zeros(n)), 10, SHAPE, ["t"])
    with pytest.raises(ValueError, match=r"expected uint8 \(2, 6, 6, 1\)"):
        s.at(2, 0).batch(0)
    with pytest.raises(ValueError, match="size and per_step"):
        SyntheticStream(counting_draw([]), 0, SHAPE, ["t"])
    with pytest.raises(ValueError, match="per_step"):
        s.at(0, 0)


def test_training_reads_step_t_of_the_stream_and_resumes_to_the_same_weights():
    """A stream source is read once per optimiser step at the run's global step (never an image twice), the epoch
    length follows its nominal size, and a run resumed after epoch 1 ends with the uninterrupted run's weights."""
    rng = np.random.default_rng(0)
    real = (classifier.to_tensor(rng.integers(0, 256, (12, *SHAPE), dtype=np.uint8)), torch.arange(12) % 3, 0.5)

    def run(calls, resume=None, keep=None):
        s = SyntheticStream(counting_draw(calls), size=24, image_shape=SHAPE, key=["t"])
        net = classifier.build("smallcnn", 1, 3, 6, seed=0, width=4)

        def on_epoch(epoch, loss, state):
            if keep is not None:
                keep[epoch] = state

        classifier.train(net, [real, (s, None, 0.5)], epochs=3, batch_size=8, optimizer="sgd", lr=0.05,
                         momentum=0.9, weight_decay=5e-4, padding=1, flip=False, seed=3, resume=resume,
                         on_epoch=on_epoch)
        return net

    calls, states = [], {}
    full = run(calls, keep=states)
    # 24 stream images at 4 per batch = 6 steps per epoch, 3 epochs: steps 0..17, each once, 4 images each
    assert calls == [(t, 4) for t in range(18)]
    later = []
    resumed = run(later, resume=states[1])
    assert later == [(t, 4) for t in range(6, 18)]
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_stream_draws_are_fresh_positional_and_balanced(tiny_generator, sampled):
    params = parse_params(tiny_params(tiny_generator, cas={"synthetic": "on_the_fly"}))
    draw = Stream(params, seed=5, root=sampled)
    n_emb, settings = draw.n, len(draw.settings)
    assert draw.size == n_emb * settings * params.sample.samples_per_setting
    big, big_labels = draw(0, 12)
    a, a_labels = draw(1, 6)  # positions 6..11: the same images as big's second half, whatever the batching
    np.testing.assert_array_equal(a, big[6:])
    np.testing.assert_array_equal(a_labels, big_labels[6:])
    # a whole pass over the embeddings uses each once, with a same-class partner that is never itself
    bank_labels = draw._ready["labels"]
    recs = draw.records(0, n_emb, bank_labels)
    assert sorted(r["row"] for r in recs) == list(range(n_emb))
    assert all(r["partner"] != r["row"] and bank_labels[r["partner"]] == bank_labels[r["row"]] for r in recs)
    # the next pass takes the next checkpoint x guidance setting; no draw seed ever repeats
    more = draw.records(1, n_emb, bank_labels)
    assert {r["setting"] for r in recs} != {r["setting"] for r in more}
    seeds = [r["seed"] for r in recs + more + draw.records(7, n_emb, bank_labels)]
    assert len(set(seeds)) == len(seeds)
    assert not np.array_equal(draw(0, 6)[0], Stream(params, seed=6, root=sampled)(0, 6)[0])  # seeds differ


def test_cas_on_the_fly_end_to_end_cached_and_keyed_on_the_sampling(tiny_generator, sampled):
    cas = {"synthetic": "on_the_fly", "epochs": 2, "batch_size": 16, "scale_synthetic": [], "scale_real": []}
    params = parse_params(tiny_params(tiny_generator, cas=cas))
    out = run_stage("cas", params, sampled)
    assert set(out["accuracy"]) == {"real", "synthetic", "real+synthetic"}
    runs = {r["mode"]: r["result"] for r in io.read_json(sampled / "data" / "cas" / "details.json")["runs"]}
    assert "on_the_fly" not in runs["real"]
    n = 40 * 2  # 40 embeddings x 2 checkpoints x 1 sample: the set sample wrote; two epochs of it at batch 16
    assert runs["synthetic"]["on_the_fly"]["images"] == runs["synthetic"]["train_images"] == 2 * n  # all fresh
    assert runs["synthetic"]["on_the_fly"]["seconds"] > 0
    assert runs["real+synthetic"]["on_the_fly"]["images"] == 2 * n  # 8 per batch: 10 steps per epoch
    assert run_stage("cas", params, sampled) == out  # cached
    noisier = parse_params(tiny_params(tiny_generator, cas=cas, sample={"noise": 0.3}))
    from thinair.tasks import cas as cas_stage
    from thinair.units import unit_key

    u = next(u for u in cas_stage.units(params, sampled) if u["job"]["mode"] == "synthetic")
    r = next(u for u in cas_stage.units(params, sampled) if u["job"]["mode"] == "real")
    assert unit_key("cas", params, u, sampled) != unit_key("cas", noisier, u, sampled)
    assert unit_key("cas", params, r, sampled) == unit_key("cas", noisier, r, sampled)


@pytest.mark.parametrize("sample, says", [({"filter_min_confidence": 0.5}, "filter_min_confidence"),
                                          ({"allocation": "coverage", "samples_per_setting": 2}, "allocation"),
                                          ({"start": "image"}, "start"),
                                          ({"method": "class_tokens"}, "method")])
def test_on_the_fly_refuses_set_level_sampling_options(tiny_generator, sample, says):
    with pytest.raises(ParamsError, match=f"cas.synthetic=on_the_fly.*sample.{says}"):
        parse_params(tiny_params(tiny_generator, cas={"synthetic": "on_the_fly"}, sample=sample))


def test_on_the_fly_without_embeddings_names_the_invert_stage(tiny_generator, tmp_path):
    from thinair.errors import StageInputMissing

    params = parse_params(tiny_params(tiny_generator, cas={"synthetic": "on_the_fly", "modes": ["synthetic"],
                                                           "scale_synthetic": [], "scale_real": []}))
    run_stage("ingest", params, tmp_path)
    with pytest.raises(StageInputMissing, match="invert"):
        stream(params, 0, tmp_path)
