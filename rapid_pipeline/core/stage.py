"""One stage run: cache check, lock, body, reconcile, lineage. Every stage goes through `run_stage`.

    report = run_stage(home, "ingest_kg", config, inputs=[path, ...], body=fn,
                       domain="demo", partition="2025-01-01")

* **Step cache**: key = sha256(stage, config, input fingerprints, code version). If the last run of
  (stage, domain, partition) had the same key and its outputs still carry the fingerprints it
  recorded, the body is skipped and the report says ``status="cached"`` with ``cached_from``.
* **Lock**: one run per (stage, domain, partition) at a time (``flock``), so two concurrent runs
  of one partition serialise instead of interleaving; the second is then a cache hit.
* **Nothing lost**: when ``rows_in`` is given, ``rows_in == rows_out + rows_quarantined +
  rows_duplicate`` must hold or the run fails.
* **Lineage**: START/COMPLETE/FAIL OpenLineage events and warehouse rows, always.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from . import lineage
from .fingerprint import canonical_json, code_version, fingerprint_obj, fingerprint_path
from .home import Home, check_name
from .warehouse import connect


@dataclass(frozen=True)
class DatasetRef:
    uri: str
    fingerprint: str
    rows: int | None = None
    schema: str | None = None  # table name in schemas/, if it is a table

    @classmethod
    def of(cls, path: str | Path, rows: int | None = None, schema: str | None = None) -> "DatasetRef":
        return cls(lineage.normalize_uri(path), fingerprint_path(path), rows, schema)

    @property
    def path(self) -> Path:
        return Path(self.uri.removeprefix("file://"))


@dataclass
class StageResult:
    """What a stage body returns."""

    outputs: list[DatasetRef]
    rows_in: int | None = None
    rows_out: int | None = None
    rows_quarantined: int = 0
    rows_duplicate: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageReport:
    stage: str
    domain: str
    partition: str
    run_id: str
    status: str
    config: dict[str, Any]
    code_version: str
    cache_key: str
    inputs: list[DatasetRef] = field(default_factory=list)
    outputs: list[DatasetRef] = field(default_factory=list)
    rows_in: int | None = None
    rows_out: int | None = None
    rows_quarantined: int = 0
    rows_duplicate: int = 0
    started_at: dt.datetime | None = None
    ended_at: dt.datetime | None = None
    seconds: float = 0.0
    cached_from: str | None = None
    parent_run_id: str | None = None
    message: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(canonical_json(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StageReport":
        d = dict(d)
        d["inputs"] = [DatasetRef(**x) for x in d.get("inputs", [])]
        d["outputs"] = [DatasetRef(**x) for x in d.get("outputs", [])]
        for k in ("started_at", "ended_at"):
            d[k] = dt.datetime.fromisoformat(d[k]) if d.get(k) else None
        return cls(**d)

    def summary(self) -> str:
        counts = f"in={self.rows_in} out={self.rows_out} quarantined={self.rows_quarantined} duplicates={self.rows_duplicate}"
        if self.status == "cached":
            return f"{self.stage} [{self.domain}/{self.partition}]: cached (inputs, config and code unchanged since run {self.cached_from}); {counts}"
        return f"{self.stage} [{self.domain}/{self.partition}]: {self.status} in {self.seconds:.1f}s; {counts}"


class ReconcileError(RuntimeError):
    pass


def config_dict(config: Any) -> dict[str, Any]:
    return json.loads(canonical_json(config)) if config is not None else {}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def _inputs(inputs: Sequence[str | Path | DatasetRef]) -> list[DatasetRef]:
    return [x if isinstance(x, DatasetRef) else DatasetRef.of(x) for x in inputs]


def _cache_hit(home: Home, stage: str, domain: str, partition: str, key: str) -> StageReport | None:
    with connect(home, write=True) as con:
        row = con.execute("SELECT report_json FROM stage_cache WHERE stage=? AND domain=? AND partition=? AND cache_key=?",
                          [stage, domain, partition, key]).fetchone()
    if row is None:
        return None
    prev = StageReport.from_dict(json.loads(row[0]))
    for out in prev.outputs:
        try:
            if fingerprint_path(out.path) != out.fingerprint:
                return None
        except FileNotFoundError:
            return None
    return prev


def _reconcile(res: StageResult) -> None:
    if res.rows_in is None or res.rows_out is None:
        return
    total = res.rows_out + res.rows_quarantined + res.rows_duplicate
    if total != res.rows_in:
        raise ReconcileError(f"counts do not reconcile: in={res.rows_in} != out {res.rows_out} + quarantined "
                             f"{res.rows_quarantined} + duplicates {res.rows_duplicate} = {total}")


class _PartitionLock:
    def __init__(self, home: Home, stage: str, domain: str, partition: str):
        self.path = home.locks / f"{stage}.{domain}.{partition}.lock"

    def __enter__(self):
        self.f = open(self.path, "a+")
        fcntl.flock(self.f, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        fcntl.flock(self.f, fcntl.LOCK_UN)
        self.f.close()


def _finish(home: Home, report: StageReport, t0: float, state: str) -> None:
    report.ended_at = _now()
    report.seconds = time.perf_counter() - t0
    with connect(home, write=True) as con:
        lineage.record(con, report)
        if report.status == "ok":
            con.execute("INSERT OR REPLACE INTO stage_cache VALUES (?,?,?,?,?,?)",
                        [report.stage, report.domain, report.partition, report.cache_key, report.run_id,
                         json.dumps(report.to_dict(), ensure_ascii=False)])
    lineage.emit(home, report, state)


def run_stage(home: Home, stage: str, config: Any, inputs: Sequence[str | Path | DatasetRef],
              body: Callable[[StageReport], StageResult], domain: str = "all", partition: str = "all",
              force: bool = False) -> StageReport:
    """Run `body` under the step cache, the partition lock and lineage (see module doc)."""
    check_name(domain, "domain"), check_name(partition, "partition")
    refs = _inputs(inputs)
    cfg = config_dict(config)
    key = fingerprint_obj([stage, cfg, [r.fingerprint for r in refs], code_version()])
    report = StageReport(stage, domain, partition, str(uuid.uuid4()), "running", cfg, code_version(), key, refs,
                         started_at=_now(), parent_run_id=os.environ.get("RAPID_PARENT_RUN_ID"))
    t0 = time.perf_counter()
    with _PartitionLock(home, stage, domain, partition):
        prev = None if force else _cache_hit(home, stage, domain, partition, key)
        if prev is not None:
            return _cached(home, report, prev, t0)
        lineage.emit(home, report, "START")
        try:
            res = body(report)
            _reconcile(res)
        except BaseException as exc:
            report.status, report.message = "failed", f"{type(exc).__name__}: {exc}"[:2000]
            _finish(home, report, t0, "FAIL")
            raise
        _apply(report, res)
        _finish(home, report, t0, "COMPLETE")
    return report


def _apply(report: StageReport, res: StageResult) -> None:
    report.status = "ok"
    report.outputs = res.outputs
    report.rows_in, report.rows_out = res.rows_in, res.rows_out
    report.rows_quarantined, report.rows_duplicate = res.rows_quarantined, res.rows_duplicate
    report.extra = res.extra


def _cached(home: Home, report: StageReport, prev: StageReport, t0: float) -> StageReport:
    report.status, report.cached_from = "cached", prev.run_id
    for name in ("outputs", "rows_in", "rows_out", "rows_quarantined", "rows_duplicate", "extra"):
        setattr(report, name, getattr(prev, name))
    report.message = f"cache hit: same inputs, config and code as run {prev.run_id}"
    _finish(home, report, t0, "COMPLETE")
    return report


def replace_config(config: Any, **changes: Any) -> Any:
    return dataclasses.replace(config, **changes)
