#!/usr/bin/env bash
# Source me: a throw-away Airflow home for trying the DAGs locally (SQLite, no examples).
#   source scripts/airflow_env.sh && airflow db migrate && airflow dags list
# Then `airflow standalone` (UI on :8080) or `airflow dags test rapid_ingest 2025-01-01`.
_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export AIRFLOW_HOME="${AIRFLOW_HOME:-$(mktemp -d /tmp/rapid_airflow.XXXXXX)}"
export AIRFLOW__CORE__DAGS_FOLDER="$_root/dags"
export AIRFLOW__CORE__LOAD_EXAMPLES=False
export AIRFLOW__CORE__EXECUTION_API_SERVER_URL="${AIRFLOW__CORE__EXECUTION_API_SERVER_URL:-http://localhost:8080/execution/}"
export RAPID_HOME="${RAPID_HOME:-$_root/rapid_home}"
export RAPID_DOMAINS="${RAPID_DOMAINS:-demo}"
export PATH="$_root/.venv/bin:$PATH"
echo "AIRFLOW_HOME=$AIRFLOW_HOME RAPID_HOME=$RAPID_HOME DAGS=$AIRFLOW__CORE__DAGS_FOLDER"
