"""The one helper every rapid_pipeline DAG task uses to call a stage and record its lineage.

    report = call_stage(["ingest", "pairs", path, "--domain", "demo", "--partition", "2025-01-01"])
    report = call_stage(["train", "clip", "--domain", "demo", "--preset", "tiny"], gpu=True)

* CPU stages run in-process through ``rapid_pipeline.cli.invoke`` (no interpreter start-up).
* GPU stages run as a child process (``python -m rapid_pipeline --json ...``, or
  ``accelerate launch -m rapid_pipeline ...`` when more than one GPU is visible), so a CUDA crash or
  an out-of-memory kill takes down the child, not the Airflow worker, and the stage resumes from its
  own checkpoints on retry.
* ``RAPID_PARENT_RUN_ID`` (``dag_id/run_id/task_id[map_index]``) is passed to the stage, which
  stores it in ``lineage_runs.parent_run_id`` and its OpenLineage events: Airflow run <-> stage run.
* Every input/output of the stage report is also handed to Airflow's hook-lineage collector, so
  the OpenLineage provider's task events carry the exact ``file://`` datasets (partition folders,
  model run dirs) rather than only the table-level Assets declared as outlets.

Tasks do wiring only: choosing arguments, skipping when there is nothing to do, and turning a
stage report into asset-event ``extra``. This module never runs at import time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from airflow.sdk import get_current_context
from airflow.sdk.exceptions import AirflowSkipException

from rapid_assets import domains, rapid_home

DEFAULT_ARGS = {
    "owner": "rapid_pipeline",
    "retries": 2,
    "retry_delay": 30,  # seconds; doubled per try (exponential backoff) up to max_retry_delay
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": 600,
}
GPU_TASK = {"pool": "gpu", "pool_slots": 1, "queue": "gpu"}
PRESETS = ["tiny", "small", "paper"]


class StageFailed(RuntimeError):
    """A stage child process exited non-zero; the message carries its last stderr line."""


# ---------------------------------------------------------------- context helpers
def parent_run_id(context: Any | None = None) -> str:
    """``dag_id/run_id/task_id[map_index]`` of the running task (``manual`` outside Airflow)."""
    try:
        ctx = context or get_current_context()
    except Exception:  # called outside a task (tests, notebooks)
        return "manual"
    ti = ctx["ti"]
    index = getattr(ti, "map_index", -1)
    suffix = f"[{index}]" if index is not None and index >= 0 else ""
    return f"{ti.dag_id}/{ctx['run_id']}/{ti.task_id}{suffix}"


def chosen_domains(params: dict, triggering: dict | None = None) -> list[str]:
    """Domains to process: the ``domain`` param, else the domains named by triggering asset
    events (``extra["domains"]``), else every configured domain."""
    if params.get("domain"):
        return [params["domain"]]
    named = sorted({d for events in (triggering or {}).values() for e in events
                    for d in ((getattr(e, "extra", None) or {}).get("domains") or [])})
    allowed = domains()
    picked = [d for d in named if d in allowed]
    return picked or allowed


def pair_partitions(domain: str) -> list[str]:
    """The domain's committed ``pairs`` partitions (those with a manifest), oldest first."""
    from rapid_pipeline.core import lake  # imported here: DAG parsing stays light
    from rapid_pipeline.core.home import Home

    return lake.partitions(Home.from_env(rapid_home()), "pairs", domain)


def link_jobs(partitions: dict[str, list[str]], max_tasks: int | None = None) -> list[dict]:
    """One ``{"domain", "partitions"}`` per link task: each domain's partitions in at most `max_tasks`
    (default ``RAPID_LINK_MAX_TASKS``, 64) contiguous, near-equal chunks; a domain without partitions gets
    no task. Why a cap: Airflow refuses more than max_map_length (1024) mapped tasks, however many days landed."""
    max_tasks = max_tasks or int(os.environ.get("RAPID_LINK_MAX_TASKS", "64"))
    jobs = []
    for domain, parts in sorted(partitions.items()):
        n = min(len(parts), max(1, max_tasks))
        bounds = [round(i * len(parts) / n) for i in range(n + 1)] if n else []
        jobs += [{"domain": domain, "partitions": parts[a:b]} for a, b in zip(bounds, bounds[1:])]
    return jobs


def skip(message: str) -> None:
    """Skip the task with a message the UI shows (skipped tasks emit no asset events)."""
    raise AirflowSkipException(message)


# ---------------------------------------------------------------- running a stage
def call_stage(argv: Sequence[str], *, gpu: bool = False, context: Any | None = None) -> dict:
    """Run one ``rapid`` command (argv without ``rapid``) and return its JSON report."""
    argv = [str(a) for a in argv]
    env = {"RAPID_HOME": str(rapid_home()), "RAPID_PARENT_RUN_ID": parent_run_id(context)}
    report = _run_child(argv, env) if gpu else _run_in_process(argv, env)
    record_lineage(report)
    return report


def _run_in_process(argv: list[str], env: dict[str, str]) -> dict:
    from rapid_pipeline.cli import invoke  # imported here: DAG parsing must not import torch

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # run_stage reads RAPID_PARENT_RUN_ID from the environment
    try:
        return invoke(argv, home=env["RAPID_HOME"])
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def visible_gpus() -> int:
    """GPUs this worker may use: CUDA_VISIBLE_DEVICES if set, else ``nvidia-smi -L`` (no torch import)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if not shutil.which("nvidia-smi"):
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def launcher(n_gpus: int) -> list[str]:
    """The command prefix: plain python for 0-1 GPU, ``accelerate launch`` for data parallel."""
    if n_gpus > 1:
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
                "--num_processes", str(n_gpus), "-m", "rapid_pipeline"]
    return [sys.executable, "-m", "rapid_pipeline"]


def _run_child(argv: list[str], env: dict[str, str]) -> dict:
    cmd = launcher(visible_gpus()) + ["--home", env["RAPID_HOME"], "--json", *argv]
    print("running:", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, check=False)
    sys.stderr.write(proc.stderr[-20000:])  # the child's progress and warnings end up in the task log
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        raise StageFailed(f"rapid {' '.join(argv)} failed (exit {proc.returncode}): {last}")
    return parse_report(proc.stdout)


def parse_report(stdout: str) -> dict:
    """The JSON report from a child's stdout. With accelerate every rank may print one; the
    reports are identical in what tasks use, so the first complete object wins."""
    decoder = json.JSONDecoder()
    for start in [i for i, ch in enumerate(stdout) if ch == "{" and (i == 0 or stdout[i - 1] == "\n")]:
        try:
            obj, _ = decoder.raw_decode(stdout[start:])
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            return obj
    raise StageFailed(f"stage printed no JSON report; stdout ended with: {stdout[-300:]!r}")


# ---------------------------------------------------------------- lineage + asset events
class _StageLineage:
    """Stands in for the hook that 'touched' the datasets (the collector keys entries by it)."""


def record_lineage(report: dict) -> None:
    """Hand the stage's file:// inputs/outputs to Airflow's hook-lineage collector (read by the
    OpenLineage provider when the task completes). A no-op when no lineage reader is configured."""
    try:
        from airflow.sdk.lineage import get_hook_lineage_collector

        collector, ctx = get_hook_lineage_collector(), _StageLineage()
        for ref in report.get("inputs") or []:
            if str(ref.get("uri", "")).startswith("file://"):
                collector.add_input_asset(ctx, uri=ref["uri"], asset_extra=_ref_extra(ref))
        for ref in report.get("outputs") or []:
            if str(ref.get("uri", "")).startswith("file://"):
                collector.add_output_asset(ctx, uri=ref["uri"], asset_extra=_ref_extra(ref))
    except Exception as exc:  # lineage must never fail a task that did its work
        print(f"warning: lineage not recorded: {exc}", file=sys.stderr)


def _ref_extra(ref: dict) -> dict:
    return {k: ref[k] for k in ("fingerprint", "rows", "schema") if ref.get(k) is not None}


def summary(report: dict) -> dict:
    """The small, JSON-able part of a stage report that goes into XCom and asset-event extra."""
    keep = ("stage", "domain", "partition", "run_id", "status", "cached_from", "rows_in", "rows_out",
            "rows_quarantined", "rows_duplicate", "seconds", "message")
    out = {k: report.get(k) for k in keep if k in report}
    out["outputs"] = [{"uri": o.get("uri"), "fingerprint": o.get("fingerprint"), "rows": o.get("rows")}
                      for o in report.get("outputs") or []]
    return out


def output_dirs(report: dict, under: str) -> list[str]:
    """Local paths of the report's outputs whose path contains ``/<under>/`` (e.g. ``models/ckclip``)."""
    paths = [str(o.get("uri", "")).removeprefix("file://") for o in report.get("outputs") or []]
    return [p for p in paths if f"/{under}/" in p + "/"]


def latest_run_dir(kind: str, domain: str) -> str | None:
    """The newest run folder under ``models/<kind>/<domain>/`` (by modification time), if any."""
    root = rapid_home() / "models" / kind / domain
    runs = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")] if root.is_dir() else []
    return str(max(runs, key=lambda p: p.stat().st_mtime)) if runs else None


def landing_dir(domain: str, day: str) -> Path:
    return rapid_home() / "landing" / domain / day


def documented(task_fn):
    """The TaskFlow task with its docstring as ``doc_md`` (mapped tasks do not pick it up alone)."""
    import inspect

    return task_fn.override(doc_md=inspect.cleandoc(task_fn.function.__doc__ or ""))
