# Two entry points for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test soak lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/repertory demo

test: $(STAMP)
	$(BIN)/pytest

# The guarantee machines with the soak profile: 10,000 examples each (about an hour or more
# on 2 cores); REPERTORY_SOAK_EXAMPLES=N runs N instead. Totals print at the end.
soak: $(STAMP)
	$(BIN)/pytest --hypothesis-profile=soak -q \
		tests/test_guarantees.py tests/test_testkit.py -k "guarantees or passes_every_fault"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) .repertory .pytest_cache .mypy_cache .ruff_cache
