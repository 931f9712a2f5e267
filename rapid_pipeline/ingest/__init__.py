"""Ingest stages: landing files -> lake tables (``rapid ingest kg`` / ``rapid ingest pairs``).

Shared conventions of the ingest stages (the helpers below, so both stages agree):

* The ``quarantine`` and ``ingest_stats`` tables are written per (stage, partition): their storage
  partition is `side_partition(stage, partition)` (``ingest_pairs-2025-01-01``), because
  `core.lake.publish_table` replaces a whole partition and two stages ingesting the same date must
  not overwrite each other's rejects. The row's ``partition`` column keeps the plain ingest partition.
* `stats_rows` builds ``ingest_stats`` rows (one per input file + a ``'*'`` total row).
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Iterable

from ..core.home import check_name


def side_partition(stage: str, partition: str) -> str:
    """Storage partition of the per-stage side tables (quarantine, ingest_stats)."""
    return check_name(f"{stage}-{partition}", "partition")


def stats_row(domain: str, partition: str, stage: str, source_file: str, accepted: int,
              duplicates: int, reasons: Counter, seconds: float | None = None) -> dict:
    quarantined = sum(reasons.values())
    return {"domain": domain, "partition": partition, "stage": stage, "source_file": source_file,
            "rows_in": accepted + quarantined + duplicates, "accepted": accepted, "quarantined": quarantined,
            "duplicates": duplicates, "reasons": json.dumps(dict(sorted(reasons.items())), ensure_ascii=False),
            "seconds": seconds}


def total_row(domain: str, partition: str, stage: str, rows: Iterable[dict], seconds: float | None) -> dict:
    """The ``'*'`` row summing per-file stats rows."""
    rows = list(rows)
    reasons: Counter = Counter()
    for r in rows:
        reasons.update(json.loads(r["reasons"]))
    return stats_row(domain, partition, stage, "*", sum(r["accepted"] for r in rows),
                     sum(r["duplicates"] for r in rows), reasons, seconds)
