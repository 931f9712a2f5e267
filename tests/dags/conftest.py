"""DAG tests: every Airflow process gets its own throw-away AIRFLOW_HOME (SQLite, no examples).

Airflow reads its configuration once, at import; so tests that run DAGs do it in a child process
(`_harness.run_airflow_script`) with the environment set BEFORE airflow is imported. This pytest
process only imports airflow for cheap unit checks, under a temporary AIRFLOW_HOME set here.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

DAGS = Path(__file__).resolve().parents[2] / "dags"
os.environ.setdefault("AIRFLOW_HOME", tempfile.mkdtemp(prefix="rapid_af_unit_"))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
os.environ.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(DAGS))
if str(DAGS) not in sys.path:
    sys.path.insert(0, str(DAGS))
sys.path.insert(0, str(Path(__file__).resolve().parent))
