"""DAG integrity: every DAG file imports, and every DAG / task follows the house rules.

    .venv/bin/python -m pytest tests/dags/test_dag_integrity.py -q
"""

from __future__ import annotations

import pytest

pytest.importorskip("airflow")

from _harness import airflow_env, run_airflow_script  # noqa: E402

EXPECTED = {"rapid_ingest", "rapid_prepare", "rapid_train", "rapid_evaluate"}
GPU_TASKS = {"rapid_train": {"train_domain.train_clip", "train_domain.train_vae", "train_domain.train_diffusion",
                             "train_domain.train_sr"},
             "rapid_evaluate": {"evaluate_gate", "compile_build"}}

BAG_SCRIPT = r'''
import json, os
from airflow.dag_processing.dagbag import DagBag
from airflow.serialization.encoders import coerce_to_core_timetable
def uris(cond):
    if hasattr(cond, "objects"):
        return [u for o in cond.objects for u in uris(o)]
    return [cond.uri] if hasattr(cond, "uri") else []
bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"])
out = {"errors": {k: v[-500:] for k, v in bag.import_errors.items()}, "dags": {}}
for dag_id, dag in bag.dags.items():
    tt = dag.timetable
    out["dags"][dag_id] = {
        "tags": sorted(dag.tags), "catchup": dag.catchup, "doc": bool(dag.doc_md),
        "params": sorted(dag.params.keys()),
        "timetable": type(tt).__name__,
        "inner_timetable": type(getattr(tt, "timetable", None)).__name__,
        "periodic": bool(coerce_to_core_timetable(tt).periodic),  # what `airflow backfill create` checks
        "schedule_uris": sorted(uris(tt.asset_condition)) if hasattr(tt, "asset_condition") else [],
        "tasks": {t.task_id: {"owner": t.owner, "retries": t.retries, "pool": t.pool, "queue": t.queue,
                              "pool_slots": t.pool_slots, "doc": bool(t.doc_md),
                              "backoff": bool(t.retry_exponential_backoff),
                              "outlets": sorted(getattr(o, "uri", None) or getattr(o, "name", "") for o in t.outlets)}
                  for t in dag.tasks},
    }
print("RESULT " + json.dumps(out))
'''


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bag")
    env = airflow_env(tmp, tmp / "rapid_home", domains="demo,food")
    return run_airflow_script(BAG_SCRIPT, env, timeout=120), tmp / "rapid_home"


def test_no_import_errors_and_all_dags_present(bag):
    result, _ = bag
    assert result["errors"] == {}
    assert set(result["dags"]) == EXPECTED


def test_every_dag_has_tags_owner_retries_docs(bag):
    for dag_id, dag in bag[0]["dags"].items():
        assert "rapid" in dag["tags"], dag_id
        assert dag["doc"] and dag["catchup"] is False, dag_id
        for task_id, t in dag["tasks"].items():
            assert t["owner"] == "rapid_pipeline", (dag_id, task_id)
            assert t["retries"] >= 1 and t["backoff"], (dag_id, task_id)
            assert t["doc"], f"{dag_id}.{task_id} has no doc_md"


def test_gpu_tasks_use_gpu_pool_and_queue_and_cpu_tasks_do_not(bag):
    for dag_id, dag in bag[0]["dags"].items():
        for task_id, t in dag["tasks"].items():
            is_gpu = task_id in GPU_TASKS.get(dag_id, set())
            assert (t["pool"] == "gpu") == is_gpu, (dag_id, task_id, t["pool"])
            assert (t["queue"] == "gpu") == is_gpu, (dag_id, task_id, t["queue"])
            if is_gpu:
                assert t["pool_slots"] == 1


def test_schedules_chain_the_assets(bag):
    dags, home = bag[0]["dags"], bag[1].resolve()
    ingest = dags["rapid_ingest"]
    assert ingest["timetable"] == "AssetOrTimeSchedule" and ingest["periodic"], "backfill needs a periodic timetable"
    assert ingest["inner_timetable"] == "CronDataIntervalTimetable"
    assert ingest["schedule_uris"] == [f"file://{home}/landing/demo", f"file://{home}/landing/food"]
    produced = {uri for t in ingest["tasks"].values() for uri in t["outlets"]}
    assert set(dags["rapid_prepare"]["schedule_uris"]) <= produced
    assert dags["rapid_prepare"]["schedule_uris"] == [f"file://{home}/lake/kg_triples", f"file://{home}/lake/pairs"]
    shard_out = dags["rapid_prepare"]["tasks"]["shard"]["outlets"]
    assert dags["rapid_train"]["schedule_uris"] == shard_out == [f"file://{home}/shards"]
    assert dags["rapid_evaluate"]["schedule_uris"] == [f"file://{home}/models/pipeline/demo", f"file://{home}/models/pipeline/food"]
    assert dags["rapid_train"]["tasks"]["train_domain.assemble"]["outlets"] == ["rapid_pipeline_models"]


def test_params_let_a_user_pick_preset_and_domain(bag):
    dags = bag[0]["dags"]
    assert {"preset", "domain"} <= set(dags["rapid_prepare"]["params"])
    assert {"preset", "domain"} <= set(dags["rapid_train"]["params"])
    assert {"domain", "model", "samples", "accept_fast_sampler"} <= set(dags["rapid_evaluate"]["params"])
    assert {"date", "domain"} <= set(dags["rapid_ingest"]["params"])


def test_bad_domain_name_is_an_import_error(tmp_path):
    env = airflow_env(tmp_path, tmp_path / "rh", domains="demo,../etc")
    result = run_airflow_script(BAG_SCRIPT, env, timeout=120)
    assert result["errors"], "an invalid RAPID_DOMAINS entry must not parse silently"
    assert any("RAPID_DOMAINS" in e for e in result["errors"].values())
