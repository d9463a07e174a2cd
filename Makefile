# otel-dl: `make demo` runs the demo pipeline, `make test` runs the whole suite.
# Both create .venv and install what they need; uv keeps its downloads (torch among
# them) under ~/.cache/uv, so a second run installs in seconds.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV := $(BIN)/uv
PY := $(BIN)/python

.PHONY: demo test test-otel-floor lint bench reliability venv clean

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
	$(MAKE) test-otel-floor

# The oldest OpenTelemetry that pyproject.toml accepts (its lower bounds, with the
# instrumentation packages of that release), in a venv of its own: the SDK's tests run
# against it too, since otel-dl reads parts of the SDK and exporters that change between
# releases. Left out here: the collector, end-to-end and reliability suites (they test the
# collector, not these packages) and the fault drills (detection, run above).
OTEL_FLOOR_VENV := .venv-otel-floor
OTEL_FLOOR := opentelemetry-api==1.30.0 opentelemetry-sdk==1.30.0 \
	opentelemetry-exporter-otlp==1.30.0 opentelemetry-proto==1.30.0 \
	opentelemetry-instrumentation==0.51b0 opentelemetry-instrumentation-requests==0.51b0 \
	opentelemetry-instrumentation-httpx==0.51b0 opentelemetry-instrumentation-fastapi==0.51b0 \
	opentelemetry-instrumentation-grpc==0.51b0

test-otel-floor: venv
	$(UV) venv --quiet --allow-existing --python $(PY) $(OTEL_FLOOR_VENV)
	$(UV) pip install --python $(OTEL_FLOOR_VENV)/bin/python --quiet -e '.[test]' $(OTEL_FLOOR)
	$(OTEL_FLOOR_VENV)/bin/python -m pytest -q tests/test_*.py tests/signals tests/compat \
		--deselect tests/test_drills.py::test_demo_pipeline_drills_with_the_collector

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
	rm -rf $(VENV) $(OTEL_FLOOR_VENV) build *.egg-info .pytest_cache .ruff_cache .mypy_cache
