# Berth — one Makefile for both the registry server and the operator.
# Every target installs what it needs (idempotently), so a fresh clone works.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export BERTH_CACHE ?= $(HOME)/.cache/berth
export PATH := /usr/local/go/bin:$(PATH)
# The venv is rebuilt when the pinned dependencies change.
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-12)

PYTEST_ARGS ?=
# e.g. BENCH_ARGS="--only operator" reruns one section (python -m bench --help).
BENCH_ARGS ?=
HELM = $(BERTH_CACHE)/helm-$(shell sed -n 's/^HELM_VERSION=//p' tools/versions.env)/helm

.PHONY: help install tools test unit integration lint fmt run serve bench crds chart-lint image image-local e2e-kind clean

help:
	@echo "make install     create .venv and install berth with pinned dependencies"
	@echo "make tools       build/install test tools into $(BERTH_CACHE) (cached by version)"
	@echo "make test        install everything needed and run all tests"
	@echo "make lint        ruff, mypy --strict, import-linter contracts"
	@echo "make run         the local stack: control plane, operator, samples, a registry (Ctrl-C stops)"
	@echo "make serve       only the registry server on 127.0.0.1:5000 with ./data"
	@echo "make crds        regenerate helm/berth/crds, manifests/ and docs/crd-reference.md"
	@echo "make chart-lint  helm lint --strict and helm template of helm/berth"
	@echo "make image       build the Berth image (needs Docker)"
	@echo "make image-local build the Berth image without Docker (root; an OCI archive, cached)"
	@echo "make bench       server vs CNCF distribution 2.8, operator, replication (BENCH_ARGS)"
	@echo "make e2e-kind    cluster end-to-end test on kind (needs a Docker engine)"

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

tools:
	bash tools/build.sh

test: install tools
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: install
	$(BIN)/python -m pytest -m "not integration" $(PYTEST_ARGS)

integration: install tools
	$(BIN)/python -m pytest -m integration $(PYTEST_ARGS)

# The drift check renders the chart with helm, so lint needs the tools too: on a new
# machine nothing else has built them yet.
lint: install tools
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports
	$(BIN)/python -m berth_dev.generate --check

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

run: install tools
	$(BIN)/python -m berth_dev

serve: install
	$(BIN)/python -m registry_server

crds: install tools
	$(BIN)/python -m berth_dev.generate

chart-lint: tools
	$(HELM) lint --strict helm/berth
	$(HELM) template berth helm/berth --namespace berth-system >/dev/null

image:
	bash hack/image.sh

# The same image from the Dockerfile's recipe over a debootstrap base, without a Docker
# engine; prints the OCI archive's path last (berth_dev/image.py).
image-local: install
	$(BIN)/python -m berth_dev.image build

bench: install tools
	$(BIN)/python -m bench $(BENCH_ARGS)

e2e-kind: install tools
	bash tools/e2e-kind.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
