# Two commands do everything on a fresh machine:
#   make run    set up, then the main job (local Ray + vLLM-CPU cluster, P/D, migration, gRPC replay, simulator)
#   make test   set up, then the whole test suite (what CI runs)
PY ?= python3
STAMP := .setup-stamp

.PHONY: setup run test test-fast test-e2e simulate bench

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(PY) -m scheduler.cli run

simulate: $(STAMP)
	$(PY) -m scheduler.cli simulate

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not e2e"

test-e2e: $(STAMP)
	$(PY) -m pytest -q -m e2e

bench: $(STAMP)
	$(PY) bench/bench_sim.py
