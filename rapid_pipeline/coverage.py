"""``rapid coverage --domain D``: the entity-coverage report of ``sql/coverage.sql``, as tables.

The SQL file is the source of truth and runs unchanged in the DuckDB CLI; this command only binds
the domain (``SET VARIABLE domain = ?``, a bound value) and prints each result section:
coverage per domain and per ingest date, top entities, relations, unlinked captions and
alias candidates (frequent unlinked Han n-grams).
"""

from __future__ import annotations

import argparse

from .core.home import check_name
from .core.warehouse import connect, read_sql, refresh_views


def coverage(home, domain: str | None) -> dict[str, list[dict]]:
    """Run sql/coverage.sql for `domain` (None: all domains); returns {section: rows}."""
    if domain is not None:
        check_name(domain, "domain")
    refresh_views(home)
    sections: dict[str, list[dict]] = {}
    with connect(home, write=False) as con:
        con.execute("SET VARIABLE domain = ?", [domain])
        for stmt in con.extract_statements(read_sql("coverage.sql")):
            rel = con.execute(stmt.query)
            if stmt.type.name != "SELECT":
                continue
            cols = [d[0] for d in rel.description]
            rows = [dict(zip(cols, r)) for r in rel.fetchall()]
            name = rows[0]["section"] if rows else _section_name(stmt.query)
            sections[name] = [{k: v for k, v in r.items() if k != "section"} for r in rows]
    return sections


def _section_name(query: str) -> str:
    return query.split("'")[1] if "'" in query else "result"


def format_table(rows: list[dict], max_width: int = 40) -> str:
    if not rows:
        return "  (no rows)"
    cols = list(rows[0])
    cells = [[str(r[c])[:max_width] for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    line = lambda vals: "  " + "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--domain", default=None, help="domain to report (default: all domains)")


def main(args: argparse.Namespace, home) -> dict:
    sections = coverage(home, args.domain)
    text = "\n\n".join(f"{name}\n{format_table(rows)}" for name, rows in sections.items())
    return {"text": text, "domain": args.domain, "sections": sections}
