# dsv3lab — every target creates .venv first when it is missing (or when pyproject.toml changed).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: help setup test test-fast reproduce reproduce-fast site site-check lab lint format bench clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	# torch first, pinned exactly: the CPU wheel on the machine's disk. The package itself accepts torch>=2.10,<3,
	# which this pin satisfies, so the next line keeps it (without the pin pip would pull a CUDA build).
	$(BIN)/python -m pip install "torch==2.13.0"
	$(BIN)/python -m pip install -e ".[dev,hf,kernels]"
	touch $(STAMP)

setup: $(STAMP)  ## create .venv and install everything (idempotent)

lint: setup  ## ruff check + ruff format --check (ruff format governs the code; see .pre-commit-config.yaml)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup  ## ruff format + autofixes (imports, unused noqa)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

CHROMIUM ?= /usr/bin/chromium
SITE := data/cache/site/default/html

test: setup lint  ## ruff + pytest: unit tests, every notebook (fast mode), reproduce --fast, the browser check
	@test -x $(CHROMIUM) || echo "*** Chromium is not installed ($(CHROMIUM)): the browser check (tests/test_site.py) \
	will be SKIPPED. Install it: apt-get install -y chromium chromium-driver (.ci/run does) ***"
	$(BIN)/python -m pytest -q

test-fast: setup  ## unit tests only: everything not marked slow (no notebooks, no reproduce --fast, no kernels)
	$(BIN)/python -m pytest -q -m "not slow"

reproduce: setup  ## run every experiment at toy scale and write figures/ (REPORT.md, summary.json, CSV, PNG)
	$(BIN)/dsv3lab reproduce --out figures

reproduce-fast: setup  ## the same in fast mode, into data/cache/figures-fast
	$(BIN)/dsv3lab reproduce --fast --out data/cache/figures-fast

site: setup  ## execute every notebook (default mode), render the static site into data/cache/site/default/html
	$(BIN)/python -m docs.build --mode default

site-check: setup  ## the browser check on that site (built first if missing) and JupyterLab; screenshots in data/cache/site-check
	test -f $(SITE)/index.html || $(MAKE) site
	DSV3LAB_SITE=$(SITE) $(BIN)/python -m pytest -q -p no:cacheprovider tests/test_site.py

lab: setup  ## JupyterLab on the notebooks
	$(BIN)/jupyter lab notebooks/

bench: setup  ## speed benchmarks (JSON on stdout)
	$(BIN)/python benchmarks/train_step.py
	$(BIN)/python benchmarks/decode.py

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) data/cache .pytest_cache .ruff_cache
