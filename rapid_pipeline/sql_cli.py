"""Query the warehouse: ``rapid sql "SELECT ..."`` or ``rapid sql FILE.sql [--param name=value ...]``.

    rapid sql "SELECT domain, count(*) FROM kg_entities GROUP BY ALL"
    rapid sql "SELECT * FROM kg_facts WHERE head = \\$name" --param name=北京
    rapid sql sql/coverage.sql --param domain=demo
    rapid --json sql "SELECT * FROM quarantine_summary"

Tables: the lake views (``kg_triples``, ``kg_entities``, ``pairs``, ``quarantine``, ...), the analyst
views of ``sql/views.sql`` (``pairs_current``, ``kg_facts``, ``ingest_summary``, ``quarantine_summary``)
and the project tables (``lineage_runs``, ``lineage_io``, ``stage_cache``, ``metrics``).

Invariants: the views are refreshed first (they see the current manifests), then the query runs on
a read-only connection, so nothing here can change the warehouse. ``--param`` values are bound
parameters (``$name`` in the SQL) and also set as DuckDB variables (``getvariable('name')``), never
pasted into SQL text. A multi-statement file runs statement by statement; the last result is printed.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path
from typing import Any

from .core import warehouse
from .core.home import Home
from .core.sqlsafe import ident

_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")


def parse_params(items: list[str] | None) -> dict[str, Any]:
    """``name=value`` strings -> {name: value}; integers and decimals become numbers."""
    params: dict[str, Any] = {}
    for item in items or []:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--param {item!r}: expected name=value")
        ident(name)  # a parameter name is an identifier: reject anything else up front
        params[name] = (float(value) if "." in value else int(value)) if _NUMBER.match(value) else value
    return params


def load_sql(query_or_file: str) -> str:
    path = Path(query_or_file)
    if query_or_file.endswith(".sql"):
        if not path.is_file():
            raise FileNotFoundError(f"SQL file {query_or_file} not found")
        return path.read_text(encoding="utf-8")
    return query_or_file


def execute(home: Home, sql: str, params: dict[str, Any]) -> tuple[list[str], list[tuple]]:
    """Run every statement of `sql` read-only; return (columns, rows) of the last one."""
    import duckdb

    statements = duckdb.extract_statements(sql)
    if not statements:
        raise ValueError("no SQL statement given")
    warehouse.refresh_views(home)
    with warehouse.connect(home, write=False) as con:
        for name, value in params.items():
            con.execute(f"SET VARIABLE {ident(name)} = ?", [value])
        for stmt in statements:
            wanted = set(stmt.named_parameters)
            missing = wanted - set(params)
            if missing:
                raise ValueError(f"the SQL uses ${', $'.join(sorted(missing))}: pass --param NAME=VALUE")
            cur = con.execute(stmt, {k: params[k] for k in wanted}) if wanted else con.execute(stmt)
        columns = [d[0] for d in cur.description] if cur.description else []
        return columns, cur.fetchall() if columns else []


def _width(text: str) -> int:
    return sum(2 if unicodedata.east_asian_width(ch) in "WF" else 1 for ch in text)


def _pad(text: str, width: int, right: bool) -> str:
    fill = " " * (width - _width(text))
    return fill + text if right else text + fill


def _cell(value: Any) -> str:
    text = "NULL" if value is None else str(value)
    return text.replace("\n", "\\n").replace("\t", "\\t")


def format_table(columns: list[str], rows: list[tuple], max_rows: int = 200) -> str:
    """An aligned text table (CJK characters count double); long results are cut at `max_rows`."""
    if not columns:
        return "(statement ran; no result set)"
    shown = [[_cell(v) for v in row] for row in rows[:max_rows]]
    numeric = [all(isinstance(r[i], (int, float)) or r[i] is None for r in rows[:max_rows]) for i in range(len(columns))]
    widths = [max([_width(c)] + [_width(r[i]) for r in shown]) for i, c in enumerate(columns)]
    lines = [" | ".join(_pad(c, w, False) for c, w in zip(columns, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(_pad(v, w, n) for v, w, n in zip(r, widths, numeric)) for r in shown]
    more = len(rows) - len(shown)
    lines.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''}" + (f", {more} not shown: --max-rows)" if more else ")"))
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("query", help='a SQL query ("SELECT ...") or a path to a .sql file')
    parser.add_argument("--param", action="append", metavar="NAME=VALUE",
                        help="bind $NAME in the SQL (and set variable NAME) to VALUE; repeatable")
    parser.add_argument("--max-rows", type=int, default=200, help="rows printed in the table view (default 200; --json prints all)")


def main(args, home: Home) -> dict:
    params = parse_params(args.param)
    columns, rows = execute(home, load_sql(args.query), params)
    if getattr(args, "json", False):
        return {"columns": columns, "rows": [dict(zip(columns, r)) for r in rows], "row_count": len(rows)}
    return {"text": format_table(columns, rows, args.max_rows)}
