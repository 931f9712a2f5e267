"""Lineage: every stage run is recorded twice, in the warehouse and as OpenLineage events.

* Warehouse: ``lineage_runs`` (one row per run) and ``lineage_io`` (inputs/outputs with URI,
  fingerprint, rows, schema). `upstream()` walks it backwards for ``rapid lineage``.
* OpenLineage (spec 2-0-2 RunEvents, START then COMPLETE/FAIL): the transport comes from the
  standard openlineage-python configuration (``OPENLINEAGE_CONFIG``, ``OPENLINEAGE_URL``,
  ``OPENLINEAGE__TRANSPORT__*``); with none set, events append to
  ``$RAPID_HOME/lineage/openlineage.jsonl`` (file transport). ``RAPID_OPENLINEAGE=off`` disables.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .home import Home

if TYPE_CHECKING:
    from .stage import DatasetRef, StageReport

NAMESPACE = os.environ.get("RAPID_OPENLINEAGE_NAMESPACE", "rapid_pipeline")
PRODUCER = "https://github.com/rapid-pipeline/rapid_pipeline"


def _client(home: Home):
    from openlineage.client import OpenLineageClient
    from openlineage.client.transport.file import FileConfig, FileTransport

    configured = os.environ.get("OPENLINEAGE_CONFIG") or os.environ.get("OPENLINEAGE_URL") or any(
        k.startswith("OPENLINEAGE__TRANSPORT") for k in os.environ
    )
    if configured:
        return OpenLineageClient()
    path = home.lineage / "openlineage.jsonl"
    return OpenLineageClient(transport=FileTransport(FileConfig(log_file_path=str(path), append=True)))


def _dataset(ref: "DatasetRef", output: bool):
    from openlineage.client.event_v2 import InputDataset, OutputDataset
    from openlineage.client.facet_v2 import output_statistics_output_dataset, schema_dataset

    facets: dict[str, Any] = {}
    if ref.schema:
        from .schemas import table_schema

        try:
            fields = [schema_dataset.SchemaDatasetFacetFields(name=f.name, type=str(f.type)) for f in table_schema(ref.schema)]
            facets["schema"] = schema_dataset.SchemaDatasetFacet(fields=fields)
        except Exception:  # a schema-less artifact (model folder) still gets its event
            pass
    name = ref.uri.removeprefix("file://")
    if output:
        out_facets = {}
        if ref.rows is not None:
            out_facets["outputStatistics"] = output_statistics_output_dataset.OutputStatisticsOutputDatasetFacet(rowCount=ref.rows)
        return OutputDataset(namespace="file", name=name, facets=facets, outputFacets=out_facets)
    return InputDataset(namespace="file", name=name, facets=facets)


def emit(home: Home, report: "StageReport", state: str) -> None:
    """Emit one OpenLineage RunEvent; lineage never fails the stage (a broken backend is logged)."""
    if os.environ.get("RAPID_OPENLINEAGE", "on").lower() in {"off", "0", "false"}:
        return
    try:
        from openlineage.client.event_v2 import Job, Run, RunEvent, RunState

        event = RunEvent(
            eventType=getattr(RunState, state),
            eventTime=dt.datetime.now(dt.timezone.utc).isoformat(),
            run=Run(runId=report.run_id),
            job=Job(namespace=NAMESPACE, name=f"{report.stage}.{report.domain}"),
            producer=PRODUCER,
            inputs=[_dataset(r, False) for r in report.inputs],
            outputs=[_dataset(r, True) for r in report.outputs] if state != "START" else [],
        )
        _client(home).emit(event)
    except Exception as exc:  # pragma: no cover - depends on the configured backend
        import logging

        logging.getLogger(__name__).warning("OpenLineage emit failed: %s", exc)


def record(con, report: "StageReport") -> None:
    """Insert (or replace) the run row and its io rows in the warehouse."""
    r = report
    con.execute("DELETE FROM lineage_runs WHERE run_id = ?", [r.run_id])
    con.execute("DELETE FROM lineage_io WHERE run_id = ?", [r.run_id])
    con.execute(
        "INSERT INTO lineage_runs VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        [r.run_id, r.stage, r.domain, r.partition, r.status, r.cache_key, r.cached_from,
         json.dumps(r.config, ensure_ascii=False, default=str), r.code_version, r.started_at, r.ended_at,
         r.seconds, r.rows_in, r.rows_out, r.rows_quarantined, r.rows_duplicate, r.parent_run_id,
         r.message, json.dumps(r.extra, ensure_ascii=False, default=str)],
    )
    rows = [[r.run_id, d, x.uri, x.fingerprint, x.rows, x.schema] for d, xs in (("input", r.inputs), ("output", r.outputs)) for x in xs]
    if rows:
        con.executemany("INSERT INTO lineage_io VALUES (?,?,?,?,?,?)", rows)


def normalize_uri(path_or_uri: str | Path) -> str:
    text = str(path_or_uri)
    if "://" in text:
        return text
    return "file://" + str(Path(text).resolve())


def upstream(con, target: str, depth: int = 20) -> list[dict]:
    """Runs that produced `target` (a URI, path, or lake table name) and, recursively, their inputs."""
    seen, frontier, out = set(), [target], []
    for _ in range(depth):
        nxt = []
        for uri in frontier:
            like = f"%/lake/{uri}/%" if "/" not in uri and "://" not in uri else normalize_uri(uri) + "%"
            rows = con.execute(
                "SELECT DISTINCT r.run_id, r.stage, r.domain, r.partition, r.status, r.ended_at, r.code_version "
                "FROM lineage_io o JOIN lineage_runs r USING (run_id) WHERE o.direction = 'output' AND o.uri LIKE ? "
                "ORDER BY r.ended_at DESC", [like]).fetchall()
            for run in rows:
                if run[0] in seen:
                    continue
                seen.add(run[0])
                inputs = con.execute("SELECT uri, fingerprint, rows FROM lineage_io WHERE run_id = ? AND direction = 'input'", [run[0]]).fetchall()
                out.append({"run_id": run[0], "stage": run[1], "domain": run[2], "partition": run[3], "status": run[4],
                            "ended_at": str(run[5]), "code_version": run[6], "output_like": like,
                            "inputs": [{"uri": u, "fingerprint": f, "rows": n} for u, f, n in inputs]})
                nxt += [u for u, _, _ in inputs]
        frontier = nxt
        if not frontier:
            break
    return out
