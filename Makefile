# `make serve` and `make test` set themselves up on a fresh machine: .venv with torch 2.13.0 (CPU build) installed
# first, then this package with its test extra, every version pinned by requirements.lock (pip constraints).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LATEST := .venv-latest
ARGS ?=

$(BIN)/.installed: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c requirements.lock -e '.[test]'
	touch $@

.PHONY: install serve test bench test-latest lock
install: $(BIN)/.installed

serve: $(BIN)/.installed
	$(BIN)/peftserve serve $(ARGS)

test: $(BIN)/.installed
	$(BIN)/python -m pytest tests $(ARGS)

bench: $(BIN)/.installed
	$(BIN)/python -m bench.throughput

# Not in CI: the suite against the newest releases of everything but torch, to see drift on purpose.
test-latest:
	rm -rf $(LATEST) && $(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q torch==2.13.0
	$(LATEST)/bin/pip install -q --upgrade -e '.[test]'
	$(LATEST)/bin/pip freeze --exclude-editable | grep -E '^(transformers|peft|tokenizers|gguf|fastapi|openai)=='
	$(LATEST)/bin/python -m pytest tests $(ARGS)

# After `make test-latest` passes: pin what it installed.
lock:
	test -x $(LATEST)/bin/python || { echo "run make test-latest first"; exit 1; }
	{ sed -n '1,2p' requirements.lock; $(LATEST)/bin/pip freeze --exclude-editable | grep -v '^-e' \
	  | sed -E 's/^torch==([0-9.]+)\+cpu$$/torch==\1/'; } > requirements.lock.new && mv requirements.lock.new requirements.lock
