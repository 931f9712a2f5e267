#!/usr/bin/env bash
# Container entrypoint (also runs outside a container): dispatch to the rapid CLI, Airflow or the API.
#
#   entrypoint.sh rapid COMMAND ...   -> python -m rapid_pipeline COMMAND ...   (e.g. rapid evaluate --help)
#   entrypoint.sh serve [FLAGS]       -> python -m rapid_pipeline serve FLAGS  (REST API; --host 0.0.0.0 by default here)
#   entrypoint.sh airflow ARGS ...    -> airflow ARGS ...                     (scheduler, api-server, celery worker, ...)
#   entrypoint.sh help                -> this text
#
# Python: $RAPID_PYTHON, else the repository's .venv, else python3/python on PATH (the image's /opt/venv).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"

usage() {
  sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

pick_python() {
  if [[ -n "${RAPID_PYTHON:-}" ]]; then echo "$RAPID_PYTHON"; return; fi
  if [[ -x "$repo/.venv/bin/python" ]]; then echo "$repo/.venv/bin/python"; return; fi
  command -v python3 || command -v python || { echo "entrypoint: no python found (set RAPID_PYTHON)" >&2; exit 127; }
}

has_host_flag() {
  local a
  for a in "$@"; do [[ "$a" == --host || "$a" == --host=* ]] && return 0; done
  return 1
}

cmd="${1:-help}"
[[ $# -gt 0 ]] && shift
case "$cmd" in
  rapid)
    exec "$(pick_python)" -m rapid_pipeline "$@" ;;
  serve)
    if has_host_flag "$@"; then exec "$(pick_python)" -m rapid_pipeline serve "$@"; fi
    exec "$(pick_python)" -m rapid_pipeline serve --host "${RAPID_SERVE_HOST:-0.0.0.0}" "$@" ;;
  airflow)
    py="$(pick_python)"
    airflow_bin="$(dirname "$py")/airflow"
    if [[ -x "$airflow_bin" ]]; then exec "$airflow_bin" "$@"; fi
    exec "$py" -m airflow "$@" ;;
  help|-h|--help)
    usage ;;
  *)
    echo "entrypoint: unknown command '$cmd' (expected one of: rapid, serve, airflow, help)" >&2
    exit 2 ;;
esac
