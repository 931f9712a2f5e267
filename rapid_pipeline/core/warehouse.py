"""The DuckDB warehouse: one file, ``$RAPID_HOME/warehouse.duckdb``.

* Project tables (lineage, step cache, metrics) come from ``sql/warehouse.sql``.
* Every lake table declared in ``schemas/`` is a view over the Parquet files its partition
  manifests list (never a glob: a glob would see files of an unfinished write). A table with no
  partition yet is an empty view with the declared column types, so queries never break.
* ``sql/views.sql`` then adds the analyst-facing views on top.

DuckDB allows one writing process per file, so every connection takes a file lock (shared for
read-only use, exclusive for writes) and is kept short. Values are bound parameters; identifiers
go through `core.sqlsafe`.
"""

from __future__ import annotations

import contextlib
import fcntl
import time
from pathlib import Path
from typing import Iterator

import duckdb
import pyarrow as pa

from .atomic import MANIFEST, read_manifest
from .home import Home
from .schemas import known_tables, table_schema
from .sqlsafe import ident, table_ident

_DUCK = {
    pa.string(): "VARCHAR", pa.large_string(): "VARCHAR", pa.binary(): "BLOB", pa.bool_(): "BOOLEAN",
    pa.int8(): "TINYINT", pa.int16(): "SMALLINT", pa.int32(): "INTEGER", pa.int64(): "BIGINT",
    pa.float16(): "FLOAT", pa.float32(): "FLOAT", pa.float64(): "DOUBLE", pa.date32(): "DATE",
}


def sql_dir() -> Path:
    return Path(__file__).resolve().parents[2] / "sql"


def read_sql(name: str) -> str:
    return (sql_dir() / name).read_text(encoding="utf-8")


def _duck_type(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return _duck_type(t.value_type) + "[]"
    if pa.types.is_timestamp(t):
        return "TIMESTAMPTZ" if t.tz else "TIMESTAMP"
    return _DUCK[t]


@contextlib.contextmanager
def connect(home: Home, write: bool = True) -> Iterator[duckdb.DuckDBPyConnection]:
    """Locked connection. Readers share, writers exclude; the first writer creates the tables."""
    lock_path = home.locks / "warehouse.lock"
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if write or not home.warehouse.exists() else fcntl.LOCK_SH)
        con = duckdb.connect(str(home.warehouse), read_only=not write and home.warehouse.exists())
        try:
            if write:
                con.execute(read_sql("warehouse.sql"))
            yield con
        finally:
            con.close()


def lake_files(home: Home, table: str) -> list[str]:
    """Files the manifests of every partition of `table` list (all domains)."""
    root = home.lake / table
    files: list[str] = []
    for manifest_path in sorted(root.glob(f"domain=*/part=*/{MANIFEST}")):
        manifest = read_manifest(manifest_path.parent) or {"files": []}
        files += [str(manifest_path.parent / f["path"]) for f in manifest["files"]]
    return files


def _literal(text: str) -> str:
    # DDL cannot take bound parameters; paths are built from validated names, quotes doubled anyway.
    return "'" + text.replace("'", "''") + "'"


def _view_sql(home: Home, table: str) -> str:
    files = lake_files(home, table)
    if files:
        return f"CREATE OR REPLACE VIEW {table_ident(table)} AS SELECT * FROM read_parquet([{', '.join(map(_literal, files))}])"
    cols = ", ".join(f"CAST(NULL AS {_duck_type(f.type)}) AS {ident(f.name)}" for f in table_schema(table))
    return f"CREATE OR REPLACE VIEW {table_ident(table)} AS SELECT {cols} WHERE false"


def refresh_views(home: Home, con: duckdb.DuckDBPyConnection | None = None) -> list[str]:
    """Point every lake view at the current manifests, then (re)create ``sql/views.sql``."""
    with contextlib.ExitStack() as stack:
        con = con or stack.enter_context(connect(home, write=True))
        tables = known_tables()
        for table in tables:
            _create_view(con, home, table)
        views = sql_dir() / "views.sql"
        if views.exists():
            con.execute(views.read_text(encoding="utf-8"))
        return tables


def _create_view(con: duckdb.DuckDBPyConnection, home: Home, table: str, attempts: int = 5) -> None:
    """Retried: a concurrent publish of another partition may delete a file the manifest we just read
    listed (its old version); reading the manifests again gives the files that exist now."""
    for attempt in range(attempts):
        try:
            con.execute(_view_sql(home, table))
            return
        except duckdb.IOException:
            if attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))


def query(home: Home, sql: str, params: list | None = None) -> pa.Table:
    """Run one read query and return Arrow (retries briefly if a writer holds the file)."""
    for attempt in range(20):
        try:
            with connect(home, write=False) as con:
                return con.sql(sql, params=params or None).to_arrow_table()
        except duckdb.IOException:
            time.sleep(0.1 * (attempt + 1))
    raise RuntimeError(f"warehouse {home.warehouse} stayed locked")
