# `make test` and `make demo` work from a clean clone: the venv is created and filled here.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Installed before the project so that pip keeps this exact build: on this machine a CPU
# wheel of it lies on disk, and the project's own `torch==2.13.0` pin is then satisfied.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv test test-fast test-faults demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet '$(TORCH_SPEC)'
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Everything but the fault storms (`make test-faults`; .ci/run runs both).
test: venv
	$(PY) -m pytest -m "not faults"

# Storage storms, kills in a storm, a full disk, nodes removed mid-job: minutes each.
test-faults: venv
	$(PY) -m pytest -m faults

# Everything that needs no Ray cluster or external service: seconds, for iteration.
test-fast: venv
	$(PY) -m pytest -m "not ray and not slow and not faults"

demo: venv
	$(VENV)/bin/squeeze demo --out demo-output

bench: venv
	$(PY) bench/model.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache
