"""The one caption / KG-name normaliser.

``normalize(raw)`` keeps the raw text and returns:

* ``text``: control, format (zero-width, BOM, bidi) and private-use characters removed, NFKC
  (full-width ＡＢＣ１２３ → ABC123, compatibility forms folded), whitespace collapsed and trimmed;
* ``simplified``: ``text`` converted traditional → simplified with OpenCC (``t2s``), a separate
  column so the original script is never lost.

`decode_strict` refuses invalid UTF-8 and NUL bytes instead of guessing.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

_WS = re.compile(r"\s+")
_DROP_CATEGORIES = {"Cc", "Cf", "Co", "Cs", "Cn"}


class TextRejected(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True)
class Normalized:
    raw: str
    text: str
    simplified: str


def decode_strict(data: bytes) -> str:
    if b"\x00" in data:
        raise TextRejected("nul_byte")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TextRejected("invalid_utf8", str(exc)) from exc


def _already_clean(raw: str) -> bool:
    # Why: most KG names / captions are already clean; this C-speed check proves `clean` would return
    # them unchanged (printable = no Cc/Cf/Co/Cs/Cn/Z* except " ", already NFKC, no edge or double space).
    return raw.isprintable() and unicodedata.is_normalized("NFKC", raw) and raw.strip() == raw and "  " not in raw


def clean(raw: str) -> str:
    if "\x00" in raw:
        raise TextRejected("nul_byte")
    if _already_clean(raw):
        return raw
    text = unicodedata.normalize("NFKC", raw)
    # Keep tabs/newlines as spaces; drop everything invisible or non-printing.
    text = "".join(" " if ch in "\t\n\r\x0b\x0c" else ch for ch in text
                   if ch in "\t\n\r\x0b\x0c" or unicodedata.category(ch) not in _DROP_CATEGORIES)
    return _WS.sub(" ", text).strip()


@functools.lru_cache(maxsize=1)
def _converter():
    from opencc import OpenCC  # the official OpenCC (C++ core)

    return OpenCC("t2s")


@functools.lru_cache(maxsize=1)
def t2s_entries() -> tuple[tuple[str, str], ...]:
    """(key, first value) of every dictionary OpenCC's t2s config uses (normalisation and conversion chain).

    The wheel ships them as binary ``.ocd2`` files; its own ``opencc_dict`` tool exports them to text (once per
    process), so the shortcut in `to_simplified` is derived from exactly the dictionaries that convert.
    """
    import json
    import subprocess
    import tempfile
    from pathlib import Path

    import opencc

    clib = Path(opencc.__file__).parent / "clib"
    share, tool = clib / "share" / "opencc", clib / "bin" / "opencc_dict"
    files = re.findall(r'"file":\s*"([^"]+\.ocd2)"', json.dumps(json.loads((share / "t2s.json").read_text())))
    entries = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in files:
            out = Path(tmp) / (name + ".txt")
            subprocess.run([str(tool), "-i", str(share / name), "-o", str(out), "-f", "ocd2", "-t", "text"], check=True,
                           capture_output=True)
            for line in out.read_text(encoding="utf-8").splitlines():
                key, _, values = line.partition("\t")
                entries.append((key, values.split(" ")[0]))
    return tuple(entries)


@functools.lru_cache(maxsize=1)
def _traditional_chars() -> frozenset[str]:
    """Characters some t2s entry actually changes: text with none of them converts to itself.

    (A matching entry that changes nothing leaves the text as it is, so only changed positions matter.)
    """
    chars: set[str] = set()
    for key, value in t2s_entries():
        chars.update(set(key) if len(key) != len(value) else {k for k, v in zip(key, value) if k != v})
    return frozenset(chars)


@functools.lru_cache(maxsize=1 << 16)
def to_simplified(text: str) -> str:
    # Why the check: most text has no character t2s can change; it is returned as is (identical output,
    # no call into OpenCC).
    if _traditional_chars().isdisjoint(text):
        return text
    return _converter().convert(text)


def to_simplified_many(texts: list[str]) -> list[str]:
    """`to_simplified` of each of `texts` (none holding a newline), in one call into OpenCC: no dictionary entry spans
    a newline, so converting the texts joined by newlines converts each on its own."""
    if not texts:
        return []
    return _converter().convert("\n".join(texts)).split("\n")


def normalize(raw: str, max_chars: int | None = None, convert: bool = True) -> Normalized:
    if max_chars is not None and len(raw) > max_chars:
        raise TextRejected("too_long", f"{len(raw)} > {max_chars} characters")
    text = clean(raw)
    if not text:
        raise TextRejected("empty_text")
    if max_chars is not None and len(text) > max_chars:  # NFKC can lengthen text (U+FDFA is 18 characters)
        raise TextRejected("too_long", f"{len(text)} > {max_chars} characters after cleaning")
    return Normalized(raw, text, to_simplified(text) if convert else text)
