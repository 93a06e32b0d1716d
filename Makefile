# Each target does its own set-up on a fresh machine: a virtual environment in .venv with the CPU build of torch
# (override TORCH_SPEC on a CUDA machine, e.g. `make test TORCH_SPEC=torch`).
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
VERL_IMPORTS := ray==2.60.0 tensordict==0.15.3 omegaconf==2.4.0 torchdata==0.11.0 codetiming==1.4.0 orjson==3.13.0 \
	peft==0.21.2 cachetools==8.0.2 fastapi==0.165.0 uvicorn==0.54.0 pillow==13.0.0

# another torch / Triton pair for `make test-stack` (docs/testing.md, "Supported versions"): 2.11.0 carries Triton 3.6,
# 2.6.0 carries 3.2. Both are CUDA builds (about 3 GB); their Triton interpreters need numpy < 2.3.
STACK_TORCH ?= 2.11.0
STACK_VENV := .venv-torch-$(STACK_TORCH)

.PHONY: lint test test-stack demo bench train gpu-wheels
# verl for tests/integrations/test_verl.py: verl 0.9.1 pins transformers < 5.11 and tensordict <= 0.10, so it goes
# in without its pins, then what its registries, compute_advantage and ppo_loss import (tested with these
# versions), constrained to the torch and transformers already installed
$(VENV)/.installed: pyproject.toml setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps verl==0.9.1
	$(BIN)/pip freeze | grep -iE '^(torch|transformers)==' > $(VENV)/keep.txt
	$(BIN)/pip install --quiet -c $(VENV)/keep.txt $(VERL_IMPORTS)
	touch $@

lint: $(VENV)/.installed
	$(BIN)/ruff check .

test: $(VENV)/.installed
	$(BIN)/python -m pytest tests/ -q

test-stack:
	$(PYTHON) -m venv $(STACK_VENV)
	$(STACK_VENV)/bin/pip install --quiet --upgrade pip
	$(STACK_VENV)/bin/pip install --quiet -e ".[test]" "torch==$(STACK_TORCH)" "numpy<2.3"
	$(STACK_VENV)/bin/python -m pytest tests/ -q

demo: $(VENV)/.installed
	$(BIN)/python -m benchmarks.cpu_vs_naive

bench: $(VENV)/.installed
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/python -m pytest benchmarks/ --benchmark-only

train: $(VENV)/.installed
	$(BIN)/python -m dypo.train --overwrite_output_dir

# the competitors of benchmarks.report, as Python 3.12 wheels for a GPU machine without network access: carry .whl to
# it, where `sh benchmarks/gpu_session.sh` installs them and runs the report (docs/testing.md). With the venv's pip
# where there is one (a fresh Debian python3 may have no pip).
gpu-wheels:
	$(if $(wildcard $(BIN)/pip),$(BIN)/pip,$(PYTHON) -m pip) download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
		liger-kernel==0.8.5 cut-cross-entropy==25.1.1
