"""Safe, atomic, deterministic file I/O shared by every stage.

Writes go to a temporary file in the destination directory, are fsynced and renamed into place, so
a killed run leaves either the old file or the new one, never half of one (its orphaned temporary file is
deleted by the next write of the same file). `.npz` files are written
with fixed zip timestamps so the same arrays always give the same bytes (DVC hashes stay stable and
downstream stages are not re-run for nothing). Tensors go to safetensors, records to JSON; nothing is
pickled.
"""
from __future__ import annotations

import fcntl
import glob
import hashlib
import io
import json
import os
import re
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from thinair import faults

MANIFEST = "manifest.json"
_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The writer holds an exclusive flock on its temporary file until it is renamed or removed, so the next write of
    the same file can tell a killed writer's orphan (lock free: deleted) from a live writer's (lock held: kept),
    on any host that shares the directory and whatever the process ids.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        faults.point("write-start", path)
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        faults.point("write-synced", path)
        os.replace(tmp, path)
        faults.point("write-renamed", path)
    finally:
        tmp.unlink(missing_ok=True)
        os.close(fd)


def _remove_orphans(path: Path) -> None:
    """Delete temporary files of earlier writes of `path` that no live writer holds (a killed run leaves them)."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]{{8}}\.tmp")  # mkstemp's 8 random characters
    for f in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if not pattern.fullmatch(f.name):
            continue
        try:
            fd = os.open(f, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live writer holds it
        else:
            f.unlink(missing_ok=True)
        finally:
            os.close(fd)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj: Any) -> None:
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text())


def save_npz(path: str | Path, **arrays: np.ndarray) -> None:
    """Write arrays as an uncompressed-per-member, deflated `.npz` with fixed timestamps (byte-stable)."""
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for name in sorted(arrays):
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.asarray(arrays[name]), allow_pickle=False)
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, buf.getvalue())


def load_npz(path: str | Path) -> dict[str, np.ndarray]:
    """Read every array of an `.npz` (never unpickling); a damaged file raises naming the path."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except Exception as err:  # zipfile.BadZipFile, ValueError, OSError...
        raise OSError(f"{path}: unreadable or corrupt npz ({err}); delete it and re-run the stage that "
                      "writes it") from err


def save_tensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> None:
    """Write torch tensors to safetensors atomically, byte-reproducibly.

    `metadata` (any JSON-able dict) is stored as ONE header entry: safetensors keeps metadata in a hash
    map whose order varies between processes, so several entries would make equal files differ in bytes.
    """
    from safetensors.torch import save_file

    meta = {"thinair": json.dumps(metadata, sort_keys=True)} if metadata else None
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=meta)


def load_metadata(path: str | Path) -> dict:
    """The metadata dict written by :func:`save_tensors` (empty if none)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["thinair"]) if "thinair" in meta else {}


def load_tensors(path: str | Path) -> dict:
    from safetensors.torch import load_file

    path = Path(path)
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as err:
        raise OSError(f"{path}: unreadable or corrupt safetensors file ({err}); delete it and re-run the "
                      "stage that writes it") from err


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_DIGESTS: dict = {}


def file_sha256_memo(path: str | Path) -> str:
    """:func:`file_sha256`, remembered per process while the file's (mtime_ns, size) are unchanged: for input
    files hashed by many cache keys (sample's embedding bank). Verification of outputs uses the plain one."""
    st = os.stat(path)
    stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
    hit = _DIGESTS.get(str(path))
    if hit is None or hit[0] != stamp:
        hit = _DIGESTS[str(path)] = (stamp, file_sha256(path))
    return hit[1]


def seed_for(*parts: Any) -> int:
    """A 63-bit seed derived from any printable parts, e.g. ``seed_for(seed, "sample", chunk, index)``."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
