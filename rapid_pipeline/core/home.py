"""Where everything lives: the RAPID_HOME folder.

Layout (created on first use)::

    $RAPID_HOME/ landing/ lake/ shards/ models/ reports/ lineage/ locks/ warehouse.duckdb

`RAPID_HOME` defaults to ``./rapid_home``. Every stage takes a `Home` so tests point it at a tmp dir.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

SUBDIRS = ("landing", "lake", "shards", "models", "reports", "lineage", "locks")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")


def check_name(value: str, what: str = "name") -> str:
    """Validate a domain / partition / table-ish name used in paths and SQL identifiers.

    Why: these names become folder names and SQL identifiers; one strict rule rejects
    traversal (`..`, `/`) and injection (`;`, quotes) before any file or SQL is touched.
    """
    if not isinstance(value, str) or not _NAME.fullmatch(value):  # fullmatch: "$" alone lets "x\n" through
        raise ValueError(
            f"invalid {what} {value!r}: use 1-64 characters from [A-Za-z0-9_-], starting with a letter or digit"
        )
    return value


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def from_env(cls, root: str | os.PathLike | None = None) -> "Home":
        path = Path(root or os.environ.get("RAPID_HOME", "rapid_home")).expanduser().resolve()
        home = cls(path)
        home.ensure()
        return home

    def ensure(self) -> None:
        for sub in SUBDIRS:
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def warehouse(self) -> Path:
        return self.root / "warehouse.duckdb"

    def __getattr__(self, item: str) -> Path:
        if item in SUBDIRS:
            return self.root / item
        raise AttributeError(item)

    def table_dir(self, table: str, domain: str) -> Path:
        """lake/<table>/domain=<domain>/ (partitions below it)."""
        return self.root / "lake" / check_name(table, "table") / f"domain={check_name(domain, 'domain')}"

    def partition_dir(self, table: str, domain: str, partition: str) -> Path:
        return self.table_dir(table, domain) / f"part={check_name(partition, 'partition')}"
