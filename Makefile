# senseflow — developer entry points. `make run` and `make test` work on a fresh Debian machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install system-deps run test test-fast lint bench bench-quick bench-compare clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

# influxd, mosquitto and nats-server are real components of the tests and of `make run`;
# chromium + chromedriver run the live page's browser tests.
system-deps:
	@command -v influxd >/dev/null && command -v mosquitto >/dev/null && command -v nats-server >/dev/null && test -e /usr/lib/nginx/modules/ngx_stream_module.so && command -v chromium >/dev/null && command -v chromedriver >/dev/null || scripts/install-system-deps.sh

run: install system-deps
	$(BIN)/python scripts/devrun.py

test: install system-deps
	$(BIN)/pytest -q

test-fast: install
	$(BIN)/pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check senseflow receiver workers shared tests benchmarks
	$(BIN)/ruff format --check senseflow receiver workers shared tests benchmarks
	$(BIN)/mypy

# The benchmark suite (benchmarks/suite.py): its own influxd and mosquitto, ceilings, receiver
# alone, end to end for --workers 1 2 4 (highest zero-loss rate known within 5 %), latency,
# the 10,000/s latency step again beside BENCH_HOG CPU-burning processes (a loaded machine;
# 0: none), overload, cost growth (CPU/event and RSS vs rate and vs users). Writes
# benchmarks/out/suite-*.json and .md; the full run also redraws the plots under benchmarks/.
# Cost growth alone: `$(BIN)/python -m benchmarks.growth`; parse/encode alone:
# `$(BIN)/python -m benchmarks.micro`.
BENCH_HOG ?= 1
bench: install system-deps
	$(BIN)/python -m benchmarks.suite --full --hog $(BENCH_HOG)

bench-quick: install system-deps
	$(BIN)/python -m benchmarks.suite --quick

# make bench-compare OLD=a.json NEW=b.json   (or: make bench-compare a.json b.json)
ifeq (bench-compare,$(firstword $(MAKECMDGOALS)))
  COMPARE_FILES := $(wordlist 2,$(words $(MAKECMDGOALS)),$(MAKECMDGOALS))
  $(eval $(COMPARE_FILES):;@:)
endif
OLD ?= $(word 1,$(COMPARE_FILES))
NEW ?= $(word 2,$(COMPARE_FILES))
bench-compare: install
	@test -n "$(OLD)" -a -n "$(NEW)" || { echo "usage: make bench-compare OLD=old.json NEW=new.json"; exit 2; }
	$(BIN)/python -m benchmarks.report compare $(OLD) $(NEW)

clean:
	rm -rf $(VENV) .run build *.egg-info .pytest_cache .mypy_cache .hypothesis
