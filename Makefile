# The two commands a fresh clone needs: `make demo` and `make test`. Both create or reuse .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test test-deps lint bench bench-peers bench-streams bench-tasks bench-eventstore clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Stamps re-run pip only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@ $(VENV)/.installed

demo: $(VENV)/.installed
	$(BIN)/riverbed demo

test-deps:
	bash scripts/test-deps.sh

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check riverbed tests bench _riverbed_cli.py
	$(BIN)/mypy riverbed _riverbed_cli.py

test: $(VENV)/.installed-dev test-deps lint
	$(BIN)/python -m pytest -ra

bench: $(VENV)/.installed-dev test-deps
	$(BIN)/python bench/log.py

# The streams benchmark's peers (Quix Streams, faust, Bytewax) live in their own Python 3.11 venv.
PEERS_PYTHON ?= python3.11
PEERS_VENV := bench/.venv-peers

$(PEERS_VENV)/.installed: bench/requirements-peers.txt
	$(PEERS_PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install -q --upgrade pip
	$(PEERS_VENV)/bin/python -m pip install -q -r bench/requirements-peers.txt
	touch $@

bench-peers: $(PEERS_VENV)/.installed

bench-streams: $(VENV)/.installed-dev test-deps bench-peers
	$(BIN)/python bench/streams.py

bench-tasks: $(VENV)/.installed-dev test-deps bench-peers
	$(BIN)/python bench/tasks.py

bench-eventstore: $(VENV)/.installed-dev test-deps bench-peers
	$(BIN)/python bench/eventstore.py

clean:
	rm -rf $(VENV) $(PEERS_VENV) .riverbed .cache .mypy_cache .ruff_cache .pytest_cache
