# `make serve` and `make test` set themselves up on a fresh machine: .venv with torch 2.13.0 (CPU build)
# installed first, then this package with its test extra.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	touch $@

.PHONY: install serve test bench
install: $(BIN)/.installed

serve: $(BIN)/.installed
	$(BIN)/peftserve serve $(ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest tests $(ARGS)

bench: $(BIN)/.installed
	$(BIN)/python -m bench.throughput
