"""rapid_ingest: landing drops -> lake tables, one partition per day and domain.

Reads ``$RAPID_HOME/landing/<domain>/<YYYY-MM-DD>/`` (KG files under ``kg/``, pair files under
``pairs/``: CSV/TSV/Parquet tables whose image URLs are relative to the table, and
``img2dataset/*.tar``) and runs
``rapid ingest kg`` / ``rapid ingest pairs`` with ``--partition <YYYY-MM-DD>``.

* Schedule: ``CronDataIntervalTimetable("@daily", UTC)`` (a real ``[start, end)`` day), OR a
  landing asset event (a producer touches ``landing/<domain>/_READY``; the triggerer's
  ``FileDeleteTrigger`` turns it into an asset event). ``catchup=False``: a backfill re-ingests
  exactly the days asked for::

      airflow backfill create --dag-id rapid_ingest --from-date 2025-01-01 --to-date 2025-01-03

* Which days: param ``date`` (``YYYY-MM-DD`` or ``all``) if given; else the UTC day of the run's
  logical date (for scheduled and backfill runs that is ``data_interval_start``, the day the
  interval covers; for a manual run it is the date the user picked); else (asset-triggered, or
  manual without a logical date) every day folder present under ``landing/<domain>/``.
* Idempotent: the partition is the day and the stage replaces it whole; a repeated day with the
  same files is a step-cache hit. A day without a landing folder is *skipped* with a message.
* Mapped over the configured domains (``RAPID_DOMAINS``) with ``.expand``.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import sys
from pathlib import Path

import pendulum
from airflow.sdk import AssetAny, AssetOrTimeSchedule, CronDataIntervalTimetable, Param, dag, get_current_context, task

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # Airflow does not always put dags/ on sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c  # noqa: E402
from rapid_assets import (  # noqa: E402
    LAKE_KG_ENTITIES, LAKE_KG_TRIPLES, LAKE_PAIRS, LAKE_QUARANTINE, LANDING_PREFIX, domains, landing_assets,
)

_DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".jsonl", ".json", ".gz", ".bz2")


def requested_days(params: dict, dag_run, logical_date) -> list[str] | None:
    """The days this run ingests, or None for 'every day folder present' (see module doc)."""
    wanted = (params.get("date") or "").strip()
    if wanted == "all":
        return None
    if wanted:
        if not _DAY.match(wanted):
            raise ValueError(f"param date={wanted!r}: use YYYY-MM-DD or 'all'")
        return [wanted]
    run_type = str(getattr(dag_run, "run_type", "") or "")
    if logical_date is None or "asset" in run_type:
        return None
    return [logical_date.astimezone(dt.timezone.utc).date().isoformat()]


def landed_days(domain: str) -> list[str]:
    root = c.rapid_home() / "landing" / domain
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _DAY.match(p.name)) if root.is_dir() else []


def _days_for(domain: str) -> tuple[list[str], bool]:
    """(days, explicit): explicit days are skipped when their folder is missing."""
    ctx = get_current_context()
    days = requested_days(ctx["params"], ctx.get("dag_run"), ctx.get("logical_date"))
    return (landed_days(domain), False) if days is None else (days, True)


def kg_files(day_dir: Path) -> list[Path]:
    folder = day_dir / "kg"
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith((".", "_"))) if folder.is_dir() else []


def pair_sources(day_dir: Path) -> list[Path]:
    """Tables (Wukong CSV/TSV/Parquet, their image URLs relative to the table) and img2dataset tars."""
    folder = day_dir / "pairs"
    if not folder.is_dir():
        return []
    tables = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(_TABLE_SUFFIXES))
    tars = sorted((folder / "img2dataset").glob("*.tar")) + sorted(folder.glob("*.tar"))
    return tables + tars


def _ingest(domain: str, kind: str, outlets: list) -> list[dict]:
    days, explicit = _days_for(domain)
    argvs = [_argv(kind, domain, day, c.landing_dir(domain, day)) for day in days]
    done = [c.summary(c.call_stage(argv)) for argv in argvs if argv]
    if not done:
        c.skip(_nothing_to_do(domain, kind, days, explicit))
    _publish(outlets, domain, done)
    return done


def _nothing_to_do(domain: str, kind: str, days: list[str], explicit: bool) -> str:
    root = c.rapid_home() / "landing" / domain
    if not explicit:
        return f"nothing to ingest for {kind} of domain {domain!r}: no day folder with {kind}/ files under {root}/"
    return (f"nothing to ingest for {kind} of domain {domain!r}: no {kind}/ files under "
            + ", ".join(f"{root / d}/" for d in days) + " (no landing data for that day)")


def _argv(kind: str, domain: str, day: str, day_dir: Path) -> list[str] | None:
    if kind == "kg":
        files = kg_files(day_dir)
        return ["ingest", "kg", *files, "--domain", domain, "--partition", day] if files else None
    # The folder itself: the stage reads every table/tar in it (tables' image URLs are relative to them).
    return ["ingest", "pairs", day_dir / "pairs", "--domain", domain, "--partition", day] if pair_sources(day_dir) else None


def _publish(outlets: list, domain: str, done: list[dict]) -> None:
    events = get_current_context()["outlet_events"]
    extra = {"domains": [domain], "partitions": [d.get("partition") for d in done],
             "runs": [{k: d.get(k) for k in ("run_id", "status", "rows_out", "rows_quarantined")} for d in done],
             "fingerprints": sorted({o["fingerprint"] for d in done for o in d["outputs"] if o.get("fingerprint")})}
    for asset in outlets:
        events[asset].extra = extra


@task(outlets=[LAKE_KG_TRIPLES, LAKE_KG_ENTITIES, LAKE_QUARANTINE])
def ingest_kg(domain: str) -> list[dict]:
    """Ingest the day's KG files (``landing/<domain>/<day>/kg/*``) into ``kg_triples`` (partition = day)
    and the per-domain ``kg_entities`` / ``kg_relations``; bad rows go to ``quarantine``.
    Skipped when the day has no ``kg/`` files."""
    return _ingest(domain, "kg", [LAKE_KG_TRIPLES, LAKE_KG_ENTITIES, LAKE_QUARANTINE])


@task(outlets=[LAKE_PAIRS, LAKE_QUARANTINE])
def ingest_pairs(domain: str) -> list[dict]:
    """Ingest the day's image-text pairs (``landing/<domain>/<day>/pairs/``: tables and
    ``img2dataset/*.tar``) into ``pairs`` (partition = day); image bytes go to the blob store,
    rejects to ``quarantine``. Skipped when the day has no ``pairs/`` files."""
    return _ingest(domain, "pairs", [LAKE_PAIRS, LAKE_QUARANTINE])


@task
def select_domains(configured: list[str]) -> list[str]:
    """The domains this run ingests: the ``domain`` param, else the domains whose landing flag
    triggered the run, else all of ``RAPID_DOMAINS``."""
    ctx = get_current_context()
    wanted = ctx["params"].get("domain")
    if wanted and wanted not in configured:
        raise ValueError(f"domain {wanted!r} is not in RAPID_DOMAINS={configured}")
    if wanted:
        return [wanted]
    landed = landing_domains(ctx.get("triggering_asset_events"), configured)
    return landed or configured


def landing_domains(triggering: dict | None, configured: list[str]) -> list[str]:
    """Domains named by triggering landing-asset events (keys may be Assets or aliases: use .name)."""
    names = {getattr(key, "name", str(key)) for key, events in (triggering or {}).items() if events}
    return [d for d in configured if LANDING_PREFIX + d in names]


@dag(
    dag_id="rapid_ingest",
    schedule=AssetOrTimeSchedule(timetable=CronDataIntervalTimetable("@daily", timezone="UTC"),
                                 assets=AssetAny(*landing_assets())),
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    default_args=c.DEFAULT_ARGS,
    tags=["rapid", "ingest"],
    params={"date": Param("", type="string", description="YYYY-MM-DD to ingest one day, 'all' for every landed day; empty = the run's data interval"),
            "domain": Param("", type="string", description="ingest only this domain (empty = all of RAPID_DOMAINS)")},
    doc_md=__doc__,
)
def rapid_ingest():
    picked = c.documented(select_domains)(domains())
    c.documented(ingest_kg).expand(domain=picked)
    c.documented(ingest_pairs).expand(domain=picked)


rapid_ingest_dag = rapid_ingest()
