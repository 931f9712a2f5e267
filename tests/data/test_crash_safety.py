"""Crash safety and concurrency of the ingest stages, with real processes and SIGKILL.

The fault hook (``RAPID_FAULT=stage:point:sigkill``, `core.faults`) kills the CLI at the start, the
middle and the end of its first lake write. Whatever the point, the partition stays readable; before
the manifest swap it is byte-for-byte the old one; a rerun then gives byte-identical files to a run
that never crashed. Two processes ingesting the same partition at once never duplicate rows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rapid_pipeline.core import atomic, lake
from rapid_pipeline.core.home import Home
from rapid_pipeline.ingest.kg import KGIngestConfig, run

REPO = Path(__file__).resolve().parents[2]
POINTS = ["start_write", "mid_write", "before_manifest", "after_manifest", "end_write"]
BEFORE_SWAP = {"start_write", "mid_write", "before_manifest"}
KG_TABLES = ("kg_triples", "kg_entities", "kg_relations", "quarantine")


def _cli(home: Home, *args: str, fault: str | None = None, wait: bool = True):
    env = {**os.environ, "RAPID_HOME": str(home.root), "RAPID_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RAPID_FAULT", None)
    if fault:
        env["RAPID_FAULT"] = fault
    cmd = [sys.executable, "-m", "rapid_pipeline", *args]
    if not wait:
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


def listed(home: Home, table: str, domain: str, partition: str) -> dict[str, bytes]:
    """What readers see: the manifest and the files it lists (bytes)."""
    folder = home.partition_dir(table, domain, partition)
    if atomic.read_manifest(folder) is None:
        return {}
    out = {atomic.MANIFEST: (folder / atomic.MANIFEST).read_bytes()}
    out.update({p.name: p.read_bytes() for p in atomic.manifest_paths(folder)})
    return out


def lake_files(home: Home, tables=KG_TABLES) -> dict[str, bytes]:
    """Every file under lake/<table>/ (stray temp files included: a rerun must leave none)."""
    out = {}
    for table in tables:
        for p in sorted((home.lake / table).rglob("*")):
            if p.is_file():
                out[str(p.relative_to(home.lake))] = p.read_bytes()
    return out


def _kg_inputs(tmp_path: Path) -> tuple[Path, Path]:
    v1 = tmp_path / "v1.tsv"
    v1.write_text("head\trelation\ttail\n北京\t首都\t中国\n北京\t别名\t燕京\nbad\trow\n", encoding="utf-8")
    v2 = tmp_path / "v2.tsv"
    v2.write_text("".join(f"实体{i}\t关系{i % 3}\t实体{i + 1}\n" for i in range(50)) + "上海\t别名\t沪\nx\t\ty\n", encoding="utf-8")
    return v1, v2


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory):
    """v1 then v2 into one partition, no crash: the reference every crashed-and-rerun home must equal."""
    tmp = tmp_path_factory.mktemp("clean")
    v1, v2 = _kg_inputs(tmp)
    home = Home.from_env(tmp / "home")
    run(KGIngestConfig(), home, [v1], "demo", "2025-01-01")
    run(KGIngestConfig(), home, [v2], "demo", "2025-01-01")
    return tmp, lake_files(home)


@pytest.mark.slow
@pytest.mark.parametrize("point", POINTS)
def test_kg_kill_during_write_then_rerun(home, clean_run, point):
    tmp, reference = clean_run
    v1, v2 = _kg_inputs(tmp)  # same paths as the reference run: source_file is part of the rows
    run(KGIngestConfig(), home, [v1], "demo", "2025-01-01")
    old = {t: listed(home, t, "demo", "2025-01-01" if t == "kg_triples" else "all") for t in ("kg_triples", "kg_entities")}

    proc = _cli(home, "ingest", "kg", str(v2), "--domain", "demo", "--partition", "2025-01-01", fault=f"ingest_kg:{point}:sigkill")
    assert proc.returncode == -9, proc.stderr  # really killed, not a clean error

    triples_now = listed(home, "kg_triples", "demo", "2025-01-01")
    if point in BEFORE_SWAP:
        assert triples_now == old["kg_triples"]  # the old partition, byte for byte
    else:
        assert triples_now != old["kg_triples"]  # the new manifest is in: the whole new partition, readable
    assert listed(home, "kg_entities", "demo", "all") == old["kg_entities"]  # rebuilt only after triples
    rows = lake.read_partition(home, "kg_triples", "demo", "2025-01-01").num_rows
    assert rows == (2 if point in BEFORE_SWAP else 51)

    rerun = _cli(home, "ingest", "kg", str(v2), "--domain", "demo", "--partition", "2025-01-01")
    assert rerun.returncode == 0, rerun.stderr
    assert lake_files(home) == reference  # byte-identical to the clean run, no stray temp files
    assert not any((home.root / ".scratch").iterdir())


@pytest.mark.slow
def test_concurrent_runs_of_one_partition_do_not_duplicate(home, tmp_path):
    _, v2 = _kg_inputs(tmp_path)
    other = tmp_path / "other.tsv"
    other.write_text("杭州\t位于\t浙江\n", encoding="utf-8")
    args = ["ingest", "kg", str(v2), "--domain", "demo", "--partition", "2025-01-01"]
    procs = [_cli(home, *args, wait=False), _cli(home, *args, wait=False),
             _cli(home, "ingest", "kg", str(other), "--domain", "demo", "--partition", "2025-01-02", wait=False)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    triples = lake.read_table(home, "kg_triples", "demo").to_pylist()
    keys = [(t["partition"], t["head"], t["relation"], t["tail"]) for t in triples]
    assert len(keys) == len(set(keys)) == 52
    # the entity rebuilds of the two partitions serialised: both partitions are in kg_entities
    names = {r["name"] for r in lake.read_table(home, "kg_entities", "demo").to_pylist()}
    assert {"杭州", "浙江", "实体0", "上海", "沪"} <= names
    statuses = sorted(_statuses(home))
    assert statuses.count("ok") >= 2 and len(statuses) == 3  # the second same-partition run: ok or cached


def _statuses(home: Home) -> list[str]:
    from rapid_pipeline.core.warehouse import query

    return [r["status"] for r in query(home, "SELECT status FROM lineage_runs WHERE stage = 'ingest_kg'").to_pylist()]


# ---------------------------------------------------------------- pairs (rapid ingest pairs, engineer A1)

@pytest.fixture(scope="module")
def demo_pairs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    home = Home.from_env(tmp / "home0")
    proc = _cli(home, "demo-data", "--out", str(tmp / "landing"), "--pairs", "24")
    assert proc.returncode == 0, proc.stderr
    return tmp / "landing" / "pairs"


PAIR_TABLES = ("pairs", "quarantine")


@pytest.mark.slow
@pytest.mark.parametrize("point", ["start_write", "before_manifest", "end_write"])
def test_pairs_kill_during_write_then_rerun(tmp_path, demo_pairs, point):
    args = ["ingest", "pairs", str(demo_pairs), "--domain", "demo", "--partition", "2025-01-01"]
    clean = Home.from_env(tmp_path / "clean")
    assert _cli(clean, *args).returncode == 0
    home = Home.from_env(tmp_path / "crashed")
    proc = _cli(home, *args, fault=f"ingest_pairs:{point}:sigkill")
    assert proc.returncode == -9, proc.stderr
    if point in BEFORE_SWAP:
        assert listed(home, "pairs", "demo", "2025-01-01") == {}  # nothing half-visible
    assert lake.read_table(home, "pairs", "demo").num_rows in (0, lake.read_table(clean, "pairs", "demo").num_rows)
    rerun = _cli(home, *args)
    assert rerun.returncode == 0, rerun.stderr
    strip = lambda files: {k.replace(str(home.root), ""): v for k, v in files.items()}
    assert strip(lake_files(home, PAIR_TABLES)) == strip(lake_files(clean, PAIR_TABLES))
    blobs = lambda h: sorted(p.name for p in (h.lake / "blobs").rglob("*") if p.is_file() and not p.name.startswith(".tmp"))
    assert blobs(home) == blobs(clean)
