# One set-up command, one main job, one test command (see README.md).
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast bench
setup:            ## create .venv and install the pinned stack (CPU; torch from the local mirror)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip wheel setuptools
	$(BIN)/pip uninstall -y -q opencc-python-reimplemented 2>/dev/null || true  # replaced by opencc (same module name)
	$(BIN)/pip install -q -c constraints.txt -e ".[airflow,dev]"

demo:             ## the main job on the built-in demo domain (tiny preset, CPU)
	$(BIN)/rapid run-demo --preset tiny

test:             ## the whole test suite
	RAPID_PROGRESS=0 $(BIN)/python -m pytest -q -n 2 --dist loadfile

test-fast:        ## skip tests marked slow
	RAPID_PROGRESS=0 $(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow"
