"""docker/ without a Docker engine: the compose file parses and wires Airflow 3 + Celery + GPU queue,
the Dockerfile only copies files that exist and has both variants, the entrypoint dispatches."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text(encoding="utf-8"))


def test_compose_has_required_services_and_healthchecks(compose):
    services = compose["services"]
    required = {"postgres", "redis", "airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor",
                "airflow-triggerer", "airflow-worker", "airflow-worker-gpu"}
    assert required <= set(services)
    for name in required - {"airflow-init"}:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert services["airflow-apiserver"]["command"] == ["airflow", "api-server"]
    assert services["airflow-dag-processor"]["command"] == ["airflow", "dag-processor"]
    assert "airflow db migrate" in services["airflow-init"]["command"][-1]
    assert "pools set gpu" in services["airflow-init"]["command"][-1]


def test_compose_celery_queues_and_gpu_reservation(compose):
    services = compose["services"]
    env = services["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert re.match(r"redis://(:@)?redis:6379/", env["AIRFLOW__CELERY__BROKER_URL"])
    assert "postgres" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    default_cmd, gpu_cmd = services["airflow-worker"]["command"], services["airflow-worker-gpu"]["command"]
    assert default_cmd[:3] == ["airflow", "celery", "worker"] and default_cmd[default_cmd.index("--queues") + 1] == "default"
    assert gpu_cmd[gpu_cmd.index("--queues") + 1] == "gpu"
    devices = services["airflow-worker-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert "deploy" not in services["airflow-worker"]
    # the DAG queue name in the repository matches the worker's queue
    assert '"queue": "gpu"' in (ROOT / "dags" / "_common.py").read_text() or "queue=\"gpu\"" in (ROOT / "dags" / "_common.py").read_text()


def test_compose_shared_home_volume_and_dags_folder(compose):
    assert "rapid_home" in compose["volumes"]
    for name in ("airflow-scheduler", "airflow-worker", "airflow-worker-gpu", "airflow-dag-processor"):
        svc = compose["services"][name]
        assert "rapid_home:/data/rapid_home" in svc["volumes"]
        assert svc["environment"]["RAPID_HOME"] == "/data/rapid_home"
        assert svc["environment"]["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/rapid/dags"
        mount = next(v for v in svc["volumes"] if v.endswith("/opt/rapid/dags:ro"))
        assert (DOCKER / mount.split(":")[0]).resolve() == ROOT / "dags"


def _dockerfile() -> str:
    return (DOCKER / "Dockerfile").read_text(encoding="utf-8")


def test_dockerfile_copies_only_existing_files_and_has_both_variants():
    text = _dockerfile()
    sources = []
    for line in text.splitlines():
        m = re.match(r"\s*COPY\s+(?!--from)(.+)", line)
        if m:
            sources += m.group(1).split()[:-1]
    assert sources, "no COPY lines parsed"
    for src in sources:
        assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    assert re.search(r"FROM \$\{CPU_BASE\} AS runtime-cpu", text) and re.search(r"FROM \$\{CUDA_BASE\} AS runtime-cuda", text)
    assert "ARG CUDA_BASE=nvidia/cuda:" in text and "runtime" in text.split("ARG CUDA_BASE=")[1].splitlines()[0]
    assert "FROM runtime-${VARIANT} AS builder" in text and "COPY --from=builder /opt/venv /opt/venv" in text
    assert "-c constraints.txt" in text
    assert 'ENTRYPOINT ["tini", "--", "/opt/rapid/docker/entrypoint.sh"]' in text


def _entry(*args, **env):
    return subprocess.run(["bash", str(DOCKER / "entrypoint.sh"), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})


def test_entrypoint_runs_rapid_help():
    res = _entry("rapid", "--help")
    assert res.returncode == 0, res.stderr
    assert "usage: rapid" in res.stdout and "evaluate" in res.stdout


def test_entrypoint_unknown_command_is_a_clear_error():
    res = _entry("frobnicate")
    assert res.returncode == 2
    assert "unknown command 'frobnicate'" in res.stderr and "rapid, serve, airflow" in res.stderr


def test_entrypoint_help_and_serve_dispatch():
    assert _entry("help").returncode == 0 and "entrypoint.sh rapid" in _entry("help").stdout
    res = _entry("serve", "--help")
    assert res.returncode == 0 and "--max-queue" in res.stdout
