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


def clean(raw: str) -> str:
    if "\x00" in raw:
        raise TextRejected("nul_byte")
    text = unicodedata.normalize("NFKC", raw)
    # Keep tabs/newlines as spaces; drop everything invisible or non-printing.
    text = "".join(" " if ch in "\t\n\r\x0b\x0c" else ch for ch in text
                   if ch in "\t\n\r\x0b\x0c" or unicodedata.category(ch) not in _DROP_CATEGORIES)
    return _WS.sub(" ", text).strip()


@functools.lru_cache(maxsize=1)
def _converter():
    from opencc import OpenCC

    return OpenCC("t2s")


@functools.lru_cache(maxsize=1 << 16)
def to_simplified(text: str) -> str:
    return _converter().convert(text)


def normalize(raw: str, max_chars: int | None = None, convert: bool = True) -> Normalized:
    if max_chars is not None and len(raw) > max_chars:
        raise TextRejected("too_long", f"{len(raw)} > {max_chars} characters")
    text = clean(raw)
    if not text:
        raise TextRejected("empty_text")
    return Normalized(raw, text, to_simplified(text) if convert else text)
