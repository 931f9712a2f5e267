"""Injection: hostile domain / partition / table / parameter names are refused before any SQL runs or
any file is written; values are bound, so a hostile value is just data; `rapid sql` is read-only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rapid_pipeline.cli import invoke
from rapid_pipeline.core import sqlsafe
from rapid_pipeline.core.home import Home, check_name
from rapid_pipeline.core.warehouse import query
from rapid_pipeline.ingest.kg import KGIngestConfig, run

REPO = Path(__file__).resolve().parents[2]
HOSTILE = ['x"; DROP TABLE lineage_runs; --', "../etc", "a/b", "x'; DELETE FROM stage_cache; --", "", ".hidden",
           "-flag", "a" * 65, "ok\n", "semi;colon", "名字"]


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def kg_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("kg") / "kg.tsv"
    path.write_text("北京\t首都\t中国\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def seeded(tmp_path_factory, kg_file):
    """A home with one real run, so there is something to destroy (shared: every test leaves it as it was)."""
    home = Home.from_env(tmp_path_factory.mktemp("seeded") / "home")
    run(KGIngestConfig(), home, [kg_file], "demo", "manual")
    return home


@pytest.mark.parametrize("bad", HOSTILE)
def test_check_name_rejects(bad):
    with pytest.raises(ValueError, match="invalid"):
        check_name(bad)


@pytest.mark.parametrize("bad", HOSTILE)
@pytest.mark.parametrize("field", ["domain", "partition"])
def test_ingest_rejects_before_touching_anything(seeded, kg_file, bad, field):
    before = _files(seeded.root)
    runs = query(seeded, "SELECT count(*) AS n FROM lineage_runs").to_pylist()[0]["n"]
    kwargs = {"domain": "demo", "partition": "manual", field: bad}
    with pytest.raises(ValueError, match=f"invalid (domain|partition)"):
        run(KGIngestConfig(), seeded, [kg_file], kwargs["domain"], kwargs["partition"])
    assert _files(seeded.root) == before  # no file written, not even a lock or a lineage event
    assert query(seeded, "SELECT count(*) AS n FROM lineage_runs").to_pylist()[0]["n"] == runs


def test_cli_rejects_hostile_domain_in_a_fresh_process(tmp_path, kg_file):
    home = tmp_path / "home"
    env = {**os.environ, "RAPID_HOME": str(home), "RAPID_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-m", "rapid_pipeline", "ingest", "kg", str(kg_file), "--domain", HOSTILE[0]],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "invalid domain" in proc.stderr and "Traceback" not in proc.stderr
    assert not (home / "warehouse.duckdb").exists()
    assert not list((home / "lake").rglob("*")) and not list((home / "lineage").rglob("*"))


@pytest.mark.parametrize("bad", ['kg_triples"; DROP TABLE lineage_runs; --', "../etc", "lineage_runs2", "x y"])
def test_sqlsafe_refuses_unknown_or_malformed_tables(bad):
    with pytest.raises(sqlsafe.UnsafeIdentifier):
        sqlsafe.table_ident(bad)


def test_sqlsafe_accepts_declared_names():
    assert sqlsafe.table_ident("kg_triples") == '"kg_triples"'
    assert sqlsafe.column_ident("kg_triples", "head") == '"head"'
    with pytest.raises(sqlsafe.UnsafeIdentifier):
        sqlsafe.column_ident("kg_triples", 'head" OR 1=1 --')


def test_lineage_cli_refuses_hostile_table(seeded):
    with pytest.raises(ValueError, match="unknown table"):
        invoke(["lineage", 'x"; DROP TABLE lineage_runs; --'], home=seeded.root)
    with pytest.raises(ValueError, match="invalid domain"):
        invoke(["lineage", "kg_triples", "--domain", "../etc"], home=seeded.root)
    assert query(seeded, "SELECT count(*) AS n FROM lineage_runs").to_pylist()[0]["n"] == 1


def test_lineage_path_is_bound_not_pasted(seeded):
    out = invoke(["lineage", "/tmp/x' OR '1'='1"], home=seeded.root)
    assert out["runs"] == []


def test_sql_param_values_are_data(seeded):
    hostile = "北京'; DROP TABLE lineage_runs; --"
    out = invoke(["--json", "sql", "SELECT $v AS v, count(*) AS n FROM kg_entities WHERE name = $v", "--param", f"v={hostile}"],
                 home=seeded.root)
    assert out["rows"] == [{"v": hostile, "n": 0}]
    assert query(seeded, "SELECT count(*) AS n FROM lineage_runs").to_pylist()[0]["n"] == 1


@pytest.mark.parametrize("name", ['x"; DROP TABLE lineage_runs; --', "1abc", "a-b", "v\n"])
def test_sql_param_names_must_be_identifiers(seeded, name):
    with pytest.raises(sqlsafe.UnsafeIdentifier):
        invoke(["sql", "SELECT 1", "--param", f"{name}=1"], home=seeded.root)


@pytest.mark.parametrize("stmt", ["DROP TABLE lineage_runs", "DELETE FROM stage_cache", "INSERT INTO metrics (run_id, stage, name) VALUES ('a','b','c')",
                                  "CREATE TABLE evil AS SELECT 1"])
def test_sql_cli_is_read_only(seeded, stmt):
    import duckdb

    with pytest.raises(duckdb.Error, match="read-only"):
        invoke(["sql", stmt], home=seeded.root)
    assert query(seeded, "SELECT count(*) AS n FROM lineage_runs").to_pylist()[0]["n"] == 1
