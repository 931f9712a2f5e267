"""rapid_ingest under `dag.test()` on generated landing data (real ingest stages, real Airflow).

One child process (fresh AIRFLOW_HOME, migrated SQLite) runs, in order: day 1, day 1 again, day 2,
a day without landing data; then the test checks the lake and the OpenLineage file.

    .venv/bin/python -m pytest tests/dags/test_dag_ingest.py -q
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("airflow")

from _harness import airflow_env, migrate, run_airflow_script  # noqa: E402

SCRIPT = r'''
import json, os, sys
import pendulum
from rapid_pipeline.cli import invoke
from rapid_pipeline.core import lake
from rapid_pipeline.core.home import Home

home = Home.from_env(os.environ["RAPID_HOME"])
# Two daily drops from one call: drop i draws different pairs (the same seed per call would repeat them).
invoke(["demo-data", "--out", str(home.landing / "demo"), "--start", "2025-01-01", "--days", "2", "--pairs", "10", "--seed", "0"])
from rapid_ingest import rapid_ingest_dag as dag

def run(day):
    r = dag.test(logical_date=pendulum.parse(day))
    return {"state": str(r.state), "tasks": sorted([t.task_id, str(t.state)] for t in r.get_task_instances())}

def snapshot():
    out = {}
    for table in ("pairs", "kg_triples", "quarantine"):
        for part in lake.partitions(home, table, "demo"):
            t = lake.read_partition(home, table, "demo", part)
            out[f"{table}/{part}"] = {"rows": t.num_rows,
                                      "ids": sorted(t.column("pair_id").to_pylist()) if table == "pairs" else []}
    return out

res = {"day1": run("2025-01-01")}
res["after_day1"] = snapshot()
res["day1_again"] = run("2025-01-01")
res["after_day1_again"] = snapshot()
res["day2"] = run("2025-01-02")
res["after_day2"] = snapshot()
res["missing_day"] = run("2025-01-07")
res["expected"] = {d: json.load(open(home.landing / "demo" / d / "expected.json")) for d in ("2025-01-01", "2025-01-02")}
print("RESULT " + json.dumps(res))
'''


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ingest_dag")
    lineage = tmp / "openlineage.jsonl"
    env = airflow_env(tmp, tmp / "rapid_home", AIRFLOW__OPENLINEAGE__DISABLED="False",
                      AIRFLOW__OPENLINEAGE__TRANSPORT=json.dumps({"type": "file", "log_file_path": str(lineage), "append": True}),
                      AIRFLOW__OPENLINEAGE__EXECUTE_IN_THREAD="True")
    migrate(env)
    return run_airflow_script(SCRIPT, env, timeout=400), lineage


def test_day_partition_has_the_expected_counts(result):
    res = result[0]
    assert res["day1"]["state"] == "success"
    assert ["ingest_pairs", "success"] in res["day1"]["tasks"] and ["ingest_kg", "success"] in res["day1"]["tasks"]
    exp = res["expected"]["2025-01-01"]
    snap = res["after_day1"]
    assert snap["pairs/2025-01-01"]["rows"] == exp["accepted"]
    assert len(set(snap["pairs/2025-01-01"]["ids"])) == exp["accepted"]
    assert snap["kg_triples/2025-01-01"]["rows"] == exp["kg"]["triples"]  # .tsv and .nt hold the same facts


def test_same_day_again_replaces_the_partition_without_duplicates(result):
    res = result[0]
    assert res["day1_again"]["state"] == "success"
    assert res["after_day1_again"] == res["after_day1"]


def test_second_day_is_its_own_partition(result):
    res = result[0]
    assert res["day2"]["state"] == "success"
    snap = res["after_day2"]
    assert snap["pairs/2025-01-01"] == res["after_day1"]["pairs/2025-01-01"]  # day 1 untouched
    day2 = snap["pairs/2025-01-02"]
    assert 0 < day2["rows"] <= res["expected"]["2025-01-02"]["accepted"]
    assert not set(day2["ids"]) & set(snap["pairs/2025-01-01"]["ids"])  # a pair lives in one partition


def test_day_without_landing_folder_is_skipped_not_failed(result):
    res = result[0]["missing_day"]
    assert res["state"] == "success"
    assert ["ingest_kg", "skipped"] in res["tasks"] and ["ingest_pairs", "skipped"] in res["tasks"]


def test_openlineage_task_events_carry_the_lake_datasets(result):
    lineage = result[1]
    events = [json.loads(line) for line in lineage.read_text().splitlines() if line.strip()]
    complete = [e for e in events if e["eventType"] == "COMPLETE" and e["job"]["name"].endswith("ingest_pairs")]
    assert complete, f"no COMPLETE event for ingest_pairs among {len(events)} events"
    outputs = {o["name"] for e in complete for o in e.get("outputs", [])}
    assert any("/lake/pairs/domain=demo/part=2025-01-01" in name for name in outputs), outputs
    assert all(o["namespace"].startswith("file") for e in complete for o in e.get("outputs", []))
    parents = [e["run"]["facets"].get("parent") for e in complete]
    assert all(p and p["job"]["name"] == "rapid_ingest" for p in parents)
