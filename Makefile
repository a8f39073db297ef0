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

# Lint, type check, then the suite in float32 and float64, the two precisions in parallel
# (each run is mostly single-threaded compilation); each log is printed when both are done.
test: lint typecheck
	@rm -f .pytest-f32.log .pytest-f64.log
	@$(MAKE) --no-print-directory pytest > .pytest-f32.log 2>&1 & p32=$$!; \
	$(MAKE) --no-print-directory pytest-x64 > .pytest-f64.log 2>&1; s64=$$?; \
	wait $$p32; s32=$$?; \
	echo "== float32 (JAX_ENABLE_X64=0) =="; cat .pytest-f32.log; \
	echo "== float64 (JAX_ENABLE_X64=1) =="; cat .pytest-f64.log; \
	test $$s32 -eq 0 && test $$s64 -eq 0

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

typecheck: $(STAMP)
	$(PY) -m mypy src/ntkflow

# The suite runs twice: float32 (JAX's default) and float64. NumPy's BLAS gets one thread
# per run: `make test` runs the two at once, and two multi-threaded BLAS pools on two cores
# spin against each other (the test building a 4096 x 4096 orthogonal matrix took 26 s
# instead of 8 s, both precisions at once, and 41 s within the suite; the whole suite took
# 65-100 s less per precision; 15-18 min in all, as the machine's load varies). On a 2-core
# Zen 3 (AVX2) machine the same suite took 46 min (float32 2670 s, float64 2754 s, at
# 712a2bc): 79-80% of it XLA compilation, 61-64% the solver tests. There a first
# Rosenbrock predictor call (n = 64, log-cosh; two processes at once, as here) took 18 s,
# 20 s with momentum (the second 0.15 s): its step unrolled 8 stages, each with its own
# conjugate-gradient loop. Since 352d371 kernels below 256 rows run the stages in a loop,
# which halves that compilation: the suite took 33 min there (float32 1918 s, float64
# 1962 s; 34 min with the install). Since 3a4b037 the tests compile without LLVM's
# expensive passes (tests/conftest.py): 24.5 min (float32 1426 s, float64 1471 s; 25.5 min
# with the install, at da10fc6), and 32 min (1879 s, 1931 s) an hour later at 573418a, with
# the same code and tests: the machine's speed varies that much. Since 44f6a6f they also
# compile with XLA's older fusion code generator, and since 4ea9eb5 predictors no longer
# compile ~26 op-by-op programs per new kernel size: 21.1 min with the install at 0f78c69
# (float32 1162 s, float64 1179 s), 23.7 min at 600efe3 (1315 s, 1333 s), 20.2 min at
# d60db6c (1107 s, 1126 s). At XLA's lowest backend optimization level (tests/conftest.py;
# tests/test_codegen.py compares with the default code generation) the same tests took
# 490 s and 529 s, and a clean clone of 78e99a9 8.5 min with the install (float32 437 s,
# float64 455 s).
pytest: $(STAMP)
	OPENBLAS_NUM_THREADS=1 JAX_ENABLE_X64=0 $(PY) -m pytest -q -p no:cacheprovider

pytest-x64: $(STAMP)
	OPENBLAS_NUM_THREADS=1 JAX_ENABLE_X64=1 $(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/bench_solvers.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
