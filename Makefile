# otel-dl: `make demo` runs the demo pipeline, `make test` runs the whole suite.
# Both create .venv and install what they need; uv keeps its downloads (torch among
# them) under ~/.cache/uv, so a second run installs in seconds.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
PY := $(BIN)/python

.PHONY: demo test lint bench reliability venv clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# uv installs the project (fast, cached); a venv made without pip gets it first.
$(UV): | $(PY)
	$(PY) -m ensurepip --upgrade >/dev/null 2>&1 || true
	$(PY) -m pip install --quiet --disable-pip-version-check uv

venv: $(UV)

# `make demo FAULT=<name>` picks the injected fault; see examples/pipeline/common.py.
FAULT ?= upstream_drift

demo: venv
	$(UV) pip install --python $(PY) --quiet -e '.[torch,feast,http,collector]' fastapi uvicorn
	$(PY) examples/pipeline/run.py --fault $(FAULT)

test: venv
	$(UV) pip install --python $(PY) --quiet -e '.[test]'
	$(PY) -m tests.e2e.binaries
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(PY) -m pytest

lint: venv
	$(UV) pip install --python $(PY) --quiet -e '.[test]'
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: venv
	$(UV) pip install --python $(PY) --quiet -e '.[test]'
	for b in benchmarks/*.py; do $(PY) $$b || exit 1; done

# Every reliability test at full scale; rewrites docs/reliability.md (tens of minutes).
reliability: venv
	$(UV) pip install --python $(PY) --quiet -e '.[test]'
	$(PY) -m tests.reliability

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
