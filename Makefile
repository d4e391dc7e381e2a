# The README's two commands are `make study` and `make test`; everything a fresh machine needs is
# installed from here.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
SCALE  ?= cpu
# Speech synthesis and MIDI rendering for the corpus, Opus for the baseline. --no-install-recommends
# matters: without it fluidsynth pulls in qsynth and a 119 MB soundfont.
SYSTEM_PACKAGES := festival festvox-us-slt-hts espeak-ng fluidsynth timgm6mb-soundfont opus-tools

.PHONY: setup tools corpus-ci corpus study test lint lab bench clean

setup: $(STAMP)

# Re-install whenever a dependency list changes. AudioCraft goes in without its dependencies (they pin
# torch==2.1.0 and pull MusicGen's stack); its quantizer needs only torch, einops and flashy (dev extras).
$(STAMP): pyproject.toml requirements-audiocraft.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-audiocraft.txt
	touch $(STAMP)

# System tools: installed when we are root on Debian/Ubuntu; otherwise the corpus builder prints the
# exact command and falls back to what is installed. `apt-get download` needs the package lists too.
tools:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=$$(for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	  apt-get update -qq && \
	  if [ -n "$$missing" ]; then DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; fi; \
	else echo "not root on Debian/Ubuntu: skipping system tools; to add them run:"; \
	  echo "  sudo apt-get install --no-install-recommends $(SYSTEM_PACKAGES)"; fi

corpus-ci: $(STAMP) tools
	$(BIN)/python -m studylib corpus --profile ci

corpus: $(STAMP) tools
	$(BIN)/python -m studylib corpus --profile study

# The whole study at one scale: corpus (built if missing), every arm and notebook, HTML reports, index.
# `make study SCALE=smoke` is a quick look; JOBS=N runs N at a time (2 on 2 cores: two one-thread codec runs
# train ~1.4x faster than one two-thread run after another, benchmarks/bench_train_step.py); GPUS=0,1 dispatches one run per GPU.
JOBS ?= 2
GPUS ?=
# DRY_RUN=1: list what would run and why, with estimated times, and run nothing (no corpus build either)
DRY_RUN ?=
study: $(STAMP) $(if $(DRY_RUN),,tools)
	$(BIN)/studylib study --scale $(SCALE) --jobs $(JOBS) $(if $(GPUS),--gpus $(GPUS)) $(if $(DRY_RUN),--dry-run)

test: $(STAMP) tools
	$(BIN)/python -m pytest

# ruff, and the layering contract of studylib (pyproject.toml [tool.importlinter]: each subpackage imports only
# the ones below it)
lint: $(STAMP)
	$(BIN)/ruff check studylib tests benchmarks notebooks
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_rvq.py --out results/bench_rvq.csv

# JupyterLab on the repository; it prints its URL with the access token. Run as root (containers, cloud
# images) it refuses to start without --allow-root, so that flag is added then, and only then. LAB_ARGS adds
# options, e.g. `make lab LAB_ARGS="--no-browser --port 8899"`.
LAB_ARGS ?=
ALLOW_ROOT = $(if $(filter 0,$(shell id -u)),--allow-root)
lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=. $(ALLOW_ROOT) $(LAB_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
