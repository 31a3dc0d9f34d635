# senseflow — developer entry points. `make run` and `make test` work on a fresh Debian machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-deps run test test-fast lint bench bench-quick clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

# influxd and mosquitto are real components of the tests and of `make run`.
system-deps:
	@command -v influxd >/dev/null && command -v mosquitto >/dev/null || scripts/install-system-deps.sh

run: install system-deps
	$(BIN)/python scripts/devrun.py

test: install system-deps
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check receiver workers shared tests benchmarks
	$(BIN)/ruff format --check receiver workers shared tests benchmarks
	$(BIN)/mypy

bench: install system-deps
	$(BIN)/python -m benchmarks.micro

clean:
	rm -rf $(VENV) .run build *.egg-info .pytest_cache .mypy_cache .hypothesis
