# phala_p2p: `make demo` and `make test` are all a new user needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-all bench lint typecheck clean

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

test: lint typecheck
	$(PY) -m pytest -m "not slow" -q

test-all: lint typecheck
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
