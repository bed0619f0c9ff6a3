"""sample.method: prompts (seed 003) on tiny in-process components: a tiny SD-layout generator with a tiny CLIP
text encoder and a character-level CLIP tokenizer, and a tiny CLIP model for the score filter."""
from __future__ import annotations

import json
import shutil
import string

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import tiny_params
from tests.stages import run_all, run_stage
from thinair import diffusion, io
from thinair import prompt_sampling as promptgen
from thinair.config import ParamsError, params_table, parse_params
from thinair.features import FeaturesUnavailable
from thinair.generator import GeneratorUnavailable, encode_prompts, load_generator
from thinair.tasks import sample
from thinair.units import run_unit

DIGITS = [str(d) for d in range(10)]


def _tokenizer(dst):
    """A real CLIPTokenizer over single characters (no merges), built offline: every prompt gets distinct ids."""
    from transformers import CLIPTokenizer

    dst.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase + string.digits:
        vocab |= {c: len(vocab), c + "</w>": len(vocab) + 1}
    (dst / "vocab.json").write_text(json.dumps(vocab))
    (dst / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(dst / "vocab.json"), str(dst / "merges.txt")), len(vocab)


TEXT = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1)


@pytest.fixture(scope="module")
def sd_generator(tiny_generator, tmp_path_factory):
    """The tiny generator plus text_encoder/ (width = the UNet's cross_attention_dim 8) and tokenizer/."""
    from transformers import CLIPTextConfig, CLIPTextModel

    dst = tmp_path_factory.mktemp("sd") / "tiny-sd"
    shutil.copytree(tiny_generator, dst)
    tok, n = _tokenizer(dst / "tokenizer")
    tok.save_pretrained(str(dst / "tokenizer"))
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(vocab_size=n, **TEXT)).save_pretrained(str(dst / "text_encoder"))
    return dst


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    """A tiny random CLIPModel + CLIPProcessor directory (16 px images, 8-wide projections)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    dst = tmp_path_factory.mktemp("clip") / "tiny-clip"
    tok, n = _tokenizer(dst / "vocab")
    torch.manual_seed(1)
    CLIPModel(CLIPConfig(text_config=dict(vocab_size=n, **TEXT), projection_dim=8,
                         vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=16, patch_size=8))).save_pretrained(dst)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(dst)
    shutil.rmtree(dst / "vocab")
    return dst


@pytest.fixture(scope="module")
def project(sd_generator, tmp_path_factory):
    """ingest/encode/invert done once with the text-encoder generator; tests sample in copies of it."""
    root = tmp_path_factory.mktemp("proj")
    run_all(parse_params(tiny_params(sd_generator)), root, ("ingest", "encode", "invert"))
    return root


def _copy(project, tmp_path):
    shutil.copytree(project, tmp_path / "p")
    return tmp_path / "p"


def _params(gen, **over):
    return parse_params(tiny_params(gen, sample={"method": "prompts", "checkpoints": ["final"]} | over))


def _sample(params, root) -> tuple[dict, dict, pd.DataFrame]:
    manifest = run_stage("sample", params, root)
    out = root / "data" / "sample"
    z = {k: np.concatenate([io.load_npz(out / f)[k] for f in manifest["chunks"]])
         for k in io.load_npz(out / manifest["chunks"][0])}
    return manifest, z, pd.read_csv(out / "provenance.csv", dtype={"prompt": str})


# ---------------------------------------------------------------- prompts and contexts

def test_baseline_and_template_prompts(tmp_path):
    assert promptgen.class_prompts(None, ["cat", "dog"]) == [["a photo of a cat"], ["a photo of a dog"]]
    f = tmp_path / "t.yaml"
    f.write_text(yaml.safe_dump({"prompts": [
        {"template": "a sketch of a {animal}", "values": {"animal": ["cat", "dog"]}, "class": "{animal}",
         "seeds": [0, 10], "count": 1},
        {"template": "a fat cat", "class": "cat", "seeds": [0, 10], "count": 3}]}))
    table = promptgen.class_prompts(str(f), ["cat", "dog", "bird"])
    assert table == [["a sketch of a cat", "a fat cat", "a fat cat", "a fat cat"], ["a sketch of a dog"], []]
    plan = [{"row": r, "seed": s} for r in (0, 1) for s in range(200)]
    promptgen.pick_prompts(plan, np.array([0, 1]), table)
    cat = [r["prompt"] for r in plan if r["row"] == 0]
    assert {r["prompt"] for r in plan if r["row"] == 1} == {"a sketch of a dog"}
    assert 0.6 < cat.count("a fat cat") / len(cat) < 0.9  # count 3 of 4 jobs: the prompt's weight
    again = [{"row": r, "seed": s} for r in (0, 1) for s in range(200)]
    promptgen.pick_prompts(again, np.array([0, 1]), table)
    assert again == plan
    with pytest.raises(ValueError, match=r"class\(es\) \['cat', 'dog'\] are not classes of the dataset"):
        promptgen.class_prompts(str(f), DIGITS)


def test_txt2img_contexts_differ_per_class_and_equal_encode_prompts(sd_generator, project):
    params = _params(sd_generator)
    bank = sample.load_bank(project, params.sample.checkpoints)
    gen = load_generator(str(sd_generator))
    pg, p = promptgen.prepare(params, bank, np.arange(len(bank["labels"])), gen, project)
    assert p.noise == 0 and p.interpolation == 0 and pg.latents is None and pg.clip is None
    recs = [{"row": 0, "seed": 0}, {"row": 1, "seed": 0}]
    labels = np.array([3, 7])
    pg.pick(recs, labels)
    assert [r["prompt"] for r in recs] == ["a photo of a 3", "a photo of a 7"]
    cond, uncond = pg.cond(recs), pg.uncond(recs)
    ref = encode_prompts(str(sd_generator), None, ["a photo of a 3", "a photo of a 7", ""])  # (3, 77, 8)
    assert cond.shape == (2, 77, 8) and torch.equal(cond, ref[:2]) and torch.equal(uncond, ref[2:].expand(2, -1, -1))
    assert (cond[0] - cond[1]).abs().max() > 1e-3


# ---------------------------------------------------------------- img2img

@pytest.mark.parametrize("scheduler", ["ddim", "pndm", "euler"])
def test_img2img_small_strength_stays_close_and_full_strength_is_txt2img(tiny_generator, scheduler):
    g = load_generator(str(tiny_generator))
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 4, 4, generator=gen), torch.randn(2, 4, 4, 4, generator=gen)
    cond, uncond, w = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, 8, generator=gen), torch.full((2,), 2.)

    def run(strength=None):
        init = None if strength is None else x0
        return sample.denoise(g.unet, g.scheduler(scheduler), noise, cond, uncond, w, 5, True, init, strength or 1)

    txt, full, small = run(), run(1.0), run(0.2)
    assert torch.equal(full, txt)  # strength 1 = from pure noise, the same draw
    assert (small - x0).abs().mean() < 0.25 * (txt - x0).abs().mean()
    assert not torch.equal(run(0.6), txt)
    lat, timesteps = diffusion.img2img_start(g.scheduler(scheduler), 5, 0.6, x0, noise)
    assert len(timesteps) == 3 + (scheduler == "pndm")  # the last 3 of 5 steps (PNDM repeats one)


# ---------------------------------------------------------------- the sample stage

def test_prompts_stage_end_to_end_and_img2img(sd_generator, project, tmp_path):
    root = _copy(project, tmp_path)
    n_train = io.read_json(root / "data" / "ingest" / "manifest.json")["splits"]["train"]["count"]
    manifest, z, prov = _sample(_params(sd_generator), root)
    assert manifest["total"] == len(z["images"]) == len(prov) == n_train  # 1 variant per train image here
    assert sorted(set(z["source_index"].tolist())) == list(range(n_train))
    assert (prov["prompt"] == [f"a photo of a {d}" for d in prov["label"]]).all()
    assert list(z["prompt"]) == list(prov["prompt"]) and (prov["uncond"] == "empty_prompt").all()
    assert "clip_filter" not in manifest and (prov["partner_index"] == -1).all()
    # img2img at strength 1 is txt2img from the same noise; at a small strength the images differ
    _, full, _ = _sample(_params(sd_generator, prompt_mode="img2img", strength=1.0), root)
    assert np.array_equal(full["images"], z["images"])
    _, small, _ = _sample(_params(sd_generator, prompt_mode="img2img", strength=0.5), root)
    assert small["images"].shape == z["images"].shape and not np.array_equal(small["images"], z["images"])


def test_clip_filter_drops_exactly_the_images_below_the_threshold(sd_generator, project, clip_dir, tmp_path):
    root = _copy(project, tmp_path)
    manifest, z, prov = _sample(_params(sd_generator, clip_model=str(clip_dir)), root)
    scores = prov["clip_score"].to_numpy()
    assert manifest["clip_filter"]["dropped"] == 0 and manifest["clip_filter"]["kept"] == len(z["images"])
    # the recorded score is CLIP's own: logits_per_image / logit_scale at the image's prompt, x 100
    model, proc = promptgen.load_clip(clip_dir)
    inp = proc(text=list(z["prompt"][:4]), images=list(np.repeat(z["images"][:4], 3, -1)), return_tensors="pt",
               padding=True)
    with torch.no_grad():
        ref = 100 * model(**inp).logits_per_image.diagonal() / model.logit_scale.exp()
    assert np.allclose(scores[:4], ref.numpy(), atol=1e-3)
    threshold = float(np.sort(scores)[len(scores) // 2] - 1e-4)  # keeps about half
    manifest, kept, prov2 = _sample(_params(sd_generator, clip_model=str(clip_dir), clip_min_score=threshold), root)
    f = manifest["clip_filter"]
    want = scores >= threshold
    assert 0 < f["dropped"] == (~want).sum() and f["kept"] == want.sum() == manifest["total"] == len(prov2)
    assert f["generated"] == len(scores) and sum(manifest["counts"].values()) == manifest["total"]
    # every kept image once, exactly those at or above the threshold
    ids = list(zip(prov2["source_index"], prov2["seed"]))
    assert len(set(ids)) == len(ids) and set(ids) == set(zip(prov["source_index"][want], prov["seed"][want]))
    assert (prov2["clip_score"] >= threshold).all() and np.allclose(prov2["clip_score"], scores[want])
    dropped = pd.read_csv(root / "data" / "sample" / f["dropped_table"])
    assert len(dropped) == f["dropped"] and (dropped["clip_score"] < threshold).all()
    assert len(kept["images"]) == manifest["total"]


# ---------------------------------------------------------------- clear errors

def test_generator_without_text_encoder_is_a_clear_error(tiny_generator, project):
    params = _params(tiny_generator)
    with pytest.raises(GeneratorUnavailable, match=r"no text_encoder/ and tokenizer/.*sample.method: class_tokens"):
        promptgen.key_parts(params, project)
    with pytest.raises(GeneratorUnavailable, match="sample.method: prompts needs a generator with a text encoder"):
        run_unit("sample", params, sample.units(params, project)[0], project)


def test_bad_prompts_file_and_clip_dir(sd_generator, project, tmp_path):
    with pytest.raises(ValueError, match=r"sample.prompts_file=.*missing.yaml.*no such template file"):
        promptgen.key_parts(_params(sd_generator, prompts_file=str(tmp_path / "missing.yaml")), project)
    some = tmp_path / "some.yaml"
    some.write_text(yaml.safe_dump({"prompts": [{"template": "a {d}", "values": {"d": ["1", "2"]}, "class": "{d}",
                                                 "seeds": [0, 5], "count": 1}]}))
    bank = sample.load_bank(project, ["final"])
    gen = load_generator(str(sd_generator))
    with pytest.raises(ValueError, match=r"has no prompt for the class\(es\) \['0', '3'"):
        promptgen.prepare(_params(sd_generator, prompts_file=str(some)), bank, np.arange(3), gen, project)
    with pytest.raises(FeaturesUnavailable, match=r"sample.clip_model=.*nowhere.*no such directory.*clip_model: null"):
        promptgen.key_parts(_params(sd_generator, clip_model=str(tmp_path / "nowhere")), project)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FeaturesUnavailable, match=r"sample.clip_model=.*has no config.json, not a CLIP model"):
        promptgen.key_parts(_params(sd_generator, clip_model=str(tmp_path / "empty")), project)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text(json.dumps({"model_type": "clip"}))
    with pytest.raises(FeaturesUnavailable, match=r"could not be loaded as a CLIPModel \+ CLIPProcessor"):
        promptgen.load_clip(tmp_path / "broken")


@pytest.mark.parametrize("over, message", [
    ({"clip_min_score": 20.0}, "sample.clip_min_score needs sample.clip_model"),
    ({"method": "inversion", "prompts_file": "p.yaml"}, "sample.prompts_file is used only by sample.method: prompts"),
    ({"method": "class_tokens", "prompt_mode": "img2img"}, "sample.prompt_mode is used only by"),
    ({"prompt_mode": "img2img", "strength": 0.1, "steps": 5}, r"runs no denoising step"),
    ({"strength": 0.0}, "sample.strength"),
    ({"prompt_mode": "inpaint"}, "sample.prompt_mode"),
])
def test_params_cross_checks(tiny_generator, over, message):
    with pytest.raises(ParamsError, match=message):
        parse_params(tiny_params(tiny_generator, sample={"method": "prompts"} | over))


def test_params_table_lists_the_new_keys():
    table = params_table()
    for key in ("prompts_file", "prompt_mode", "strength", "clip_model", "clip_min_score"):
        assert f"`sample.{key}`" in table
    assert "prompts = text prompts" in table
