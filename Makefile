# Pleura: the two commands for a fresh machine are `make demo` and `make test`.

SHELL := /bin/bash
# Big downloads live outside the work tree so fresh clones reuse them.
PLEURA_CACHE ?= $(HOME)/.cache/pleura
VENV := $(PLEURA_CACHE)/venv
PYTHON := $(VENV)/bin/python
CARGO ?= cargo

.PHONY: all build test demo services venv fmt clippy clean-tests

all: build

services:
	@scripts/ensure-services.sh

# Python is only for checks that need the reference tools: the `onnx`
# package's checker, and the README's integrator example (pika, redis).
$(PYTHON):
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check onnx==1.23.2 pika==1.4.4 redis==8.1.0

venv: $(PYTHON)

build:
	$(CARGO) build --workspace --bins

test: services venv build
	PLEURA_PYTHON=$(PYTHON) $(CARGO) test --workspace -- --test-threads=2

demo:
	@scripts/demo.sh

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy --workspace --all-targets
