"""Shared fixtures: a tiny *random* SD-architecture generator (tests only) and a tiny project params set."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # the child processes tests start (CLI runs, kill tests): see below
# the shared Prefect server a test's `thinair` commands start in its own PREFECT_HOME outlives the test this long
os.environ.setdefault("THINAIR_SERVER_IDLE_SECONDS", "20")
# One intra-op thread: the tests' tensors are tiny, so a second thread only adds synchronisation, and on shared cores
# (CI, or a machine running anything else) a thread waiting for its partner makes each op many times slower
# (a smallcnn step on 40 digits: 0.2 s with one thread, 1.3 s with two, under a load of 5 on 2 cores).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _console_logs_follow_this_tests_streams():
    """Prefect and DVC bind their console handlers to sys.stderr / sys.stdout as they are when logging is set up;
    under pytest those may be an earlier test's captured streams, closed by now. Re-point them at this test's."""
    import logging
    import sys

    loggers = [logging.getLogger()] + [lg for lg in list(logging.Logger.manager.loggerDict.values())
                                       if isinstance(lg, logging.Logger)]
    for h in {h for lg in loggers for h in lg.handlers}:
        if type(h).__name__ == "PrefectConsoleHandler":
            with h.lock:
                h.stream = h.console.file = sys.stderr
    if "dvc.logger" in sys.modules:  # DVC's: the product's own helper (thinair/dvcrun.py)
        from thinair.dvcrun import _console_to_current_streams

        _console_to_current_streams()
    yield


@pytest.fixture(scope="session")
def tiny_generator(tmp_path_factory) -> Path:
    """A random tiny SD-layout generator directory: 16 px images, VAE factor 4, 4x4x4 latents."""
    from thinair.generator import build_unet, build_vae, save_generator

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gen") / "tiny-random"
    unet = build_unet(4, [8, 16], cross_attention_dim=8, norm_groups=4, head_dim=4)
    vae = build_vae(16, [4, 8, 8], norm_groups=4, scaling_factor=1.0)
    save_generator(path, unet, vae)
    return path


def tiny_params(generator: Path, **sections) -> dict:
    """Raw params for a seconds-long run: 4 digits per class, 2 chunks, a few steps everywhere, one CAS seed and one
    point per scaling study (the full-size one; tests/test_cas.py sets its own), one torch thread per task (see
    above), and no generator-fit check in `encode` (its domain classifier trains for 200 steps; a random generator
    never fits anyway; tests/test_fit_check.py runs it with the trained one)."""
    raw = {
        "base": {"generator": str(generator), "chunk_size": 20, "gen_resolution": 16, "device": "cpu", "threads": 1},
        "ingest": {"per_class_limit": 4},
        "encode": {"fit_check": "off"},
        "invert": {"steps": 4, "batch_size": 10, "checkpoint_every": 2, "num_tokens": 2},
        "sample": {"steps": 2, "samples_per_setting": 1, "batch_size": 16, "checkpoints": [2, "final"],
                   "scheduler": "ddim"},
        "metrics": {"feature_epochs": 1, "features": "domain"},
        "cas": {"epochs": 1, "model": "smallcnn", "seeds": 1, "scale_synthetic": [1], "scale_real": [1.0]},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return raw


@pytest.fixture
def params(tiny_generator):
    from thinair.config import parse_params

    return parse_params(tiny_params(tiny_generator))


UPSTREAM = ("ingest", "encode", "invert", "sample")


@pytest.fixture(scope="session")
def _sampled_once(tiny_generator, tmp_path_factory) -> Path:
    """ingest, encode, invert and sample of `tiny_params` (the stage functions, no Prefect), run once per session."""
    from tests.stages import run_all
    from thinair.config import parse_params

    root = tmp_path_factory.mktemp("sampled") / "ws"
    run_all(parse_params(tiny_params(tiny_generator)), root, UPSTREAM)
    return root


@pytest.fixture
def sampled(_sampled_once, tmp_path) -> Path:
    """`tmp_path` holding a copy of data/ after ingest, encode, invert and sample of `tiny_params` (the same bytes
    ``run_all(params, tmp_path, UPSTREAM)`` writes, without its caches: what runs next computes from scratch). For
    tests whose params differ from tiny_params only in the sections of later stages (metrics, cas, report)."""
    import shutil

    shutil.copytree(_sampled_once / "data", tmp_path / "data")
    return tmp_path


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One temporary Prefect server (and PREFECT_HOME) for every test that runs flows."""
    home = tmp_path_factory.mktemp("prefect-home")
    old = {k: os.environ.get(k) for k in ("PREFECT_HOME", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")}
    os.environ["PREFECT_HOME"] = str(home)
    os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def benchmark_script(name: str):
    """A script of benchmarks/ (not a package) loaded as a module, so tests call its functions and main()."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location(name, root / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
