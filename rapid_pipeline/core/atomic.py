"""Atomic publication: a crash never leaves a half-written output.

Two shapes, one rule (write elsewhere, fsync, then one `os.replace`):

* **Manifest partitions** (lake tables). Data files are written under a temporary name, fsynced
  and renamed to a content-addressed name ``part-<sha256[:16]>.parquet``; then ``_manifest.json``
  is replaced atomically. Readers trust only files the manifest lists, so until the manifest swap
  the previous partition is what everyone sees. Files the new manifest does not list are removed
  after the swap. Content-addressed names make a rerun byte-identical to a clean run.
* **Whole folders** (models, shard sets, reports): build in ``<final>.tmp-<uuid>`` and swap in with
  `publish_dir`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .faults import fault_point

MANIFEST = "_manifest.json"


@dataclass(frozen=True)
class FileEntry:
    path: str  # relative to the partition folder
    rows: int
    bytes: int
    sha256: str


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=True) + "\n").encode())


def finalize_file(tmp: Path, folder: Path, rows: int, suffix: str, prefix: str = "part") -> FileEntry:
    """Rename a fully written temp file to its content-addressed name inside `folder`."""
    fsync_path(tmp)
    digest = sha256_file(tmp)
    name = f"{prefix}-{digest[:16]}{suffix}"
    os.replace(tmp, folder / name)
    return FileEntry(name, rows, (folder / name).stat().st_size, digest)


def temp_path(folder: Path, suffix: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f".tmp-{uuid.uuid4().hex}{suffix}"


def commit_manifest(folder: Path, files: list[FileEntry], meta: dict[str, Any], stage: str = "publish") -> dict:
    """Atomically make `files` the content of partition `folder`; returns the manifest."""
    manifest = {
        "version": 1,
        "files": [asdict(f) for f in sorted(files, key=lambda f: f.path)],
        "rows": sum(f.rows for f in files),
        "fingerprint": hashlib.sha256("".join(sorted(f.sha256 for f in files)).encode()).hexdigest(),
        "meta": meta,
    }
    fault_point(stage, "before_manifest")
    atomic_write_json(folder / MANIFEST, manifest)
    fault_point(stage, "after_manifest")
    _collect_garbage(folder, {f.path for f in files} | {MANIFEST})
    return manifest


def _collect_garbage(folder: Path, keep: set[str]) -> None:
    for child in folder.iterdir():
        if child.name not in keep and child.is_file():
            child.unlink(missing_ok=True)


def read_manifest(folder: Path) -> dict | None:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    return json.loads(path.read_text())


def manifest_paths(folder: Path) -> list[Path]:
    manifest = read_manifest(folder)
    return [] if manifest is None else [Path(folder) / f["path"] for f in manifest["files"]]


def publish_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Swap a fully built folder into place. The old one, if any, is removed after the swap."""
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    for p in tmp_dir.rglob("*"):
        if p.is_file():
            fsync_path(p)
    old = None
    if final_dir.exists():
        old = final_dir.with_name(f".old-{uuid.uuid4().hex}-{final_dir.name}")
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    fsync_path(final_dir.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def staging_dir(final_dir: Path) -> Path:
    final_dir = Path(final_dir)
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = final_dir.with_name(f".tmp-{uuid.uuid4().hex}-{final_dir.name}")
    tmp.mkdir()
    return tmp
