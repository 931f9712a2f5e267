"""Content-addressed image store: ``lake/blobs/<sha[:2]>/<sha256>`` holds the ORIGINAL bytes, once.

Invariants: a blob's name is the sha256 of its bytes; a blob is written to a temporary name, fsynced
and renamed (a reader never sees half a blob); writing an existing blob is a no-op (idempotent,
so reruns and duplicates cost nothing). Readers decode with `core.images.decode_image`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import re
import uuid
from pathlib import Path

from ..core.atomic import atomic_write_bytes
from ..core.home import Home

_SHA = re.compile(r"^[0-9a-f]{64}$")


def blob_path(home: Home, sha: str) -> Path:
    if not _SHA.match(sha):
        raise ValueError(f"not a sha256 hex digest: {sha!r}")
    return home.lake / "blobs" / sha[:2] / sha


def put_blob(home: Home, data: bytes, sha: str | None = None, durable: bool = True) -> str:
    """Store `data` (if not stored yet) and return its sha256.

    ``durable=False`` skips the per-blob fsync (one fsync per small image dominates ingest time);
    the caller must then call `sync_blobs(home)` before publishing anything that references them.
    """
    sha = sha or hashlib.sha256(data).hexdigest()
    path = blob_path(home, sha)
    if path.exists() and path.stat().st_size == len(data):
        return sha
    if durable:
        atomic_write_bytes(path, data)
        return sha
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    os.replace(tmp, path)  # still atomic for readers: the name appears only with all bytes behind it
    return sha


def sync_blobs(home: Home) -> None:
    """Flush every blob written with ``durable=False`` to disk (one syncfs of the lake's filesystem)."""
    root = home.lake / "blobs"
    root.mkdir(parents=True, exist_ok=True)
    syncfs(root)


def syncfs(path: Path) -> None:
    """One ``syncfs(2)`` of the filesystem holding `path` (``os.sync()`` where syncfs is missing):
    far cheaper than one fsync per small file when thousands were just written."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if getattr(libc, "syncfs", None) is None or libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def read_blob(home: Home, sha: str) -> bytes:
    path = blob_path(home, sha)
    if not path.exists():
        raise FileNotFoundError(f"no blob {sha} in {path.parent}")
    return path.read_bytes()
