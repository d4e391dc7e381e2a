# The README's two commands are `make study` and `make test`; everything a fresh machine needs is
# installed from here.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SCALE  ?= cpu

.PHONY: setup study test lint lab bench clean

setup: $(STAMP)

# Re-install whenever the dependency list changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Until the study runner exists (issue #5), the main job is the quantizer benchmark.
study: $(STAMP)
	$(BIN)/python benchmarks/bench_rvq.py --out results/bench_rvq.csv

test: $(STAMP)
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check studylib tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_rvq.py --out results/bench_rvq.csv

lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=.

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
