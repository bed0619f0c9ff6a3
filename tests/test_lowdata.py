"""One tiny cell of the low-data benchmark (benchmarks/lowdata.py) end to end: a generator pretrained on the
holdout pool, k images per class, the arms trained and summarized, the JSON and the plot written; and a re-run
comes from the caches."""
from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import benchmark_script

ROOT = Path(__file__).resolve().parents[1]
lowdata = benchmark_script("lowdata")


def _argv(tmp_path) -> list[str]:
    return ["--ks", "2", "--seeds", "2", "--variants", "cond",
            "--arms", "real,real+cutout,di,real+di,real+di+cutout,real+di[knn+filter],recon,real+tokens,real+fly,"
            "real+fly~time,real+di~fly", "--pretrain-steps", "2,2", "--steps", "3", "--batch-size", "16", "--per-embedding", "1", "--root", str(tmp_path),
            "--params", str(ROOT / "params.yaml"), "-S", "invert.steps=2", "-S", "invert.checkpoint_every=1",
            "-S", "sample.steps=2", "-S", "metrics.feature_epochs=1", "-S", "pretrain.vae_channels=[8,16,16]",
            "-S", "pretrain.unet_channels=[16,32]"]


def test_a_tiny_cell_end_to_end_then_resumed_from_the_caches(tmp_path, capsys):
    assert lowdata.main(_argv(tmp_path)) == 0
    out = json.loads((tmp_path / "benchmarks" / "lowdata" / "digits.json").read_text())
    rows = out["rows"]
    assert {r["arm"] for r in rows} == {"real", "real+cutout", "di", "real+di", "real+di+cutout", "real+di[knn+filter]",
                                        "recon", "real+tokens", "real+fly", "real+fly~time", "real+di~fly"}
    assert next(r for r in rows if r["arm"] == "real+di+cutout")["train_images"] == 40  # DI with an augmentation
    assert all(r["real_images"] == 20 for r in rows)  # 2 per class of 10 classes
    di = next(r for r in rows if r["arm"] == "di")
    assert di["train_images"] == 20  # one synthetic image per real one
    both = next(r for r in rows if r["arm"] == "real+di")
    assert both["train_images"] == 40
    options = next(r for r in rows if r["arm"] == "real+di[knn+filter]")  # issue 17's options: the same count
    assert options["train_images"] == 40
    fly = next(r for r in rows if r["arm"] == "real+fly")  # on the fly: 8 fresh images per step, 3 steps
    assert fly["drawn"] == fly["train_images"] - 20 == 24 and fly["draw_seconds"] > 0
    timed = next(r for r in rows if r["arm"] == "real+fly~time")  # fewer steps at real+di's wall time
    assert 1 <= timed["steps"] <= 3 and timed["drawn"] == 8 * timed["steps"]
    assert next(r for r in rows if r["arm"] == "real+di~fly")["train_images"] == 20 + 40  # >= 24, whole per image
    cell = tmp_path / ".thinair" / "lowdata" / "digits" / "cond" / "k2" / "s0"
    manifest = json.loads((cell / "di-knn-filter" / "data" / "sample" / "manifest.json").read_text())
    assert manifest["params"]["partner"] == "knn" and manifest["label_filter"]["min_confidence"] == 0.5
    assert next(r for r in rows if r["arm"] == "recon")["train_images"] == 20  # the VAE round trip of each real one
    summary = out["summary"]["cond"]["2"]
    assert summary["real"]["n"] == 2 and "best augmentation" in summary
    assert (tmp_path / "benchmarks" / "lowdata" / "digits.png").read_bytes()[:4] == b"\x89PNG"
    log = json.loads((tmp_path / ".thinair" / "lowdata" / "digits" / "generators" / "cond" / "train_log.json")
                     .read_text())
    assert log["pool"]["pool"] == "holdout"
    capsys.readouterr()
    assert lowdata.main(_argv(tmp_path)) == 0  # everything cached: same numbers
    again = json.loads((tmp_path / "benchmarks" / "lowdata" / "digits.json").read_text())
    assert [r["accuracy"] for r in again["rows"]] == [r["accuracy"] for r in rows]
    # the coverage probe reads the same cell: every real image counted, covered or not
    capsys.readouterr()
    cell = tmp_path / ".thinair" / "lowdata" / "digits" / "cond" / "k2" / "s0"
    assert benchmark_script("coverage_probe").main([str(cell), "--counts", "0,20", "--k", "1",
                                                    "--params", str(ROOT / "params.yaml")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "first 0 synthetic images leave 20 of 20 real train images uncovered" in lines[0]
    assert len(lines) == 2 and "of 20 real train images uncovered (k=1)" in lines[1]
