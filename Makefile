# The two commands of README.md: `make run` and `make test`. Both create the
# virtual environment and install on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA ?= appliance-data
PYTEST_ARGS ?=

.PHONY: install run test lint format docs bench clean binary test-e2e test-systemd test-cluster

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	@test -f $(DATA)/appliance.toml || $(BIN)/appliance init --data-dir $(DATA)
	$(BIN)/appliance run --config $(DATA)/appliance.toml --log-format text

lint: $(STAMP)
	$(BIN)/ruff check appliance tests bench
	$(BIN)/ruff format --check appliance tests bench

format: $(STAMP)
	$(BIN)/ruff format appliance tests bench
	$(BIN)/ruff check --fix appliance tests bench

docs: $(STAMP)
	$(BIN)/python scripts/gen_config_docs.py

test: lint
	$(BIN)/pytest --ignore=tests/e2e --ignore=tests/cluster $(PYTEST_ARGS)

# Three hosts on one machine (tests/cluster/netns.py): network namespaces on a bridge, the harness's own
# PostgreSQL and Redis in a fourth, one appliance in each of the others (root; iproute2, PostgreSQL, Redis).
test-cluster: $(STAMP)
	@command -v ip >/dev/null || (apt-get update -qq && apt-get install -y -qq iproute2 >/dev/null)
	$(BIN)/pytest tests/cluster -m cluster $(PYTEST_ARGS)

# The one-file executable dist/appliance (PyInstaller, packaging/appliance.spec), and the tests
# that run it: tests/e2e, then a host without Python (packaging/bare-host-smoke.py).
BUILD_STAMP := $(VENV)/.build-installed

$(BUILD_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[build]'
	@touch $@

binary: $(BUILD_STAMP)
	$(BIN)/python packaging/build.py

test-e2e: $(STAMP)
	@test -x dist/appliance || $(MAKE) binary
	$(BIN)/pytest tests/e2e $(PYTEST_ARGS)
	$(BIN)/python packaging/bare-host-smoke.py dist/appliance

# The binary as a Type=notify service under a booted systemd (systemd-nspawn; packaging/systemd-smoke.py, root).
test-systemd: $(STAMP)
	@test -x dist/appliance || $(MAKE) binary
	$(BIN)/python packaging/systemd-smoke.py dist/appliance

# The appliance against the whole reference stack, one table into bench/results/latest.md (bench/stack/).
# wrk and nginx come from Debian at bench time only; the install starts a system nginx on port 80, stopped
# again here. PostgreSQL/Redis: APPLIANCE_TEST_PG_URL / APPLIANCE_TEST_REDIS_URL (from .ci/test-env when not set).
# BENCH_ARGS=--quick for a short run. Then the reference design's locust test (bench/locust/), 60 s with 5 and
# with 20 users against `appliance run` on the default config, adds its section to the same file (LOCUST_ARGS).
BENCH_ARGS ?=
LOCUST_ARGS ?=

bench: $(STAMP)
	@command -v wrk >/dev/null && command -v nginx >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk nginx >/dev/null \
		&& if [ -f /run/nginx.pid ]; then kill "$$(cat /run/nginx.pid)"; fi)
	$(BIN)/pip install -q -e '.[bench]'
	@if [ -z "$$APPLIANCE_TEST_PG_URL" ] && [ -f .ci/test-env ]; then . ./.ci/test-env; fi; $(BIN)/python -m bench stack $(BENCH_ARGS)
	$(BIN)/python -m bench locust $(LOCUST_ARGS)

clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache
