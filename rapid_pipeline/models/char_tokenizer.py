"""A BERT-style character-level Chinese vocabulary built from a corpus (when no checkpoint tokenizer is given).

    vocab_path = build_vocab(captions, out_dir, min_freq=1, max_size=21128)
    tok = load_tokenizer(out_dir)        # transformers BertTokenizer(Fast) over vocab.txt

Invariants:
* Specials first, in BERT order: ``[PAD]`` (id 0, the pad id the text model's embedding expects),
  ``[UNK]``, ``[CLS]``, ``[SEP]``, ``[MASK]``.
* CJK characters are single tokens (BERT splits them itself with ``tokenize_chinese_chars``); other
  characters also get a ``##`` continuation form, so any Latin word or number decomposes into
  characters instead of becoming ``[UNK]``.
* Deterministic: frequency descending, ties by code point; the same corpus gives the same vocab.
"""

from __future__ import annotations

import collections
import os
import unicodedata
from pathlib import Path
from typing import Iterable

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2FA1F
            or 0xF900 <= cp <= 0xFAFF)


def _is_punct(ch: str) -> bool:
    # BERT's basic tokenizer splits every punctuation mark into its own token, so no ## form is needed.
    return unicodedata.category(ch).startswith("P") or (ch.isascii() and not ch.isalnum())


def count_chars(texts: Iterable[str]) -> collections.Counter:
    counts: collections.Counter = collections.Counter()
    for text in texts:
        # Lower-cased like BertTokenizer(do_lower_case=True) sees it.
        counts.update(ch for ch in text.lower() if not ch.isspace())
    return counts


def vocab_tokens(counts: collections.Counter, min_freq: int = 1, max_size: int = 21128) -> list[str]:
    """Specials, then characters by frequency (and ``##c`` for non-CJK, non-punctuation characters)."""
    if max_size <= len(SPECIALS):
        raise ValueError(f"max_size {max_size} leaves no room beyond the {len(SPECIALS)} special tokens")
    tokens = list(SPECIALS)
    for ch, n in sorted(counts.items(), key=lambda kv: (-kv[1], ord(kv[0]))):
        if n < min_freq:
            break
        extra = [ch] if _is_cjk(ch) or _is_punct(ch) else [ch, "##" + ch]
        if len(tokens) + len(extra) > max_size:
            break
        tokens += extra
    return tokens


def build_vocab(corpus_texts: Iterable[str], out_dir: str | os.PathLike, min_freq: int = 1,
                max_size: int = 21128) -> Path:
    """Write ``vocab.txt`` for `corpus_texts` into `out_dir`; returns its path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "vocab.txt"
    path.write_text("\n".join(vocab_tokens(count_chars(corpus_texts), min_freq, max_size)) + "\n", encoding="utf-8")
    return path


def load_tokenizer(folder: str | os.PathLike):
    """The tokenizer stored in `folder` (tokenizer files of a checkpoint, or a bare ``vocab.txt``)."""
    from transformers import AutoTokenizer, BertTokenizerFast

    folder = Path(folder)
    if (folder / "tokenizer_config.json").exists() or (folder / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if not (folder / "vocab.txt").exists():
        raise FileNotFoundError(f"no tokenizer in {folder} (expected tokenizer_config.json or vocab.txt)")
    # transformers 5 takes the vocab as a path or mapping via ``vocab=`` (``vocab_file=`` is ignored there).
    return BertTokenizerFast(vocab=str(folder / "vocab.txt"), do_lower_case=True, tokenize_chinese_chars=True)
