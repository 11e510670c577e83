# Two commands on a fresh machine: `make demo` (the whole pipeline on the bundled data) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test full serve verify clean-demo notebook

# Three install profiles, each pinned (requirements*.txt) and each a pyproject extra: the runtime (`make demo`, the
# stage scripts, bench/), + the server (`make serve`), + the test suite and notebook runner (`make test`). The package
# itself is installed editable (`import models` works from any directory: bench/, examples/, a notebook).
$(VENV)/.venv:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	touch $@

$(VENV)/.installed-runtime: requirements.txt pyproject.toml $(VENV)/.venv
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet -e . --no-deps
	touch $@

$(VENV)/.installed-serve: requirements-serve.txt $(VENV)/.installed-runtime
	$(PY) -m pip install --quiet -r requirements-serve.txt
	touch $@

$(VENV)/.installed-test: requirements-test.txt $(VENV)/.installed-serve
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

demo: $(VENV)/.installed-runtime
	$(PY) run_pipeline.py --preset demo

full: $(VENV)/.installed-runtime
	$(PY) run_pipeline.py --preset full

# Tests run one torch thread per process, one process per core (pytest-xdist), whole files per worker, the longest
# first (tests/conftest.py says why).
test: $(VENV)/.installed-test
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile --no-loadscope-reorder tests

# The steering page and job API on http://127.0.0.1:8000/ with the shipped pair (serve.py --help: every option).
serve: $(VENV)/.installed-serve
	$(PY) serve.py

verify: $(VENV)/.installed-runtime
	$(PY) verify_models.py

# Re-run the example notebook on the shipped pair and store its outputs (pictures inline, as GitHub shows them).
NOTEBOOK := examples/direct_decoder_tour.ipynb
notebook: $(VENV)/.installed-test
	$(PY) -c "import nbclient, nbformat; from models.io.files import atomic_write_text; \
		nb = nbformat.read('$(NOTEBOOK)', as_version=4); \
		nbclient.NotebookClient(nb, timeout=1800, kernel_name='python3').execute(); \
		atomic_write_text(nbformat.writes(nb), '$(NOTEBOOK)')"

clean-demo:
	rm -rf demo
