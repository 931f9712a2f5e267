"""`rapid ingest kg`: formats, normalisation, ids, dedupe, aliases, quarantine, idempotence, streaming."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json

import pytest

from rapid_pipeline.cli import invoke
from rapid_pipeline.core import lake
from rapid_pipeline.core.warehouse import query
from rapid_pipeline.ingest.kg import KGIngestConfig, run
from rapid_pipeline.ingest.kg_readers import InputError

TSV = (
    "head\trelation\ttail\n"
    "北京\t首都\t中国\n"
    "北京\t别名\t燕京\n"
    "ＡＢＣ公司\t位于\t上\u200b海\n"       # full-width -> NFKC, zero-width space dropped
    "北京\t首都\t中国\n"                   # duplicate
    "only\ttwo\n"                         # column count
    "x\t\t y\n"                           # empty relation
    "電腦\t类别\t  设备  \n"                 # traditional head; padded tail
)


def _tsv(tmp_path, text=TSV, name="kg.tsv"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def _ingest(home, paths, domain="demo", partition="manual", **cfg):
    return run(KGIngestConfig(**cfg), home, paths, domain, partition)


def _rows(home, table, domain="demo"):
    return lake.read_table(home, table, domain).to_pylist()


def test_tsv_normalises_dedupes_and_quarantines(home, tmp_path):
    report = _ingest(home, [_tsv(tmp_path)])
    assert report.status == "ok"
    assert (report.rows_in, report.rows_out, report.rows_quarantined, report.rows_duplicate) == (7, 4, 2, 1)
    triples = {(r["head"], r["relation"], r["tail"]) for r in _rows(home, "kg_triples")}
    assert triples == {("北京", "首都", "中国"), ("北京", "别名", "燕京"), ("ABC公司", "位于", "上海"), ("電腦", "类别", "设备")}
    first = [r for r in _rows(home, "kg_triples") if r["relation"] == "首都"]
    assert [r["source_pos"] for r in first] == [2]  # the first occurrence (line 2) is kept
    quarantine = {(r["source_pos"], r["reason"]) for r in _rows(home, "quarantine")}
    assert quarantine == {(6, "column_count"), (7, "empty_field")}
    assert all(r["source_file"] == str((tmp_path / "kg.tsv").resolve()) for r in _rows(home, "quarantine"))


def test_entities_ids_aliases_and_simplified(home, tmp_path):
    _ingest(home, [_tsv(tmp_path)])
    ents = {r["name"]: r for r in _rows(home, "kg_entities")}
    expected_id = "e" + hashlib.sha256("demo\0北京".encode()).hexdigest()[:15]
    assert ents["北京"]["entity_id"] == expected_id
    assert ents["北京"]["aliases"] == ["燕京"] and ents["北京"]["degree"] == 2
    assert ents["電腦"]["name_simplified"] == "电脑"
    assert ents["中国"]["aliases"] == []
    rels = {r["name"]: r for r in _rows(home, "kg_relations")}
    assert rels["别名"]["is_alias"] and not rels["首都"]["is_alias"]
    # ids do not depend on anything but (domain, name)
    other = _ingest(home, [_tsv(tmp_path, "a\tb\t北京\n", "other.tsv")], domain="other")
    assert other.status == "ok"
    assert _rows(home, "kg_entities", "other")[1]["entity_id"] != expected_id  # domain is part of the id


def test_simplified_off_keeps_script(home, tmp_path):
    _ingest(home, [_tsv(tmp_path)], to_simplified=False)
    ents = {r["name"]: r for r in _rows(home, "kg_entities")}
    assert ents["電腦"]["name_simplified"] == "電腦"


def test_too_long_names_and_bad_bytes(home, tmp_path):
    path = tmp_path / "bad.tsv"
    path.write_bytes("a\tb\tc\n".encode() + b"\xff\xfe\tb\tc\n" + b"n\x00ul\tb\tc\n" + ("x" * 300 + "\tb\tc\n").encode())
    report = _ingest(home, [path], max_name_chars=256)
    assert (report.rows_in, report.rows_out, report.rows_quarantined) == (4, 1, 3)
    reasons = {r["source_pos"]: r["reason"] for r in _rows(home, "quarantine")}
    assert reasons == {2: "invalid_utf8", 3: "nul_byte", 4: "too_long"}
    raw = {r["source_pos"]: r["raw"] for r in _rows(home, "quarantine")}
    assert raw[2].startswith("\\xff\\xfe") and len(raw[4]) <= 2048


def test_csv_with_column_mapping_and_quotes(home, tmp_path):
    path = tmp_path / "kg.csv"
    path.write_text('id,subj,pred,obj\n1,"上海, 市",位于,中国\n2,x\n3,a,b,c\n', encoding="utf-8")
    report = _ingest(home, [path], columns="head=subj,relation=pred,tail=obj")
    assert (report.rows_out, report.rows_quarantined) == (2, 1)
    assert {(r["head"], r["tail"]) for r in _rows(home, "kg_triples")} == {("上海, 市", "中国"), ("a", "c")}


def test_tsv_without_header_by_index(home, tmp_path):
    path = _tsv(tmp_path, "x\t中国\t首都\t北京\n", "noheader.tsv")
    _ingest(home, [path], columns="head=1,relation=2,tail=3", header="no")
    assert [(r["head"], r["relation"], r["tail"], r["source_pos"]) for r in _rows(home, "kg_triples")] == [("中国", "首都", "北京", 1)]


def test_bad_column_mapping_is_one_clear_error(home, tmp_path):
    with pytest.raises(InputError, match="not in the header"):
        _ingest(home, [_tsv(tmp_path)], columns="head=nope,relation=1,tail=2")


def test_ntriples_turtle_jsonl_and_compression(home, tmp_path):
    nt = ('<http://kg/%E5%8C%97%E4%BA%AC> <http://kg/rel#capitalOf> <http://kg/%E4%B8%AD%E5%9B%BD> .\n'
          '# a comment\n'
          '<http://kg/a> <http://kg/b> bad .\n'
          '<http://kg/%E5%8C%97%E4%BA%AC> <http://kg/population> "2189万"@zh .\n')
    (tmp_path / "kg.nt.gz").write_bytes(gzip.compress(nt.encode()))
    ttl = '@prefix k: <http://kg/> .\nk:上海 k:位于 k:中国 ;\n  k:别名 "沪" .\n'
    (tmp_path / "kg.ttl").write_text(ttl, encoding="utf-8")
    jsonl = '{"s": "杭州", "p": "位于", "o": "浙江"}\n{"s": "x"}\nnot json\n'
    (tmp_path / "kg.jsonl").write_text(jsonl, encoding="utf-8")
    # bz2 without a telling suffix: found by magic bytes, format given explicitly
    (tmp_path / "dump.bin").write_bytes(bz2.compress("深圳\t位于\t广东\n".encode()))
    _ingest(home, [tmp_path / "kg.nt.gz", tmp_path / "kg.ttl"])
    report = _ingest(home, [tmp_path / "kg.jsonl"], partition="p2", json_keys="s,p,o")
    report2 = _ingest(home, [tmp_path / "dump.bin"], partition="p3", format="tsv", header="no")
    facts = {(r["head"], r["relation"], r["tail"]) for r in _rows(home, "kg_triples")}
    assert {("北京", "capitalOf", "中国"), ("北京", "population", "2189万"), ("上海", "位于", "中国"),
            ("上海", "别名", "沪"), ("杭州", "位于", "浙江"), ("深圳", "位于", "广东")} == facts
    q = {(r["partition"], r["source_pos"], r["reason"]) for r in _rows(home, "quarantine")}
    assert ("manual", 3, "rdf_syntax") in q  # line 3 of the N-Triples file (comments count as lines)
    assert {("p2", 2, "missing_key"), ("p2", 3, "json_syntax")} <= q
    assert report.rows_quarantined == 2 and report2.rows_out == 1
    ents = {r["name"]: r for r in _rows(home, "kg_entities")}
    assert ents["上海"]["aliases"] == ["沪"]  # entities span all partitions of the domain


def test_reingest_partition_is_idempotent_and_entities_follow(home, tmp_path):
    a = _tsv(tmp_path, "北京\t首都\t中国\n上海\t位于\t中国\n", "a.tsv")
    b = _tsv(tmp_path, "杭州\t位于\t浙江\n", "b.tsv")
    _ingest(home, [a], partition="2025-01-01")
    _ingest(home, [b], partition="2025-01-02")
    assert len(_rows(home, "kg_entities")) == 5
    again = _ingest(home, [b], partition="2025-01-02")
    assert again.status == "cached"  # same inputs, config, code, and its outputs are untouched
    # 2025-01-01's cached outputs included kg_entities, which 2025-01-02 rebuilt: it runs again (never stale)
    assert _ingest(home, [a], partition="2025-01-01").status == "ok"
    run(KGIngestConfig(), home, [a], "demo", "2025-01-01", force=True)
    assert len(_rows(home, "kg_triples")) == 3  # replaced, not appended
    smaller = _tsv(tmp_path, "北京\t首都\t中国\n", "a2.tsv")
    _ingest(home, [smaller], partition="2025-01-01")
    names = {r["name"] for r in _rows(home, "kg_entities")}
    assert names == {"北京", "中国", "杭州", "浙江"}  # 上海 left with its only triple


def test_small_batches_give_identical_output(home, tmp_path):
    """Batch and chunk boundaries (streaming) must not change a single byte of the result."""
    from rapid_pipeline.ingest import kg_readers

    triples = [(f"实体{i % 37}", f"关系{i % 5}", f"实体{(i * 7) % 41}") for i in range(600)]
    path = _tsv(tmp_path, "\n".join("\t".join(t) for t in triples) + "\nbad\tline\n", "many.tsv")
    # tiny byte chunks: lines are cut mid-way in the reader and must be stitched back
    def rows(opts):
        return [x for b in kg_readers.read_triples(path, opts)
                for x in zip(b.head.to_pylist(), b.relation.to_pylist(), b.tail.to_pylist(), b.pos.to_pylist())]
    ref = rows(kg_readers.ReadOptions())
    assert rows(kg_readers.ReadOptions(chunk_bytes=13)) == ref and len(ref) == 600
    jsonl = tmp_path / "many.jsonl"
    jsonl.write_text("".join(json.dumps({"head": h, "relation": r, "tail": t}, ensure_ascii=False) + "\n" for h, r, t in triples))
    big = _ingest(home, [jsonl], partition="big")
    small = _ingest(home, [jsonl], partition="small", batch_rows=7, name_cache=10)  # the name cache restarts often
    assert (small.rows_out, small.rows_duplicate) == (big.rows_out, big.rows_duplicate)
    strip = lambda part: [{k: v for k, v in r.items() if k != "partition"}
                          for r in lake.read_partition(home, "kg_triples", "demo", part).to_pylist()]
    assert strip("big") == strip("small")


def test_cli_and_warehouse_views(home, tmp_path):
    out = invoke(["ingest", "kg", str(_tsv(tmp_path)), "--domain", "demo", "--partition", "2025-02-01"], home=home.root)
    assert out["status"] == "ok" and out["rows_out"] == 4
    counts = query(home, "SELECT rows_in, accepted, quarantined, duplicates FROM ingest_summary WHERE stage = 'ingest_kg'").to_pylist()
    assert counts == [{"rows_in": 7, "accepted": 4, "quarantined": 2, "duplicates": 1}]
    stats = json.loads(query(home, "SELECT reasons FROM ingest_stats WHERE source_file = '*'").to_pylist()[0]["reasons"])
    assert stats == {"column_count": 1, "empty_field": 1}


def test_unknown_format_and_missing_file(home, tmp_path):
    (tmp_path / "x.xyz").write_text("a")
    with pytest.raises(InputError, match="--format"):
        _ingest(home, [tmp_path / "x.xyz"])
    with pytest.raises(FileNotFoundError):
        _ingest(home, [tmp_path / "missing.tsv"])
