"""Shared test configuration.

The suite runs twice (``make test``): with ``JAX_ENABLE_X64=0`` (float32, JAX's
default) and ``JAX_ENABLE_X64=1`` (float64). Tolerances are keyed by the active
default float dtype.
"""

from __future__ import annotations

import gc
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# Compilation is most of the suite's time (small problems, many distinct programs; 1,212 s
# of a 1,556 s float64 run, 4,317 programs, with the first flag below only), so the tests
# compile XLA's CPU code faster:
# - without LLVM's expensive optimization passes: bit-identical results (a Rosenbrock, a
#   Tsit5 and a momentum solve compared); `tests/test_solvers.py` alone, float64, took 506 s
#   instead of about 690 s;
# - with XLA's older fusion code generator (`xla_cpu_use_fusion_emitters=false`): 29% less
#   compilation on six solves of every kind (15.5 s against 21.9 s, two runs each), the
#   same run times; results agree to 1.6e-11 relative in float64, not bitwise;
# - at XLA's lowest backend optimization level (`xla_backend_optimization_level=0`: no
#   LLVM optimization of the generated code): the whole suite, both precisions at once,
#   took 490 s (float32) and 529 s (float64) instead of 1,107 s and 1,126 s; an unrolled
#   Rosenbrock solve (n = 20) compiled in 2.2 s instead of 5.1 s and ran in 51 ms instead
#   of 35 ms. `tests/test_codegen.py` runs solves of every kind with XLA's default flags
#   in another process and compares.
# The flags are set before the first computation (JAX reads XLA_FLAGS when it starts its
# backend, not on import). The benchmarks and users' programs run without them.
_XLA_FLAGS = os.environ.get("XLA_FLAGS", "")
for _flag, _value in (("xla_llvm_disable_expensive_passes", "true"),
                      ("xla_cpu_use_fusion_emitters", "false"),
                      ("xla_backend_optimization_level", "0")):
    if _flag not in _XLA_FLAGS:  # a value set by the caller wins
        _XLA_FLAGS = f"{_XLA_FLAGS} --{_flag}={_value}".strip()
os.environ["XLA_FLAGS"] = _XLA_FLAGS

X64 = bool(jax.config.jax_enable_x64)
DTYPE = jnp.zeros(()).dtype

#: (rtol, atol) for comparisons against references, by precision.
TOL = {"rtol": 1e-6, "atol": 1e-7} if X64 else {"rtol": 2e-3, "atol": 2e-4}


def rel_err(a, b) -> float:
    """max |a - b| / max(|b|, 1e-12) (errors relative to the reference's scale)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def psd_kernel(key, n: int, p: int | None = None, dtype=None) -> jnp.ndarray:
    """A random PSD kernel ``J J^T / p`` of shape ``(n, n)``."""
    p = 2 * n if p is None else p
    j = jax.random.normal(key, (n, p), dtype or DTYPE)
    return j @ j.T / p


def float32_power_law_problem(n: int, n_test: int, k: int, seed: int) -> tuple:
    """Float32 ``(k_tt, k_st, y, f0, ft0)`` and the spectrum ``lam`` (float64): ``K_tt``
    with eigenvalues ``n * logspace(0, -4, n)`` (cond 1e4), a consistent ``K_st``, one-hot
    targets and small initial outputs."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    lam = np.logspace(0, -4, n) * n
    w = rng.normal(size=(n_test, n)) / np.sqrt(n)
    arrays = [(q * lam) @ q.T, (w * lam) @ q.T, np.eye(k)[np.arange(n) % k],
              0.1 * rng.normal(size=(n, k)), 0.1 * rng.normal(size=(n_test, k))]
    return tuple(np.asarray(a, np.float32) for a in arrays) + (lam,)


@pytest.fixture
def key():
    return jax.random.PRNGKey(0)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop JAX's compiled programs after each test module. Every XLA CPU executable
    holds memory mappings; the float64 suite compiled enough of them in one process to
    approach the kernel's limit on mappings per process (``vm.max_map_count``, 65,530 by
    default: 63,129 measured at 54% of the suite), where compilation crashed with a
    segmentation fault."""
    yield
    jax.clear_caches()
    gc.collect()


def pytest_report_header(config):
    return f"ntkflow tests: default float dtype {DTYPE} (JAX_ENABLE_X64={int(X64)})"
