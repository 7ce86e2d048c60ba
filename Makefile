# The two commands of the README: `make up` runs the suite, `make test` the tests.
# Both set up everything they need on a fresh machine (virtualenv, pinned
# packages, Kafka jars; `make test` also buf, grpcurl, promtool, kcat and chromium); tools are
# cached outside the repository.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CACHE ?= $(or $(CARGOTRACK_CACHE_DIR),$(HOME)/.cache/cargotrack)
TOOLS := $(CACHE)/tools
BUF := $(TOOLS)/node_modules/.bin/buf
GRPCURL := $(TOOLS)/bin/grpcurl
BUF_VERSION := 1.75.0
GRPCURL_VERSION := v1.9.3
APT_INSTALL := DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends
PYTEST_ARGS ?=

export CARGOTRACK_CACHE_DIR := $(CACHE)
export PATH := $(TOOLS)/bin:$(TOOLS)/node_modules/.bin:$(PATH)

.PHONY: up test lint protos bootstrap tools kcat promtool chromium clean

up: bootstrap
	$(BIN)/cargotrack dev

test: bootstrap tools lint
	$(BIN)/pytest $(PYTEST_ARGS)

lint: bootstrap tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	cd protos && $(BUF) lint
	$(BIN)/python scripts/check-breaking
	$(BIN)/python protos/generate.py --check

protos: bootstrap
	$(BIN)/python protos/generate.py

bootstrap: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev,local]'
	touch $@

tools: $(BUF) $(GRPCURL) promtool kcat chromium

# kcat reads topics in the README's example (tests/e2e/test_readme.py runs it). It is
# a system package: installed quietly with apt-get where that works (Debian, as
# root: CI), else a one-line hint; never a failure, and nothing when it is present.
kcat:
	@command -v kcat >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	       && { $(APT_INSTALL) kcat || { apt-get update -qq && $(APT_INSTALL) kcat; }; } \
	       >/dev/null 2>&1; } \
	  || echo "kcat not installed (apt-get install kcat, brew install kcat): the README's topic example needs it"

$(BUF):
	mkdir -p $(TOOLS)
	cd $(TOOLS) && npm install --silent --no-audit --no-fund @bufbuild/buf@$(BUF_VERSION)

$(GRPCURL):
	mkdir -p $(TOOLS)/bin
	GOBIN=$(TOOLS)/bin go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)

# promtool checks and unit-tests the alert rules (tests/k8s/test_monitoring.py). It
# comes from Debian's `prometheus` package (Debian 12: Prometheus 2.42, whose promtool
# runs the same `check rules` / `test rules`): building it from the Prometheus Go
# module instead costs 10+ CPU-minutes on a fresh machine. Installed with apt-get
# where that works (Debian, as root: CI); elsewhere put any promtool on PATH.
promtool:
	@command -v promtool >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	       && { $(APT_INSTALL) prometheus || { apt-get update -qq && $(APT_INSTALL) prometheus; }; } \
	       >/dev/null 2>&1; } \
	  || { echo "promtool not found: install Debian's prometheus package or put promtool on PATH"; exit 1; }

# chromium runs the browser tests (tests/browser: the tracking page, the dispatch board),
# driven by the pinned Python playwright launched on /usr/bin/chromium; never
# `playwright install` (no browser downloads). Debian's package, installed quietly with
# apt-get where that works (Debian, as root: CI). Not pinned to a version: Debian
# ships chromium security updates in place and drops the old version from the archive,
# so a pin would break installs; playwright talks to any current Chromium.
chromium:
	@command -v chromium >/dev/null 2>&1 \
	  || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	       && { $(APT_INSTALL) chromium || { apt-get update -qq && $(APT_INSTALL) chromium; }; } \
	       >/dev/null 2>&1; } \
	  || { echo "chromium not found: install Debian's chromium package (the browser tests need it)"; exit 1; }

clean:
	rm -rf $(VENV) .cargotrack .pytest_cache .mypy_cache .ruff_cache
