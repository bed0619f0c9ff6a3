# The README's two commands: `make run` (install + the whole pipeline on the embedded default) and
# `make test` (install + the test suite). Both create .venv on first use.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install run test test-all

$(BIN)/thinair: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(BIN)/thinair

run: install
	PATH="$(abspath $(BIN)):$$PATH" DVC_NO_ANALYTICS=1 dvc repro

test: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest

test-all: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/pytest -m ""
