# Each target does its own set-up on a fresh machine: a virtual environment in .venv with the CPU build of torch
# (override TORCH_SPEC on a CUDA machine, e.g. `make test TORCH_SPEC=torch`).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: test demo bench train
$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

test: $(VENV)/.installed
	$(BIN)/python -m pytest tests/ -q

demo: $(VENV)/.installed
	$(BIN)/python -m benchmarks.cpu_vs_naive

bench: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python -m pytest benchmarks/ --benchmark-only

train: $(VENV)/.installed
	$(BIN)/python -m dypo.train --overwrite_output_dir
