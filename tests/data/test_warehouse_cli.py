"""Warehouse: sql/views.sql on empty and filled warehouses, `rapid sql`, `rapid lineage`."""

from __future__ import annotations

import pyarrow as pa
import pytest

from rapid_pipeline.cli import invoke
from rapid_pipeline.core import lake, warehouse
from rapid_pipeline.core.schemas import table_schema
from rapid_pipeline.core.stage import StageResult, run_stage
from rapid_pipeline.ingest.kg import KGIngestConfig, run
from rapid_pipeline.sql_cli import format_table, parse_params

VIEWS = ("pairs_current", "kg_facts", "ingest_summary", "quarantine_summary")


@pytest.fixture
def kg_home(home, tmp_path):
    path = tmp_path / "kg.tsv"
    path.write_text("head\trelation\ttail\n北京\t首都\t中国\n北京\t别名\t燕京\n上海\t位于\t中国\nbad\n", encoding="utf-8")
    run(KGIngestConfig(), home, [path], "demo", "2025-01-01")
    return home


def test_views_exist_and_are_typed_on_an_empty_warehouse(home):
    warehouse.refresh_views(home)
    for view in VIEWS:
        assert warehouse.query(home, f"SELECT * FROM {view}").num_rows == 0
    schema = warehouse.query(home, "SELECT * FROM kg_facts").schema
    assert schema.field("head_degree").type == pa.int64() and schema.field("is_alias").type == pa.bool_()


def _pairs(partition: str, ids: list[str]) -> pa.Table:
    rows = [{"domain": "demo", "partition": partition, "pair_id": i, "caption_raw": f"c{i}", "caption": f"c{i}",
             "caption_simplified": f"c{i}", "image_sha256": "0" * 64, "width": 8, "height": 8, "split": "train",
             "source_file": f"{partition}.csv", "source_pos": n} for n, i in enumerate(ids)]
    schema = table_schema("pairs")
    return pa.Table.from_pylist([{f.name: r.get(f.name) for f in schema} for r in rows], schema=schema)


def test_pairs_current_keeps_earliest_partition(home):
    lake.publish_table(home, "pairs", "demo", "2025-01-02", _pairs("2025-01-02", ["a", "b", "c"]), stage="test")
    lake.publish_table(home, "pairs", "demo", "2025-01-01", _pairs("2025-01-01", ["b", "d"]), stage="test")
    warehouse.refresh_views(home)
    rows = warehouse.query(home, "SELECT pair_id, partition FROM pairs_current ORDER BY pair_id").to_pylist()
    assert [(r["pair_id"], r["partition"]) for r in rows] == [("a", "2025-01-02"), ("b", "2025-01-01"), ("c", "2025-01-02"), ("d", "2025-01-01")]


def test_kg_views(kg_home):
    facts = warehouse.query(kg_home, "SELECT head, relation, tail, is_alias, head_degree FROM kg_facts ORDER BY source_pos").to_pylist()
    assert facts[0] == {"head": "北京", "relation": "首都", "tail": "中国", "is_alias": False, "head_degree": 2}
    assert facts[1]["is_alias"] is True
    summary = warehouse.query(kg_home, "SELECT * FROM ingest_summary").to_pylist()
    assert [(s["rows_in"], s["accepted"], s["quarantined"], s["duplicates"]) for s in summary] == [(4, 3, 1, 0)]
    q = warehouse.query(kg_home, "SELECT stage, reason, rows FROM quarantine_summary").to_pylist()
    assert q == [{"stage": "ingest_kg", "reason": "column_count", "rows": 1}]


def test_sql_cli_table_json_params_and_files(kg_home, tmp_path):
    text = invoke(["sql", "SELECT name, degree FROM kg_entities WHERE degree >= $d ORDER BY name", "--param", "d=2"], home=kg_home.root)["text"]
    assert text.splitlines()[0].split() == ["name", "|", "degree"] and "北京" in text and "中国" in text and "(2 rows)" in text and "上海" not in text
    js = invoke(["--json", "sql", "SELECT count(*) AS n FROM kg_triples"], home=kg_home.root)
    assert js == {"columns": ["n"], "rows": [{"n": 3}], "row_count": 1}
    script = tmp_path / "q.sql"
    script.write_text("CREATE TEMP VIEW hub AS SELECT * FROM kg_facts WHERE head = getvariable('h');\n"
                      "SELECT relation, tail FROM hub WHERE relation <> $skip ORDER BY relation;\n", encoding="utf-8")
    out = invoke(["--json", "sql", str(script), "--param", "h=北京", "--param", "skip=别名"], home=kg_home.root)
    assert out["rows"] == [{"relation": "首都", "tail": "中国"}]  # the last statement's result
    with pytest.raises(ValueError, match=r"\$skip"):
        invoke(["sql", str(script), "--param", "h=北京"], home=kg_home.root)
    with pytest.raises(FileNotFoundError):
        invoke(["sql", str(tmp_path / "missing.sql")], home=kg_home.root)


def test_format_table_aligns_wide_characters_and_cuts():
    text = format_table(["名称", "n"], [("北京", 1), ("abc", 22), (None, None)], max_rows=2)
    lines = text.splitlines()
    assert lines[2] == "北京 |  1" and lines[3] == "abc  | 22"
    assert lines[-1] == "(3 rows, 1 not shown: --max-rows)"
    assert parse_params(["a=1", "b=2.5", "c=x=y", "d=-3"]) == {"a": 1, "b": 2.5, "c": "x=y", "d": -3}


def test_lineage_tree_walks_back_through_runs(kg_home):
    # a downstream stage reads kg_entities and writes links: its lineage must reach the KG ingest and its file
    refs = lake.table_refs(kg_home, "kg_entities", "demo")

    def body(report):
        empty = table_schema("links").empty_table()
        return StageResult([lake.publish_table(kg_home, "links", "demo", "all", empty, stage="link_test")], rows_in=0, rows_out=0)

    run_stage(kg_home, "link_test", {"k": 1}, refs, body, domain="demo", partition="all")
    out = invoke(["lineage", "links"], home=kg_home.root)
    top = out["runs"][0]
    assert top["stage"] == "link_test"
    producer = top["inputs"][0]["produced_by"][0]
    assert producer["stage"] == "ingest_kg" and producer["partition"] == "2025-01-01"
    assert producer["inputs"][0]["uri"].endswith("kg.tsv")
    lines = out["text"].splitlines()
    assert lines[0] == "links" and any("ingest_kg [demo/2025-01-01] ok" in line for line in lines)
    assert any(line.strip().startswith("└─ input file://") and "kg.tsv" in line for line in lines)
    by_path = invoke(["lineage", str(kg_home.partition_dir("kg_triples", "demo", "2025-01-01"))], home=kg_home.root)
    assert [r["stage"] for r in by_path["runs"]] == ["ingest_kg"]
    assert invoke(["lineage", "pairs"], home=kg_home.root)["runs"] == []
