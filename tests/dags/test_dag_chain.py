"""The asset chain ingest -> prepare -> train -> evaluate, each DAG's `dag.test()` in order.

`dag.test()` records asset events but does not start downstream DAGs (that is
test_dag_scheduler.py's job), so the test runs each DAG itself and feeds the next one what
the asset event would carry.

* `test_chain_wiring`: stages replaced by a recorder (fast): checks which commands each task runs,
  with which arguments, and that run dirs flow clip + vae -> diffusion -> assemble -> evaluate -> compile,
  that a blocked gate skips compile, and that a failing GPU child fails its task and its downstream.

    .venv/bin/python -m pytest tests/dags/test_dag_chain.py -q
"""

from __future__ import annotations

import pytest

pytest.importorskip("airflow")

from _harness import airflow_env, migrate, run_airflow_script  # noqa: E402

FAKE_CHAIN = r'''
import json, os
import pathlib
import pendulum
import _common
HOME = os.environ["RAPID_HOME"]
CALLS = []
# committed pairs partitions (a manifest is what makes one): demo has three days, food one
for d, day in [("demo", "2025-01-01"), ("demo", "2025-01-02"), ("demo", "2025-01-03"), ("food", "2025-01-02")]:
    part = pathlib.Path(HOME, "lake", "pairs", f"domain={d}", f"part={day}")
    part.mkdir(parents=True)
    (part / "_manifest.json").write_text("{}")
os.environ["RAPID_LINK_MAX_TASKS"] = "2"
GATE = {"decision": "promoted"}
OUT = {("train", "clip"): "models/ckclip/{d}/clip-1", ("train", "vae"): "models/vae/{d}/vae-1",
       ("train", "diffusion"): "models/pipeline/{d}/diff-1",
       ("train", "sr"): "models/esrgan/{d}/sr-1", ("pipeline", "assemble"): "models/pipeline/{d}/asm-1",
       ("kg", "transe"): "models/transe/{d}/te-1", ("shard",): "shards/{d}", ("link",): "lake/links/domain={d}",
       ("compile",): "models/compiled/x"}

def fake(argv, env, gpu):
    CALLS.append({"argv": [str(a) for a in argv], "gpu": gpu, "parent": env["RAPID_PARENT_RUN_ID"]})
    d = argv[argv.index("--domain") + 1] if "--domain" in argv else "demo"
    key = tuple(argv[:2]) if tuple(argv[:2]) in OUT else tuple(argv[:1])
    outs = [{"uri": f"file://{HOME}/" + OUT[key].format(d=d), "fingerprint": "fp-" + "-".join(key)}] if key in OUT else []
    rep = {"stage": "-".join(key), "domain": d, "status": "ok", "run_id": "run-" + "-".join(key), "outputs": outs,
           "inputs": [{"uri": f"file://{HOME}/shards/{d}/manifest.json", "fingerprint": "fp-shards"}], "config": {"k": 1}}
    if argv[0] == "evaluate":
        rep["gate"] = dict(GATE, reason="test gate")
    return rep

_common._run_in_process = lambda argv, env: fake(argv, env, False)
_common._run_child = lambda argv, env: fake(argv, env, True)

from rapid_prepare import rapid_prepare_dag
from rapid_train import rapid_train_dag
from rapid_evaluate import rapid_evaluate_dag

def states(run):
    return sorted([t.task_id, t.map_index, str(t.state)] for t in run.get_task_instances())

def xcom(run, task_id, map_index=0):
    return [t for t in run.get_task_instances() if t.task_id == task_id and t.map_index == map_index][0].xcom_pull(task_ids=task_id, map_indexes=map_index)

res = {}
r = rapid_prepare_dag.test(run_conf={"preset": "small"})
res["prepare"] = {"state": str(r.state), "tasks": states(r)}
r = rapid_train_dag.test(run_conf={"preset": "small"})
res["train"] = {"state": str(r.state), "tasks": states(r), "assembled": xcom(r, "train_domain.assemble")}
model = res["train"]["assembled"]["run_dir"]
r = rapid_evaluate_dag.test(run_conf={"model": model, "domain": "demo", "samples": 8})
res["evaluate"] = {"state": str(r.state), "tasks": states(r)}
GATE["decision"] = "blocked"
r = rapid_evaluate_dag.test(run_conf={"model": model, "domain": "demo", "samples": 8})
res["evaluate_blocked"] = {"state": str(r.state), "tasks": states(r)}
res["calls"] = CALLS

def boom(argv, env):
    raise _common.StageFailed("rapid train sr failed (exit 1): CUDA error: out of memory")
_common._run_child = boom
for t in rapid_train_dag.tasks:
    t.retries = 0  # the retry path (30 s backoff) is Airflow's; here only the failure matters
r = rapid_train_dag.test(run_conf={"preset": "tiny"})
res["train_failing"] = {"state": str(r.state), "tasks": states(r)}
print("RESULT " + json.dumps(res, default=str))
'''


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chain")
    env = airflow_env(tmp, tmp / "rapid_home", domains="demo,food")
    migrate(env)
    return run_airflow_script(FAKE_CHAIN, env, timeout=400), (tmp / "rapid_home").resolve()


def _argvs(calls, *head):
    return [c["argv"] for c in calls if c["argv"][:len(head)] == list(head)]


def test_prepare_maps_link_over_partitions_and_the_rest_over_domains(chain):
    res, _ = chain
    assert res["prepare"]["state"] == "success"
    expected = {"link": [0, 1, 2], "transe": [0, 1], "shard": [0, 1], "coverage": [0, 1]}
    for step, indexes in expected.items():
        done = [t for t in res["prepare"]["tasks"] if t[0] == step]
        assert [t[1] for t in done] == indexes and all(t[2] == "success" for t in done), (step, done)
    calls = res["calls"]
    # RAPID_LINK_MAX_TASKS=2: demo's three days in two contiguous chunks, food's one day in one task
    linked = sorted((a[a.index("--domain") + 1], [a[i + 1] for i, x in enumerate(a) if x == "--partition"])
                    for a in _argvs(calls, "link"))
    assert linked == [("demo", ["2025-01-01", "2025-01-02"]), ("demo", ["2025-01-03"]), ("food", ["2025-01-02"])]
    assert sorted(a[a.index("--domain") + 1] for a in _argvs(calls, "kg", "transe")) == ["demo", "food"]
    assert all(a[-2:] == ["--preset", "small"] for a in _argvs(calls, "kg", "transe") + _argvs(calls, "shard"))
    assert not any(c["gpu"] for c in calls if c["argv"][0] in ("link", "kg", "shard", "coverage"))


def test_train_passes_run_dirs_and_records_the_model_asset_extra(chain):
    res, home = chain
    assert res["train"]["state"] == "success"
    calls = res["calls"]
    assert all(c["gpu"] for c in calls if c["argv"][0] == "train")
    diff = [a for a in _argvs(calls, "train", "diffusion") if "demo" in a][0]
    assert diff[diff.index("--clip") + 1] == f"{home}/models/ckclip/demo/clip-1"  # clip -> diffusion, same domain
    assert diff[diff.index("--vae") + 1] == f"{home}/models/vae/demo/vae-1"  # vae -> diffusion, same domain
    vae = [a for a in _argvs(calls, "train", "vae") if "demo" in a]
    assert vae == [["train", "vae", "--domain", "demo", "--preset", "small"]]
    asm = [a for a in _argvs(calls, "pipeline", "assemble") if "demo" in a][0]
    assert asm[asm.index("--pipeline") + 1] == f"{home}/models/pipeline/demo/diff-1"
    assert asm[asm.index("--sr") + 1] == f"{home}/models/esrgan/demo/sr-1"
    extra = res["train"]["assembled"]
    assert extra["run_dir"] == f"{home}/models/pipeline/demo/asm-1" and extra["domain"] == "demo"
    assert set(extra["parts"]) == {"ckclip", "vae", "diffusion", "esrgan"}
    assert extra["parts"]["vae"]["run_dir"] == f"{home}/models/vae/demo/vae-1"
    assert extra["trained_on"][f"file://{home}/shards/demo/manifest.json"] == "fp-shards"
    parents = {c["parent"] for c in calls if c["argv"][:2] == ["train", "clip"]}
    assert all(p.startswith("rapid_train/") and "train_domain.train_clip[" in p for p in parents), parents


def test_vae_is_trained_before_diffusion_in_every_domain(chain):
    res, _ = chain
    train = [c["argv"] for c in res["calls"] if c["argv"][0] in ("train", "pipeline")]
    for d in ("demo", "food"):
        order = [a[1] for a in train if a[a.index("--domain") + 1] == d]
        assert sorted(order) == ["assemble", "clip", "diffusion", "sr", "vae"], order  # each stage once
        assert order.index("vae") < order.index("diffusion") and order.index("clip") < order.index("diffusion")
        assert order.index("diffusion") < order.index("assemble") and order.index("sr") < order.index("assemble")
    states = {t[0]: t[2] for t in res["train"]["tasks"] if t[1] == 0}
    assert states["train_domain.train_vae"] == "success"


def test_evaluate_gates_then_compiles_only_promoted_builds(chain):
    res, home = chain
    assert res["evaluate"]["state"] == "success"
    assert ["compile_build", 0, "success"] in res["evaluate"]["tasks"]
    ev = _argvs(res["calls"], "evaluate")[0]
    assert ev[ev.index("--model") + 1] == f"{home}/models/pipeline/demo/asm-1" and "--gate" in ev
    assert _argvs(res["calls"], "compile")[0] == ["compile", "--model", f"{home}/models/pipeline/demo/asm-1"]
    assert len(_argvs(res["calls"], "compile")) == 1  # not for the blocked build
    assert ["compile_build", 0, "skipped"] in res["evaluate_blocked"]["tasks"]
    assert ["evaluate_gate", 0, "success"] in res["evaluate_blocked"]["tasks"]


def test_a_crashing_gpu_child_fails_its_task_not_the_run_silently(chain):
    res, _ = chain
    failing = res["train_failing"]
    assert failing["state"] == "failed"
    assert any(t[0] == "train_domain.train_sr" and t[2] == "failed" for t in failing["tasks"])
    assert any(t[0] == "train_domain.train_vae" and t[2] == "failed" for t in failing["tasks"])
    assert any(t[0] == "train_domain.train_diffusion" and t[2] == "upstream_failed" for t in failing["tasks"])
    assert any(t[0] == "train_domain.assemble" and t[2] == "upstream_failed" for t in failing["tasks"])


REAL_CHAIN = r'''
import json, os
import duckdb, pendulum
from rapid_pipeline.cli import invoke
from rapid_pipeline.core.home import Home

home = Home.from_env(os.environ["RAPID_HOME"])
invoke(["demo-data", "--out", str(home.landing / "demo"), "--start", "2025-01-01", "--pairs", "40", "--seed", "0"])
from rapid_ingest import rapid_ingest_dag
from rapid_prepare import rapid_prepare_dag
from rapid_train import rapid_train_dag
from rapid_evaluate import rapid_evaluate_dag

def states(run):
    return sorted([t.task_id, t.map_index, str(t.state)] for t in run.get_task_instances())

def xcom(run, task_id):
    ti = [t for t in run.get_task_instances() if t.task_id == task_id][0]
    return ti.xcom_pull(task_ids=task_id, map_indexes=ti.map_index)

res = {}
for dag in (rapid_ingest_dag, rapid_prepare_dag, rapid_train_dag, rapid_evaluate_dag):
    for t in dag.tasks:
        t.retries = 0  # a failure must show at once, not after backoff
r = rapid_ingest_dag.test(logical_date=pendulum.parse("2025-01-01"))
res["ingest"] = {"state": str(r.state), "tasks": states(r)}
r = rapid_prepare_dag.test(run_conf={"preset": "tiny"})
res["prepare"] = {"state": str(r.state), "tasks": states(r), "shard": xcom(r, "shard")}
r = rapid_train_dag.test(run_conf={"preset": "tiny"})
res["train"] = {"state": str(r.state), "tasks": states(r), "model": xcom(r, "train_domain.assemble")}
model = res["train"]["model"]["run_dir"]
# compile is a GPU stage that takes minutes on CPU: marked done here, covered by its own tests.
r = rapid_evaluate_dag.test(run_conf={"model": model, "domain": "demo", "samples": 8}, mark_success_pattern="compile_build")
res["evaluate"] = {"state": str(r.state), "tasks": states(r), "gate": xcom(r, "evaluate_gate")}
con = duckdb.connect(str(home.warehouse), read_only=True)
res["parents"] = con.execute("SELECT stage, parent_run_id FROM lineage_runs WHERE parent_run_id IS NOT NULL").fetchall()
res["manifest"] = json.loads((home.shards / "demo" / "manifest.json").read_text())
print("RESULT " + json.dumps(res, default=str))
'''


@pytest.mark.slow
def test_real_chain_on_the_demo_domain(tmp_path):
    """ingest -> prepare -> train -> evaluate with the real stages (tiny presets, CPU, a few minutes)."""
    env = airflow_env(tmp_path, tmp_path / "rapid_home", domains="demo")
    migrate(env)
    res = run_airflow_script(REAL_CHAIN, env, timeout=900)
    for step in ("ingest", "prepare", "train", "evaluate"):
        assert res[step]["state"] == "success", (step, res[step]["tasks"])
        assert all(t[2] == "success" for t in res[step]["tasks"]), (step, res[step]["tasks"])
    model = res["train"]["model"]
    home = (tmp_path / "rapid_home").resolve()
    assert model["run_dir"].startswith(f"{home}/models/pipeline/demo/")
    assert (tmp_path / "rapid_home" / "models" / "pipeline" / "demo" / model["run_dir"].rsplit("/", 1)[1] / "model_index.json").is_file()
    assert set(model["parts"]) == {"ckclip", "vae", "diffusion", "esrgan"}
    assert model["parts"]["vae"]["run_dir"].startswith(f"{home}/models/vae/demo/vae-")
    assert any("/shards/demo" in uri for uri in model["trained_on"]), model["trained_on"]
    assert res["evaluate"]["gate"]["decision"] in {"promoted", "blocked"} and res["evaluate"]["gate"]["reason"]
    assert res["evaluate"]["gate"]["decision"] == "promoted"  # the first build has no production to lose to
    assert (home / "models" / "pipeline" / "demo" / "production").is_file()
    parents = dict(res["parents"])
    assert any(p.startswith("rapid_train/") for p in parents.values()), parents
    assert any(p.startswith("rapid_ingest/") for p in parents.values()), parents
    assert res["manifest"]["splits"]["train"]["samples"] > 0
