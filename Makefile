# `make demo`, `make notebooks` and `make test` set everything up on a fresh clone (Python 3.11 + pip), then run.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch that this machine keeps on disk; override for CUDA builds: make TORCH=torch
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: all install demo notebooks test lint bench clean

all: test

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[demo,io,notebooks,test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/trackin-ooc demo --out ./trackin-demo

# Execute every notebook in place (outputs committed with them); what they write goes to a temporary folder.
notebooks: $(STAMP)
	$(BIN)/python scripts/run_notebooks.py

test: $(STAMP)
	$(BIN)/ruff check trackin_ooc cli tests benchmarks
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check trackin_ooc cli tests benchmarks

clean:
	rm -rf $(VENV) trackin-demo .pytest_cache .hypothesis
