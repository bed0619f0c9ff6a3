"""thinair export, thinair.data and the dataset card: every format loaded back by the library that owns it
(torchvision ImageFolder, Hugging Face datasets, webdataset) equals data/sample pixel for pixel and label for label.
The optional `export` stage writes data/export byte for byte as `thinair export` writes the same options.

One tiny project (ingest .. sample on the tiny random generator) is built once for the module."""
from __future__ import annotations

import glob
import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests.conftest import tiny_params
from tests.stages import run_all
from thinair.cli import main
from thinair.config import ParamsError, parse_params
from thinair.upstream import read_split, read_synthetic

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def project(tiny_generator, tmp_path_factory):
    """A tiny project: 40 real digits, 160 synthetic images (2 checkpoints x 2 guidance scales), its params file,
    and the embedded default's metrics.json / cas.json (so the card has every section)."""
    root = tmp_path_factory.mktemp("export-project")
    raw = tiny_params(tiny_generator, sample={"guidance_scales": [1.5, 3.0]},
                      encode={"fit_check": "warn"})  # fit.json: the card's generator-fit section
    params = parse_params(raw)
    run_all(params, root, ("ingest", "encode", "invert", "sample"))
    for stage, name in (("metrics", "metrics.json"), ("cas", "cas.json")):
        (root / "data" / stage).mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "data" / stage / name, root / "data" / stage / name)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    return root, params


@pytest.fixture(scope="module")
def truth(project):
    """key -> (image uint8 (H, W, C), label, provenance row), read without thinair.data."""
    root, _ = project
    syn = read_synthetic(root)
    prov = pd.read_csv(root / "data" / "sample" / "provenance.csv")
    keys = "syn-" + prov["file"].str.removesuffix(".npz") + "-" + prov["row"].map("{:06d}".format)
    out = {k: (syn.images[i], int(syn.labels[i]), prov.iloc[i]) for i, k in enumerate(keys)}
    real = read_split("train", root)
    shard = root / "data" / "ingest"
    offset = 0
    for f in sorted(p.name for p in shard.glob("train-*.npz")):
        n = len(np.load(shard / f)["labels"])
        for r in range(n):
            out[f"real-{f[:-4]}-{r:06d}"] = (real.images[offset + r], int(real.labels[offset + r]), None)
        offset += n
    return out


def cli(project, *args) -> int:
    root, _ = project
    return main(["--params", str(root / "params.yaml"), "--root", str(root), "export", *args])


def same_pixels(loaded: np.ndarray, stored: np.ndarray) -> bool:
    """A grey image loaded as RGB (ImageFolder's default loader) repeats its channel."""
    loaded = np.asarray(loaded)
    if loaded.ndim == 2:
        loaded = loaded[..., None]
    if loaded.shape[-1] == 3 and stored.shape[-1] == 1:
        stored = np.repeat(stored, 3, axis=-1)
    return loaded.shape == stored.shape and np.array_equal(loaded, stored)


def test_imagefolder_round_trip(project, truth, tmp_path):
    from torchvision.datasets import ImageFolder

    out = tmp_path / "folder"
    assert cli(project, "--format", "imagefolder", str(out)) == 0
    ds = ImageFolder(str(out))
    names = read_split("train", project[0]).class_names
    synthetic = [k for k in truth if k.startswith("syn-")]
    assert len(ds) == len(synthetic) == 160
    for path, target in ds.samples:
        image, label, _ = truth[Path(path).stem]
        assert ds.classes[target] == names[label]
    for i in range(len(ds)):  # every image, pixel for pixel
        img, _ = ds[i]
        assert same_pixels(img, truth[Path(ds.samples[i][0]).stem][0])
    prov = pd.read_csv(out / "provenance.csv")
    assert list(prov.columns[:2]) == ["path", "key"] and len(prov) == 160
    assert all((out / p).is_file() for p in prov["path"])
    src = pd.read_csv(project[0] / "data" / "sample" / "provenance.csv")
    assert set(src.columns) <= set(prov.columns)
    assert (out / "README.md").is_file()


def test_hf_round_trip(project, truth, tmp_path):
    import datasets

    out = tmp_path / "hf"
    assert cli(project, "--format", "hf", "--shard-size", "64", str(out)) == 0
    files = sorted(glob.glob(str(out / "data" / "*.parquet")))
    assert len(files) == 3  # 160 images / 64
    names = read_split("train", project[0]).class_names
    for ds in (datasets.load_from_disk(str(out / "arrow")),
               datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "c1")),
               datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "c2"))):  # the card's configs
        assert len(ds) == 160
        assert isinstance(ds.features["image"], datasets.Image)
        assert ds.features["label"].names == names
        for row in ds:
            image, label, prov = truth[row["key"]]
            assert row["label"] == label and same_pixels(row["image"], image)
            assert row["seed"] == prov["seed"] and row["guidance"] == pytest.approx(prov["guidance"])
            assert row["checkpoint"] == prov["checkpoint"] and row["method"] == "inversion"


def test_webdataset_round_trip(project, truth, tmp_path):
    import webdataset as wds

    out = tmp_path / "wds"
    assert cli(project, "--format", "webdataset", "--shard-size", "100", "--real", str(out)) == 0
    shards = sorted(str(p) for p in out.glob("shard-*.tar"))
    assert [Path(s).name for s in shards] == ["shard-000000.tar", "shard-000001.tar"]
    seen = 0
    for key, image, cls, meta in wds.WebDataset(shards, shardshuffle=False).decode("pil").to_tuple(
            "__key__", "png", "cls", "json"):
        stored, label, prov = truth[key]
        assert cls == label == meta["label"] and meta["key"] == key and same_pixels(image, stored)
        assert meta["seed"] == (None if prov is None else prov["seed"])  # exact 63-bit seeds, None for real images
        assert meta["method"] == ("real" if key.startswith("real-") else "inversion")
        seen += 1
    assert seen == len(truth) == 200  # 160 synthetic + 40 real
    again = tmp_path / "wds2"
    assert cli(project, "--format", "webdataset", "--shard-size", "100", "--real", str(again)) == 0
    assert all((out / n).read_bytes() == (again / n).read_bytes() for n in ("shard-000000.tar", "shard-000001.tar"))


def test_filters(project):
    from thinair.data import apply_where, select
    from thinair.formats import class_dirs

    root, _ = project
    prov = pd.read_csv(root / "data" / "sample" / "provenance.csv")
    t = select(root, ["checkpoint=-1", "guidance>=2"])
    assert len(t) == ((prov["checkpoint"] == -1) & (prov["guidance"] >= 2)).sum() == 40
    assert set(t["checkpoint"]) == {-1} and set(t["guidance"]) == {3.0}
    assert len(select(root, ["checkpoint!=-1"])) == 80
    assert len(select(root, {"method": "inversion"})) == 160
    assert len(select(root, ["label<3", "class_name!=0"])) == 2 * 16
    real = select(root, ["checkpoint=-1"], real=True)  # real rows have no checkpoint: kept
    assert (real["method"] == "real").sum() == 40 and len(real) == 80 + 40
    assert len(select(root, ["method=real"], real=True)) == 40
    for bad, why in (("clip_score>20", "prompts"), ("guidance>=high", "not a number"), ("method<a", "text"),
                     ("nonsense", "COLUMN")):
        with pytest.raises(ValueError, match=why):
            select(root, [bad])
    with pytest.raises(ValueError, match="no image"):
        select(root, ["guidance>10"])
    prompts = pd.DataFrame({"clip_score": [20.0, 30.0, 27.5], "prompt": ["a photo of a 1", "a=b>c", "x"]})
    assert apply_where(prompts, ["clip_score>25"])["prompt"].tolist() == ["a=b>c", "x"]
    assert apply_where(prompts, "prompt=a=b>c")["clip_score"].tolist() == [30.0]
    assert class_dirs(["a/b", "", "README.md", "x", "x"]) == ["a_b", "class_1", "class_2", "x", "class_4"]


def test_cli_refuses_bad_input(project, tmp_path, capsys):
    assert cli(project, "--where", "clip_score>20", str(tmp_path / "a")) == 1
    assert "clip_score" in capsys.readouterr().err and not (tmp_path / "a").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert cli(project, str(tmp_path / "full")) == 1
    assert "not empty" in capsys.readouterr().err and (tmp_path / "full" / "x").read_text() == "keep me"
    assert cli(project, "--push-to-hub", "me/data", str(tmp_path / "b")) == 1  # needs --format hf
    assert not list(tmp_path.glob(".*partial"))


def test_push_to_hub_fails_clearly_offline(project, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "hf"
    assert cli(project, "--format", "hf", "--limit", "5", "--push-to-hub", "me/data", str(out)) == 1
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" in err and "nothing was uploaded" in err
    assert len(list((out / "data").glob("*.parquet"))) == 1  # the export itself is complete


def test_limit_and_per_class_are_seeded(project):
    from thinair.data import select

    root, _ = project
    a, b, c = (select(root, limit=25, seed=s) for s in (0, 0, 1))
    assert len(a) == 25 and list(a["key"]) == list(b["key"]) and list(a["key"]) != list(c["key"])
    assert list(a["key"]) == sorted(a["key"])  # kept in table order
    p = select(root, real=True, per_class=3, seed=4)
    assert p.groupby("label").size().tolist() == [3] * 10
    assert list(p["key"]) == list(select(root, real=True, per_class=3, seed=4)["key"])
    both = select(root, per_class=3, limit=7)
    assert len(both) == 7 and both.groupby("label").size().max() <= 3


def test_dataset_class(project, truth, tmp_path):
    import torch
    from torchvision.transforms import ToTensor

    from thinair.data import SyntheticDataset, provenance

    root, _ = project
    ds = SyntheticDataset(root, where=["checkpoint=-1"], real=True)
    assert len(ds) == 120 and ds.classes == read_split("train", root).class_names
    image, label = ds[0]
    key = ds.provenance(0)["key"]
    assert label == truth[key][1] and same_pixels(image, truth[key][0]) and image.mode == "L"
    p = ds.provenance(119)
    assert p["method"] == "real" and p["guidance"] is None and isinstance(p["source_index"], int)
    assert ds.provenance(0)["checkpoint"] == -1 and ds.provenance(0)["seed"] == truth[key][2]["seed"]
    table = provenance(root)
    assert len(table) == 160 and {"key", "stage", "class_name", "seed", "guidance"} <= set(table.columns)
    # the same selection as an export with the same filters, in the same order
    out = tmp_path / "f"
    assert cli(project, "--where", "checkpoint=-1", "--real", str(out)) == 0
    assert list(pd.read_csv(out / "provenance.csv")["key"]) == list(ds.table["key"])
    # a DataLoader with shard-local shuffling: every image once per epoch, each shard's images together
    ds = SyntheticDataset(root, transform=ToTensor(), cache_shards=1)
    sampler = ds.sampler(seed=0)
    order = list(sampler)
    assert sorted(order) == list(range(160))
    files = ds.table["file"].to_numpy()[order]
    assert (files[1:] != files[:-1]).sum() == 1  # two shards, each visited once
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=16, sampler=sampler)))
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.float32 and y.shape == (16,)


def test_card(project, tmp_path):
    from thinair.card import licence, quality

    root, params = project
    out = tmp_path / "card"
    assert cli(project, "--format", "hf", "--where", "guidance>=2", "--real", str(out)) == 0
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["license"] == "other" and front["task_categories"] == ["image-classification"]
    assert front["size_categories"] == ["n<1K"] and front["configs"][0]["data_files"][0]["path"] == "data/train-*"
    for section in ("## Dataset summary", "## How to load", "## Source dataset", "## Generator",
                    "## Method and parameters", "## Counts per class", "## Quality", "## Generator-fit check",
                    "## Provenance", "## How to reproduce"):
        assert section in text
    encode = yaml.safe_load((root / "data" / "encode" / "manifest.json").read_text())
    assert encode["generator"] in text and "see its directory" in text
    assert "120 images (80 synthetic, 40 real)" in text
    assert "| class | synthetic | real |" in text and "| 3 | 8 | 4 |" in text  # digits: the name is the label
    assert "guidance_scales:" in text and "Method `inversion`" in text
    from thinair.card import _cell

    fid = _cell(json.loads((root / "data" / "metrics" / "metrics.json").read_text())["synthetic_vs_train"]["fid"])
    assert f"| synthetic vs real train | {fid} |" in text  # the project's own figure, as the card rounds it
    assert "floor: real test vs real train" in text and "trained on" in text
    assert "**FAILED**: a classifier" in text  # the project runs the fit check (warn): a random generator fails it
    assert "thinair export --format hf --where 'guidance>=2' --real" in text and "dvc repro" in text
    assert "git checkout <the revision" in text  # the tiny project is no git checkout
    assert licence("CompVis/stable-diffusion-v1-4")[0] == "creativeml-openrail-m"
    assert "model card" in licence("someone/some-model")[1]
    assert "No data/metrics/metrics.json" in quality(tmp_path)


def test_git_revision_of_a_checkout():
    from thinair.card import git_revision

    rev = git_revision(REPO)
    assert rev is None or len(rev.split()[0]) == 40
    assert git_revision("/") is None


def readme_block(marker: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    return next(b for b in blocks if marker in b).replace("num_workers=2", "num_workers=0")  # no worker processes


def test_readme_examples_run(project, tmp_path, monkeypatch, capsys):
    root, _ = project
    monkeypatch.chdir(root)
    example = readme_block("SyntheticDataset(")
    assert len([line for line in example.splitlines() if line.strip()]) <= 10
    exec(compile(example, "README: training example", "exec"), {})
    assert "'method': 'inversion'" in capsys.readouterr().out
    assert cli(project, "--real", str(tmp_path / "train")) == 0
    monkeypatch.setattr(sys, "argv", ["train_resnet18.py", str(tmp_path / "train"), "1"])
    exec(compile(readme_block("train_resnet18.py"), "README: train_resnet18.py", "exec"), {"__name__": "__main__"})
    assert re.search(r"epoch 0: real test accuracy \d+\.\d %", capsys.readouterr().out)


def test_report_legend_names_classes_once():
    from thinair.tasks.report import class_label, class_legend

    digits = class_legend([str(k) for k in range(10)])
    assert "<li>3</li>" in digits and "3: 3" not in digits and "<ol" not in digits
    named = class_legend(["cat", "dog"])
    assert "<li>0: cat</li>" in named and "<li>1: dog</li>" in named
    assert class_label(2, "2") == "2" and class_label(2, "bird") == "2: bird"


# --- the `export` stage (tasks/export.py): the same export, written by `dvc repro` into data/export ----------------

def stage_params(project, **export):
    """The project's params with this `export` section."""
    return parse_params(yaml.safe_load((project[0] / "params.yaml").read_text()) | {"export": export})


def files(folder: Path) -> dict[str, bytes]:
    return {f.relative_to(folder).as_posix(): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


def test_export_stage_writes_what_thinair_export_writes(project, tmp_path):
    from thinair.formats import command_line
    from thinair.tasks.export import command
    from thinair.units import run_local

    root, out = project[0], project[0] / "data" / "export"
    off = run_local("export", stage_params(project), root)  # the default: off, a manifest says so
    assert off["ran"] is False and "export.format is null" in off["why"] and list(files(out)) == ["manifest.json"]

    opts = {"format": "webdataset", "where": ["checkpoint=-1"], "real": True, "per_class": 3, "seed": 1, "shard_size": 7}
    params = stage_params(project, **opts)
    manifest = run_local("export", params, root)
    args = ["--format", "webdataset", "--where", "checkpoint=-1", "--real", "--per-class", "3", "--seed", "1",
            "--shard-size", "7"]
    assert cli(project, *args, str(tmp_path / "cli")) == 0
    stage, by_hand = files(out), files(tmp_path / "cli")
    assert json.loads(stage.pop("manifest.json")) == manifest
    assert manifest["images"] == 30 and manifest["real"] + manifest["synthetic"] == 30 and manifest["options"] == \
        params.export.model_dump(mode="json")
    card, card_by_hand = stage.pop("README.md").decode(), by_hand.pop("README.md").decode()
    assert stage == by_hand and len(stage) == 5  # the same shards, byte for byte: 30 images, 7 per shard
    assert "dvc repro export" in card and "--shard-size 7 OUT" in card
    assert card_by_hand.replace(command_line(tmp_path / "cli", "webdataset", ["checkpoint=-1"], True, None, 3, 1, 7),
                                command(params.export)) == card  # the same card but for how it was made

    # a selection error names the param and its fix; the last good export stays
    before = files(out)
    for where, why in ((["clip_score>20"], "export.where clip_score>20: no column 'clip_score'"),
                       (["guidance>10"], "no image meets export.where guidance>10")):
        with pytest.raises(ValueError, match=re.escape(why) + ".*fix export.where in params.yaml"):
            run_local("export", stage_params(project, format="imagefolder", where=where), root)
        assert files(out) == before

    assert run_local("export", stage_params(project), root)["ran"] is False  # off again: the export is taken away
    assert list(files(out)) == ["manifest.json"] and not (root / ".thinair" / "work" / "export").exists()


@pytest.mark.parametrize("section, named", [
    ({"format": "parquet"}, "export.format: got 'parquet'; Input should be 'imagefolder', 'hf' or 'webdataset'"),
    ({"where": ["nonsense"]}, "'nonsense' is not COLUMN<op>VALUE"),
    ({"where": "checkpoint=-1"}, "export.where: got 'checkpoint=-1'; Input should be a valid list"),
    ({"limit": 0}, "export.limit: got 0"),
    ({"shard_size": 0}, "export.shard_size: got 0"),
    ({"wher": ["checkpoint=-1"]}, "export.wher: unknown key (value ['checkpoint=-1']). Did you mean 'where'?"),
])
def test_bad_export_params_name_the_key(section, named):
    with pytest.raises(ParamsError) as err:
        parse_params({"export": section})
    assert named in str(err.value) and "Fix params.yaml" in str(err.value)


def test_export_where_is_checked_with_the_grammar_of_the_filters():
    from thinair.data import parse_where

    for cond in ("checkpoint=-1", "guidance>=2", "a=b>c", "a<b=c", "label!=3", "x==1", "  seed < 5", "nonsense", "=1",
                 " >= 2", "a!b=c", "!=x", "guidance>"):
        try:
            parse_where(cond)
            valid = True
        except ValueError:
            valid = False
        try:
            parse_params({"export": {"where": [cond]}})
            accepted = True
        except ParamsError:
            accepted = False
        assert accepted is valid, cond


def test_export_stage_from_the_cli(project, tmp_path, capsys):
    root = project[0]
    f = str(root / "params.yaml")
    assert main(["--params", f, "--root", str(root), "-S", "export.format=tar", "export"]) == 2  # before any work
    assert "export.format: got 'tar'" in capsys.readouterr().err
    assert main(["--params", f, "--root", str(root), "export", "--real", "--where", "checkpoint=-1"]) == 2
    err = capsys.readouterr().err
    assert "--where, --real need an OUT folder" in err and "-S export.where=" in err
    (root / "data" / "export").mkdir(parents=True, exist_ok=True)
    (root / "data" / "export" / "old.png").write_bytes(b"an earlier export")
    assert main(["--params", f, "--root", str(root), "export"]) == 0  # off (the default): no Prefect, about a second
    assert "nothing to do; Prefect not started" in capsys.readouterr().out
    assert sorted(p.name for p in (root / "data" / "export").iterdir()) == ["manifest.json"]
    assert "export.format is null" in json.loads((root / "data" / "export" / "manifest.json").read_text())["why"]


def test_export_stage_runs_as_a_cached_flow(prefect_server, project, capsys):
    from tests.test_caching import _task_states
    from thinair.flows.export import export_flow

    root = project[0]
    argv = ["--params", str(root / "params.yaml"), "--root", str(root), "-S", "export.format=imagefolder", "-S",
            "export.limit=10", "export"]
    assert main(argv) == 0, capsys.readouterr().err  # `thinair export` without OUT: what dvc.yaml's stage runs
    assert len(list((root / "data" / "export").rglob("*.png"))) == 10
    params = stage_params(project, format="imagefolder", limit=10)
    assert _task_states(export_flow(params=params, root=str(root), return_state=True)) == {"export-all": "Cached"}
    assert _task_states(export_flow(params=stage_params(project, format="imagefolder", limit=9), root=str(root),
                                    return_state=True)) == {"export-all": "Completed"}
    assert len(list((root / "data" / "export").rglob("*.png"))) == 9


def test_fit_section_reports_the_check(tmp_path):
    from thinair import io
    from thinair.card import fit_section

    fit = {"ok": False, "accuracy_originals": 0.9, "accuracy_reconstructions": 0.45, "images": 100, "ratio": 0.5,
           "min_ratio": 0.9, "psnr_db": 7.9, "message": "the generator cannot represent this dataset"}
    d = tmp_path / "data" / "encode"
    d.mkdir(parents=True)
    io.write_json(d / "fit.json", fit)
    text = fit_section(tmp_path)
    assert text.startswith("**FAILED**: a classifier") and "45.0 %" in text and "cannot represent" in text
    io.write_json(d / "fit.json", fit | {"ok": True, "ratio": 0.95, "message": None})
    assert fit_section(tmp_path).startswith("passed: ") and "ratio 0.95" in fit_section(tmp_path)
