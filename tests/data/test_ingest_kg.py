"""`rapid ingest kg`: formats, normalisation, ids, dedupe, aliases, quarantine, idempotence, streaming."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import json
import os

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


# ---------------------------------------------------------------- DuckDB's TSV reader vs read_tsv

EDGE_TSV = b"".join([
    b"head\trelation\ttail\n",                    # 1 header
    "北京\t首都\t中国\n".encode(),                  # 2
    b"\n",                                         # 3 blank: not a row
    b"\xff\xfe\tb\tc\n",                           # 4 invalid UTF-8
    b"\xc3\x28\tb\tc\n",                           # 5 invalid UTF-8, right after another
    "ＡＢＣ公司\t位于\t上\u200b海\n".encode(),         # 6 normalised
    b"n\x00ul\tb\tc\n",                            # 7 NUL
    b"\xff\x00\tb\tc\n",                           # 8 NUL and invalid UTF-8: nul_byte (as read_tsv says)
    b"only\ttwo\n",                                # 9 too few columns
    b"a\tb\tc\td\n",                               # 10 too many columns
    b"x\t\ty\n",                                   # 11 empty relation
    b"  \t \t \n",                                 # 12 names empty after cleaning
    "北京\t首都\t中国\n".encode(),                  # 13 duplicate of line 2
    "電腦\t类别\t  设备  \n".encode(),              # 14 traditional head, padded tail
    b"x" * 300 + b"\tb\tc\n",                      # 15 too long
    b"\n",                                         # 16 blank
    "尾\t部\t行\n".encode(),                        # 17
    b"\xfe",                                       # 18 invalid, no final newline
])
EDGE_REASONS = {4: "invalid_utf8", 5: "invalid_utf8", 7: "nul_byte", 8: "nul_byte", 9: "column_count", 10: "column_count",
                11: "empty_field", 12: "empty_field", 15: "too_long", 18: "invalid_utf8"}


def _random_tsv(n: int = 3000, seed: int = 7) -> bytes:
    """Many rejected lines at random places: DuckDB's row numbers must map back to the right lines."""
    import random

    rnd = random.Random(seed)
    bad = [b"\xff\tb\tc", b"only\ttwo", b"n\x00\tb\tc", b"", b"\xc3\x28", b"a\t\tb"]
    lines = [rnd.choice(bad) if rnd.random() < 0.2 else f"实体{rnd.randrange(200)}\t关系{rnd.randrange(7)}\t实体{rnd.randrange(200)}".encode()
             for _ in range(n)]
    return b"\n".join(lines) + b"\n"


def _fingerprints(home, domain="demo", partition="manual"):
    side = f"ingest_kg-{partition}"
    return {t: lake.partition_ref(home, t, domain, p).fingerprint
            for t, p in (("kg_triples", partition), ("quarantine", side), ("kg_entities", "all"), ("kg_relations", "all"))}


def _both_paths(tmp_path, monkeypatch, data: bytes, **cfg):
    """Ingest the same file via DuckDB's reader and via read_tsv (two homes): (reports, fingerprints, homes)."""
    from rapid_pipeline.core.home import Home
    from rapid_pipeline.ingest import kg_stage

    path = tmp_path / "edge.tsv"
    path.write_bytes(data)
    homes = [Home.from_env(tmp_path / "duck"), Home.from_env(tmp_path / "py")]
    duck = _ingest(homes[0], [path], **cfg)
    with monkeypatch.context() as m:
        m.setattr(kg_stage, "tsv_layout", lambda *a: None)
        py = _ingest(homes[1], [path], **cfg)
    assert (duck.extra["files_read_by_duckdb"], py.extra["files_read_by_duckdb"]) == (1, 0)
    return (duck, py), (_fingerprints(homes[0]), _fingerprints(homes[1])), homes


@pytest.mark.parametrize("data,cfg", [(EDGE_TSV, {}), (_random_tsv(), {"header": "no"}),
                                      (b"h\xff\tr\tt\nA\tB\tC\n\xff\n", {"header": "yes"}),  # an invalid header line
                                      (b"\n\na\x01\tb\tc\n\n\x02\t\t\nd\te\tf\tg\th\n", {"header": "no"})],
                         ids=["edge", "random", "bad-header", "control-bytes-and-blank-start"])
def test_duckdb_tsv_reader_matches_read_tsv(tmp_path, monkeypatch, data, cfg):
    (duck, py), (fp_duck, fp_py), homes = _both_paths(tmp_path, monkeypatch, data, **cfg)
    counts = lambda r: (r.rows_in, r.rows_out, r.rows_quarantined, r.rows_duplicate)
    assert counts(duck) == counts(py) and duck.extra["reasons"] == py.extra["reasons"]
    assert fp_duck == fp_py  # same rows, same bytes: kg_triples, quarantine, kg_entities, kg_relations
    if data == EDGE_TSV:
        assert {r["source_pos"]: r["reason"] for r in _rows(homes[0], "quarantine")} == EDGE_REASONS
        assert [r["source_pos"] for r in _rows(homes[0], "kg_triples")] == [2, 6, 14, 17]
        raw = {r["source_pos"]: r["raw"] for r in _rows(homes[0], "quarantine")}
        assert raw[4].startswith("\\xff\\xfe") and raw[8] == "\\xff\\x00\tb\tc" and raw[18] == "\\xfe"


@pytest.mark.parametrize("chunk", [1, 5, 64, 1 << 20])
def test_read_lines_finds_lines_by_number_across_chunks(tmp_path, chunk):
    from rapid_pipeline.ingest.kg_readers import read_lines

    data = _random_tsv(300)[:-1]  # no final newline: the last line still counts
    lines = data.split(b"\n")
    numbers = [1, 2, 3, 50, 51, 52, 199, len(lines) - 1, len(lines)]
    with open(tmp_path / "x.tsv", "wb") as f:
        f.write(data)
    with open(tmp_path / "x.tsv", "rb") as f:
        assert list(read_lines(f, numbers, chunk)) == [(n, lines[n - 1]) for n in numbers]


@pytest.mark.parametrize("data", [b"a\tb\tc\r\nd\te\tf\r\n", b"\xef\xbb\xbfa\tb\tc\nd\te\tf\n"], ids=["crlf", "bom"])
def test_files_duckdb_cannot_read_exactly_go_to_read_tsv(home, tmp_path, data):
    path = tmp_path / "odd.tsv"
    path.write_bytes(data)
    report = _ingest(home, [path], header="no")
    assert report.extra["files_read_by_duckdb"] == 0 and report.rows_out == 2 and report.rows_quarantined == 0


def test_unreconciled_duckdb_read_falls_back_without_double_rows(tmp_path, monkeypatch):
    """If DuckDB's rows + rejected lines do not add up to the file's lines, read_tsv reads the file instead."""
    import dataclasses

    from rapid_pipeline.core.home import Home
    from rapid_pipeline.ingest import kg_stage

    path = tmp_path / "edge.tsv"
    path.write_bytes(EDGE_TSV)
    reference = _ingest(Home.from_env(tmp_path / "ref"), [path])
    real = kg_stage.tsv_layout
    monkeypatch.setattr(kg_stage, "tsv_layout", lambda *a: dataclasses.replace(real(*a), lines=real(*a).lines + 1))
    home = Home.from_env(tmp_path / "fallback")
    report = _ingest(home, [path])
    assert report.extra["files_read_by_duckdb"] == 0
    assert (report.rows_in, report.rows_out, report.rows_quarantined) == (reference.rows_in, reference.rows_out, reference.rows_quarantined)
    assert _fingerprints(home) == _fingerprints(Home.from_env(tmp_path / "ref"))


def test_entities_from_the_run_equal_entities_from_the_lake(home, tmp_path):
    """A domain's only partition: entities come from the run's tables; with a second partition, from the lake."""
    _ingest(home, [_tsv(tmp_path)], partition="p1")
    first = _fingerprints(home, partition="p1")
    _ingest(home, [_tsv(tmp_path, "only\ttwo\n", "rejects_only.tsv")], partition="p2")  # no triples: same entities
    second = _fingerprints(home, partition="p1")
    assert (first["kg_entities"], first["kg_relations"]) == (second["kg_entities"], second["kg_relations"])


def test_names_dedupe_by_normal_form_across_files(home, tmp_path):
    """Full-width / zero-width variants in two files are one triple (first file, first line kept); one kg_triples
    file per input; the entity's degree counts the triple once."""
    a = _tsv(tmp_path, "ＡＢＣ\t位于\t上\u200b海\n北京\t首都\t中国\n", "a.tsv")
    b = _tsv(tmp_path, "ABC\t位于\t上海\nABC\t别名\tＡ Ｂ Ｃ\n", "b.tsv")
    report = _ingest(home, [a, b])
    assert (report.rows_in, report.rows_out, report.rows_duplicate) == (4, 3, 1) and report.extra["names_renamed"] >= 2
    rows = _rows(home, "kg_triples")
    assert {(r["head"], r["tail"], r["source_file"].rsplit("/", 1)[-1], r["source_pos"]) for r in rows} == {
        ("ABC", "上海", "a.tsv", 1), ("北京", "中国", "a.tsv", 2), ("ABC", "A B C", "b.tsv", 2)}
    files = [f["rows"] for f in lake.atomic.read_manifest(home.partition_dir("kg_triples", "demo", "manual"))["files"]]
    assert sorted(files) == [1, 2]
    ents = {r["name"]: r for r in _rows(home, "kg_entities")}
    assert ents["ABC"]["degree"] == 2 and ents["ABC"]["aliases"] == ["A B C"] and ents["上海"]["degree"] == 1
    stats = query(home, "SELECT source_file, accepted, duplicates FROM ingest_stats WHERE source_file <> '*' ORDER BY 1").to_pylist()
    assert [(r["accepted"], r["duplicates"]) for r in stats] == [(2, 0), (1, 1)]


def test_name_longer_than_the_limit_after_nfkc_is_too_long(home, tmp_path):
    """NFKC can lengthen a name (U+FDFA is 18 characters): the limit holds for the cleaned name too."""
    report = _ingest(home, [_tsv(tmp_path, "\ufdfa\tb\tc\nx\tb\tc\n", "long.tsv")], max_name_chars=10)
    assert (report.rows_out, report.rows_quarantined) == (1, 1)
    assert [(r["source_pos"], r["reason"]) for r in _rows(home, "quarantine")] == [(1, "too_long")]


def test_dedupe_in_hash_slices_gives_the_same_bytes(tmp_path, monkeypatch):
    """Triple hashes sorted in many slices (bounded memory) find the same duplicates as in one."""
    from rapid_pipeline.core.home import Home
    from rapid_pipeline.ingest import kg

    path = tmp_path / "r.tsv"
    path.write_bytes(_random_tsv(2000, seed=3))
    one = _ingest(Home.from_env(tmp_path / "one"), [path], header="no")
    monkeypatch.setattr(kg, "KEY_SLICE", 16)  # 2000 rows -> 128 slices
    many = _ingest(Home.from_env(tmp_path / "many"), [path], header="no")
    assert one.rows_duplicate == many.rows_duplicate > 0
    assert _fingerprints(Home.from_env(tmp_path / "one")) == _fingerprints(Home.from_env(tmp_path / "many"))


def test_line_map_as_sql_equals_the_numpy_map():
    """`LineMap.sql` (nested CASEs) gives every rowid the line `LineMap.lines` gives it, repeated gaps included."""
    import duckdb
    import numpy as np

    from rapid_pipeline.ingest.kg_stage import LineMap

    con = duckdb.connect()
    for gaps in ([], [1], [1, 2, 3], [5, 6, 40, 41, 42, 100], list(range(3, 400, 7))):
        lines = LineMap(np.array(gaps, np.int64))
        got = con.sql(f"SELECT {lines.sql('x')} AS line FROM range(500) t(x) ORDER BY x").fetchnumpy()["line"]
        assert got.tolist() == lines.lines(np.arange(500)).tolist(), gaps


def test_python_line_function_gives_the_same_bytes_as_sql(tmp_path, monkeypatch):
    """Files too ragged (over MAX_SQL_GAPS gaps) or too long for the SQL path get `line_udf`: same files."""
    from rapid_pipeline.core.home import Home
    from rapid_pipeline.ingest import kg, kg_stage

    paths = [tmp_path / "r.tsv", tmp_path / "r.csv"]
    paths[0].write_bytes(_random_tsv(2000, seed=5))
    paths[1].write_bytes(_random_tsv(500, seed=6).replace(b"\t", b","))  # read by the Python CSV reader
    sql = _ingest(Home.from_env(tmp_path / "sql"), paths, header="no")
    monkeypatch.setattr(kg_stage, "MAX_SQL_GAPS", 10)
    monkeypatch.setattr(kg, "MAX_BITSTRING_ROWS", 100)
    udf = _ingest(Home.from_env(tmp_path / "udf"), paths, header="no")
    assert sql.extra["files_read_by_duckdb"] == udf.extra["files_read_by_duckdb"] == 1
    assert sql.rows_duplicate == udf.rows_duplicate > 0 and sql.rows_quarantined == udf.rows_quarantined > 10
    assert _fingerprints(Home.from_env(tmp_path / "sql")) == _fingerprints(Home.from_env(tmp_path / "udf"))


def _starts(data: bytes) -> list[int]:
    return [0] + [i + 1 for i, b in enumerate(data) if b == 10]


def test_rejected_lines_found_from_duckdb_byte_hints(tmp_path):
    """DuckDB's line_byte_position is a line's first byte or the next one; either settles the line, also after a
    blank line; a hint that settles nothing falls back to counting newlines."""
    from rapid_pipeline.ingest.kg_stage import _lines_at

    data = b"ok\tok\tok\n\n\xffbad\tx\ty\nmore\tb\tc\n\xfe\ta\n"
    path = tmp_path / "h.tsv"
    path.write_bytes(data)
    starts = _starts(data)
    want = [(3, b"\xffbad\tx\ty"), (5, b"\xfe\ta")]
    for shift in ((0, 0), (1, 1), (0, 1), (1, 0)):
        hints = [(n, starts[n - 1] + d) for (n, _), d in zip(want, shift)]
        assert list(_lines_at(path, hints, 3)) == want
    assert list(_lines_at(path, [(3, 0), (5, 1)], 3)) == want  # line 1 is no reject: counted instead
    assert list(_lines_at(path, [(3, starts[2]), (5, starts[2] + 1)], 3)) == want  # out of order: counted instead


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1 << 20])
def test_blank_lines_across_chunks(tmp_path, chunk):
    from rapid_pipeline.ingest.kg_stage import blank_lines

    data = b"\n\na\n\nbb\n\n\nc\n\n"
    path = tmp_path / "b.tsv"
    path.write_bytes(data)
    want = [i + 1 for i, line in enumerate(data.split(b"\n")[:-1]) if not line]
    assert blank_lines(path, chunk).tolist() == want == [1, 2, 4, 6, 7, 9]


def test_ingest_bench_runs_and_reconciles(load_bench, capsys, monkeypatch):
    """bench/ingest.py end to end on a tiny file: both sides run, the counts reconcile (speed is not checked)."""
    bench = load_bench("ingest")
    monkeypatch.setattr("sys.argv", ["ingest.py", "--triples", "3000", "--threads", "1", "--runs", "2"])
    before = os.environ.get("RAPID_OPENLINEAGE")
    bench.main()
    out = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert out["rows_out"] + out["quarantined"] + out["duplicates"] == out["triples"]
    assert out["ratio"] > 0 and out["ingest_extra"]["files_read_by_duckdb"] == 1 and out["quarantined"] > 0
    assert out["runs"] == 2 and out["ratio_range"][0] <= out["ratio"] <= out["ratio_range"][1]
    assert out["ratio_vs_zstd3"] > 0 and out["two_pass_floor"] > 0
    assert os.environ.get("RAPID_OPENLINEAGE") == before  # the bench's settings do not leak into later code
