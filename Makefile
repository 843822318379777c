# Two commands a new user needs: `make setup` then `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test test-slow bench demo clean

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'

test:
	$(BIN)/python -m pytest -q

test-slow:
	$(BIN)/python -m pytest -q -m slow

bench:
	$(BIN)/python bench/bench_attribution.py
	$(BIN)/python bench/bench_generation.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
