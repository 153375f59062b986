# Weft — the front door. `make` alone lists the targets.
.DEFAULT_GOAL := help
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
WEFT := $(VENV)/bin/weft
PYTEST_ARGS ?=

.PHONY: help setup run test lint proto proto-check bench soak demo infra-up infra-down doctor clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

setup: ## install Debian packages, kernel headers link, and the venv (idempotent, root)
	@bash infra/setup.sh

run: setup ## broker + Redis + this host's agent + stitcher, exporting traces (Ctrl-C stops)
	@$(WEFT) run

test: setup ## lint, then every test (unit, contract, bpf, infra, netns, slow) against real components
	@$(MAKE) --no-print-directory lint
	@$(PY) -m pytest $(PYTEST_ARGS)

lint: ## ruff + mypy + generated-code check
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/mypy weft schemas probe_agent stitcher infra
	@$(PY) -m schemas.generate --check

proto: ## regenerate schemas/*_pb2.py from the .proto files
	@$(PY) -m schemas.generate

bench: setup ## run the benchmarks; prints a table, writes results/bench.json
	@$(PY) -m tests.bench

soak: setup ## fault-injection areas (tests/bench/*.soak); writes results/soak.json
	@$(PY) -m tests.bench --soak

demo: setup ## multi-node demo: test nodes, agents, stitcher, demo services, traces shown
	@$(WEFT) demo

infra-up: setup ## start the local broker and Redis (loopback)
	@$(WEFT) infra up

infra-down: ## stop what infra-up started
	@$(WEFT) infra down

doctor: setup ## what this kernel and machine allow
	@$(WEFT) doctor

clean: ## remove the venv, caches and results
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache results run *.egg-info
