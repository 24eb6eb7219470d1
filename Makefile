# Every target sets itself up: a fresh clone with only python3 is enough.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PORT   ?= 8000
STAMP  := $(VENV)/.installed

.PHONY: help test lint docs demo bench reliability clean

## Lists the targets.
help:
	@awk '/^## /{doc=substr($$0, 4); next} /^[a-z][a-z-]*:/{if (doc) {split($$0, t, ":"); printf "  make %-12s %s\n", t[1], doc}; doc=""; next} {doc=""}' $(MAKEFILE_LIST)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e . --group dev
	touch $(STAMP)

## The whole suite, with branch coverage of the library.
test: $(STAMP)
	$(BIN)/python -m coverage run -m pytest $(PYTEST_ARGS)
	$(BIN)/python -m coverage report --fail-under=93

## Static checks on the library.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --strict middleware_sessions

## The documentation site (MkDocs), built with --strict into site/.
docs: $(VENV)/.docs-installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

$(VENV)/.docs-installed: $(STAMP)
	$(BIN)/python -m pip install -q --group docs
	touch $@

## The demo ledger service on PORT (default 8000).
demo: $(STAMP)
	@echo "demo_app: http://127.0.0.1:$(PORT)/docs"
	$(BIN)/python -m demo_app --host 127.0.0.1 --port $(PORT)

## Side-by-side benchmarks; writes benchmarks/RESULTS.md.
bench: $(STAMP)
	$(BIN)/python -m pip install -q -r benchmarks/requirements.txt
	$(BIN)/python -m benchmarks

## Fault, soak and scale-out tests (PostgreSQL, PgBouncer, uvicorn); rewrites docs/reliability.md.
reliability: $(STAMP)
	MIDDLEWARE_SESSIONS_RELIABILITY=1 $(BIN)/python -m pytest tests/reliability -q

## Removes the venv, caches and built files.
clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage site
