"""Run Airflow in a child process with a fresh AIRFLOW_HOME, and read back one JSON result.

A script prints ``RESULT <json>`` as its last such line; `run_airflow_script` returns that object
(and fails the test with the child's output tail when it exits non-zero or prints none).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DAGS = ROOT / "dags"
PY = sys.executable


def airflow_env(tmp: Path, rapid_home: Path, domains: str = "demo", **extra: str) -> dict[str, str]:
    """Environment for one isolated Airflow: SQLite under tmp, our dags/, no examples."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "OPENLINEAGE", "RAPID_"))}
    env.update({
        "AIRFLOW_HOME": str(tmp / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__OPENLINEAGE__DISABLED": "True",
        "RAPID_HOME": str(rapid_home),
        "RAPID_DOMAINS": domains,
        "RAPID_PROGRESS": "0",
        "RAPID_OPENLINEAGE": "off",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(DAGS)]),
    })
    env.update(extra)
    return env


def migrate(env: dict[str, str]) -> None:
    """`airflow db migrate` into the env's AIRFLOW_HOME (about 4 s)."""
    proc = subprocess.run([PY, "-m", "airflow", "db", "migrate"], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def run_airflow_script(code: str, env: dict[str, str], timeout: int = 300) -> dict:
    """Run `code` (dedented) with PY in a child process; return the object after ``RESULT``."""
    proc = subprocess.run([PY, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT))
    out = proc.stdout + proc.stderr
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, f"child exited {proc.returncode}:\n{out[-6000:]}"
    # raw_decode reads the one JSON value and ignores what follows: print() writes the text and its newline
    # separately, and a log line written by another thread in between lands on the same line (seen under load).
    return json.JSONDecoder().raw_decode(lines[-1][len("RESULT "):])[0]


# Shared prelude for dag.test() scripts: fake stage runner (records argv) when FAKE is set.
PRELUDE = '''
import json, os, sys
import pendulum
CALLS = []
def run_states(run):
    return sorted([ti.task_id, ti.map_index, str(ti.state)] for ti in run.get_task_instances())
'''
