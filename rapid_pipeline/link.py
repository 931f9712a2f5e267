"""Stage ``link``: find the KG entities named in every caption of a domain.

    rapid link --domain demo                 # every pairs partition (unchanged ones are cache hits)
    rapid link --domain demo --partition 2025-01-03

Reads ``kg_entities`` (names + aliases) and ``pairs``; writes ``links`` (pair_id, entity_id, start,
end, surface, method) with one links partition per pairs partition, so a backfilled ingest day is
relinked alone and Airflow can map the work over partitions. The automaton is built once per
(KG fingerprint, linker config) and cached under ``models/linker/<domain>/<key>/``.

Invariants: every caption of the partition is linked exactly once (duplicate pair ids inside a
partition are counted, not relinked: in = out + duplicates); offsets satisfy
``caption[start:end] == surface``; the links partition is replaced whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import pyarrow as pa

from .core import lake
from .core.atomic import publish_dir, staging_dir
from .core.config import add_config_args, config_from_args
from .core.fingerprint import fingerprint_obj
from .core.home import Home
from .core.progress import progress
from .core.stage import StageReport, StageResult, run_stage
from .core.warehouse import refresh_views
from .linker import LinkConfig, Linker, entries_from_entities


_LOADED: dict[Path, Linker] = {}


def linker_for(home: Home, domain: str, config: LinkConfig) -> tuple[Linker, dict]:
    """The cached linker for the domain's current KG; built (and timed) on a cache miss."""
    kg = lake.table_refs(home, "kg_entities", domain)
    if not kg:
        raise FileNotFoundError(f"domain {domain!r} has no kg_entities yet: run `rapid ingest kg ... --domain {domain}` first")
    key = fingerprint_obj([[r.fingerprint for r in kg], dataclasses.asdict(config)])[:20]
    folder = home.models / "linker" / domain / key
    if folder in _LOADED:  # several partitions in one process share one automaton
        return _LOADED[folder], {"linker_cache": "hit", "linker_dir": str(folder)}
    if (folder / "index.parquet").exists():
        _LOADED[folder] = Linker.load(folder)
        return _LOADED[folder], {"linker_cache": "hit", "linker_dir": str(folder)}
    t0 = time.perf_counter()
    linker = Linker.build(entries_from_entities(lake.read_table(home, "kg_entities", domain)), config)
    tmp = staging_dir(folder)
    linker.save(tmp)
    publish_dir(tmp, folder)
    _LOADED[folder] = linker
    return linker, {"linker_cache": "miss", "linker_dir": str(folder), "linker_build_s": round(time.perf_counter() - t0, 3), "linker_keys": len(linker)}


def _link_rows(linker: Linker, pairs: pa.Table, domain: str, partition: str) -> tuple[dict, int, int]:
    cols = {k: [] for k in ("domain", "partition", "pair_id", "entity_id", "start", "end", "surface", "method")}
    seen, linked = set(), 0
    data = pairs.select(["pair_id", "caption"]).to_pydict()
    for pair_id, caption in progress(zip(data["pair_id"], data["caption"]), "link", total=pairs.num_rows, unit="caption"):
        if pair_id in seen:
            continue
        seen.add(pair_id)
        mentions = linker.link(caption)
        linked += bool(mentions)
        for m in mentions:
            for k, v in zip(cols, (domain, partition, pair_id, m.entity_id, m.start, m.end, m.surface, m.method)):
                cols[k].append(v)
    return cols, len(seen), linked


def run_partition(config: LinkConfig, home: Home, domain: str, partition: str, force: bool = False) -> StageReport:
    inputs = lake.table_refs(home, "kg_entities", domain) + [lake.partition_ref(home, "pairs", domain, partition)]

    def body(report: StageReport) -> StageResult:
        linker, info = linker_for(home, domain, config)
        pairs = lake.read_partition(home, "pairs", domain, partition, ["pair_id", "caption"])
        cols, unique, linked = _link_rows(linker, pairs, domain, partition)
        ref = lake.publish_table(home, "links", domain, partition, pa.table(cols), "link")
        refresh_views(home)
        extra = {**info, "links": ref.rows, "captions": unique, "linked_captions": linked,
                 "coverage": round(linked / unique, 4) if unique else 0.0}
        return StageResult([ref], rows_in=pairs.num_rows, rows_out=unique, rows_duplicate=pairs.num_rows - unique, extra=extra)

    return run_stage(home, "link", config, inputs, body, domain=domain, partition=partition, force=force)


def run(config: LinkConfig, home: Home, domain: str, partitions: list[str] | None = None, force: bool = False) -> list[StageReport]:
    parts = partitions or lake.partitions(home, "pairs", domain)
    if not parts:
        raise FileNotFoundError(f"domain {domain!r} has no pairs yet: run `rapid ingest pairs ... --domain {domain}` first")
    return [run_partition(config, home, domain, p, force) for p in parts]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--domain", required=True, help="domain whose captions to link")
    p.add_argument("--partition", action="append", help="pairs partition(s) to link (default: all); repeatable")
    p.add_argument("--force", action="store_true", help="relink even if inputs, config and code are unchanged")
    add_config_args(p, LinkConfig)


def main(args: argparse.Namespace, home: Home) -> dict:
    reports = run(config_from_args(LinkConfig(), args), home, args.domain, args.partition, args.force)
    caps = sum(r.extra.get("captions", 0) for r in reports)
    linked = sum(r.extra.get("linked_captions", 0) for r in reports)
    text = "\n".join(r.summary() for r in reports)
    text += f"\nlinked {linked}/{caps} captions ({linked / max(caps, 1):.1%}) in {len(reports)} partition(s)"
    return {"text": text, "domain": args.domain, "captions": caps, "linked_captions": linked,
            "reports": [r.to_dict() for r in reports], "outputs": [o for r in reports for o in r.to_dict()["outputs"]],
            "status": "ok" if all(r.status in ("ok", "cached") for r in reports) else "failed",
            "linker_dir": str(Path(reports[0].extra.get("linker_dir", ""))) if reports else None}
