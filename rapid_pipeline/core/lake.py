"""Publishing and reading lake partitions: ``lake/<table>/domain=<d>/part=<p>/``.

`publish_table` is the one way a stage writes a table partition: conform to ``schemas/<table>.json``,
write Parquet in row groups under temporary names, rename each to its content hash, then swap the
manifest (see `core.atomic`). The whole partition is replaced, so a rerun or a backfill of one
partition never duplicates rows. `read_table` reads what the manifests list, nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from . import atomic
from .faults import fault_point
from .home import Home
from .schemas import conform, empty_table, table_schema
from .stage import DatasetRef

ROWS_PER_FILE = 1_000_000


def _write_file(folder: Path, table: pa.Table) -> atomic.FileEntry:
    tmp = atomic.temp_path(folder, ".parquet")
    # Fixed writer options and no timestamps: same rows -> same bytes -> same file name.
    pq.write_table(table, tmp, compression="zstd", row_group_size=128_000, write_statistics=True)
    return atomic.finalize_file(tmp, folder, table.num_rows, ".parquet")


def publish_table(home: Home, table_name: str, domain: str, partition: str, table: pa.Table | Iterable[pa.Table],
                  stage: str, meta: dict | None = None) -> DatasetRef:
    """Replace partition (domain, partition) of `table_name` with `table` (or an iterable of batches)."""
    folder = home.partition_dir(table_name, domain, partition)
    folder.mkdir(parents=True, exist_ok=True)
    fault_point(stage, "start_write")
    batches = [table] if isinstance(table, pa.Table) else table
    entries, pending, rows = [], [], 0
    for batch in batches:
        pending.append(conform(batch, table_name))
        rows += batch.num_rows
        if rows >= ROWS_PER_FILE:
            entries.append(_write_file(folder, pa.concat_tables(pending)))
            fault_point(stage, "mid_write")
            pending, rows = [], 0
    if pending or not entries:
        entries.append(_write_file(folder, pa.concat_tables(pending) if pending else empty_table(table_name)))
    fault_point(stage, "mid_write")
    manifest = atomic.commit_manifest(folder, entries, {"table": table_name, "domain": domain, "partition": partition, **(meta or {})}, stage)
    fault_point(stage, "end_write")
    return DatasetRef("file://" + str(folder), manifest["fingerprint"], manifest["rows"], table_name)


def partitions(home: Home, table_name: str, domain: str) -> list[str]:
    root = home.table_dir(table_name, domain)
    return sorted(p.name.removeprefix("part=") for p in root.glob("part=*") if (p / atomic.MANIFEST).exists())


def read_partition(home: Home, table_name: str, domain: str, partition: str, columns: list[str] | None = None) -> pa.Table:
    files = atomic.manifest_paths(home.partition_dir(table_name, domain, partition))
    if not files:
        return empty_table(table_name) if columns is None else empty_table(table_name).select(columns)
    return pa.concat_tables([pq.read_table(f, columns=columns, schema=table_schema(table_name)) for f in files])


def read_table(home: Home, table_name: str, domain: str, columns: list[str] | None = None) -> pa.Table:
    """All current partitions of `table_name` for `domain` (only manifest-listed files)."""
    parts = [read_partition(home, table_name, domain, p, columns) for p in partitions(home, table_name, domain)]
    if not parts:
        t = empty_table(table_name)
        return t if columns is None else t.select(columns)
    return pa.concat_tables(parts)


def partition_ref(home: Home, table_name: str, domain: str, partition: str) -> DatasetRef:
    folder = home.partition_dir(table_name, domain, partition)
    manifest = atomic.read_manifest(folder)
    if manifest is None:
        raise FileNotFoundError(f"no partition {table_name}/{domain}/{partition} in {home.lake}")
    return DatasetRef("file://" + str(folder), manifest["fingerprint"], manifest["rows"], table_name)


def table_refs(home: Home, table_name: str, domain: str) -> list[DatasetRef]:
    """Lineage refs for every current partition (inputs of a downstream stage)."""
    return [partition_ref(home, table_name, domain, p) for p in partitions(home, table_name, domain)]
