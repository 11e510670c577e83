# Two commands on a fresh machine: `make demo` (the whole pipeline on the bundled data) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test full verify clean-demo

# The pinned requirements, then the package itself, editable (`import models` works from any directory: bench/,
# examples/, a notebook).
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet -e . --no-deps
	touch $@

demo: $(VENV)/.installed
	$(PY) run_pipeline.py --preset demo

full: $(VENV)/.installed
	$(PY) run_pipeline.py --preset full

# Tests run one torch thread per process, one process per core (pytest-xdist).
test: $(VENV)/.installed
	$(PY) -m pytest -q -n auto --maxprocesses 4 tests

verify: $(VENV)/.installed
	$(PY) verify_models.py

clean-demo:
	rm -rf demo
