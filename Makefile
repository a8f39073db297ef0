# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo lint typecheck pytest pytest-x64 bench fixtures clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[demo,test]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m ntkflow demo

test: lint typecheck pytest pytest-x64

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

typecheck: $(STAMP)
	$(PY) -m mypy src/ntkflow

# The suite runs twice: float32 (JAX's default) and float64.
pytest: $(STAMP)
	JAX_ENABLE_X64=0 $(PY) -m pytest -q -p no:cacheprovider

pytest-x64: $(STAMP)
	JAX_ENABLE_X64=1 $(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/bench_solvers.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
