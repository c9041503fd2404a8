# Ballast: `make demo` runs the release loop end to end, `make test` runs the test suite.
# Both create .venv/ and install what they need on first use, and reuse it afterwards.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install demo test test-fast check fmt bench gpu-check clean

help:  ## Show this help
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN{FS=":.*## "}{printf "  make %-10s %s\n", $$1, $$2}'

# Python 3.11 or 3.12 (pyproject.toml); a .venv made with another is made again (before, one made
# by an unsupported python3 was reused for ever, whatever PY said), and so is one without pip (a
# `venv` that failed half-way, e.g. Debian without python3-venv, left a python but no pip).
SUPPORTED := import sys; sys.exit(not (3, 11) <= sys.version_info[:2] <= (3, 12))

$(STAMP): pyproject.toml constraints.txt
	@if ! { $(BIN)/python -c '$(SUPPORTED)' && $(BIN)/python -m pip --version; } >/dev/null 2>&1; then \
	  $(PY) -c '$(SUPPORTED)' || { echo "Ballast needs Python 3.11 or 3.12; $(PY) is $$($(PY) -V 2>&1): run make PY=python3.12"; exit 1; }; \
	  echo "creating $(VENV) with $(PY)"; rm -rf $(VENV); \
	  $(PY) -m venv $(VENV) || { rm -rf $(VENV); echo "$(PY) -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)"; exit 1; }; \
	fi
	$(BIN)/python -m pip install --quiet --upgrade pip
	# The constraints file pins every transitive version that was tested together (torch exactly).
	# compat mode: a .pth puts the repo on sys.path, so packages added later import without reinstalling.
	$(BIN)/python -m pip install --quiet -c constraints.txt --config-settings editable_mode=compat -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## Create .venv and install Ballast with its dev tools

demo: $(STAMP)  ## Run the demo: release 1 promoted, release 2 (faulty) rolled back by the canary
	$(BIN)/ballast demo

test: $(STAMP)  ## Run the whole test suite (unit, flows, integration against real servers)
	bash infra/system-deps.sh
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)  ## Unit tests only
	$(BIN)/python -m pytest -q tests/unit

check: $(STAMP)  ## Lint, format check and type check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)  ## Format and autofix
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)  ## Run the compile benchmark (benchmarks/ holds the others; see their --help)
	$(BIN)/python benchmarks/compile_bench.py

gpu-check: $(STAMP)  ## On a CUDA machine: the GPU suite (tests/gpu), CUDA-branch suites, gpu_check, ddp_bench
	PY=$(BIN)/python bash benchmarks/device_check.sh

clean:  ## Remove state (.ballast) and caches, keep .venv
	rm -rf .ballast .pytest_cache .mypy_cache .ruff_cache
