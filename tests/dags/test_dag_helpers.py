"""Unit checks of the DAG wiring helpers (no Airflow run): report parsing, launcher choice,
which days / domains / builds a run picks, the model asset's extra.

    .venv/bin/python -m pytest tests/dags/test_dag_helpers.py -q
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from types import SimpleNamespace

import pytest

pytest.importorskip("airflow")

import _common as c  # noqa: E402
import rapid_ingest  # noqa: E402
from rapid_evaluate import builds_from_events, evaluate_argv, fast_sampler_summary  # noqa: E402
from rapid_train import _assemble_args, model_extra  # noqa: E402


def test_parse_report_takes_the_json_object_after_noise():
    stdout = "loading...\n" + json.dumps({"status": "ok", "run_id": "r1"}, indent=1) + "\n"
    assert c.parse_report(stdout) == {"status": "ok", "run_id": "r1"}
    twice = json.dumps({"run_id": "a"}) + "\n" + json.dumps({"run_id": "b"}) + "\n"
    assert c.parse_report(twice)["run_id"] == "a"  # accelerate: every rank prints; first wins
    with pytest.raises(c.StageFailed, match="no JSON report"):
        c.parse_report("Traceback ...\nboom\n")


def test_launcher_uses_accelerate_only_for_several_gpus(monkeypatch):
    assert c.launcher(0) == [sys.executable, "-m", "rapid_pipeline"]
    assert c.launcher(1) == [sys.executable, "-m", "rapid_pipeline"]
    multi = c.launcher(4)
    assert multi[:3] == [sys.executable, "-m", "accelerate.commands.launch"] and "4" in multi
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert c.visible_gpus() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert c.visible_gpus() == 0


def test_child_stage_failure_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("RAPID_HOME", str(tmp_path))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    with pytest.raises(c.StageFailed, match=r"rapid link --domain bad/name failed \(exit 1\): rapid: error: "):
        c.call_stage(["link", "--domain", "bad/name"], gpu=True)


def test_requested_days_follow_param_then_logical_date_then_all():
    day = dt.datetime(2025, 1, 2, tzinfo=dt.timezone.utc)
    scheduled = SimpleNamespace(run_type="scheduled")
    assert rapid_ingest.requested_days({"date": ""}, scheduled, day) == ["2025-01-02"]
    assert rapid_ingest.requested_days({"date": "2025-03-04"}, scheduled, day) == ["2025-03-04"]
    assert rapid_ingest.requested_days({"date": "all"}, scheduled, day) is None
    assert rapid_ingest.requested_days({"date": ""}, SimpleNamespace(run_type="asset_triggered"), day) is None
    assert rapid_ingest.requested_days({"date": ""}, SimpleNamespace(run_type="manual"), None) is None
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        rapid_ingest.requested_days({"date": "yesterday"}, scheduled, day)


def test_landing_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("RAPID_HOME", str(tmp_path))
    day = tmp_path / "landing" / "demo" / "2025-01-01"
    (day / "kg").mkdir(parents=True)
    (day / "kg" / "triples.tsv").write_text("h\tr\tt\n")
    (day / "kg" / ".hidden").write_text("")
    (day / "pairs" / "images").mkdir(parents=True)
    (day / "pairs" / "img2dataset").mkdir()
    (day / "pairs" / "wukong.csv").write_text("url,caption\n")
    (day / "pairs" / "img2dataset" / "00000.tar").write_bytes(b"")
    (tmp_path / "landing" / "demo" / "not-a-day").mkdir()
    assert rapid_ingest.landed_days("demo") == ["2025-01-01"]
    assert [p.name for p in rapid_ingest.kg_files(day)] == ["triples.tsv"]
    argv = rapid_ingest._argv("pairs", "demo", "2025-01-01", day)
    assert argv == ["ingest", "pairs", day / "pairs", "--domain", "demo", "--partition", "2025-01-01"]
    assert rapid_ingest._argv("kg", "demo", "2025-01-09", tmp_path / "nowhere") is None


def test_chosen_domains_from_param_events_or_config(monkeypatch):
    monkeypatch.setenv("RAPID_DOMAINS", "demo,food")
    ev = lambda *d: SimpleNamespace(extra={"domains": list(d)})  # noqa: E731
    assert c.chosen_domains({"domain": "food"}) == ["food"]
    assert c.chosen_domains({}, {"lake_pairs": [ev("food")], "kg": [ev("food", "unknown")]}) == ["food"]
    assert c.chosen_domains({}, {}) == ["demo", "food"]
    monkeypatch.setenv("RAPID_DOMAINS", "demo,;drop")
    with pytest.raises(ValueError, match="RAPID_DOMAINS"):
        c.domains()


def test_builds_from_events_newest_per_domain():
    ev = lambda d, m: SimpleNamespace(extra={"domain": d, "run_dir": m})  # noqa: E731
    got = builds_from_events({"a": [ev("demo", "/m/1"), ev("demo", "/m/2")], "b": [ev("food", "/f/1"), SimpleNamespace(extra={})]})
    assert got == [{"domain": "demo", "model": "/m/2"}, {"domain": "food", "model": "/f/1"}]


def test_model_extra_records_parts_and_training_inputs():
    clip = {"part": "ckclip", "run_dir": "/c", "run_id": "c1", "config": {"lr": 1}, "inputs": [{"uri": "file:///s", "fingerprint": "fs"}]}
    sr = {"part": "esrgan", "run_dir": "/e", "run_id": "e1", "config": {}, "inputs": [{"uri": "file:///s", "fingerprint": "fs"}]}
    built = {"part": "assembled", "run_dir": "/p", "run_id": "p1", "inputs": [{"uri": "file:///c", "fingerprint": "fc"}]}
    extra = model_extra("demo", built, [clip, sr])
    assert extra["run_dir"] == "/p" and extra["domain"] == "demo"
    assert extra["trained_on"] == {"file:///s": "fs", "file:///c": "fc"}
    assert extra["parts"]["ckclip"]["config"] == {"lr": 1}
    assert _assemble_args(None, sr) == ["--sr", "/e"]
    assert _assemble_args({"run_dir": "/d"}, sr) == ["--pipeline", "/d", "--sr", "/e"]


def test_output_dirs_and_latest_run(tmp_path, monkeypatch):
    monkeypatch.setenv("RAPID_HOME", str(tmp_path))
    rep = {"outputs": [{"uri": f"file://{tmp_path}/models/ckclip/demo/r1"}, {"uri": f"file://{tmp_path}/lake/x"}]}
    assert c.output_dirs(rep, "models/ckclip") == [f"{tmp_path}/models/ckclip/demo/r1"]
    assert c.latest_run_dir("ckclip", "demo") is None
    (tmp_path / "models" / "ckclip" / "demo" / "r1").mkdir(parents=True)
    assert c.latest_run_dir("ckclip", "demo").endswith("/r1")


def test_landing_events_pick_their_domain():
    from airflow.sdk import Asset

    trig = {Asset(name="rapid_landing_food", uri="file:///x/landing/food"): [object()],
            Asset(name="rapid_landing_demo", uri="file:///x/landing/demo"): []}
    assert rapid_ingest.landing_domains(trig, ["demo", "food"]) == ["food"]
    assert rapid_ingest.landing_domains({}, ["demo", "food"]) == []


def test_evaluate_argv_passes_accept_fast_sampler_and_summary_keeps_the_decision(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    build = {"domain": "demo", "model": "/m/demo/r1"}
    plain = evaluate_argv(build, {"samples": 8, "accept_fast_sampler": False})
    assert plain == ["evaluate", "--model", "/m/demo/r1", "--domain", "demo", "--samples", 8, "--gate"]
    assert evaluate_argv(build, {"samples": 8, "accept_fast_sampler": True})[-1] == "--accept-fast-sampler"
    assert fast_sampler_summary({"status": "ok"}) is None
    fast = {"decision": "rejected", "reason": "fid ...", "reference": {}, "candidate": {}, "margin": 0.5, "decided_at": "t"}
    assert fast_sampler_summary({"fast_sampler": fast}) == {k: fast[k] for k in ("decision", "reason", "reference", "candidate", "margin")}


def test_link_jobs_chunk_each_domains_partitions_contiguously():
    days = [f"2025-01-{i:02d}" for i in range(1, 8)]
    jobs = c.link_jobs({"food": ["2025-02-01"], "demo": days, "empty": []}, max_tasks=3)
    assert [(j["domain"], j["partitions"]) for j in jobs] == [
        ("demo", days[0:2]), ("demo", days[2:5]), ("demo", days[5:7]), ("food", ["2025-02-01"])]
    assert c.link_jobs({"demo": days}, max_tasks=100) == [{"domain": "demo", "partitions": [d]} for d in days]
    assert c.link_jobs({}) == []
