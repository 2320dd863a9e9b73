# `make demo`, `make notebooks` and `make test` set everything up on a fresh clone (Python 3.11 + pip), then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch that this machine keeps on disk; override for CUDA builds: make TORCH=torch
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# Test processes (pytest-xdist): each module's tests run in one of them (its module fixtures are built
# once), the longest modules first (tests/conftest.py). `make test PYTEST_WORKERS=0` runs them all here.
PYTEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadscope --no-loadscope-reorder)
LINTED = trackin_ooc cli tests benchmarks docs/hooks
# mkdocs 1.x plugins print a banner about a future mkdocs 2; it says nothing about this build.
export NO_MKDOCS_2_WARNING = 1
export DISABLE_MKDOCS_2_WARNING = true

.PHONY: all install demo notebooks test lint typecheck format docs docs-check bench clean

all: test

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[demo,io,notebooks,test,docs,lint]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/trackin-ooc demo --out ./trackin-demo

# Execute every notebook in place (outputs committed with them); what they write goes to a temporary folder.
notebooks: $(STAMP)
	$(BIN)/python scripts/run_notebooks.py

# Lint and format check, the type checker, the test suite (the slowest 15 tests listed at the end), then
# the documentation site built strictly (a broken API reference or link fails here).
test: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check --quiet $(LINTED)
	$(BIN)/mypy
	$(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)
	$(MAKE) --no-print-directory docs-check

# What .pre-commit-config.yaml runs on every commit: ruff's lint and format check, mypy, the spell checker.
lint: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/mypy
	$(BIN)/codespell

typecheck: $(STAMP)
	$(BIN)/mypy

# Apply the formatter (what `ruff format --check` in lint and test expects).
format: $(STAMP)
	$(BIN)/ruff format $(LINTED)

# The site, in build/site: the guides, the notebooks with the outputs they are committed with (make notebooks
# refreshes them), and the API reference generated from the package.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict

docs-check: $(STAMP)
	$(BIN)/mkdocs build --strict --quiet --site-dir build/site-check

clean:
	rm -rf $(VENV) trackin-demo .pytest_cache .hypothesis build
