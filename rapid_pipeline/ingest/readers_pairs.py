"""Streaming readers of image-text pair inputs, used by `rapid_pipeline.ingest.pairs`.

Each reader yields `RawSample`s one at a time (bounded memory: an image's bytes are read only when
the sample is judged, and never kept after). Readers do not judge content; they only report what
they could not even read (a CSV line with the wrong column count, a missing file) as a reason code.

Formats:
* Wukong CSV (``url,caption``; column names configurable): read as bytes-preserving text
  (``surrogateescape``) so one line of invalid UTF-8 or a NUL byte is one rejected row, not a dead file.
  ``source_pos`` = the CSV line number (header = line 1).
* Parquet with the same columns, streamed in record batches; ``source_pos`` = row index.
* img2dataset tars (``NNNNNNNNN.jpg/.txt/.json``), streamed with `tarfile` (``r|*``) and grouped by key;
  ``source_pos`` = sample index in the tar.
* Image folders: every image file with its caption in a sidecar ``.txt``; ``source_pos`` = index in
  sorted path order.

URLs in tables: a path relative to the image root (default: the table's own folder), or ``file://``.
Remote URLs are never downloaded (reason ``remote_url``): landing data must already hold the bytes.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import unquote, urlparse

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TABLE_EXTS = (".csv", ".tsv", ".parquet", ".tar", ".tar.gz", ".tgz")
RAW_LIMIT = 2048


class SampleRejected(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclass
class RawSample:
    source_file: str
    source_pos: int
    caption: str | bytes | None              # bytes = not yet decoded (CSV field, .txt sidecar)
    load_image: Callable[[], bytes] | None   # raises SampleRejected when the image cannot be had
    raw: str                                 # what to show in quarantine (truncated)
    error: SampleRejected | None = None      # the reader could not even parse this row


def show_raw(data: str | bytes | None) -> str:
    """Quarantine ``raw`` column: undecodable bytes and NULs escaped, truncated to 2 KB."""
    if data is None:
        return ""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogateescape")
    text = data[: RAW_LIMIT * 2].decode("utf-8", "backslashreplace").replace("\x00", "\\x00")
    return text[:RAW_LIMIT]


def read_file_limited(path: Path, max_bytes: int) -> bytes:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise SampleRejected("missing_image", f"no file {path}") from None
    if not path.is_file():
        raise SampleRejected("missing_image", f"not a file: {path}")
    if size > max_bytes:
        raise SampleRejected("too_many_bytes", f"{size} > {max_bytes}")
    return path.read_bytes()


def url_loader(url: str | None, root: Path, max_bytes: int) -> Callable[[], bytes]:
    """A loader for one table row's image reference (resolved lazily, when the sample is judged)."""
    def load() -> bytes:
        if not url:
            raise SampleRejected("missing_image", "empty url")
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https", "ftp", "s3", "gs"):
            raise SampleRejected("remote_url", f"{url[:200]} (ingest reads local files only; download first)")
        if parsed.scheme == "file" and Path(unquote(parsed.path)).is_absolute() and not parsed.netloc:
            return read_file_limited(Path(unquote(parsed.path)), max_bytes)  # an explicit absolute file:// URL
        rel = unquote(parsed.netloc + parsed.path) if parsed.scheme == "file" else url
        path = (root / rel).resolve()
        # A relative reference must stay inside its root: a row cannot make ingest read /etc/... by "../../".
        if not path.is_relative_to(root.resolve()):
            raise SampleRejected("bad_url", f"{url[:200]} points outside {root}")
        return read_file_limited(path, max_bytes)
    return load


# --------------------------------------------------------------------------- CSV

def _field(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


def _column(header: list[str], name: str, path: Path) -> int:
    if name not in header:
        raise ValueError(f"{path}: no column {name!r} in header {header[:10]} (set --url-column / --caption-column)")
    return header.index(name)


def read_csv(path: Path, label: str, root: Path, url_col: str, caption_col: str, max_bytes: int) -> Iterator[RawSample]:
    # A caption of megabytes must reach the length check (and be quarantined), not kill the reader.
    csv.field_size_limit(max(csv.field_size_limit(), min(sys.maxsize, 1 << 30)))
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        iu, ic = _column(header, url_col, path), _column(header, caption_col, path)
        for row in reader:
            raw = show_raw(delimiter.join(row))
            if len(row) != len(header):
                err = SampleRejected("bad_row", f"{len(row)} columns, header has {len(header)}")
                yield RawSample(label, reader.line_num, None, None, raw, err)
                continue
            url = _field(row[iu]).decode("utf-8", "replace")
            yield RawSample(label, reader.line_num, _field(row[ic]), url_loader(url, root, max_bytes), raw)


# --------------------------------------------------------------------------- Parquet

def read_parquet(path: Path, label: str, root: Path, url_col: str, caption_col: str, max_bytes: int) -> Iterator[RawSample]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    _column(names, url_col, path), _column(names, caption_col, path)
    pos = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[url_col, caption_col]):
        for url, caption in zip(batch.column(0).to_pylist(), batch.column(1).to_pylist()):
            url = url.decode("utf-8", "replace") if isinstance(url, bytes) else url
            yield RawSample(label, pos, caption, url_loader(url, root, max_bytes), show_raw(f"{url},{show_raw(caption)}"))
            pos += 1


# --------------------------------------------------------------------------- img2dataset tar

def _split_key(name: str) -> tuple[str, str]:
    head, base = os.path.split(name)
    key, dot, ext = base.partition(".")
    return os.path.join(head, key), ("." + ext.lower()) if dot else ""


def _tar_sample(label: str, pos: int, key: str, members: dict[str, bytes | SampleRejected]) -> RawSample:
    meta: dict = {}
    if isinstance(members.get(".json"), bytes):
        try:
            meta = json.loads(members[".json"])
        except (ValueError, UnicodeDecodeError):
            meta = {}
    caption = members.get(".txt")
    if caption is None and isinstance(meta.get("caption"), str):
        caption = meta["caption"]
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)

    def load() -> bytes:
        if isinstance(image, SampleRejected):
            raise image
        if image is None:
            raise SampleRejected("missing_image", f"tar sample {key} has no image member")
        return image

    error = None
    if meta.get("status") not in (None, "success"):
        error = SampleRejected("download_failed", f"img2dataset status {meta.get('status')!r}")
    raw = show_raw(f"{key} {sorted(members)} caption={show_raw(caption)}")
    return RawSample(label, pos, caption if not isinstance(caption, SampleRejected) else None, load, raw, error)


def read_tar(path: Path, label: str, max_bytes: int) -> Iterator[RawSample]:
    """Stream the tar; consecutive members sharing a key form one sample (img2dataset writes them so)."""
    with tarfile.open(path, mode="r|*") as tar:
        key, members, pos = None, {}, 0
        for info in tar:
            if not info.isfile():
                continue
            k, ext = _split_key(info.name)
            if k != key and key is not None:
                yield _tar_sample(label, pos, key, members)
                members, pos = {}, pos + 1
            key = k
            if info.size > max_bytes:
                members[ext] = SampleRejected("too_many_bytes", f"{info.size} > {max_bytes}")
            else:
                members[ext] = tar.extractfile(info).read()
        if key is not None:
            yield _tar_sample(label, pos, key, members)


# --------------------------------------------------------------------------- image folder

def read_folder(folder: Path, label: str, max_bytes: int) -> Iterator[RawSample]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    for pos, p in enumerate(files):
        sidecar = p.with_suffix(".txt")
        caption = sidecar.read_bytes() if sidecar.is_file() else None
        rel = f"{label}/{p.relative_to(folder)}"
        yield RawSample(rel, pos, caption, lambda p=p: read_file_limited(p, max_bytes), show_raw(f"{rel} {show_raw(caption)}"))


# --------------------------------------------------------------------------- discovery

def table_kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith((".csv", ".tsv")):
        return "csv"
    if name.endswith(".parquet"):
        return "parquet"
    if name.endswith((".tar", ".tar.gz", ".tgz")):
        return "tar"
    return None


def discover(path: Path) -> list[tuple[str, Path, str]]:
    """(kind, file, label) for a file, or for every table/tar under a folder (sorted).

    Labels are paths relative to the folder given (or the file name), so ``source_file`` does not
    depend on where the landing folder lives.
    """
    if not path.exists():
        raise FileNotFoundError(f"input {path} does not exist")
    if path.is_file():
        kind = table_kind(path)
        if kind is None:
            raise ValueError(f"{path}: not a CSV/TSV, Parquet or tar file (image folders go through --images)")
        return [(kind, path, path.name)]
    # .tsv only as an explicit file: inside a landing drop a .tsv is the KG (kg/triples.tsv), not pairs.
    found = [(table_kind(p), p, str(p.relative_to(path))) for p in sorted(path.rglob("*"))
             if p.is_file() and not p.name.lower().endswith(".tsv") and not p.name.startswith(".")]
    found = [f for f in found if f[0] is not None]
    if not found:
        raise ValueError(f"{path}: no CSV/TSV, Parquet or tar files inside (image folders go through --images)")
    return found
