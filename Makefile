# Two commands for a fresh machine: `make run` and `make test`. Both create or reuse ./.venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel by default; on a GPU box install your CUDA build first (see README) and it is kept.
TORCH_SPEC ?= torch==2.13.0
CONFIG ?= configs/multimaterial_1_discs_3types.yaml
ARGS ?=

.PHONY: run train test bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,dask,analytics]"
	touch $@

run: $(VENV)/.installed
	$(BIN)/proctor run $(CONFIG) $(ARGS)

train: $(VENV)/.installed
	$(BIN)/proctor train $(CONFIG) $(ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m ruff check engine tui models tests bench
	# two workers, a file per worker at a time: most tests wait on child processes
	$(BIN)/python -m pytest -q -n 2 --dist loadfile $(ARGS)

bench: $(VENV)/.installed
	$(BIN)/python bench/runner_overhead.py
	$(BIN)/python bench/engine_overhead.py
	$(BIN)/python bench/train_throughput.py

clean-venv:
	rm -rf $(VENV)
