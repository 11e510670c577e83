# Two commands on a fresh machine: `make demo` (the whole pipeline on the bundled data) and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test full verify clean-demo continue-student notebook

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

# The adversarial student run in progress (README "The student"): remakes its 12,000 pairs (deterministic; skipped
# when they exist), restores its latest committed epoch checkpoint and continues it bit-exactly with --resume.
ADV_PAIRS := runs/pairs_s11
ADV_RUN := runs/student_adv
continue-student: $(VENV)/.installed
	$(PY) generate_training_data.py --n_samples 12000 --batch_size 100 --steps 25 --spacing leading --seed 11 \
		--output_dir $(ADV_PAIRS) --cpu --channels_last
	mkdir -p $(ADV_RUN) && cp -n resume/student_adv/ckpt_epoch_*.pt $(ADV_RUN)/
	$(PY) train_direct_decoder.py --data_path $(ADV_PAIRS)/training_data.pt --init_from checkpoints/student_mnist5k.pt \
		--output_dir $(ADV_RUN) --epochs 30 --batch_size 64 --lr 1e-4 --adv_weight 2.0 --adv_real dataset \
		--class_weight 0.05 --cpu --resume
