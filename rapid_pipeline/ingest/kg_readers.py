"""Streaming readers of KG triple files, one per format, all yielding `RawBatch`es.

Used by ``rapid ingest kg`` (`rapid_pipeline.ingest.kg`). Formats: TSV (vectorised with Arrow),
CSV (``csv`` module), N-Triples and Turtle (pyoxigraph's streaming parser), JSONL. ``.gz`` /
``.bz2`` are opened transparently (by suffix or magic bytes).

Invariants:
* Memory is bounded by one batch (``batch_rows`` rows or ``chunk_bytes`` bytes), whatever the file size.
* Every data row either appears in a batch's arrays or in its ``rejects`` (with line number and
  reason) — nothing is dropped silently. Blank lines, ``#`` comment lines of RDF files and the
  header row are not data rows.
* ``pos`` is the 1-based line number (TSV/CSV/N-Triples/JSONL) or the 1-based triple ordinal (Turtle,
  whose statements span lines).

`tsv_layout` is the pre-scan that lets ``ingest kg`` hand a plain TSV file to DuckDB's own CSV reader
instead (`kg_stage`): it returns None, and the file goes through `read_tsv`, unless DuckDB would cut
the file into exactly the lines `read_tsv` sees (``\\n`` newlines and no CR, no BOM, not compressed).
Its line count lets the caller reconcile DuckDB's rows + rejects against the file.
"""

from __future__ import annotations

import bz2
import codecs
import csv
import gzip
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable, Iterator
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..core.text import TextRejected, decode_strict

ROLES = ("head", "relation", "tail")
HEADER_ALIASES = {"head": {"head", "subject", "subj", "h", "s", "实体", "头实体"},
                  "relation": {"relation", "predicate", "pred", "rel", "r", "p", "关系", "属性"},
                  "tail": {"tail", "object", "obj", "t", "o", "值", "尾实体"}}
RAW_LIMIT = 2048
FORMATS = ("auto", "tsv", "csv", "ntriples", "turtle", "jsonl")
_SUFFIX_FORMAT = {".tsv": "tsv", ".txt": "tsv", ".csv": "csv", ".nt": "ntriples", ".ttl": "turtle",
                  ".turtle": "turtle", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


class InputError(ValueError):
    """The file as a whole cannot be read (unknown format, bad column mapping)."""


@dataclass(frozen=True)
class Reject:
    pos: int
    reason: str
    detail: str
    raw: str


@dataclass
class RawBatch:
    head: pa.Array
    relation: pa.Array
    tail: pa.Array
    pos: pa.Array  # int64
    rejects: list[Reject] = field(default_factory=list)

    @property
    def rows_in(self) -> int:
        return len(self.pos) + len(self.rejects)


@dataclass(frozen=True)
class ReadOptions:
    format: str = "auto"
    columns: str = ""          # "head=0,relation=1,tail=2" or "head=subj,relation=pred,tail=obj"
    header: str = "auto"       # auto | yes | no
    json_keys: str = "head,relation,tail"
    batch_rows: int = 100_000
    chunk_bytes: int = 8 << 20


# ---------------------------------------------------------------- opening files

def open_binary(path: Path) -> IO[bytes]:
    """Open `path` for reading, decompressing .gz / .bz2 (by suffix or by magic bytes)."""
    with open(path, "rb") as f:
        magic = f.read(3)
    if path.suffix == ".gz" or magic[:2] == b"\x1f\x8b":
        return gzip.open(path, "rb")
    if path.suffix == ".bz2" or magic == b"BZh":
        return bz2.open(path, "rb")
    return open(path, "rb")


def detect_format(path: Path, requested: str = "auto") -> str:
    if requested != "auto":
        if requested not in FORMATS:
            raise InputError(f"unknown format {requested!r}; choose one of {', '.join(FORMATS)}")
        return requested
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2")]
    fmt = _SUFFIX_FORMAT.get(suffixes[-1].lower() if suffixes else "")
    if fmt is None:
        raise InputError(f"cannot tell the format of {path.name} from its suffix; pass --format")
    return fmt


def read_triples(path: Path, opts: ReadOptions) -> Iterator[RawBatch]:
    fmt = detect_format(path, opts.format)
    reader = {"tsv": read_tsv, "csv": read_csv, "ntriples": read_ntriples, "turtle": read_turtle, "jsonl": read_jsonl}[fmt]
    with open_binary(path) as f:
        yield from reader(f, opts)


def _raw(text: str | bytes) -> str:
    """The offending input for `quarantine.raw`: undecodable bytes and NUL escaped, 2 KB at most."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="backslashreplace")
    return text[:RAW_LIMIT].replace("\x00", "\\x00")


def _empty_batch(rejects: list[Reject]) -> RawBatch:
    e = pa.array([], pa.string())
    return RawBatch(e, e, e, pa.array([], pa.int64()), rejects)


def _batch(rows: list[tuple[str, str, str, int]], rejects: list[Reject]) -> RawBatch:
    if not rows:
        return _empty_batch(rejects)
    h, r, t, p = zip(*rows)
    return RawBatch(pa.array(h, pa.string()), pa.array(r, pa.string()), pa.array(t, pa.string()), pa.array(p, pa.int64()), rejects)


# ---------------------------------------------------------------- column mapping

def parse_columns(spec: str, header: list[str] | None) -> tuple[int, int, int]:
    """``head=0,relation=1,tail=2`` (indices) or ``head=subj,...`` (header names) -> indices."""
    if not spec:
        return _from_header(header) if header else (0, 1, 2)
    found = {}
    for item in spec.split(","):
        role, _, col = item.partition("=")
        if role.strip() not in ROLES or not col.strip():
            raise InputError(f"bad --columns item {item!r}: expected head=COL,relation=COL,tail=COL")
        found[role.strip()] = _column_index(col.strip(), header)
    if set(found) != set(ROLES):
        raise InputError(f"--columns must name head, relation and tail (got {', '.join(found)})")
    return found["head"], found["relation"], found["tail"]


def _column_index(col: str, header: list[str] | None) -> int:
    if col.isdigit():
        return int(col)
    if header is None or col not in header:
        raise InputError(f"column {col!r} is not in the header {header}")
    return header.index(col)


def _from_header(header: list[str]) -> tuple[int, int, int]:
    lowered = [h.strip().lower() for h in header]
    idx = []
    for role in ROLES:
        hits = [i for i, h in enumerate(lowered) if h in HEADER_ALIASES[role]]
        idx.append(hits[0] if hits else ROLES.index(role))
    return tuple(idx)  # type: ignore[return-value]


def looks_like_header(fields: list[str], mode: str) -> bool:
    if mode in ("yes", "no"):
        return mode == "yes"
    names = {f.strip().lower() for f in fields}
    return sum(bool(names & HEADER_ALIASES[r]) for r in ROLES) >= 2


# ---------------------------------------------------------------- TSV pre-scan (DuckDB fast path)

@dataclass(frozen=True)
class TsvLayout:
    cols: tuple[int, int, int]  # 0-based field index of head, relation, tail
    width: int                  # fields every data line must have
    header: bool                # line 1 is a header, not data
    first_valid: bool           # line 1 is strict UTF-8 (else DuckDB rejects it and its row 0 is line 2)
    lines: int                  # physical lines (a last line without newline counts)
    nul: bool                   # the file holds a NUL byte somewhere


def _tsv_header(first: bytes, opts: ReadOptions) -> tuple[bool, tuple[int, int, int], int]:
    """Header decision, column indices and width from the first line (shared by both TSV paths)."""
    fields = first.rstrip(b"\r\n").decode("utf-8", errors="replace").split("\t")
    header = looks_like_header(fields, opts.header)
    cols = parse_columns(opts.columns, fields if header else None)
    width = len(fields) if header else max(cols) + 1
    if max(cols) >= width:
        raise InputError(f"--columns {opts.columns!r} names column {max(cols)}, but the header has {width} columns")
    return header, cols, width


def _count_lines(f: IO[bytes], chunk_bytes: int) -> tuple[int, bool] | None:
    """(physical lines, holds a NUL byte), or None if a CR occurs: C-speed bytes scans, one chunk in memory.

    Why refuse CR: DuckDB 2.0's reader (strict, ``new_line='\\n'``) stops on a CR in a line, and its
    CRLF mode mis-splits lines; such files go to `read_tsv`, which strips CRs itself.
    """
    lines, last, nul = 0, b"\n", False
    while block := f.read(chunk_bytes):
        if b"\r" in block:
            return None
        nul = nul or b"\x00" in block
        lines += block.count(b"\n")
        last = block[-1:]
    return lines + (last != b"\n"), nul


def tsv_layout(path: Path, opts: ReadOptions) -> TsvLayout | None:
    """How DuckDB can read `path` line by line, or None when only `read_tsv` reads it exactly (see module doc)."""
    if detect_format(path, opts.format) != "tsv" or path.suffix in (".gz", ".bz2"):
        return None
    with open(path, "rb") as f:
        first = f.readline()
        if first[:2] == b"\x1f\x8b" or first[:3] in (b"BZh", b"\xef\xbb\xbf") or not first:
            return None
        header, cols, width = _tsv_header(first, opts)
        f.seek(0)
        scan = _count_lines(f, opts.chunk_bytes)
    return None if scan is None else TsvLayout(cols, width, header, is_utf8(first), *scan)


def is_utf8(line: bytes) -> bool:
    """Strict UTF-8 (what DuckDB's reader accepts, byte for byte)."""
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def read_lines(f: IO[bytes], numbers: Iterable[int], chunk_bytes: int = 8 << 20) -> Iterator[tuple[int, bytes]]:
    """(n, line without its newline) for sorted 1-based line `numbers`, in one pass of byte chunks.

    Why not seek to DuckDB's ``line_byte_position``: it is 0- or 1-based depending on the line before.
    """
    want = iter(numbers)
    n, first, pending = next(want, None), 1, b""  # `first`: file line number of the first line in `pending`
    while n is not None:
        block = f.read(chunk_bytes)
        if not block and not pending:
            return
        data = pending + (block or b"\n")  # the last line may lack its newline
        cut = data.rfind(b"\n") + 1
        whole, pending = data[:cut], data[cut:]
        count = whole.count(b"\n")
        ends = np.flatnonzero(np.frombuffer(whole, np.uint8) == 10) if n < first + count else ()
        while n is not None and n < first + len(ends):
            k = n - first
            yield n, whole[(ends[k - 1] + 1 if k else 0):ends[k]]
            n = next(want, None)
        first += count
        if not block:
            return


def line_reject(pos: int, line: bytes | str) -> Reject:
    """A line that is not text (NUL byte or invalid UTF-8), with the same reason and detail as `read_tsv`."""
    if ("\x00" if isinstance(line, str) else b"\x00") in line:
        return Reject(pos, "nul_byte", "NUL byte in line", _raw(line))
    return Reject(pos, "invalid_utf8", "line is not valid UTF-8", _raw(line))


def column_count_reject(pos: int, line: str, width: int) -> Reject:
    fields = line.count("\t") + 1
    return Reject(pos, "column_count", f"{fields} columns, expected {width}", _raw(line))


# ---------------------------------------------------------------- TSV (vectorised)

def read_tsv(f: IO[bytes], opts: ReadOptions) -> Iterator[RawBatch]:
    """Byte chunks cut at newlines; Arrow splits lines and fields, checks counts, picks columns."""
    first = f.readline()
    header, cols, width = _tsv_header(first, opts)
    consumed, pending = (1, b"") if header else (0, first)  # file lines before `pending`
    while True:
        block = f.read(opts.chunk_bytes)
        data = pending + block
        if not block:
            if data:
                yield _tsv_chunk(data if data.endswith(b"\n") else data + b"\n", consumed, cols, width)
            return
        cut = data.rfind(b"\n") + 1
        if cut:
            yield _tsv_chunk(data[:cut], consumed, cols, width)
            consumed += data.count(b"\n", 0, cut)
        pending = data[cut:]


def _tsv_chunk(data: bytes, base: int, cols: tuple[int, int, int], width: int) -> RawBatch:
    """`data` holds whole lines; line k (0-based) of it is file line base + 1 + k.

    Why numpy/Arrow and no per-line Python: line ends, NUL bytes and tab counts are found with
    vectorised scans, the lines become one zero-copy Arrow array, and Python only touches bad lines.
    """
    buf = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(buf == 10)
    pos = np.arange(base + 1, base + 1 + len(ends), dtype=np.int64)
    offsets = np.concatenate(([0], ends + 1)).astype(np.int64)
    lines = pa.LargeStringArray.from_buffers(len(ends), pa.py_buffer(offsets), pa.py_buffer(data))
    rejects: list[Reject] = []
    bad = _bad_byte_lines(data, buf, ends, offsets, pos, rejects)
    fields = np.bincount(np.searchsorted(ends, np.flatnonzero(buf == 9)), minlength=len(ends)) + 1
    lines = pc.utf8_rtrim(lines.filter(pa.array(~bad)), characters="\r\n")  # each line still ends with its newline
    pos, fields = pos[~bad], fields[~bad]
    keep = pc.greater(pc.utf8_length(lines), 0).to_numpy(zero_copy_only=False)  # blank lines are not rows
    good = keep & (fields == width)
    for k in np.flatnonzero(keep & ~good):
        rejects.append(column_count_reject(int(pos[k]), lines[int(k)].as_py(), width))
    parts = pc.split_pattern(lines.filter(pa.array(good)), "\t")
    h, r, t = (pc.cast(pc.list_element(parts, c), pa.string()) for c in cols)
    return RawBatch(h, r, t, pa.array(pos[good]), sorted(rejects, key=lambda x: x.pos))


def _bad_byte_lines(data: bytes, buf: np.ndarray, ends: np.ndarray, offsets: np.ndarray, pos: np.ndarray,
                    rejects: list[Reject]) -> np.ndarray:
    """Mask of lines holding NUL or invalid UTF-8 (those go to `rejects`); scans only near bad bytes."""
    nul = np.zeros(len(ends), dtype=bool)
    nul[np.searchsorted(ends, np.flatnonzero(buf == 0))] = True
    bad = nul.copy()
    for offset in _invalid_utf8_offsets(data):
        bad[np.searchsorted(ends, offset)] = True
    for k in np.flatnonzero(bad):
        rejects.append(line_reject(int(pos[k]), data[offsets[k]:ends[k]]))
    return bad


def _invalid_utf8_offsets(data: bytes) -> Iterator[int]:
    """Byte offsets of the first invalid UTF-8 sequence of each bad line (lines decode independently)."""
    view, start = memoryview(data), 0
    while start < len(data):
        try:
            codecs.utf_8_decode(view[start:], "strict", True)
            return
        except UnicodeDecodeError as exc:
            yield start + exc.start
            nl = data.find(b"\n", start + exc.start)
            start = len(data) if nl < 0 else nl + 1


# ---------------------------------------------------------------- CSV

def read_csv(f: IO[bytes], opts: ReadOptions) -> Iterator[RawBatch]:
    """RFC-4180 CSV (quoted fields may hold commas and newlines); ``pos`` is the record's first line."""
    text = io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline="")
    reader = csv.reader(text)
    rows, rejects, cols, width, start = [], [], None, 0, 1
    for record in reader:
        pos, start = start, reader.line_num + 1
        if cols is None:
            header = looks_like_header(record, opts.header)
            cols = parse_columns(opts.columns, record if header else None)
            width = len(record) if header else max(cols) + 1
            if header:
                continue
        _csv_row(record, pos, cols, width, rows, rejects)
        if len(rows) + len(rejects) >= opts.batch_rows:
            yield _batch(rows, rejects)
            rows, rejects = [], []
    yield _batch(rows, rejects)


def _csv_row(record: list[str], pos: int, cols, width: int, rows: list, rejects: list) -> None:
    if not record:
        return
    line = ",".join(record)
    try:
        decode_strict(line.encode("utf-8", errors="surrogateescape"))
    except TextRejected as exc:
        rejects.append(Reject(pos, exc.reason, str(exc), _raw(line.encode("utf-8", errors="surrogateescape"))))
        return
    if len(record) != width:
        rejects.append(Reject(pos, "column_count", f"{len(record)} columns, expected {width}", _raw(line)))
        return
    rows.append((record[cols[0]], record[cols[1]], record[cols[2]], pos))


# ---------------------------------------------------------------- JSONL

def read_jsonl(f: IO[bytes], opts: ReadOptions) -> Iterator[RawBatch]:
    keys = [k.strip() for k in opts.json_keys.split(",")]
    if len(keys) != 3:
        raise InputError(f"--json-keys needs three keys head,relation,tail (got {opts.json_keys!r})")
    rows, rejects = [], []
    for n, raw in enumerate(f, start=1):
        if raw.strip():
            _json_row(raw, n, keys, rows, rejects)
        if len(rows) + len(rejects) >= opts.batch_rows:
            yield _batch(rows, rejects)
            rows, rejects = [], []
    yield _batch(rows, rejects)


def _json_row(raw: bytes, n: int, keys: list[str], rows: list, rejects: list) -> None:
    try:
        obj = json.loads(decode_strict(raw.rstrip(b"\r\n")))
    except TextRejected as exc:
        rejects.append(Reject(n, exc.reason, str(exc), _raw(raw)))
        return
    except json.JSONDecodeError as exc:
        rejects.append(Reject(n, "json_syntax", str(exc), _raw(raw)))
        return
    values = [obj.get(k) if isinstance(obj, dict) else None for k in keys]
    if not all(isinstance(v, str) for v in values):
        rejects.append(Reject(n, "missing_key", f"needs string values for keys {keys}", _raw(raw)))
        return
    if any("\x00" in v for v in values):
        rejects.append(Reject(n, "nul_byte", "NUL inside a JSON string", _raw(raw)))
        return
    rows.append((*values, n))


# ---------------------------------------------------------------- RDF

def term_name(term) -> str:
    """IRI -> its local name (after the last '#' or '/', percent-decoded); literal -> its value."""
    import pyoxigraph as ox

    if isinstance(term, ox.NamedNode):
        iri = term.value.rstrip("/#")
        local = iri.rsplit("#", 1)[-1] if "#" in iri else iri.rsplit("/", 1)[-1]
        return unquote(local, errors="strict")
    if isinstance(term, ox.BlankNode):
        return "_:" + term.value
    return term.value


def read_ntriples(f: IO[bytes], opts: ReadOptions) -> Iterator[RawBatch]:
    """Batches of lines go to pyoxigraph at once; a line it rejects is quarantined with its number."""
    lines: list[bytes] = []
    numbers: list[int] = []
    for n, raw in enumerate(f, start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith(b"#"):
            continue
        lines.append(raw.rstrip(b"\r\n"))
        numbers.append(n)
        if len(lines) >= opts.batch_rows:
            yield _nt_batch(lines, numbers)
            lines, numbers = [], []
    yield _nt_batch(lines, numbers)


def _nt_batch(lines: list[bytes], numbers: list[int]) -> RawBatch:
    import pyoxigraph as ox

    rows, rejects, bad = [], [], {}
    clean, clean_numbers = _nt_prefilter(lines, numbers, rejects)
    triples = []
    parser = iter(ox.parse(b"\n".join(clean) + b"\n", format=ox.RdfFormat.N_TRIPLES))
    while True:
        try:
            triples.append(next(parser))
        except StopIteration:
            break
        except SyntaxError as exc:
            bad[exc.lineno] = str(exc)
    good_numbers = [n for k, n in enumerate(clean_numbers, start=1) if k not in bad]
    if len(good_numbers) != len(triples):  # more than one statement on a line: line-by-line
        return _nt_per_line(clean, clean_numbers, rejects)
    for k, msg in sorted(bad.items()):
        line = clean_numbers[k - 1]  # the parser counted lines of this batch; report the file's
        rejects.append(Reject(line, "rdf_syntax", _LINE.sub(f"line {line}", msg), _raw(clean[k - 1])))
    for q, n in zip(triples, good_numbers):
        _rdf_row(q, n, rows, rejects)
    return _batch(rows, rejects)


_LINE = re.compile(r"line \d+")


def _nt_prefilter(lines: list[bytes], numbers: list[int], rejects: list[Reject]) -> tuple[list[bytes], list[int]]:
    clean, clean_numbers = [], []
    for raw, n in zip(lines, numbers):
        try:
            decode_strict(raw)
        except TextRejected as exc:
            rejects.append(Reject(n, exc.reason, str(exc), _raw(raw)))
            continue
        clean.append(raw)
        clean_numbers.append(n)
    return clean, clean_numbers


def _nt_per_line(lines: list[bytes], numbers: list[int], rejects: list[Reject]) -> RawBatch:
    import pyoxigraph as ox

    rows = []
    for raw, n in zip(lines, numbers):
        try:
            quads = list(ox.parse(raw + b"\n", format=ox.RdfFormat.N_TRIPLES))
        except SyntaxError as exc:
            rejects.append(Reject(n, "rdf_syntax", str(exc), _raw(raw)))
            continue
        if len(quads) != 1:
            rejects.append(Reject(n, "rdf_syntax", f"{len(quads)} statements on one line", _raw(raw)))
            continue
        _rdf_row(quads[0], n, rows, rejects)
    return _batch(rows, rejects)


def _rdf_row(q, n: int, rows: list, rejects: list) -> None:
    try:
        rows.append((term_name(q.subject), term_name(q.predicate), term_name(q.object), n))
    except UnicodeDecodeError as exc:
        rejects.append(Reject(n, "invalid_utf8", f"percent-encoded IRI is not UTF-8: {exc}", _raw(str(q))))


def read_turtle(f: IO[bytes], opts: ReadOptions) -> Iterator[RawBatch]:
    """Streams pyoxigraph's Turtle parser; a syntax error is quarantined and parsing goes on where it can."""
    import pyoxigraph as ox

    rows, rejects, ordinal = [], [], 0
    parser = iter(ox.parse(f, format=ox.RdfFormat.TURTLE))
    while True:
        try:
            q = next(parser)
        except StopIteration:
            break
        except SyntaxError as exc:
            rejects.append(Reject(exc.lineno or 0, "rdf_syntax", str(exc), ""))
            if len(rejects) > 1000 and not rows:  # not Turtle at all: stop instead of spinning
                break
            continue
        ordinal += 1
        _rdf_row(q, ordinal, rows, rejects)
        if len(rows) + len(rejects) >= opts.batch_rows:
            yield _batch(rows, rejects)
            rows, rejects = [], []
    yield _batch(rows, rejects)
