"""The benchmark script's measuring functions run (smoke), so the hand-run benchmark cannot rot silently."""
from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import benchmark_script
from thinair.generator import load_generator

ROOT = Path(__file__).resolve().parents[1]

def _bench():
    return benchmark_script("bench")

def test_benchmark_functions_measure_the_tiny_generator(tiny_generator):
    bench = _bench()
    g = load_generator(str(tiny_generator))
    cpu = torch.device("cpu")
    assert bench.unet_flops(g.unet, 4, 2, cpu, torch.float32) > 0
    assert bench.bench_sample(g.unet, g.vae, g.scheduler_config, 4, 2, 16, 2, 2, cpu, torch.float32) > 0
    assert bench.bench_invert(g.unet, 4, 2, 16, 2, 1, cpu, torch.float32) > 0
    assert bench.SD_V1_UNET["cross_attention_dim"] == 768 and bench.SD_V1_VAE["latent_channels"] == 4

def _workspace(raw: dict, root):
    """A tiny workspace with ingest/encode/invert done and its params file; returns the params path."""
    import yaml

    from tests.stages import run_all
    from thinair.config import parse_params

    run_all(parse_params(raw), root, ("ingest", "encode", "invert"))
    f = root / "params.yaml"
    f.write_text(yaml.safe_dump(raw))
    return f


def test_steps_sweep_runs_the_real_stages_and_picks_a_default(tiny_generator, tmp_path):
    from tests.conftest import tiny_params
    from thinair.io import read_json
    from thinair.tasks.report import sweep_section

    f = _workspace(tiny_params(tiny_generator, cas={"epochs": 1}), tmp_path)
    sweep = benchmark_script("steps_sweep")
    out = tmp_path / "sweep.json"
    assert sweep.main(["--configs", "ddim:4,dpmsolver++:2,ddim:2:2", "--seeds", "1", "--params", str(f),
                       "--root", str(tmp_path), "--out", str(out)]) == 0
    result = read_json(out)
    assert [(r["scheduler"], r["steps"], r["checkpoint"]) for r in result["rows"]] == [
        ("ddim", 4, "final"), ("dpmsolver++", 2, "final"), ("ddim", 2, "2")]
    assert all(r["images"] == 40 and r["images_per_s"] > 0 for r in result["rows"])
    assert result["rows"][2]["within_tolerance"] is False  # another checkpoint is never picked as the sampler
    assert (result["best"]["scheduler"], result["best"]["steps"]) in {("ddim", 4), ("dpmsolver++", 2)}
    assert "dpmsolver++" in sweep_section(out) and "<table>" in sweep_section(out)

def test_steps_sweep_measures_a_guidance_interval_with_fewer_unet_evaluations(tiny_generator, tmp_path):
    from tests.conftest import tiny_params
    from thinair.io import read_json

    f = _workspace(tiny_params(tiny_generator, cas={"epochs": 1}), tmp_path)
    out = tmp_path / "sweep.json"
    assert benchmark_script("steps_sweep").main(["--configs", "dpmsolver++:4,dpmsolver++:4:final:0.3-0.8", "--seeds",
                                                 "1", "--params", str(f), "--root", str(tmp_path), "--out",
                                                 str(out)]) == 0
    rows = read_json(out)["rows"]
    assert [r["interval"] for r in rows] == ["all", "0.3-0.8"] and rows[0]["unet_evals"] == 8
    assert rows[1]["unet_evals"] == 6 and rows[1]["within_tolerance"] is False  # shown, not picked as the sampler
    prov = (tmp_path / ".thinair" / "sweep" / "dpmsolver++-4-final-g0.3-0.8" / "data" / "sample" / "provenance.csv")
    assert "0.3-0.8" in prov.read_text()


def test_invert_sweep_counts_passes_and_scores_each_configuration(tiny_generator, tmp_path):
    from tests.conftest import tiny_params
    from thinair.io import read_json

    f = _workspace(tiny_params(tiny_generator, cas={"epochs": 1}), tmp_path)
    out = tmp_path / "inv.json"
    sweep = benchmark_script("invert_sweep")
    assert sweep.main(["--configs", "root;steps=1,lr=0.1,lr_schedule=cosine,warm_start=class,warm_start_steps=2",
                       "--seeds", "1", "--params", str(f), "--root", str(tmp_path), "--out", str(out)]) == 0
    ref, cheap = read_json(out)["rows"]
    # 40 images in chunks of 20 at batch 10: 4 x 20 per chunk; the cheap one 1 x 20 + a class phase of 2 x 10
    assert ref["passes"] == 2 * 4 * 20 and cheap["passes"] == 2 * (20 + 2 * 10)
    assert cheap["passes_vs_reference"] == 0.5 and ref["cas_minus_reference"] == 0
    assert all(r["eval_loss"] > 0 and 0 <= r["cas"]["mean"] <= 1 and r["fid"] >= 0 for r in (ref, cheap))
    assert ref["eval_loss"] != cheap["eval_loss"]


def test_methods_benchmark_compares_every_method_at_equal_count(tiny_generator, tmp_path):
    from tests.conftest import tiny_params
    from thinair.io import read_json
    from thinair.tasks.report import methods_section

    f = _workspace(tiny_params(tiny_generator, cas={"epochs": 1},
                               classenc={"tokens": 2, "hidden": 16, "steps": 4, "batch_size": 8}), tmp_path)
    methods = benchmark_script("methods")
    out = tmp_path / "methods.json"
    assert methods.main(["--methods", "inversion,class_encoder", "--seeds", "1", "--params", str(f),
                         "--root", str(tmp_path), "--out", str(out)]) == 0
    rows = read_json(out)["rows"]
    assert [r["method"] for r in rows] == ["real", "inversion", "class_encoder"]
    assert rows[0]["images"] == 40 and rows[1]["images"] == rows[2]["images"] == 80  # equal synthetic count
    assert rows[2]["train_seconds"] > 0 and rows[1]["train_seconds"] == 0
    assert all(0 <= r["cas"]["mean"] <= 1 and r["fid"] >= 0 for r in rows)
    assert "class encoder (seed 002)" in methods_section(out)


def test_vs_diffusers_matches_the_pipeline_images_and_times_every_contender(tiny_generator, tmp_path):
    from tests.conftest import tiny_params
    from thinair.io import read_json

    _workspace(tiny_params(tiny_generator), tmp_path)
    out = tmp_path / "vs.json"
    assert benchmark_script("vs_diffusers").main([
        "--generator", str(tiny_generator), "--root", str(tmp_path), "--n", "8", "--steps", "4", "--interval",
        "0.3-0.8", "--fast-steps", "2", "--reps", "1", "--invert-iters", "1", "--out", str(out)]) == 0
    result = read_json(out)
    assert result["max_abs_diff"] <= 1  # thinair's sampler = diffusers' pipeline, to 1/255
    rows = {r["sampler"]: r for r in result["sampling"]}
    assert rows["diffusers StableDiffusionPipeline"]["ratio"] == 1.0
    assert rows["thinair"]["unet_evaluations"] == 8 and rows["thinair, guidance interval 0.3-0.8"]["unet_evaluations"] == 6
    assert rows["thinair, 2 steps, guidance interval 0.3-0.8"]["unet_evaluations"] in (2, 3, 4)
    assert all(r["images_per_s"] > 0 for r in rows.values())
    assert all(len(v) == 1 and v[0] > 0 for v in result["inversion"].values())


def test_classifier_layout_times_both_memory_formats(capsys):
    assert benchmark_script("classifier_layout").main(["--steps", "1", "--reps", "1", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "ms / step" not in line]
    assert [r.split(" | ")[0] for r in rows] == ["| NCHW (contiguous)", "| channels_last"]
    assert float(rows[0].split(" | ")[2].rstrip("x |")) == 1.0 and float(rows[1].split(" | ")[1]) > 0
