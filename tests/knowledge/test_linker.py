"""The Aho-Corasick linker on the hand-labelled set and on its rules."""

from __future__ import annotations

import pytest

from rapid_pipeline.linker import LinkConfig, Linker, match_form

from .linking_gold import GOLD, KG, entity_id, gold_spans, kg_entries


@pytest.fixture(scope="module")
def linker():
    return Linker.build(kg_entries(), LinkConfig())


def _scores(linker):
    tp = fp = fn = 0
    for caption, mentions in GOLD:
        gold = gold_spans(caption, mentions)
        got = {(m.start, m.end, m.entity_id) for m in linker.link(caption)}
        tp, fp, fn = tp + len(gold & got), fp + len(got - gold), fn + len(gold - got)
    return tp / max(tp + fp, 1), tp / max(tp + fn, 1), tp


def test_gold_set_is_large_and_varied():
    assert len(GOLD) >= 60
    assert sum(len(m) for _, m in GOLD) >= 80


def test_precision_and_recall_on_hand_labelled_set(linker):
    precision, recall, tp = _scores(linker)
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)


def test_offsets_point_into_original_text(linker):
    for caption, _ in GOLD:
        for m in linker.link(caption):
            assert caption[m.start:m.end] == m.surface


def test_leftmost_longest_prefers_nested_longer_name(linker):
    [m] = linker.link("红富士苹果")
    assert (m.entity_id, m.surface) == (entity_id("红富士苹果"), "红富士苹果")


def test_variants_and_methods(linker):
    methods = {m.surface: m.method for m in linker.link("蘋果和檸檬和士多啤梨和ｉＰｈｏｎｅ")}
    assert methods["蘋果"] == "ambiguous:degree+variant"
    assert methods["檸檬"] == "exact+variant"
    assert methods["士多啤梨"] == "alias"
    assert methods["ｉＰｈｏｎｅ"] == "exact+variant"


def test_ambiguous_name_resolved_by_degree(linker):
    [m] = linker.link("苹果")
    assert m.entity_id == entity_id("苹果") and m.method == "ambiguous:degree"


def test_single_characters_and_stoplist_need_configuration():
    entries = [("汁", "e1", 1.0), ("照片", "e2", 1.0)]
    assert Linker.build(entries).link("汁的照片") == []
    custom = Linker.build(entries, LinkConfig(min_chars=1, stoplist=()))
    assert [m.entity_id for m in custom.link("汁的照片")] == ["e1", "e2"]


def test_match_form_keeps_an_offset_map_when_lengths_change():
    form, index = match_form("㍿苹果")  # NFKC expands one character into four
    assert form.endswith("苹果") and index is not None and index[form.index("苹果")] == 1


def test_offsets_survive_expanding_characters(linker):
    [m] = linker.link("㍿草莓")
    assert (m.start, m.end, m.surface) == (1, 3, "草莓")


def test_save_load_round_trip(linker, tmp_path):
    linker.save(tmp_path / "lk")
    again = Linker.load(tmp_path / "lk")
    for caption, _ in GOLD:
        assert again.link(caption) == linker.link(caption)


def test_empty_linker_links_nothing():
    assert Linker.build([]).link("草莓") == []
    assert len(KG) > 30
