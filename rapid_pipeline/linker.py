"""The entity linker: an Aho-Corasick automaton over KG names and aliases.

Used by ``rapid link`` (captions) and at inference time (prompts), so training and generation link
text the same way::

    linker = Linker.build([("草莓", "e123", 5.0), ("士多啤梨", "e123", 5.0)], LinkConfig())
    linker.link("一张士多啤梨的照片")  # [Mention("e123", 2, 6, "士多啤梨", "alias")]

Invariants:

* Matching runs on a *match form* made character by character: NFKC (full-width → half-width),
  OpenCC t2s (traditional → simplified), lower case. Names get the same treatment, so 蘋果, 苹果 and
  full-width variants meet; a per-character map keeps offsets pointing into the original text
  (code-point offsets, ``text[start:end] == surface``).
* Leftmost-longest, non-overlapping: among matches starting at the leftmost free position the
  longest wins (红富士苹果 beats 苹果 inside it).
* Names shorter than ``min_chars`` (default 2: single CJK characters are too ambiguous) and names
  on the stoplist are never indexed unless configured.
* A name shared by several entities resolves to the highest prior (KG degree or a domain prior),
  ties to the smallest entity id; the mention says so (``method="ambiguous:degree"``). A match made
  through normalisation (traditional, full-width, case) gets ``+variant`` appended to its method.
* The automaton stores integers only (``STORE_INTS``): memory stays near the trie's own size at
  OpenKG scale (see bench/linking.py for the measured build time and memory per million names).
"""

from __future__ import annotations

import array
import functools
import json
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import ahocorasick
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .core.config import opt
from .core.text import to_simplified

DEFAULT_STOPLIST = ("一个", "一张", "一只", "一些", "这个", "那个", "我们", "你们", "他们", "什么", "没有",
                    "可以", "时候", "东西", "照片", "图片", "图像", "画面")


@dataclass(frozen=True)
class LinkConfig:
    min_chars: int = opt(2, "names shorter than this many characters are not linked (CJK single characters are ambiguous)")
    stoplist: tuple[str, ...] = opt(DEFAULT_STOPLIST, "very common names that are never linked")
    link_aliases: bool = opt(True, "also match entity aliases (别名, 又称, ...)")
    max_name_chars: int = opt(64, "longer names are not indexed")


@dataclass(frozen=True)
class Mention:
    entity_id: str
    start: int
    end: int
    surface: str
    method: str


@functools.lru_cache(maxsize=1 << 16)
def _char_form(ch: str) -> str:
    return to_simplified(unicodedata.normalize("NFKC", ch)).lower()


class _FormTable(dict):
    """code point -> match form, filled lazily; `str.translate` calls __missing__ for new characters."""

    def __missing__(self, code: int) -> str:
        form = self[code] = _char_form(chr(code))
        if len(form) != 1:
            _EXPANDING.add(chr(code))
        return form


_TABLE, _EXPANDING = _FormTable(), set()


def match_form(text: str) -> tuple[str, list[int] | None]:
    """(normalised text, map from normalised index to original index, or None when 1:1)."""
    form = text.translate(_TABLE)  # C loop; per-character forms are cached in _TABLE
    if len(form) == len(text) and _EXPANDING.isdisjoint(text):
        return form, None
    parts = [_char_form(ch) for ch in text]
    if all(len(p) == 1 for p in parts):
        return "".join(parts), None
    index = [i for i, p in enumerate(parts) for _ in p]
    return "".join(parts), index + [len(text)]


def name_form(name: str) -> str:
    return match_form(name)[0]


@dataclass
class _Index:
    """Per automaton value v: key length, chosen entity (code into `entity_ids`) and flags.

    Numpy columns instead of Python objects per key (bench/linking.py reports the retained MB per million names).
    """

    key_len: np.ndarray  # int16
    entity_code: np.ndarray  # int32
    flags: np.ndarray  # uint8: ALIAS | AMBIGUOUS
    entity_ids: list[str]

    def __len__(self) -> int:
        return len(self.key_len)


ALIAS, AMBIGUOUS = 1, 2
_BATCH = 1_000_000


class Linker:
    def __init__(self, automaton: ahocorasick.Automaton, index: _Index, config: LinkConfig):
        self.automaton, self.index, self.config = automaton, index, config
        self._key_len = array.array("h", index.key_len.astype(np.int16).tobytes())

    # ---- build -------------------------------------------------------------------------------
    @classmethod
    def build(cls, entries: Iterable[tuple[str, str, float] | tuple[str, str, float, str]], config: LinkConfig = LinkConfig()) -> "Linker":
        """entries: (surface name, entity_id, prior[, kind "name"|"alias"]). Highest prior wins per key."""
        best = _best_per_key(_entries_table(entries, config))
        automaton = ahocorasick.Automaton(ahocorasick.STORE_INTS)
        for offset in range(0, best.num_rows, _BATCH):
            for i, key in enumerate(best["key"].slice(offset, _BATCH).to_pylist(), offset):
                automaton.add_word(key, i)
        if best.num_rows:
            automaton.make_automaton()
        return cls(automaton, _index_of(best), config)

    def __len__(self) -> int:
        return len(self.index)

    # ---- link --------------------------------------------------------------------------------
    def link(self, text: str) -> list[Mention]:
        if not len(self.index) or not text:
            return []
        form, index = match_form(text)
        key_len = self._key_len  # array.array: scalar reads avoid numpy scalar boxing
        spans = _leftmost_longest([(end - key_len[v] + 1, end + 1, v) for end, v in self.automaton.iter(form)])
        return [self._mention(text, form, index, s, e, v) for s, e, v in spans]

    def _mention(self, text: str, form: str, index: list[int] | None, s: int, e: int, v: int) -> Mention:
        start, end = (s, e) if index is None else (index[s], index[e])
        surface, flags = text[start:end], int(self.index.flags[v])
        method = "ambiguous:degree" if flags & AMBIGUOUS else "alias" if flags & ALIAS else "exact"
        if surface != form[s:e]:  # matched through NFKC / t2s / case folding
            method += "+variant"
        return Mention(self.index.entity_ids[self.index.entity_code[v]], start, end, surface, method)

    # ---- persistence (our own cache files only) ----------------------------------------------
    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        ix = self.index
        pq.write_table(pa.table({"key_len": ix.key_len, "entity_code": ix.entity_code, "flags": ix.flags}), folder / "index.parquet")
        pq.write_table(pa.table({"entity_id": pa.array(ix.entity_ids, pa.string())}), folder / "entities.parquet")
        (folder / "config.json").write_text(json.dumps(asdict(self.config), ensure_ascii=False))
        if len(ix):
            self.automaton.save(str(folder / "automaton.bin"))

    @classmethod
    def load(cls, folder: Path) -> "Linker":
        folder = Path(folder)
        cfg = json.loads((folder / "config.json").read_text())
        cfg["stoplist"] = tuple(cfg["stoplist"])
        t = pq.read_table(folder / "index.parquet")
        index = _Index(t["key_len"].to_numpy(), t["entity_code"].to_numpy(), t["flags"].to_numpy(),
                       pq.read_table(folder / "entities.parquet")["entity_id"].to_pylist())
        automaton = ahocorasick.load(str(folder / "automaton.bin"), lambda b: b) if len(index) else ahocorasick.Automaton(ahocorasick.STORE_INTS)
        return cls(automaton, index, LinkConfig(**cfg))


def _entries_table(entries, config: LinkConfig) -> pa.Table:
    """Normalised keys of all usable entries, built in bounded batches of Python objects."""
    stop = {name_form(s) for s in config.stoplist}
    batches, cols = [], ([], [], [], [])
    for entry in entries:
        is_alias = len(entry) > 3 and entry[3] == "alias"
        if is_alias and not config.link_aliases:
            continue
        key = name_form(entry[0].strip())
        if len(key) < config.min_chars or len(key) > config.max_name_chars or key in stop:
            continue
        for col, value in zip(cols, (key, entry[1], float(entry[2]), is_alias)):
            col.append(value)
        if len(cols[0]) >= _BATCH:
            batches.append(_batch(cols))
            cols = ([], [], [], [])
    batches.append(_batch(cols))
    return pa.concat_tables(batches)


def _batch(cols) -> pa.Table:
    return pa.table({"key": pa.array(cols[0], pa.string()), "entity_id": pa.array(cols[1], pa.string()),
                     "prior": pa.array(cols[2], pa.float64()), "is_alias": pa.array(cols[3], pa.bool_())})


def _best_per_key(t: pa.Table) -> pa.Table:
    """One row per key: highest prior, then smallest entity id; a key that is a canonical name of
    the entity counts as a name even if it is also its alias; `n` = entities sharing the key."""
    per_pair = t.group_by(["key", "entity_id"]).aggregate([("prior", "max"), ("is_alias", "min")])
    counts = per_pair.group_by("key").aggregate([("entity_id", "count")]).rename_columns(["key", "n"])
    ranked = per_pair.sort_by([("key", "ascending"), ("prior_max", "descending"), ("entity_id", "ascending")])
    keys = ranked["key"].combine_chunks()
    if len(keys) == 0:
        return ranked.append_column("n", pa.array([], pa.int64()))
    first = pa.concat_arrays([pa.array([True]), pc.not_equal(keys.slice(1), keys.slice(0, len(keys) - 1))])
    return ranked.filter(first).join(counts, "key").sort_by("key")


def _index_of(best: pa.Table) -> _Index:
    encoded = best["entity_id"].combine_chunks().dictionary_encode()
    flags = (pc.cast(best["is_alias_min"], pa.uint8()).to_numpy(zero_copy_only=False) * ALIAS
             + (best["n"].to_numpy() > 1).astype(np.uint8) * AMBIGUOUS).astype(np.uint8)
    key_len = pc.utf8_length(best["key"]).to_numpy().astype(np.int16)
    return _Index(key_len, encoded.indices.to_numpy(zero_copy_only=False).astype(np.int32), flags, encoded.dictionary.to_pylist())


def _leftmost_longest(matches: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Greedy selection over all (start, end, value) matches: leftmost first, then longest."""
    out, free_from = [], 0
    for s, e, v in sorted(matches, key=lambda m: (m[0], -m[1])):
        if s >= free_from:
            out.append((s, e, v))
            free_from = e
    return out


def entries_from_entities(table: pa.Table, priors: dict[str, float] | None = None) -> Iterable[tuple[str, str, float, str]]:
    """(surface, entity_id, prior, kind) from a ``kg_entities`` table: names, simplified names, aliases."""
    cols = table.select(["entity_id", "name", "name_simplified", "aliases", "degree"]).to_pydict()
    for eid, name, simp, aliases, degree in zip(*cols.values()):
        prior = float(priors.get(eid, degree or 0)) if priors else float(degree or 0)
        yield name, eid, prior, "name"
        if simp and simp != name:
            yield simp, eid, prior, "name"
        for alias in aliases or ():
            yield alias, eid, prior, "alias"

