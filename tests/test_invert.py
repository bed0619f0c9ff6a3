"""invert: the optimisation itself, resume after a kill, non-finite losses, stale-chunk handling."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from thinair.config import parse_params
from thinair.generator import load_generator
from thinair.tasks.invert import NonFiniteLoss, init_embeddings, invert_loop
from tests.conftest import tiny_params


@pytest.fixture(scope="module")
def setup(tiny_generator):
    g = load_generator(str(tiny_generator))
    torch.manual_seed(1)
    mean, logvar = torch.randn(6, 4, 4, 4), torch.full((6, 4, 4, 4), -2.0)
    return g, DDPMScheduler.from_config(g.scheduler_config), mean, logvar


def _p(tiny_generator, **kw):
    return parse_params(tiny_params(tiny_generator, invert=kw)).invert


def test_init_matches_reference_linear_layer_bound():
    e = init_embeddings(100, 5, 768, torch.Generator().manual_seed(0))
    assert e.shape == (100, 5, 768) and e.abs().max() <= 0.1 and e.abs().max() > 0.099


def test_only_embeddings_learn_and_loss_is_recorded(setup, tiny_generator):
    g, sched, mean, logvar = setup
    before = {k: v.clone() for k, v in g.unet.state_dict().items()}
    p = _p(tiny_generator, steps=6, batch_size=3, checkpoint_every=2)
    emb, ckpts, losses = invert_loop(g.unet, sched, mean, logvar, 1.0, p, torch.Generator().manual_seed(0), 0)
    assert emb.shape == (6, 2, 8) and sorted(ckpts) == [2, 4, 6] and len(losses) == 6
    assert not torch.equal(ckpts[2], ckpts[6]) and torch.equal(ckpts[6], emb)
    assert all(torch.equal(before[k], v) for k, v in g.unet.state_dict().items())


def test_resume_from_checkpoint_is_exact(setup, tiny_generator):
    g, sched, mean, logvar = setup
    p = _p(tiny_generator, steps=6, batch_size=3, checkpoint_every=2)
    full, _, full_losses = invert_loop(g.unet, sched, mean, logvar, 1.0, p, torch.Generator().manual_seed(5), 0)
    saved = {}
    invert_loop(g.unet, sched, mean, logvar, 1.0, _p(tiny_generator, steps=4, batch_size=3, checkpoint_every=2),
                torch.Generator().manual_seed(5), 0, on_checkpoint=lambda s, st: saved.update({s: st}))
    resumed, _, losses = invert_loop(g.unet, sched, mean, logvar, 1.0, p, torch.Generator().manual_seed(99), 0,
                                     state=saved[2])
    assert torch.equal(resumed, full) and losses == full_losses


def test_nan_loss_names_chunk_and_step(setup, tiny_generator):
    g, sched, mean, logvar = setup
    bad = mean.clone()
    bad[0] = float("nan")
    with pytest.raises(NonFiniteLoss, match="chunk 7: loss is nan at step 1"):
        invert_loop(g.unet, sched, bad, logvar, 1.0, _p(tiny_generator, steps=2, batch_size=6), torch.Generator(), 7)


def test_chunk_files_are_byte_reproducible_across_processes(tmp_path):
    """safetensors' metadata map has a per-process order: we store one entry so bytes never vary."""
    import subprocess
    import sys

    code = ("import sys, torch; from thinair import io; "
            "io.save_tensors(sys.argv[1], {'a': torch.arange(3)}, {'losses': [[1, 0.5]], 'generator': 'g', 'x': 1})")
    for i in range(4):
        subprocess.run([sys.executable, "-c", code, str(tmp_path / f"{i}.safetensors")], check=True)
    from thinair import io

    assert len({io.file_sha256(tmp_path / f"{i}.safetensors") for i in range(4)}) == 1
    assert io.load_metadata(tmp_path / "0.safetensors")["losses"] == [[1, 0.5]]
