"""Content fingerprints for cache keys and lineage.

A fingerprint is a sha256 hex string. Files hash their bytes, folders with a manifest reuse the
manifest's fingerprint (cheap: no re-read of data), other folders hash (relative path, file hash)
pairs. Configs hash their canonical JSON. The code version hashes the package's own sources, so
any code change invalidates step caches (conservative, never stale).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from .. import __version__
from .atomic import read_manifest, sha256_file


def canonical_json(obj: Any) -> str:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    return json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str, separators=(",", ":"))


def fingerprint_obj(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def fingerprint_path(path: str | Path) -> str:
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    if not path.exists():
        raise FileNotFoundError(f"cannot fingerprint missing path {path}")
    manifest = read_manifest(path)
    if manifest is not None and _manifest_files_intact(path, manifest):
        return manifest["fingerprint"]
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.is_file() and not q.name.startswith(".tmp-")):
        h.update(str(p.relative_to(path)).encode() + b"\0" + sha256_file(p).encode())
    return h.hexdigest()


def _manifest_files_intact(folder: Path, manifest: dict) -> bool:
    # Cheap tamper check (no re-read): every listed file is there with its recorded size. If not, the
    # folder is hashed as it is, so the fingerprint no longer matches and a step cache misses.
    for f in manifest["files"]:
        p = folder / f["path"]
        if not p.is_file() or p.stat().st_size != f["bytes"]:
            return False
    return True


@functools.cache
def code_version() -> str:
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(__version__.encode())
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return f"{__version__}+{h.hexdigest()[:12]}"
