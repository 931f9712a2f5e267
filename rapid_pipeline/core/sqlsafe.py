"""The one SQL identifier check. Values are always bound parameters (``?``); identifiers
(table and column names) cannot be bound, so they must be names `schemas/` declares (or the
view/table names the project itself creates) before they are quoted.
"""

from __future__ import annotations

import re

from .schemas import known_tables, table_schema

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
# Tables the project creates itself (lineage, cache, metrics); see core/warehouse.py.
INTERNAL_TABLES = frozenset({"lineage_runs", "lineage_io", "stage_cache", "run_counts", "metrics"})


class UnsafeIdentifier(ValueError):
    pass


def ident(name: str) -> str:
    """Quote a syntactically valid identifier; raises UnsafeIdentifier otherwise."""
    if not isinstance(name, str) or not _IDENT.fullmatch(name):  # fullmatch: "$" alone lets "x\n" through
        raise UnsafeIdentifier(f"unsafe SQL identifier {name!r}")
    return f'"{name}"'


def table_ident(name: str) -> str:
    if name not in INTERNAL_TABLES and name not in known_tables():
        raise UnsafeIdentifier(f"unknown table {name!r}: not in schemas/ nor a warehouse table")
    return ident(name)


def column_ident(table: str, column: str) -> str:
    if table in known_tables() and column not in table_schema(table).names:
        raise UnsafeIdentifier(f"table {table!r} has no column {column!r}")
    return ident(column)
