# The two commands of the README: `make up` runs the suite, `make test` the tests.
# Both set up everything they need on a fresh machine (virtualenv, pinned
# packages, Kafka jars, buf, grpcurl); tools are cached outside the repository.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
CACHE ?= $(or $(CARGOTRACK_CACHE_DIR),$(HOME)/.cache/cargotrack)
TOOLS := $(CACHE)/tools
BUF := $(TOOLS)/node_modules/.bin/buf
GRPCURL := $(TOOLS)/bin/grpcurl
BUF_VERSION := 1.75.0
GRPCURL_VERSION := v1.9.3
PYTEST_ARGS ?=

export CARGOTRACK_CACHE_DIR := $(CACHE)
export PATH := $(TOOLS)/bin:$(TOOLS)/node_modules/.bin:$(PATH)

.PHONY: up test lint protos bootstrap tools clean

up: bootstrap
	$(BIN)/cargotrack dev

test: bootstrap tools lint
	$(BIN)/pytest $(PYTEST_ARGS)

lint: bootstrap tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	cd protos && $(BUF) lint
	$(BIN)/python protos/generate.py --check

protos: bootstrap
	$(BIN)/python protos/generate.py

bootstrap: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.lock
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c requirements.lock -e '.[dev,local]'
	touch $@

tools: $(BUF) $(GRPCURL)

$(BUF):
	mkdir -p $(TOOLS)
	cd $(TOOLS) && npm install --silent --no-audit --no-fund @bufbuild/buf@$(BUF_VERSION)

$(GRPCURL):
	mkdir -p $(TOOLS)/bin
	GOBIN=$(TOOLS)/bin go install github.com/fullstorydev/grpcurl/cmd/grpcurl@$(GRPCURL_VERSION)

clean:
	rm -rf $(VENV) .cargotrack .pytest_cache .mypy_cache .ruff_cache
