"""sql/coverage.sql: numbers checked against the lake tables computed in Python, and runnable as-is."""

from __future__ import annotations

from collections import Counter

import duckdb

from rapid_pipeline.cli import invoke
from rapid_pipeline.core import lake
from rapid_pipeline.core.warehouse import read_sql
from rapid_pipeline.coverage import coverage
from rapid_pipeline.link import LinkConfig, run

from .lake_fixtures import build_lake, pairs_table

EXTRA = ["一只杨桃", "两个杨桃和草莓", "杨桃很甜"]


def _prepared(home):
    build_lake(home)
    lake.publish_table(home, "pairs", "demo", "2025-01-03", pairs_table("demo", "2025-01-03", EXTRA), "test")
    run(LinkConfig(), home, "demo")
    pairs = lake.read_table(home, "pairs", "demo").to_pylist()
    links = lake.read_table(home, "links", "demo").to_pylist()
    return pairs, links


def test_coverage_sections_match_python(home):
    pairs, links = _prepared(home)
    sections = coverage(home, "demo")
    linked = {link["pair_id"] for link in links}
    [row] = sections["by_domain"]
    assert (row["captions"], row["linked_captions"], row["mentions"]) == (len(pairs), len(linked), len(links))
    by_part = {r["partition"]: (r["captions"], r["linked_captions"]) for r in sections["by_partition"]}
    expected = Counter(p["partition"] for p in pairs)
    assert {k: v[0] for k, v in by_part.items()} == dict(expected)
    assert by_part["2025-01-03"][1] == 1  # only 两个杨桃和草莓 names a KG entity
    top = sections["top_entities"][0]
    assert top["mentions"] == max(Counter(link["entity_id"] for link in links).values())
    unlinked = {r["pair_id"] for r in sections["unlinked_captions"]}
    assert unlinked <= {p["pair_id"] for p in pairs} - linked


def test_alias_candidates_find_the_missing_entity(home):
    _prepared(home)
    grams = {r["gram"]: r["captions"] for r in coverage(home, "demo")["alias_candidates"]}
    assert grams.get("杨桃") == 4  # 3 extra captions + 星形的杨桃 in the gold set; 杨桃 is not in the KG
    assert "草莓" not in grams  # linked spans are excluded


def test_other_domain_is_filtered_out(home):
    _prepared(home)
    lake.publish_table(home, "pairs", "other", "x", pairs_table("other", "x", ["草莓"]), "test")
    assert [r["domain"] for r in coverage(home, "demo")["by_domain"]] == ["demo"]
    assert {r["domain"] for r in coverage(home, None)["by_domain"]} == {"demo", "other"}


def test_sql_file_runs_as_is_in_duckdb(home):
    _prepared(home)
    invoke(["coverage", "--domain", "demo"], home=home.root)  # refreshes the views
    con = duckdb.connect(str(home.warehouse), read_only=True)
    rows = con.execute(read_sql("coverage.sql")).fetchall()  # no variable set: all domains
    assert rows and rows[0][0] == "alias_candidates"
    con.close()


def test_cli_prints_tables(home):
    _prepared(home)
    out = invoke(["coverage", "--domain", "demo"], home=home.root)
    assert "by_domain" in out["text"] and "alias_candidates" in out["text"]
