# Two commands on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test coverage lint bench soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall only when the dependency list changes.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/iiot run

test: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider --durations=15

# The same suite with a line and branch coverage summary (about a fifth slower: not in CI).
coverage: $(STAMP)
	$(BIN)/python -m pytest --cov --cov-report=term:skip-covered -p no:cacheprovider

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(BIN)/mypy

bench: $(STAMP)
	@test -e /usr/include/amqp.h && command -v nginx >/dev/null && command -v wrk >/dev/null || \
	  { apt-get update -qq && apt-get install -y -qq librabbitmq-dev gcc nginx wrk >/dev/null; }
	$(BIN)/python -m bench.run_all

# Not part of `make test`: every protocol at once with random faults, then an exactly-once
# check (10 minutes by default; SOAK_S=120 make soak for a short run).
soak: $(STAMP)
	$(BIN)/python -m bench.soak --duration $${SOAK_S:-600}

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage htmlcov
