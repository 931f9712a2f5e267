"""The library never imports Airflow: DAGs depend on rapid_pipeline, never the other way round.

    .venv/bin/python -m pytest tests/test_no_airflow_import.py -q
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "rapid_pipeline"

IMPORT_ALL = r'''
import importlib, json, pkgutil, sys
import rapid_pipeline
failed = {}
for mod in pkgutil.walk_packages(rapid_pipeline.__path__, "rapid_pipeline."):
    if mod.name.endswith("__main__"):  # runs the CLI (and exits) at import
        continue
    try:
        importlib.import_module(mod.name)
    except Exception as exc:  # a module that cannot import is reported, not hidden
        failed[mod.name] = f"{type(exc).__name__}: {exc}"
airflow = sorted(m for m in sys.modules if m == "airflow" or m.startswith("airflow."))
print(json.dumps({"airflow": airflow, "failed": failed, "count": len(list(pkgutil.walk_packages(rapid_pipeline.__path__)))}))
'''


def test_importing_every_module_does_not_import_airflow():
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["count"] > 5, "the walk found too few modules to mean anything"
    assert result["airflow"] == [], f"rapid_pipeline imported {result['airflow'][:5]}"
    assert result["failed"] == {}


def test_no_source_file_mentions_an_airflow_import():
    pattern = re.compile(r"^\s*(import\s+airflow|from\s+airflow[\s.])", re.MULTILINE)
    offenders = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py") if pattern.search(p.read_text(encoding="utf-8"))]
    assert offenders == []
