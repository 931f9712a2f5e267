"""rapid_evaluate: a new model build -> FID / CLIP score / retrieval -> promotion gate -> compile.

Scheduled on the per-domain model assets ``file://$RAPID_HOME/models/pipeline/<domain>`` (emitted by
``rapid_train``'s ``assemble``). For each triggering event it evaluates the build named in the
event's ``extra["run_dir"]`` (or the ``model`` param, or the domain's newest build)::

    select_builds -> evaluate_gate[build] -> compile_build[build]

* ``evaluate_gate`` runs ``rapid evaluate --model DIR --domain D --gate``: the STAGE compares the
  new build with ``models/pipeline/<domain>/production`` and promotes it or blocks it; this task
  only reports the decision (task log, XCom, and the ``reports`` asset event's extra).
* With the param ``accept_fast_sampler`` (default false) it adds ``--accept-fast-sampler``: the stage
  also evaluates DPM-Solver++ 20 steps on the same split / N / seeds and accepts it iff its Fréchet
  metric is within the margin of the reference protocol (PNDM-50; ``reports/<domain>/<run>/fast_sampler.json``,
  used by ``rapid serve --fast-sampler``). The decision is in the returned dict under ``fast_sampler``
  (``None`` when not asked); a rejected sampler does not fail the task and does not change the gate.
* ``compile_build`` runs ``rapid compile --model DIR`` only for a promoted build (a blocked build is
  *skipped* with the gate's reason, so the UI shows it).
* Both are GPU stages: pool ``gpu``, queue ``gpu``, child process.

Trigger by hand with ``{"domain": "demo", "model": "/abs/models/pipeline/demo/<run>", "samples": 200,
"accept_fast_sampler": true}``.
"""

from __future__ import annotations

import os
import sys

import pendulum
from airflow.sdk import AssetAny, Param, dag, get_current_context, task

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # Airflow does not always put dags/ on sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as c  # noqa: E402
from rapid_assets import COMPILED_MODELS, REPORTS, model_assets  # noqa: E402


def builds_from_events(triggering: dict | None) -> list[dict]:
    """One ``{"domain", "model"}`` per model asset event (the newest event per domain wins)."""
    found: dict[str, str] = {}
    for events in (triggering or {}).values():
        for event in events:
            extra = getattr(event, "extra", None) or {}
            if extra.get("domain") and extra.get("run_dir"):
                found[extra["domain"]] = extra["run_dir"]
    return [{"domain": d, "model": m} for d, m in sorted(found.items())]


@task
def select_builds() -> list[dict]:
    """The builds to evaluate: the ``model`` param, else those named by the triggering model
    asset events, else each configured domain's newest build."""
    ctx = get_current_context()
    params = ctx["params"]
    if params.get("model"):
        return [{"domain": params.get("domain") or c.domains()[0], "model": params["model"]}]
    builds = builds_from_events(ctx.get("triggering_asset_events"))
    if params.get("domain"):
        builds = [b for b in builds if b["domain"] == params["domain"]]
    if not builds:
        doms = [params["domain"]] if params.get("domain") else c.domains()
        builds = [{"domain": d, "model": m} for d in doms if (m := c.latest_run_dir("pipeline", d))]
    if not builds:
        c.skip("no model build to evaluate: no model asset event and no folder under models/pipeline/<domain>/")
    return builds


def _device_args() -> list[str]:
    return ["--device", "cuda"] if c.visible_gpus() > 0 else []


def evaluate_argv(build: dict, params: dict) -> list:
    """The `rapid evaluate` command line of one build under this run's params."""
    fast = ["--accept-fast-sampler"] if params.get("accept_fast_sampler") else []
    return ["evaluate", "--model", build["model"], "--domain", build["domain"], "--samples", params["samples"],
            "--gate", *fast, *_device_args()]


def fast_sampler_summary(report: dict) -> dict | None:
    """The fast-sampler decision for XCom (None when it was not asked for)."""
    fast = report.get("fast_sampler")
    if not fast:
        return None
    keep = ("decision", "reason", "reference", "candidate", "margin")
    return {k: fast.get(k) for k in keep}


@task(outlets=[REPORTS], **c.GPU_TASK)
def evaluate_gate(build: dict) -> dict:
    """Evaluate the build on the domain's test split and run the promotion gate (the stage
    decides: promoted / blocked), plus the fast-sampler acceptance when ``accept_fast_sampler`` is
    set; the decisions go to the log, XCom and the asset event."""
    report = c.call_stage(evaluate_argv(build, get_current_context()["params"]), gpu=True)
    gate = report.get("gate") or {}
    decision = {**build, "decision": gate.get("decision", "unknown"), "reason": gate.get("reason", ""),
                "run_id": report.get("run_id"), "status": report.get("status"), "html": report.get("html"),
                "fast_sampler": fast_sampler_summary(report)}
    print(f"gate for {build['domain']} {build['model']}: {decision['decision']} ({decision['reason']})")
    if decision["fast_sampler"]:
        print(f"fast sampler: {decision['fast_sampler']['decision']} ({decision['fast_sampler']['reason']})")
    get_current_context()["outlet_events"][REPORTS].extra = {"domains": [build["domain"]], **decision}
    return decision


@task(outlets=[COMPILED_MODELS], **c.GPU_TASK)
def compile_build(decision: dict) -> dict:
    """Build the optimized artifact (attention backend + compiler + precision) of a promoted
    build (``rapid compile``); skipped, with the gate's reason, when the build was blocked."""
    if decision.get("decision") != "promoted":
        c.skip(f"not compiling {decision.get('model')}: gate decision {decision.get('decision')!r} ({decision.get('reason')})")
    report = c.call_stage(["compile", "--model", decision["model"]], gpu=True)
    get_current_context()["outlet_events"][COMPILED_MODELS].extra = {"domains": [decision["domain"]], **c.summary(report)}
    return c.summary(report)


@dag(
    dag_id="rapid_evaluate",
    schedule=AssetAny(*model_assets()),
    start_date=pendulum.datetime(2025, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=c.DEFAULT_ARGS,
    tags=["rapid", "evaluate", "gpu"],
    params={"domain": Param("", type="string", description="evaluate only this domain (empty = from the asset events / all)"),
            "model": Param("", type="string", description="pipeline folder to evaluate (empty = from the asset event / newest)"),
            "samples": Param(1000, type="integer", minimum=1, description="images per side for FID / CLIP score"),
            "accept_fast_sampler": Param(False, type="boolean",
                                         description="also evaluate DPM-Solver++ 20 steps and accept it iff its Fréchet metric (fid or frechet_ckclip) is within the margin of PNDM-50 (rapid serve --fast-sampler uses it)")},
    doc_md=__doc__,
)
def rapid_evaluate():
    decisions = c.documented(evaluate_gate).expand(build=c.documented(select_builds)())
    c.documented(compile_build).expand(decision=decisions)


rapid_evaluate_dag = rapid_evaluate()
