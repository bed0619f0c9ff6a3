"""Security: nothing we read is unpickled (except our own checkpoints through weights_only=True), no remote
code, the Prefect server stays on 127.0.0.1 unless protected."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from thinair import io

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [f for d in ("thinair", "tasks", "flows", "benchmarks") for f in sorted((ROOT / d).rglob("*.py"))]


def _calls(name: str):
    for f in SOURCES:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith(name):
                yield f, node


def _kw(node: ast.Call, key: str):
    return next((ast.unparse(k.value) for k in node.keywords if k.arg == key), None)


def test_every_torch_load_is_weights_only():
    calls = list(_calls("torch.load"))
    assert calls, "the scan found no torch.load at all: it is broken"
    for f, node in calls:
        assert _kw(node, "weights_only") == "True", f"{f.name}:{node.lineno} torch.load without weights_only=True"


def test_every_numpy_load_refuses_pickles_and_nothing_uses_pickle():
    for f, node in _calls("np.load"):
        assert _kw(node, "allow_pickle") == "False", f"{f.name}:{node.lineno} np.load without allow_pickle=False"
    for name in ("pickle.load", "pickle.loads", "joblib.load", "dill.load", "pd.read_pickle"):
        assert not list(_calls(name)), f"{name} is called"  # (CIFAR's own pickles are torchvision's to read)


def test_no_remote_code_is_ever_trusted():
    for f in SOURCES:
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call):
                assert _kw(node, "trust_remote_code") in (None, "False"), f"{f.name}:{node.lineno}"


def test_an_npz_holding_a_pickled_object_is_refused(tmp_path):
    bad = tmp_path / "evil.npz"
    np.savez(bad, images=np.array([{"not": "an array"}], dtype=object))  # numpy pickles object arrays
    with pytest.raises(OSError, match="unreadable or corrupt npz"):
        io.load_npz(bad)


def test_server_binds_to_localhost_and_refuses_an_open_host_without_auth(monkeypatch, capsys):
    from thinair.cli import _parser, main

    args = _parser().parse_args(["server"])
    assert args.host == "127.0.0.1"
    monkeypatch.delenv("PREFECT_SERVER_API_AUTH_STRING", raising=False)
    assert main(["server", "--host", "0.0.0.0"]) == 1
    assert "PREFECT_SERVER_API_AUTH_STRING" in capsys.readouterr().err
