# Two commands on a fresh machine: `make demo` (the whole pipeline on the bundled data) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test full verify clean-demo notebook

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

# Re-run the example notebook on the shipped pair and store its outputs (pictures inline, as GitHub shows them).
NOTEBOOK := examples/direct_decoder_tour.ipynb
notebook: $(VENV)/.installed
	$(PY) -c "import nbclient, nbformat; from models.io.files import atomic_write_text; \
		nb = nbformat.read('$(NOTEBOOK)', as_version=4); \
		nbclient.NotebookClient(nb, timeout=1800, kernel_name='python3').execute(); \
		atomic_write_text(nbformat.writes(nb), '$(NOTEBOOK)')"

clean-demo:
	rm -rf demo
