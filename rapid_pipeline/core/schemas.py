"""Arrow schemas for every table, loaded from the repo's ``schemas/*.json``.

One JSON file per table: ``{"name": ..., "doc": ..., "fields": [{"name", "type", "nullable", "doc"}]}``.
Types: string, large_string, binary, bool, int8/16/32/64, float16/32/64, date32, timestamp[us],
timestamp[us,UTC], list<T>. `conform` enforces the contract on write: missing or extra columns
and impossible casts raise `SchemaError`; nothing silently disappears.

``RAPID_SCHEMAS`` overrides the folder (a pip-installed copy ships the repo's folder as data).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import pyarrow as pa

_SIMPLE = {
    "string": pa.string(), "large_string": pa.large_string(), "binary": pa.binary(), "bool": pa.bool_(),
    "int8": pa.int8(), "int16": pa.int16(), "int32": pa.int32(), "int64": pa.int64(),
    "float16": pa.float16(), "float32": pa.float32(), "float64": pa.float64(), "date32": pa.date32(),
    "timestamp[us]": pa.timestamp("us"), "timestamp[us,UTC]": pa.timestamp("us", tz="UTC"),
}


class SchemaError(ValueError):
    pass


def schemas_dir() -> Path:
    env = os.environ.get("RAPID_SCHEMAS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "schemas"


def parse_type(text: str) -> pa.DataType:
    text = text.strip()
    if text in _SIMPLE:
        return _SIMPLE[text]
    if text.startswith("list<") and text.endswith(">"):
        return pa.list_(parse_type(text[5:-1]))
    raise SchemaError(f"unknown type {text!r} in schemas/")


@functools.cache
def table_schema(name: str) -> pa.Schema:
    path = schemas_dir() / f"{name}.json"
    if not path.exists():
        raise SchemaError(f"no schema for table {name!r} (expected {path})")
    spec = json.loads(path.read_text())
    fields = [pa.field(f["name"], parse_type(f["type"]), nullable=f.get("nullable", True)) for f in spec["fields"]]
    return pa.schema(fields, metadata={"table": name})


def known_tables() -> list[str]:
    return sorted(p.stem for p in schemas_dir().glob("*.json"))


def conform(table: pa.Table, name: str) -> pa.Table:
    """Select, order and cast `table`'s columns to the named schema; raise on any mismatch."""
    schema = table_schema(name)
    missing = [f.name for f in schema if f.name not in table.column_names]
    extra = [c for c in table.column_names if c not in schema.names]
    if missing or extra:
        raise SchemaError(f"table {name}: missing columns {missing}, unexpected columns {extra}")
    try:
        out = table.select(schema.names).cast(schema)
    except (ValueError, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:  # pyarrow raises plain ValueError for nulls -> non-nullable
        raise SchemaError(f"table {name}: {exc}") from exc
    for f in schema:
        if not f.nullable and out.column(f.name).null_count:
            raise SchemaError(f"table {name}: column {f.name} is not nullable but has nulls")
    return out


def empty_table(name: str) -> pa.Table:
    return table_schema(name).empty_table()
