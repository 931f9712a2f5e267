"""`airflow backfill create` accepts rapid_ingest (a periodic timetable) and plans exactly the days
asked for; those logical dates are the partitions the ingest tasks rewrite.

    .venv/bin/python -m pytest tests/dags/test_dag_backfill.py -q
"""

from __future__ import annotations

import re
import subprocess

import pytest

pytest.importorskip("airflow")

from _harness import PY, airflow_env, migrate  # noqa: E402


def test_backfill_dry_run_plans_one_run_per_day(tmp_path):
    env = airflow_env(tmp_path, tmp_path / "rapid_home")
    migrate(env)
    ser = subprocess.run([PY, "-m", "airflow", "dags", "reserialize"], env=env, capture_output=True, text=True, timeout=180)
    assert ser.returncode == 0, ser.stdout[-2000:] + ser.stderr[-2000:]
    cmd = [PY, "-m", "airflow", "backfill", "create", "--dag-id", "rapid_ingest",
           "--from-date", "2025-01-01", "--to-date", "2025-01-03", "--dry-run"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    planned = re.findall(r"\|\s*(\d{4}-\d{2}-\d{2}) 00:00:00\+00:00\s*\|", out)
    assert planned == ["2025-01-01", "2025-01-02", "2025-01-03"], out[-2000:]
