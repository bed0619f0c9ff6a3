"""Device slots (thinair/devices.py): the global `gpu` limit bounds device tasks across the run, each holder
gets its own device, out-of-memory halves the batch, and the chunk fan-out gives identical outputs on Dask."""
from __future__ import annotations

import importlib.util
import threading
import time

import pytest
import torch

from thinair import devices, io
from thinair.config import parse_params
from tests.conftest import tiny_params


def test_device_count_follows_the_param_then_the_workers_on_cpu(tiny_generator):
    p = parse_params(tiny_params(tiny_generator, base={"workers": 3}))
    assert devices.device_count(p.base) == 3  # CPU: one "device" per worker
    p = parse_params(tiny_params(tiny_generator, base={"workers": 3, "devices": 2}))
    assert devices.device_count(p.base) == 2


def test_out_of_memory_halves_the_batch_and_other_errors_pass_through():
    seen = []

    def fn(batch):
        seen.append(batch)
        if batch > 10:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return batch

    assert devices.with_halving(64, fn, "test") == 8 and seen == [64, 32, 16, 8]
    with pytest.raises(ValueError):
        devices.with_halving(64, lambda b: (_ for _ in ()).throw(ValueError("bad input")), "test")
    with pytest.raises(torch.OutOfMemoryError):  # at batch 1 there is nothing left to halve
        devices.with_halving(4, lambda b: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory")), "t")


def test_inversion_survives_a_simulated_oom_with_the_same_result(params, monkeypatch):
    """A step that runs out of memory is redone as micro-batches with accumulated gradients: same maths."""
    from diffusers import DDPMScheduler

    from thinair.generator import generator_for
    from thinair.tasks import invert

    gen, _ = generator_for(params.base)
    sched = DDPMScheduler.from_config(gen.scheduler_config)
    mean, logvar = torch.randn(10, 4, 4, 4, generator=torch.Generator().manual_seed(1)), torch.zeros(10, 4, 4, 4)

    def run():
        return invert.invert_loop(gen.unet, sched, mean, logvar, 1.0, params.invert, torch.Generator().manual_seed(0),
                                  0)

    ref, _, ref_losses = run()
    real = invert.denoising_loss
    sizes = []

    def limited(unet, noisy, noise, t, ctx):
        sizes.append(len(noisy))
        if len(noisy) > 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(unet, noisy, noise, t, ctx)

    monkeypatch.setattr(invert, "denoising_loss", limited)
    emb, _, losses = run()
    assert sizes[:3] == [10, 5, 2] and set(sizes[3:]) == {2}  # full batch, then halves; later steps keep 2
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=1e-4)
    assert [s for s, _ in losses] == [s for s, _ in ref_losses]


def test_two_simulated_devices_bound_the_chunk_tasks(prefect_server, tiny_generator, tmp_path, monkeypatch):
    """8 invert chunks, 4 workers, a `gpu` limit of 2: never more than 2 chunks hold a device, each on its own
    device slot, and every chunk completes."""
    from thinair.flows.encode import encode_flow
    from thinair.flows.ingest import ingest_flow
    from thinair.flows.invert import invert_flow
    from thinair.orchestration import task_runner
    from thinair.tasks import invert

    params = parse_params(tiny_params(tiny_generator, base={"chunk_size": 5, "workers": 4, "devices": 2,
                                                            "gpu_limit": "gpu-test", "threads": 1},
                                      invert={"steps": 12}))
    root = str(tmp_path)
    ingest_flow(params=params, root=root)
    encode_flow(params=params, root=root)
    active, peak, slots_seen, lock = set(), [0], [], threading.Lock()
    real = invert.compute

    def observed(params, unit, out, root=".", device=None):
        slot = devices._THREAD_DEVICES.slot
        with lock:
            assert slot not in active, f"device slot {slot} given to two tasks at once"
            active.add(slot)
            peak[0] = max(peak[0], len(active))
            slots_seen.append(slot)
        try:
            time.sleep(0.5)  # hold the device long enough for the other workers to try
            return real(params, unit, out, root, device)
        finally:
            with lock:
                active.discard(slot)

    monkeypatch.setattr(invert, "compute", observed)
    trace = tmp_path / "trace"
    monkeypatch.setenv("THINAIR_TRACE", str(trace))  # every durable write (thinair/faults.py)
    flow = invert_flow.with_options(task_runner=task_runner(4, "thread"))
    manifest = flow(params=params, root=root)
    assert len(manifest["chunks"]) == 8 and len(slots_seen) == 8
    # concurrent chunk tasks never write the same file: each output is written exactly once
    events = [line.split(" ", 2)[1:] for line in trace.read_text().splitlines()]
    outputs = [w for k, w in events if k == "write-renamed" and "/data/invert/" in w]
    assert len(outputs) == len(set(outputs)) == 8 + 2, outputs  # 8 chunks, losses.json, manifest.json
    computed = [w for k, w in events if k == "computed"]
    assert len(computed) == len(set(computed)) == 8
    assert peak[0] == 2, f"at most 2 chunk tasks may hold devices at once (peak {peak[0]})"
    assert set(slots_seen) == {0, 1}
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        limit = client.read_global_concurrency_limit_by_name("gpu-test")
    assert limit.limit == 2 and limit.active_slots == 0  # created by the flow, every slot given back


@pytest.mark.skipif(importlib.util.find_spec("prefect_dask") is None, reason="needs prefect-dask (dev extra)")
def test_invert_on_a_local_dask_cluster_equals_the_thread_runner(prefect_server, tiny_generator, tmp_path):
    from thinair.flows.encode import encode_flow
    from thinair.flows.ingest import ingest_flow
    from thinair.flows.invert import invert_flow
    from thinair.orchestration import task_runner

    outs = {}
    for kind in ("thread", "dask"):
        params = parse_params(tiny_params(tiny_generator, base={"workers": 2, "threads": 1, "task_runner": kind}))
        root = tmp_path / kind
        ingest_flow(params=params, root=str(root))
        encode_flow(params=params, root=str(root))
        runner = task_runner(2, kind)
        invert_flow.with_options(task_runner=runner)(params=params, root=str(root))
        d = root / "data" / "invert"
        outs[kind] = {f.name: io.file_sha256(f) for f in sorted(d.iterdir()) if f.name != "losses.json"}
        outs[kind]["losses"] = io.read_json(d / "losses.json")["curves"]
    assert len(outs["thread"]) == 4  # 2 chunks, the manifest and the loss curves
    assert outs["dask"] == outs["thread"]


def test_slots_of_killed_runs_are_reclaimed_on_the_shared_temporary_server_only(monkeypatch):
    """`thinair` with process workers points them at its temporary server through PREFECT_API_URL: they must
    still reclaim killed runs' slots there (else a kill -9 leaves the `gpu` limit full for good), but never on a
    real server, whose repossessor does it."""
    from thinair.devices import TEMPORARY_SERVER_ENV, reapable

    fs = "prefect.server.concurrency.lease_storage.filesystem"
    monkeypatch.delenv(TEMPORARY_SERVER_ENV, raising=False)
    assert reapable(None, fs) and not reapable(None, "prefect.server.concurrency.lease_storage.memory")
    assert not reapable("http://127.0.0.1:8875/api", fs)  # a server thinair did not start
    monkeypatch.setenv(TEMPORARY_SERVER_ENV, "http://127.0.0.1:8875/api")
    assert reapable("http://127.0.0.1:8875/api", fs) and not reapable("http://prefect.example/api", fs)
