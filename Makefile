# Two commands for a fresh machine:  make run  (a local cluster)  and  make test.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
BENCH_ARGS ?=

.PHONY: run test unit lint typecheck bench bench-latency bench-floor bench-ceiling bench-storage bench-replication \
        system-deps clean schemathesis

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $@

## Start three nodes and the proxy on 127.0.0.1:8080-8083 in one process.
run: $(STAMP)
	$(BIN)/twistd -n shardkv cluster

## System packages some tests use (libfiu for fsync faults, faketime for clock skew,
## chromium for the dashboard's headless-browser test).
system-deps:
	@./scripts/system-deps fiu-utils faketime chromium

## Everything CI checks: lint, types, then every test.
test: $(STAMP) system-deps lint typecheck
	$(BIN)/pytest
	$(MAKE) --no-print-directory schemathesis

## schemathesis (st run) against a live proxy and a live node, from their own /openapi.json:
## every operation, 100 examples each, default checks (scripts/schemathesis.toml says what is tuned).
schemathesis: $(STAMP)
	$(BIN)/python scripts/schemathesis.py --max-examples 100

unit: $(STAMP)
	$(BIN)/pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy

## The benchmark's extras (py-spy for --profile) on top of the dev install; redone
## whenever $(STAMP) is (pyproject.toml changed).
$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install --quiet -e '.[dev,bench]'
	touch $@

## bench/run.py's modes (bench/README.md); extra options in BENCH_ARGS, e.g.
## make bench-latency BENCH_ARGS="--rounds 5 --profile /tmp/prof"
bench: $(BENCH_STAMP)
	@./scripts/system-deps wrk
	$(BIN)/python bench/run.py $(BENCH_ARGS)

bench-latency bench-floor bench-ceiling bench-storage bench-replication: bench-%: $(BENCH_STAMP)
	@./scripts/system-deps wrk
	$(BIN)/python bench/run.py $* $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .tox .mypy_cache .ruff_cache .pytest_cache .hypothesis
