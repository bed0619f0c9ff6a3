"""invert: the optimisation itself, resume after a kill, non-finite losses, stale-chunk handling."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from thinair.config import parse_params
from thinair.generator import load_generator
from thinair.tasks import invert as invert_stage
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
    assert emb.shape == (6, 2, 8) and sorted(ckpts) == [2, 4, 6] and len(losses) == 12  # 6 x 6 / 3 optimiser steps
    assert not torch.equal(ckpts[2], ckpts[6]) and torch.equal(ckpts[6], emb)
    assert all(torch.equal(before[k], v) for k, v in g.unet.state_dict().items())


@pytest.mark.parametrize("batch", [3, 4])  # 4: the checkpoint falls inside an epoch of the row stream
def test_resume_from_checkpoint_is_exact(setup, tiny_generator, batch):
    g, sched, mean, logvar = setup
    p = _p(tiny_generator, steps=6, batch_size=batch, checkpoint_every=1)
    full, _, full_losses = invert_loop(g.unet, sched, mean, logvar, 1.0, p, torch.Generator().manual_seed(5), 0)
    saved = {}
    invert_loop(g.unet, sched, mean, logvar, 1.0, _p(tiny_generator, steps=4, batch_size=batch, checkpoint_every=1),
                torch.Generator().manual_seed(5), 0, on_checkpoint=lambda s, st: saved.update({s: st}))
    resumed, _, losses = invert_loop(g.unet, sched, mean, logvar, 1.0, p, torch.Generator().manual_seed(99), 0,
                                     state=saved[1])
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


def _old_invert_loop(unet, noise_sched, mean, logvar, scaling, p, rng):
    """The loop as it was before steps meant per-embedding updates: p.steps optimiser steps, each a fresh
    randperm(n)[:batch] (the reference the default path must still equal bit for bit)."""
    n = len(mean)
    emb = torch.nn.Parameter(init_embeddings(n, p.num_tokens, unet.config.cross_attention_dim, rng))
    opt = torch.optim.AdamW([emb], lr=p.lr, betas=p.betas, weight_decay=p.weight_decay)
    std, batch, ckpts, losses = torch.exp(0.5 * logvar), min(p.batch_size, n), {}, []
    for step in range(1, p.steps + 1):
        idx = torch.randperm(n, generator=rng)[:batch]
        z0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=rng)) * scaling
        noise = torch.randn(z0.shape, generator=rng)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch,), generator=rng)
        opt.zero_grad(set_to_none=True)
        loss = invert_stage.denoising_loss(unet, noise_sched.add_noise(z0, noise, t), noise, t, emb[idx])
        loss.backward()
        opt.step()
        losses.append([step, round(loss.item(), 6)])
        if step % p.checkpoint_every == 0 or step == p.steps:
            ckpts[step] = emb.detach().clone()
    return emb.detach(), ckpts, losses


def test_batch_equal_to_chunk_is_bit_identical_to_the_old_global_steps(setup, tiny_generator):
    """The embedded default (batch = chunk): one optimiser step is one update of every embedding, and every draw
    happens in the old order, so embeddings, checkpoints and losses are exactly the old ones."""
    g, sched, mean, logvar = setup
    p = _p(tiny_generator, steps=5, batch_size=6, checkpoint_every=2)
    new = invert_loop(g.unet, sched, mean, logvar, 1.0, p, torch.Generator().manual_seed(3), 0)
    old = _old_invert_loop(g.unet, sched, mean, logvar, 1.0, p, torch.Generator().manual_seed(3))
    assert torch.equal(new[0], old[0]) and new[2] == old[2] and sorted(new[1]) == sorted(old[1]) == [2, 4, 5]
    assert all(torch.equal(new[1][k], old[1][k]) for k in old[1])
    assert all(isinstance(x, int) for x, _ in new[2])  # integer steps: the stored metadata's bytes are unchanged


@pytest.mark.parametrize("steps,batch,every", [(4, 4, 2), (3, 4, 1), (4, 2, 2), (2, 5, 1)])
def test_every_embedding_gets_steps_updates_when_batch_is_below_chunk(setup, tiny_generator, monkeypatch, steps,
                                                                       batch, every):
    """Count the rows each optimiser step selects: ceil(steps n / b) steps, every embedding updated `steps` times (one
    more for some only when b does not divide steps n), and at checkpoint k every embedding has had k (or k+1)."""
    g, sched, mean, logvar = setup
    n, drawn = len(mean), []
    real = invert_stage.next_rows
    monkeypatch.setattr(invert_stage, "next_rows", lambda *a: drawn.append(real(*a)) or drawn[-1])
    p = _p(tiny_generator, steps=steps, batch_size=batch, checkpoint_every=every)
    _, ckpts, losses = invert_loop(g.unet, sched, mean, logvar, 1.0, p, torch.Generator().manual_seed(0), 0)
    assert len(drawn) == len(losses) == -(-steps * n // batch) and all(len(i) == batch for i in drawn)
    counts = torch.bincount(torch.cat(drawn), minlength=n)
    assert counts.min() == steps and counts.max() <= steps + (1 if steps * n % batch else 0)
    assert sorted(ckpts) == list(range(every, steps + 1, every)) + ([] if steps % every == 0 else [steps])
    for k in ckpts:  # the checkpoint named k was saved after the optimiser step that completes k updates each
        upto = torch.bincount(torch.cat(drawn[:-(-k * n // batch)]), minlength=n)
        assert upto.min() == k and upto.max() <= k + 1
    assert losses[-1][0] == round(len(losses) * batch / n, 4) and losses[-1][0] >= steps


LABELS = torch.tensor([0, 1, 0, 2, 1, 0])


def test_class_warm_start_gives_each_image_its_class_embedding_then_resumes_exactly(setup, tiny_generator):
    """invert.warm_start class (issue 19): the class phase learns one embedding per class, every image starts from
    its class's (equal within a class, different across), and a run resumed after the phase is the uninterrupted one."""
    g, sched, mean, logvar = setup
    p = _p(tiny_generator, steps=4, batch_size=3, checkpoint_every=1, warm_start="class", warm_start_steps=3)
    starts, loss = invert_stage.class_warm_start(g.unet, sched, mean, torch.exp(0.5 * logvar), 1.0, LABELS, p,
                                                 torch.Generator().manual_seed(0), 0, "cpu")
    assert starts.shape == (6, 2, 8) and loss == loss  # finite
    assert torch.equal(starts[0], starts[2]) and torch.equal(starts[0], starts[5]) and torch.equal(starts[1], starts[4])
    assert not torch.equal(starts[0], starts[1]) and not torch.equal(starts[1], starts[3])
    full, _, full_losses = invert_loop(g.unet, sched, mean, logvar, 1.0, p, torch.Generator().manual_seed(5), 0,
                                       labels=LABELS)
    plain, _, _ = invert_loop(g.unet, sched, mean, logvar, 1.0, _p(tiny_generator, steps=4, batch_size=3,
                                                                   checkpoint_every=1),
                              torch.Generator().manual_seed(5), 0)
    assert not torch.equal(full, plain)
    saved = {}
    invert_loop(g.unet, sched, mean, logvar, 1.0, p, torch.Generator().manual_seed(5), 0,
                on_checkpoint=lambda s, st: saved.update({s: st}), labels=LABELS)
    resumed, _, losses = invert_loop(g.unet, sched, mean, logvar, 1.0, p, torch.Generator().manual_seed(99), 0,
                                     state=saved[2], labels=LABELS)
    assert torch.equal(resumed, full) and losses == full_losses
    with pytest.raises(ValueError, match="needs the chunk's labels"):
        invert_loop(g.unet, sched, mean, logvar, 1.0, p, torch.Generator(), 0)


def test_cosine_lr_schedule_decays_to_one_percent_and_constant_stays(setup, tiny_generator, monkeypatch):
    p = _p(tiny_generator, lr_schedule="cosine")
    f = [invert_stage.lr_factor(p, s, 5) for s in range(1, 6)]
    assert f[0] == 1.0 and abs(f[-1] - 0.01) < 1e-12 and all(a > b for a, b in zip(f, f[1:]))
    assert {invert_stage.lr_factor(_p(tiny_generator), s, 5) for s in range(1, 6)} == {1.0}
    g, sched, mean, logvar = setup  # the optimiser sees the schedule: lrs recorded at every step
    seen, real_step = [], torch.optim.AdamW.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    q = _p(tiny_generator, steps=5, batch_size=6, lr=0.1, lr_schedule="cosine")
    invert_loop(g.unet, sched, mean, logvar, 1.0, q, torch.Generator().manual_seed(0), 0)
    assert seen == pytest.approx([0.1 * x for x in f])
