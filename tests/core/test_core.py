"""Unit tests of rapid_pipeline.core: atomic publish, manifests, lake, step cache, lineage, config,
checkpoints, text normalisation, CLI dispatch."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import unicodedata
from dataclasses import dataclass

import pyarrow as pa
import pytest
import torch

from rapid_pipeline.core import atomic, lake, warehouse
from rapid_pipeline.core.checkpoint import CheckpointError, load_state_dict, save_state_dict
from rapid_pipeline.core.config import add_config_args, config_from_args, opt, preset
from rapid_pipeline.core.schemas import SchemaError, conform, table_schema
from rapid_pipeline.core.stage import DatasetRef, ReconcileError, StageResult, run_stage
from rapid_pipeline.core.text import TextRejected, _converter, clean, normalize, to_simplified


def _quarantine(n: int, tag: str = "x") -> pa.Table:
    rows = [{"domain": "d", "partition": "p", "stage": "s", "source_file": tag, "source_pos": i, "reason": "r",
             "detail": None, "raw": None} for i in range(n)]
    return pa.Table.from_pylist(rows, schema=table_schema("quarantine"))


# ---------------------------------------------------------------- atomic

def test_publish_dir_swaps_whole_folder(tmp_path):
    final = tmp_path / "model"
    for version in ("v1", "v2"):
        stage = atomic.staging_dir(final)
        (stage / "weights.bin").write_text(version)
        atomic.publish_dir(stage, final)
    assert (final / "weights.bin").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or old folder left


def test_commit_manifest_lists_content_addressed_files_and_collects_garbage(tmp_path):
    tmp = atomic.temp_path(tmp_path, ".bin")
    tmp.write_bytes(b"hello")
    entry = atomic.finalize_file(tmp, tmp_path, rows=1, suffix=".bin")
    assert entry.path == f"part-{atomic.sha256_file(tmp_path / entry.path)[:16]}.bin"
    (tmp_path / "stray.parquet").write_bytes(b"old")
    (tmp_path / ".tmp-dead.parquet").write_bytes(b"half")
    manifest = atomic.commit_manifest(tmp_path, [entry], {"table": "t"})
    assert manifest["rows"] == 1 and [f["path"] for f in manifest["files"]] == [entry.path]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([entry.path, atomic.MANIFEST])
    assert atomic.manifest_paths(tmp_path) == [tmp_path / entry.path]


def test_atomic_write_json_replaces(tmp_path):
    atomic.atomic_write_json(tmp_path / "a.json", {"x": 1})
    atomic.atomic_write_json(tmp_path / "a.json", {"x": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"x": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


# ---------------------------------------------------------------- lake + schemas

def test_publish_replaces_partition_and_reads_only_manifest_files(home, monkeypatch):
    monkeypatch.setattr(lake, "ROWS_PER_FILE", 3)
    ref = lake.publish_table(home, "quarantine", "d", "p", iter([_quarantine(2), _quarantine(2), _quarantine(1)]), stage="t")
    assert ref.rows == 5 and len(atomic.read_manifest(ref.path)["files"]) == 2
    lake.publish_table(home, "quarantine", "d", "p", _quarantine(4, "y"), stage="t")
    assert lake.read_table(home, "quarantine", "d").num_rows == 4  # replaced, not appended
    # an orphan file (e.g. from a killed writer) is invisible to readers and to the warehouse view
    pa.parquet.write_table(_quarantine(7, "orphan"), home.partition_dir("quarantine", "d", "p") / "part-orphan.parquet")
    assert lake.read_table(home, "quarantine", "d").column("source_file").to_pylist() == ["y"] * 4
    warehouse.refresh_views(home)
    assert warehouse.query(home, "SELECT count(*) AS n FROM quarantine").to_pylist() == [{"n": 4}]


def test_empty_partition_and_missing_table_read_typed(home):
    assert lake.read_table(home, "quarantine", "nothing").schema == table_schema("quarantine")
    lake.publish_table(home, "quarantine", "d", "empty", _quarantine(0), stage="t")
    assert lake.partitions(home, "quarantine", "d") == ["empty"]


RELATION = "SELECT 'r1' AS relation_id, {name} AS name, false AS is_alias, {triples} AS triples, $domain AS domain"


def test_publish_query_checks_schema_and_keeps_the_old_partition(home):
    import duckdb

    con = duckdb.connect()
    ref = lake.publish_query(home, con, RELATION.format(name="'别名'", triples="3::BIGINT"), {"domain": "d"}, "kg_relations", "d", "all", "t")
    assert ref.rows == 1 and lake.read_table(home, "kg_relations", "d").to_pylist() == [
        {"relation_id": "r1", "name": "别名", "is_alias": False, "triples": 3, "domain": "d"}]
    bad = {"NULL in a non-nullable column": (RELATION.format(name="NULL::VARCHAR", triples="3::BIGINT"), SchemaError, "column name is not nullable"),
           "wrong type": (RELATION.format(name="'x'", triples="'3'"), SchemaError, "column triples is string, expected int64"),
           "missing column": ("SELECT 'r1' AS relation_id", SchemaError, "the query must select")}
    for why, (sql, error, message) in bad.items():
        with pytest.raises(error, match=message):
            lake.publish_query(home, con, sql, {"domain": "d"}, "kg_relations", "d", "all", "t")
        assert lake.partition_ref(home, "kg_relations", "d", "all").fingerprint == ref.fingerprint, why
    folder = home.partition_dir("kg_relations", "d", "all")
    assert sorted(p.name for p in folder.iterdir()) == sorted([atomic.MANIFEST] + [f["path"] for f in atomic.read_manifest(folder)["files"]])


def test_publish_query_bytes_do_not_depend_on_the_plan(home):
    """The same rows from a table scan (statistics prove no NULLs) and from computed expressions give one file."""
    import duckdb

    con = duckdb.connect()
    con.execute("CREATE TABLE rel AS SELECT 'r' || range AS relation_id, 'n' || range AS name, false AS is_alias, "
                "range AS triples, 'd' AS domain FROM range(5)")
    a = lake.publish_query(home, con, "SELECT * FROM rel ORDER BY triples", {}, "kg_relations", "d", "a", "t")
    computed = ("SELECT concat('r', x) AS relation_id, concat('n', x) AS name, x < 0 AS is_alias, x::BIGINT AS triples, "
                "lower('D') AS domain FROM (SELECT unnest([0, 1, 2, 3, 4]) AS x) ORDER BY x")
    b = lake.publish_query(home, con, computed, {}, "kg_relations", "d", "b", "t")
    assert a.fingerprint == b.fingerprint


def test_conform_refuses_missing_extra_and_null_columns():
    t = _quarantine(1)
    with pytest.raises(SchemaError, match="missing"):
        conform(t.drop_columns(["reason"]), "quarantine")
    with pytest.raises(SchemaError, match="unexpected"):
        conform(t.append_column("extra", pa.array([1])), "quarantine")
    with pytest.raises(SchemaError, match="nullable"):
        conform(t.set_column(5, "reason", pa.array([None], pa.string())), "quarantine")


# ---------------------------------------------------------------- run_stage: cache, reconcile, lineage

def _file_stage(home, out, inp, cfg, calls):
    def body(report):
        calls.append(report.run_id)
        out.write_text(inp.read_text().upper())
        return StageResult([DatasetRef.of(out)], rows_in=1, rows_out=1)

    return run_stage(home, "upper", cfg, [inp], body, domain="d", partition="p")


def test_step_cache_hit_miss_and_tamper(home, tmp_path):
    inp, out, calls = tmp_path / "in.txt", tmp_path / "out.txt", []
    inp.write_text("a")
    assert _file_stage(home, out, inp, {"k": 1}, calls).status == "ok"
    hit = _file_stage(home, out, inp, {"k": 1}, calls)
    assert hit.status == "cached" and hit.cached_from == calls[0] and len(calls) == 1
    assert _file_stage(home, out, inp, {"k": 2}, calls).status == "ok"  # config changed
    inp.write_text("b")
    assert _file_stage(home, out, inp, {"k": 2}, calls).status == "ok"  # input changed
    out.write_text("tampered")
    assert _file_stage(home, out, inp, {"k": 2}, calls).status == "ok"  # output tampered -> rerun
    assert out.read_text() == "B" and len(calls) == 4


@pytest.mark.parametrize("tamper", ["delete", "truncate"])
def test_step_cache_sees_tampered_partition_file(home, tmp_path, tamper):
    calls = []

    def body(report):
        calls.append(1)
        return StageResult([lake.publish_table(home, "quarantine", "d", "p", _quarantine(3), stage="t")])

    run_stage(home, "q", {}, [], body, domain="d", partition="p")
    assert run_stage(home, "q", {}, [], body, domain="d", partition="p").status == "cached"
    data = atomic.manifest_paths(home.partition_dir("quarantine", "d", "p"))[0]
    data.unlink() if tamper == "delete" else data.write_bytes(data.read_bytes()[:10])
    assert run_stage(home, "q", {}, [], body, domain="d", partition="p").status == "ok"
    assert len(calls) == 2 and lake.read_table(home, "quarantine", "d").num_rows == 3


def test_reconcile_failure_fails_the_run_and_is_recorded(home):
    def body(report):
        return StageResult([], rows_in=10, rows_out=7, rows_quarantined=1, rows_duplicate=1)

    with pytest.raises(ReconcileError, match="in=10"):
        run_stage(home, "leaky", {}, [], body, domain="d", partition="p")
    runs = warehouse.query(home, "SELECT status, message FROM lineage_runs WHERE stage = 'leaky'").to_pylist()
    assert runs[0]["status"] == "failed" and "do not reconcile" in runs[0]["message"]
    assert warehouse.query(home, "SELECT count(*) AS n FROM stage_cache WHERE stage = 'leaky'").to_pylist() == [{"n": 0}]


def test_lineage_rows_and_openlineage_events(home, tmp_path):
    inp = tmp_path / "in.txt"
    inp.write_text("x")

    def body(report):
        return StageResult([lake.publish_table(home, "quarantine", "d", "p", _quarantine(3), stage="t")], rows_in=3, rows_out=3)

    report = run_stage(home, "qstage", {"a": 1}, [inp], body, domain="d", partition="p")
    io = warehouse.query(home, "SELECT direction, uri, rows, schema_name FROM lineage_io WHERE run_id = ? ORDER BY direction",
                         [report.run_id]).to_pylist()
    assert [r["direction"] for r in io] == ["input", "output"]
    assert io[1]["rows"] == 3 and io[1]["schema_name"] == "quarantine" and io[0]["uri"] == f"file://{inp}"
    events = [json.loads(line) for line in (home.lineage / "openlineage.jsonl").read_text().splitlines()]
    mine = [e for e in events if e["run"]["runId"] == report.run_id]
    assert [e["eventType"] for e in mine] == ["START", "COMPLETE"]
    assert mine[1]["job"]["name"] == "qstage.d"
    out = mine[1]["outputs"][0]
    assert out["outputFacets"]["outputStatistics"]["rowCount"] == 3
    assert [f["name"] for f in out["facets"]["schema"]["fields"]] == table_schema("quarantine").names


# ---------------------------------------------------------------- config

@dataclass(frozen=True)
class _Cfg:
    steps: int = opt(10, "optimizer steps")
    lr: float = opt(1e-4, "learning rate")
    ema: bool = opt(True, "keep an EMA copy")
    tags: tuple[str, ...] = opt(("a",), "free-form tags")
    name: str | None = opt(None, "run name")


def test_config_flags_from_dataclass():
    parser = argparse.ArgumentParser()
    add_config_args(parser, _Cfg)
    assert "optimizer steps (preset default: 10)" in parser.format_help()
    args = parser.parse_args(["--steps", "3", "--no-ema", "--tags", "x", "y", "--name", "n1"])
    cfg = config_from_args(_Cfg(lr=0.5), args)
    assert cfg == _Cfg(steps=3, lr=0.5, ema=False, tags=("x", "y"), name="n1")  # unset flags keep the preset
    assert config_from_args(_Cfg(), parser.parse_args([])) == _Cfg()
    with pytest.raises(TypeError, match="tuples"):
        opt([1], "lists are mutable")
    with pytest.raises(ValueError, match="unknown preset"):
        preset({"tiny": _Cfg()}, "huge")


# ---------------------------------------------------------------- checkpoints

class _Evil:
    def __reduce__(self):
        return (os.system, ("touch " + os.environ.get("A2_EVIL_MARKER", "/tmp/a2-evil"),))


def test_checkpoint_refuses_malicious_pickle(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("A2_EVIL_MARKER", str(marker))
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"weight": _Evil()}, f)
    with pytest.raises(CheckpointError, match="refusing"):
        load_state_dict(path)
    assert not marker.exists()


def test_checkpoint_unwraps_params_ema_and_roundtrips(tmp_path):
    ema, raw = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
    torch.save({"params": raw, "params_ema": ema}, tmp_path / "esrgan.pth")
    assert torch.equal(load_state_dict(tmp_path / "esrgan.pth")["w"], ema["w"])  # EMA weights preferred
    save_state_dict({"w": torch.arange(3.0)}, tmp_path / "m.safetensors")
    assert torch.equal(load_state_dict(tmp_path / "m.safetensors")["w"], torch.arange(3.0))
    torch.save({"a": [1, 2]}, tmp_path / "notflat.pth")
    with pytest.raises(CheckpointError, match="flat state dict"):
        load_state_dict(tmp_path / "notflat.pth")


# ---------------------------------------------------------------- text

def _slow_clean(raw: str) -> str:
    import re

    text = unicodedata.normalize("NFKC", raw)
    text = "".join(" " if ch in "\t\n\r\x0b\x0c" else ch for ch in text
                   if ch in "\t\n\r\x0b\x0c" or unicodedata.category(ch) not in {"Cc", "Cf", "Co", "Cs", "Cn"})
    return re.sub(r"\s+", " ", text).strip()


def test_clean_fast_path_matches_the_full_rules_on_every_code_point():
    for cp in range(1, sys.maxunicode + 1, 1 if os.environ.get("CI_FULL_UNICODE") else 3):
        ch = chr(cp)
        for s in (ch, f"a{ch}b", f"a{ch}{ch}"):
            assert clean(s) == _slow_clean(s), hex(cp)


def test_normalize_examples():
    n = normalize(" \u200bＡＢＣ１２３  電腦\u3000 ")
    assert (n.text, n.simplified) == ("ABC123 電腦", "ABC123 电脑")
    with pytest.raises(TextRejected, match="empty_text"):
        normalize("\u200b \t")
    with pytest.raises(TextRejected, match="nul_byte"):
        normalize("a\x00b")
    with pytest.raises(TextRejected, match="too_long"):
        normalize("abcd", max_chars=3)
    with pytest.raises(TextRejected, match="after cleaning"):
        normalize("\ufdfa", max_chars=10)  # one character before NFKC, 18 after


def test_to_simplified_fast_path_is_exact():
    from rapid_pipeline.core.text import t2s_entries

    entries = t2s_entries()
    assert len(entries) > 1000 and ("電", "电") in entries
    samples = [key for key, _ in entries[::7]] + ["反覆", "一目瞭然", "计算机", "北京", "ABC", "乾隆"]
    samples += [chr(cp) for cp in range(0x4E00, 0x9FA6, 5)]
    for s in samples:
        assert to_simplified(s) == _converter().convert(s), s


# ---------------------------------------------------------------- cli dispatch

def test_cli_finds_command_after_top_level_option_values():
    from rapid_pipeline.cli import _selected

    assert _selected(["--home", "/x", "ingest", "kg", "a.tsv"]) == ("ingest", "kg")
    assert _selected(["--json", "sql", "SELECT 1"]) == ("sql",)
    assert _selected(["nothing"]) is None
