# The two commands a newcomer types are `make demo` and `make test`; both set up .venv from uv.lock first.
SHELL := /bin/bash
.DEFAULT_GOAL := help
# tarfile extraction filters (PEP 706), which tasks.download relies on, arrived in 3.11.4.
PYTHON_VERSION := >=3.11.4,<3.12
# uv from PATH, else a private copy installed under .local/ (no root, no system changes).
UV := $(shell command -v uv 2>/dev/null || echo $(CURDIR)/.local/tools/bin/uv)
VENV := .venv
PY := $(VENV)/bin/python
LOCAL := .local
export UV_PYTHON := $(PYTHON_VERSION)
# MLflow's usage telemetry is off in the demo, the tests and the local servers; `MLFLOW_DISABLE_TELEMETRY=false make
# ...` turns it on (mlflow/README.md).
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: help setup demo test lint bench tracking serve clean up browser

help:
	@echo "make demo   build the embedded BigEarthNet-format mirror and serve it on loopback; run the refresh DAG (the archive streamed into validated patches and tiles, sample, version), the training DAG (train, evaluate, gate) and, with a champion, the screening DAG (screen, monitor) with dag.test(), a real MLflow server and the GCS emulator"
	@echo "make test   lint, then every test (unit, data, model, integration with real servers on loopback, end to end: DAG runs, a real scheduler, the UI)"
	@echo "make lint   ruff check + ruff format --check, hadolint, the compose schema, kubernetes-validate"
	@echo "make bench  benchmarks under bench/ (ratios measured side by side)"
	@echo "make tracking  MLflow server on http://127.0.0.1:5000 (SQLite .local/mlflow.db; artifacts in the GCS emulator, .local/gcs)"
	@echo "make serve  the registry's champion over HTTP on http://127.0.0.1:8000 (POST /invocations), following the alias; needs make tracking or make up"
	@echo "make up     the local stack until Ctrl-C: Airflow UI + REST API on http://127.0.0.1:8080 (.local/airflow), MLflow UI on http://127.0.0.1:5000, GCS emulator (.local/gcs)"
	@echo "make browser  install chromium + chromium-driver with apt-get when missing (the UI test needs them; root)"

$(UV):
	python3 -m venv $(LOCAL)/tools
	$(LOCAL)/tools/bin/pip install --quiet uv

# Where PYTHONDONTWRITEBYTECODE is set (CI images often do), nothing caches bytecode and every process compiles what
# it imports from source: 5 s of each Great Expectations import, 3 s of each Airflow one. Python here may write the
# .pyc files of .venv and of this checkout (both ours, both gitignored), the first time each module is imported:
# cheaper than `uv sync --compile-bytecode`, which compiles all 41,572 files of the environment up front (75 s).
unexport PYTHONDONTWRITEBYTECODE

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen
	touch $@

setup: $(VENV)/.synced

demo: setup
	$(PY) -m demo.run

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/hadolint --config .hadolint.yaml docker/*.Dockerfile
	$(VENV)/bin/check-jsonschema --builtin-schema vendor.compose-spec docker/compose.yaml
	$(VENV)/bin/kubernetes-validate --strict --quiet --kubernetes-version 1.35.0 docker/k8s/*.yaml

test: lint browser
	$(VENV)/bin/pytest

bench: setup
	$(PY) -m bench.ingest
	$(PY) -m bench.ingest_full
	$(PY) -m bench.tile
	$(PY) -m bench.train_input
	$(PY) -m bench.orchestration
	$(PY) -m bench.inference
	$(PY) -m bench.screen
	$(PY) -m bench.serve

# Foreground, Ctrl-C stops it. Configured by the MLFLOW_* variables of mlflow/server.sh (see mlflow/README.md).
tracking: setup
	$(PY) -m ops.tracking_server --with-emulator $(LOCAL)/gcs

# Foreground, Ctrl-C stops it: tasks.serve against the local tracking server (make tracking or make up running).
serve: setup
	MLFLOW_TRACKING_URI=$${MLFLOW_TRACKING_URI:-http://127.0.0.1:5000} $(PY) -m tasks.serve

clean:
	rm -rf $(LOCAL)/data $(LOCAL)/gcs $(LOCAL)/mlflow.db $(LOCAL)/airflow test-artifacts

# Foreground, Ctrl-C stops it: GCS emulator, MLflow server and `airflow standalone` (demo/up.py says what it sets up).
up: setup
	$(PY) -m demo.up

# Chromium and its WebDriver for tests/e2e/test_ui.py, from the distribution's packages (Debian: chromium,
# chromium-driver), installed only when missing.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then exit 0; fi; \
	if [ "$$(id -u)" != 0 ]; then \
		echo "make browser: /usr/bin/chromium or /usr/bin/chromedriver is missing; as root run: apt-get install -y chromium chromium-driver" >&2; \
		exit 1; \
	fi; \
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver
