# Quick start: `make run` trains one network per bundled series; `make test` runs the tests.
# Both create .venv and install on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Prefect's server would try to send telemetry; there is no network for it here or on most clusters.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# Prefect's temporary server gives up after 20 s; on a fresh 2-core machine creating its database took
# longer than that (a flow run of the chaos test failed so), so it gets the time it needs.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 120
STAMP := $(VENV)/.installed

.PHONY: install run test serve bench bench-chaos gpu-wheels data clean

install: $(STAMP)

# The CPU torch wheel goes in first where no torch is present: the project's own requirement is a
# range, and a range with no torch installed pulls the newest multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	@# The compiled stacked layers (models/native.py), built once per machine here rather than in the first
	@# run's warm-up; without a C++ compiler this warns and the eager layers run.
	$(PY) -c "from models import native; native.load()"
	touch $(STAMP)

run: install
	$(PY) -m flows.cli $(ARGS)

test: install
	$(PY) -m pytest $(ARGS)

# A local Prefect server on http://127.0.0.1:4200 with train_many served: press Run in the UI.
serve: install
	$(PY) -m deployments.local $(ARGS)

bench: install
	$(PY) -m benchmarks.slowdown $(ARGS)

bench-chaos: install
	$(PY) -m benchmarks.chaos $(ARGS)

# What a lent GPU machine's image (Python 3.12, its own torch) lacks for benchmarks/gpu_check.sh:
# wheels, carried there in .whl (ignored by git). Versions are those this project is tested with.
gpu-wheels: install
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
		typing-extensions==4.16.0

data: install
	$(PY) -m data.generate --series 1660 --out data/series.parquet

clean:
	rm -rf $(VENV) runs .pytest_cache .prefect-local
