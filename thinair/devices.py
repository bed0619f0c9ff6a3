"""Device slots: the global `gpu` concurrency limit plus one local device per running task.

Every task that runs a model on a device holds one slot of a Prefect *global concurrency limit* (name
``base.gpu_limit``, default ``gpu``), acquired with ``strict=True`` so a missing limit is an error, never a
silent no-op. The limit is created (or resized) idempotently at the start of each stage, sized to
``base.devices`` or to the number of visible GPUs (on CPU: ``base.workers``). Inside the slot the task takes
one free device of this machine through a file lock in ``.thinair/locks/`` (``fcntl``), so two tasks never
share a GPU while another idles, whatever the task runner. Reads/writes only those lock files.

Prefect's temporary (ephemeral) server does not run its lease "repossessor": a slot held by a process that
was killed would stay taken forever. While waiting for a slot we therefore revoke *expired* leases with
Prefect's own revocation code (leases are kept on disk: ``PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE`` is set to
the filesystem store by :func:`thinair.orchestration.configure`). A live holder renews its lease, so only
dead holders' slots are reclaimed (after at most ``LEASE_SECONDS``).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from pathlib import Path

import torch

from thinair import paths

log = logging.getLogger(__name__)
LEASE_SECONDS = 60  # Prefect's minimum; a live holder renews it, a killed one loses it after this long
WAIT_SECONDS = 20  # how long one acquisition attempt waits before checking for dead holders' slots
_THREAD_DEVICES = threading.local()


def device_count(base) -> int:
    """How many devices the limit admits: base.devices, else visible GPUs, else (CPU) base.workers."""
    if base.devices is not None:
        return base.devices
    if base.device in ("auto",) or base.device.startswith("cuda"):
        if torch.cuda.is_available():
            return 1 if ":" in base.device else torch.cuda.device_count()
    return base.workers


def ensure_limit(base) -> int:
    """Create or resize the global limit (idempotent). Returns its size."""
    from prefect.client.orchestration import get_client

    n = device_count(base)
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(base.gpu_limit, n)
    return n


TEMPORARY_SERVER_ENV = "THINAIR_TEMPORARY_API_URL"  # set by `thinair` when it shares its temporary server


def reapable(api_url: str | None, lease_storage: str) -> bool:
    """Whether this process must reclaim killed runs' slots itself: on Prefect's temporary server (no API URL, or
    the temporary server `thinair` started and shares with its worker processes), with leases kept on disk. A
    real server runs its own repossessor service."""
    temporary = not api_url or api_url == os.environ.get(TEMPORARY_SERVER_ENV)
    return temporary and lease_storage.endswith("filesystem")


def reap_expired_leases() -> int:
    """Revoke leases whose holder stopped renewing them (killed processes), when we run on a temporary server."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if not reapable(settings.api.url, settings.server.concurrency.lease_storage):
        return 0
    from prefect.server.concurrency.lease_storage import get_concurrency_lease_storage
    from prefect.server.database import provide_database_interface
    from prefect.server.services.repossessor import revoke_expired_lease
    from prefect.utilities.asyncutils import run_coro_as_sync

    storage = get_concurrency_lease_storage()

    async def reap() -> int:
        ids = await storage.read_expired_lease_ids()
        for lease_id in ids:
            await revoke_expired_lease(lease_id, db=provide_database_interface(), lease_storage=storage)
        return len(ids)

    n = run_coro_as_sync(reap())
    if n:
        log.warning("released %d device slot(s) held by runs that were killed", n)
    return n


@contextlib.contextmanager
def _local_device(base, root) -> torch.device:
    """Lock one of this machine's devices for the caller (first free one)."""
    from thinair.generator import resolve_device

    dev = resolve_device(base.device)
    gpus = torch.cuda.device_count() if dev.type == "cuda" and dev.index is None else 0
    slots = gpus if gpus else device_count(base)
    lock_dir = paths.state_dir(root) / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    while True:
        for i in range(slots):
            f = open(lock_dir / f"{base.gpu_limit}-{i}.lock", "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            try:
                _THREAD_DEVICES.slot = i
                yield torch.device("cuda", i) if gpus else dev
            finally:
                _THREAD_DEVICES.slot = None
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
            return
        time.sleep(0.2)  # every local device busy (slots of other machines' runs): wait for ours


@contextlib.contextmanager
def device_slot(base, root: str | Path = ".", what: str = "task"):
    """Hold one slot of the global limit and one local device; yields the torch.device to use.

    Outside a Prefect run (plain function calls, tests of the pure core) there is no limit to hold and the
    device comes from ``base.device`` alone.
    """
    from prefect.context import TaskRunContext

    if TaskRunContext.get() is None:
        from thinair.generator import resolve_device

        yield resolve_device(base.device)
        return
    from prefect.concurrency.sync import concurrency

    t0 = time.time()
    while True:
        try:
            slot = concurrency(base.gpu_limit, occupy=1, strict=True, timeout_seconds=WAIT_SECONDS,
                               lease_duration=LEASE_SECONDS)
            slot.__enter__()
            break
        except TimeoutError:
            log.info("%s: waiting for a %r slot (%.0f s so far)", what, base.gpu_limit, time.time() - t0)
            reap_expired_leases()
    try:
        with _local_device(base, root) as dev:
            _THREAD_DEVICES.current = dev
            log.info("%s: holds a %r slot on %s", what, base.gpu_limit, dev)
            yield dev
    finally:
        _THREAD_DEVICES.current = None
        slot.__exit__(None, None, None)


def set_threads(base) -> None:
    """torch intra-op threads for this task: base.threads, else cores / workers."""
    n = base.threads or max(1, (os.cpu_count() or 1) // base.workers)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@contextlib.contextmanager
def one_thread():
    """Run the block on one torch intra-op thread, then give the caller's setting back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def is_oom(err: BaseException) -> bool:
    """A device out-of-memory error (CUDA, MPS or a CPU allocation failure)."""
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    return isinstance(err, oom) or (isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def with_halving(batch_size: int, fn, what: str):
    """``fn(batch_size)``; on out-of-memory retry with half the batch size (down to 1), logging each halving.

    ``fn`` must give the same result for any batch size (it only changes how work is split).
    """
    b = batch_size
    while True:
        try:
            return fn(b)
        except Exception as err:  # noqa: BLE001 - only OOM is handled
            if not is_oom(err) or b == 1:
                raise
            free_memory()
            b = max(1, b // 2)
            log.warning("%s: out of memory; retrying with batch size %d", what, b)


def current_device(base) -> torch.device:
    """The device this thread's slot holds (see :func:`device_slot`), else the one `base.device` names."""
    dev = getattr(_THREAD_DEVICES, "current", None)
    if dev is not None:
        return dev
    from thinair.generator import resolve_device

    return resolve_device(base.device)
