"""`rapid link` as a stage: links table, per-partition cache, linker cache, reconcile, CLI."""

from __future__ import annotations


from rapid_pipeline.cli import invoke
from rapid_pipeline.core import lake
from rapid_pipeline.core.warehouse import query
from rapid_pipeline.link import LinkConfig, run

from .lake_fixtures import build_lake, pairs_table
from .linking_gold import GOLD, gold_spans


def test_links_match_gold_and_offsets(home):
    build_lake(home)
    reports = run(LinkConfig(), home, "demo")
    assert [r.status for r in reports] == ["ok", "ok"]
    links = lake.read_table(home, "links", "demo").to_pylist()
    pairs = {p["pair_id"]: p["caption"] for p in lake.read_table(home, "pairs", "demo").to_pylist()}
    got = {(pairs[link["pair_id"]], link["start"], link["end"], link["entity_id"]) for link in links}
    gold = {(c, s, e, eid) for c, m in GOLD for s, e, eid in gold_spans(c, m)}
    assert len(got & gold) / len(got) >= 0.95 and len(got & gold) / len(gold) >= 0.95
    assert all(pairs[link["pair_id"]][link["start"]:link["end"]] == link["surface"] for link in links)


def test_rerun_is_cached_and_linker_built_once(home):
    build_lake(home)
    first = run(LinkConfig(), home, "demo")
    assert [r.extra["linker_cache"] for r in first] == ["miss", "hit"]
    again = run(LinkConfig(), home, "demo")
    assert [r.status for r in again] == ["cached", "cached"]
    n = query(home, "SELECT count(*) AS n FROM links").column("n")[0].as_py()
    assert n == len(lake.read_table(home, "links", "demo"))


def test_changed_partition_relinks_only_that_partition(home):
    parts = build_lake(home)
    run(LinkConfig(), home, "demo")
    day = "2025-01-02"
    lake.publish_table(home, "pairs", "demo", day, pairs_table("demo", day, parts[day] + ["新的一张草莓照片"]), "test")
    statuses = {r.partition: r.status for r in run(LinkConfig(), home, "demo")}
    assert statuses == {"2025-01-01": "cached", day: "ok"}


def test_duplicate_pairs_reconcile(home):
    build_lake(home)
    day = "2025-01-03"
    lake.publish_table(home, "pairs", "demo", day, pairs_table("demo", day, ["草莓", "草莓", "香蕉"]), "test")
    [report] = run(LinkConfig(), home, "demo", [day])
    assert (report.rows_in, report.rows_out, report.rows_duplicate) == (3, 2, 1)


def test_cli_reports_coverage(home):
    build_lake(home)
    out = invoke(["link", "--domain", "demo"], home=home.root)
    assert out["status"] == "ok" and out["captions"] == len(GOLD)
    assert 0 < out["linked_captions"] < out["captions"]  # a few gold captions have no entity


def test_missing_kg_is_a_clear_error(home):
    lake.publish_table(home, "pairs", "demo", "x", pairs_table("demo", "x", ["草莓"]), "test")
    try:
        run(LinkConfig(), home, "demo")
    except FileNotFoundError as exc:
        assert "rapid ingest kg" in str(exc)
    else:
        raise AssertionError("expected FileNotFoundError")
