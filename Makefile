# lapse: `make demo` runs the main job end to end; `make test` runs lint, types and tests.
# Both create .venv (Python 3.11+) and install the package with its dev extras on first use.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: help install test lint demo bench clean

help:  ## list the targets
	@grep -E '^[a-z]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)  ## create .venv and install lapse with dev extras

lint: $(STAMP)  ## ruff (lint + format check) and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint  ## lint, types, then the whole test suite
	$(BIN)/pytest

demo: $(STAMP)  ## synthetic data -> validate -> train -> register -> score (file sink)
	$(BIN)/lapse demo

bench: $(STAMP)  ## feature benchmark against DuckDB (1M and 10M events)
	$(BIN)/python benchmarks/features.py

clean:  ## remove the venv, caches and demo output
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis demo lapse-runs
