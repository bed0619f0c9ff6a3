"""Prefect task caching keyed on content and verified on every hit (thinair/units.py): a second run is all
cache hits; a deleted or changed output makes exactly that task run again; records live in the project."""
from __future__ import annotations

import json

from thinair import io, paths, units
from tests.conftest import tiny_params


def _store(root, key: str, result: dict) -> None:
    d = paths.prefect_results(root)
    d.mkdir(parents=True, exist_ok=True)
    (d / key).write_text(json.dumps({"metadata": {}, "result": json.dumps(result)}))


def test_a_record_whose_output_is_missing_or_changed_is_dropped(tmp_path):
    out = tmp_path / "data" / "x" / "a.bin"
    out.parent.mkdir(parents=True)
    out.write_bytes(b"abc")
    rec = units.record(tmp_path, [out])
    assert rec == {"outputs": {"data/x/a.bin": io.file_sha256(out)}}
    params = {"root": str(tmp_path), "key": "k1", "unit": {"name": "u"}}
    _store(tmp_path, "t-u-k1", rec)
    assert units.verified_key("t", None, params) == "t-u-k1"
    assert (paths.prefect_results(tmp_path) / "t-u-k1").is_file()  # intact outputs: the record stays
    out.write_bytes(b"abd")
    units.verified_key("t", None, params)
    assert not (paths.prefect_results(tmp_path) / "t-u-k1").exists()  # changed output: dropped
    _store(tmp_path, "t-u-k1", rec)
    out.unlink()
    units.verified_key("t", None, params)
    assert not (paths.prefect_results(tmp_path) / "t-u-k1").exists()  # missing output: dropped
    _store(tmp_path, "t-u-k2", {"no": "outputs"})
    units.verified_key("t", None, params | {"key": "k2"})
    assert not (paths.prefect_results(tmp_path) / "t-u-k2").exists()  # unreadable record: dropped


def test_result_records_live_in_the_project_not_the_home(tmp_path):
    assert paths.prefect_results(tmp_path) == (tmp_path / ".thinair" / "prefect" / "results").resolve()


def _task_states(flow_state) -> dict[str, str]:
    """{task run name: state name} of one flow run."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[flow_state.state_details.flow_run_id])))
    return {r.name: r.state.name for r in runs}


def _chunks(states: dict, prefix: str) -> dict[str, str]:
    return {k: v for k, v in states.items() if k.startswith(prefix)}


def test_second_run_is_all_cache_hits_and_a_deleted_chunk_alone_reruns(prefect_server, tiny_generator, tmp_path):
    from thinair.config import parse_params
    from thinair.flows.encode import encode_flow
    from thinair.flows.ingest import ingest_flow
    from thinair.flows.invert import invert_flow

    params = parse_params(tiny_params(tiny_generator))
    root = str(tmp_path)
    first = {f.name: f(params=params, root=root, return_state=True) for f in (ingest_flow, encode_flow, invert_flow)}
    for state in first.values():
        assert state.is_completed()
        assert set(_task_states(state).values()) == {"Completed"}
    out = tmp_path / "data" / "invert"
    before = {f.name: io.file_sha256(f) for f in out.iterdir()}

    second = {f.name: f(params=params, root=root, return_state=True) for f in (ingest_flow, encode_flow, invert_flow)}
    for name, state in second.items():
        states = _task_states(state)
        assert states and set(states.values()) == {"Cached"}, (name, states)

    # delete one chunk's published file: only that chunk's task runs (restored from the verified chunk cache)
    (out / "train-00001.safetensors").unlink()
    states = _chunks(_task_states(invert_flow(params=params, root=root, return_state=True)), "invert-chunk")
    assert sorted(states.values()) == ["Cached", "Completed"], states
    # delete it everywhere (published file and chunk cache): that chunk alone is recomputed, to the same bytes
    key = next(d for d in paths.cache_dir("invert", root).iterdir() if (d / "train-00001.safetensors").exists())
    (out / "train-00001.safetensors").unlink()
    (key / "train-00001.safetensors").unlink()
    states = _chunks(_task_states(invert_flow(params=params, root=root, return_state=True)), "invert-chunk")
    assert sorted(states.values()) == ["Cached", "Completed"], states
    assert (key / "train-00001.safetensors").is_file()  # it was computed again
    assert {f.name: io.file_sha256(f) for f in out.iterdir()} == before
    # a changed param changes every key: nothing is reused
    changed = parse_params(tiny_params(tiny_generator, invert={"steps": 5}))
    states = _chunks(_task_states(invert_flow(params=changed, root=root, return_state=True)), "invert-chunk")
    assert set(states.values()) == {"Completed"}
