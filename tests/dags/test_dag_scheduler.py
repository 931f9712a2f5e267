"""Against a REAL scheduler: asset events start the downstream DAGs (issue 5 part 6).

Starts ``airflow api-server`` (random loopback port), ``airflow scheduler``, ``airflow dag-processor``
and ``airflow triggerer`` on a temporary SQLite AIRFLOW_HOME with the LocalExecutor, then

* posts a model asset event (``POST /api/v2/assets/events``, as ``rapid_train``'s ``assemble``
  would emit) and waits for an asset-triggered ``rapid_evaluate`` run that consumed it;
* touches ``landing/demo/_READY`` and waits for the landing AssetWatcher (FileDeleteTrigger in the
  triggerer) to start an asset-triggered ``rapid_ingest`` run and delete the flag;
* creates a real backfill of ``rapid_ingest`` over three days (two with landing data, one without)
  through ``POST /api/v2/backfills``, waits for it to complete, checks each landed day's partition
  holds exactly its accepted pairs, then backfills the same days again with
  ``reprocess_behavior=completed`` and checks the lake did not change (no duplicates).

Every wait is bounded (5 min in all); every process started here is killed at the end.

    .venv/bin/python -m pytest tests/dags/test_dag_scheduler.py -q -m slow
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest

pytest.importorskip("airflow")
httpx = pytest.importorskip("httpx")

from _harness import PY, airflow_env, migrate  # noqa: E402

DEADLINE_S = 300
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """The Airflow processes of one test module and a REST client for them."""

    def __init__(self, tmp: Path):
        self.port = _free_port()
        self.home = (tmp / "rapid_home").resolve()
        self.env = airflow_env(tmp, self.home, domains="demo", **{
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": "2",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{self.port}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
        })
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.procs: list[subprocess.Popen] = []
        self.deadline = time.monotonic() + DEADLINE_S
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}/api/v2", timeout=10)

    def start(self) -> None:
        migrate(self.env)
        (self.home / "landing" / "demo").mkdir(parents=True, exist_ok=True)
        for name in (["api-server", "--port", str(self.port)], ["dag-processor"], ["scheduler"], ["triggerer"]):
            log = open(self.logs / f"{name[0]}.log", "w")
            self.procs.append(subprocess.Popen([PY, "-m", "airflow", *name], env=self.env, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True))

    def stop(self) -> None:
        self.client.close()
        for p in self.procs:  # only the process groups started above
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=5)

    def wait_for(self, what: str, probe, every: float = 1.0):
        """Call probe() until it returns something truthy, or fail at the shared deadline."""
        while time.monotonic() < self.deadline:
            dead = [p.args[3] for p in self.procs if p.poll() is not None]
            assert not dead, f"airflow {dead} exited early; logs in {self.logs}: {self.tail()}"
            try:
                got = probe()
            except httpx.HTTPError:
                got = None
            if got:
                return got
            time.sleep(every)
        pytest.fail(f"timed out after {DEADLINE_S}s waiting for {what}; logs: {self.tail()}")

    def tail(self) -> str:
        return "\n".join(f"--- {f.name}\n" + f.read_text(errors="replace")[-1500:] for f in sorted(self.logs.iterdir()))

    def get(self, path: str, **params) -> dict:
        for _ in range(10):  # SQLite: a read can hit "database is locked" (5xx) while the scheduler writes
            r = self.client.get(path, params=params)
            if r.status_code < 500:
                break
            time.sleep(1)
        r.raise_for_status()
        return r.json()

    def asset_id(self, uri: str) -> int | None:
        found = [a for a in self.get("/assets", uri_pattern=uri, limit=100)["assets"] if a["uri"] == uri]
        return found[0]["id"] if found else None

    def asset_runs(self, dag_id: str) -> list[dict]:
        runs = self.get(f"/dags/{dag_id}/dagRuns", limit=50)["dag_runs"]
        return [r for r in runs if r["run_type"] == "asset_triggered"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("scheduler"))
    try:
        c.start()
        c.wait_for("the api-server", lambda: c.client.get("/monitor/health").status_code == 200)
        c.wait_for("rapid_evaluate to be parsed", lambda: c.get("/dags/rapid_evaluate").get("dag_id"))
        yield c
    finally:
        c.stop()


def test_a_model_asset_event_starts_rapid_evaluate(cluster):
    uri = f"file://{cluster.home}/models/pipeline/demo"
    asset_id = cluster.wait_for(f"asset {uri}", lambda: cluster.asset_id(uri))
    assert cluster.asset_runs("rapid_evaluate") == []
    extra = {"domain": "demo", "domains": ["demo"], "run_dir": f"{cluster.home}/models/pipeline/demo/run-under-test"}
    cluster.wait_for("the asset event to be accepted",
                     lambda: _accepted(cluster.client.post("/assets/events", json={"asset_id": asset_id, "extra": extra})))
    runs = cluster.wait_for("an asset-triggered rapid_evaluate run", lambda: cluster.asset_runs("rapid_evaluate"))
    assert len(runs) == 1
    run_id = quote(runs[0]["dag_run_id"], safe="")
    # Retried: under load the SQLite-backed api-server can answer 500 while the scheduler holds the lock.
    events = cluster.wait_for("the run's upstream asset events",
                              lambda: cluster.get(f"/dags/rapid_evaluate/dagRuns/{run_id}/upstreamAssetEvents")["asset_events"])
    assert [e["extra"].get("run_dir") for e in events] == [extra["run_dir"]]


def test_a_ready_flag_in_landing_starts_rapid_ingest(cluster):
    flag = cluster.home / "landing" / "demo" / "_READY"
    before = len(cluster.asset_runs("rapid_ingest"))
    flag.touch()
    runs = cluster.wait_for("the landing watcher to start rapid_ingest",
                            lambda: len(cluster.asset_runs("rapid_ingest")) > before and cluster.asset_runs("rapid_ingest"))
    assert runs
    assert not flag.exists(), "the FileDeleteTrigger consumes the flag, so one drop starts one run"


def _lake_pairs(home: Path) -> dict[str, list[str]]:
    from rapid_pipeline.core import lake
    from rapid_pipeline.core.home import Home

    h = Home.from_env(str(home))
    return {part: sorted(lake.read_partition(h, "pairs", "demo", part).column("pair_id").to_pylist())
            for part in lake.partitions(h, "pairs", "demo")}


def _accepted(r: httpx.Response) -> httpx.Response | None:
    """The response, or None to ask again on a 5xx: under concurrent scheduler writes SQLite answers
    "database is locked", which the api-server reports as 503 or as a hidden 500 "Database error"."""
    if r.status_code >= 500:
        return None
    assert r.status_code == 200, r.text
    return r


def _create_backfill(cluster, body: dict) -> int | None:
    """The new backfill's id, or None to ask again. On SQLite the api-server may answer 5xx ("database is
    locked") to a POST that did commit; the retry then gets 409, and the backfill it names is ours."""
    r = cluster.client.post("/backfills", json=body)
    if r.status_code == 409 and "already a running backfill" in r.text:
        running = [b for b in cluster.get("/backfills", dag_id=body["dag_id"])["backfills"] if not b.get("completed_at")]
        return running[0]["id"] if running else None
    accepted = _accepted(r)
    return accepted.json()["id"] if accepted else None


def _backfill(cluster, reprocess: str) -> list[dict]:
    body = {"dag_id": "rapid_ingest", "from_date": "2025-01-01T00:00:00Z", "to_date": "2025-01-03T00:00:00Z",
            "reprocess_behavior": reprocess, "max_active_runs": 2}
    backfill_id = cluster.wait_for("the backfill to be accepted", lambda: _create_backfill(cluster, body), every=2)
    cluster.wait_for(f"backfill {backfill_id} to complete",
                     lambda: cluster.get(f"/backfills/{backfill_id}").get("completed_at"), every=2)
    runs = [x for x in cluster.get("/dags/rapid_ingest/dagRuns", limit=50, run_type="backfill")["dag_runs"]]
    return sorted(runs, key=lambda x: x["logical_date"])


def test_a_real_backfill_reingests_exactly_those_days_without_duplicates(cluster):
    import json

    from rapid_pipeline.cli import invoke

    landing = cluster.home / "landing" / "demo"
    invoke(["demo-data", "--out", str(landing), "--start", "2025-01-01", "--days", "2", "--pairs", "8"], home=cluster.home)
    # Only rapid_ingest is under test: keep its asset events from starting prepare/train on 2 cores, and the
    # rapid_evaluate run of the first test (a build that does not exist, retried with backoff) from holding
    # the executor's two slots.
    for dag_id in ("rapid_prepare", "rapid_evaluate"):
        cluster.wait_for(f"{dag_id} to pause",
                         lambda: _accepted(cluster.client.patch(f"/dags/{dag_id}", json={"is_paused": True})))
    runs = _backfill(cluster, "none")
    assert [(x["logical_date"][:10], x["state"]) for x in runs] == [
        ("2025-01-01", "success"), ("2025-01-02", "success"), ("2025-01-03", "success")], runs
    first = _lake_pairs(cluster.home)
    for day in ("2025-01-01", "2025-01-02"):
        expected = json.loads((landing / day / "expected.json").read_text())["accepted"]
        assert len(first[day]) == len(set(first[day])) == expected
    assert "2025-01-03" not in first  # no landing data that day: skipped, nothing written
    assert not set(first["2025-01-01"]) & set(first["2025-01-02"])
    _backfill(cluster, "completed")  # the same days again
    assert _lake_pairs(cluster.home) == first
