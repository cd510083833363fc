# phala_p2p: `make demo` and `make test` are all a new user needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all browser bench lint typecheck clean

$(VENV):
	$(PYTHON) -m venv $(VENV)

# (Re)install when pyproject.toml changes; `make .venv` just creates the environment.
$(STAMP): pyproject.toml | $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/launch.py --gatekeepers 4 --miners 2 --clients 1 --demo

lint: $(STAMP)
	$(VENV)/bin/ruff check phala_p2p tests benchmarks examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy phala_p2p

# The suite runs on TEST_WORKERS processes (pytest-xdist): most of its time is spent waiting
# on blocks and timeouts, and two workers take it from about 9 to about 6 minutes on 2 cores.
TEST_WORKERS ?= 2

test: lint typecheck
	$(PY) -m pytest -m "not slow" -q -n $(TEST_WORKERS)

# The dashboard's browser test needs Chromium, which CI machines start without: install it
# (Debian's chromium and chromium-driver) when it is missing and we are root with apt-get.
# Elsewhere that test is skipped, saying why. `make test` never needs a browser.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
	      apt-get install -y -qq chromium chromium-driver; \
	  else \
	    echo "no chromium and not root with apt-get: the browser test will be skipped"; \
	  fi; }

test-all: lint typecheck browser
	@command -v ip >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq iproute2; \
	  else \
	    echo "no ip (iproute2) and not root with apt-get: the netns tests will be skipped"; \
	  fi; }
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
