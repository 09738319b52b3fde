# oodlab: `make demo` runs the smoke study, `make test` the tests (`make test-fast`: no end-to-end studies),
# `make lint` ruff + mypy; all set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# Offline datasets: ../shared/data beside the checkout unless OODLAB_DATA_DIR says otherwise.
export OODLAB_DATA_DIR ?= $(abspath ../shared/data)
STORAGE ?= oodlab-results
# Test processes (pytest-xdist): most of a study test is process start-up and waiting, so two
# share two cores well; TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2

.PHONY: setup demo test test-fast lint bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: setup  ## smoke study of studies/negprior_shift.py (re-running it resumes, i.e. just prints the table)
	$(PY) studies/negprior_shift.py --smoke --storage $(STORAGE) \
	  $$( [ -d $(STORAGE)/ray/negprior_shift-smoke ] && echo --resume )

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist load --maxschedchunk 1

test-fast: setup  ## every test but the end-to-end studies (marker `slow`)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist load -m "not slow"

lint: setup  ## ruff (style, imports, bugbear, complexity) and mypy, both configured in pyproject.toml
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

bench: setup
	$(PY) benchmarks/overhead.py

clean:
	rm -rf $(STORAGE) .pytest_cache
