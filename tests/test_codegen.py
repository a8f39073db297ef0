"""The suite's code generation against users': the same solves, compiled both ways.

``conftest.py`` makes XLA compile the tests' programs fast (no LLVM optimization, the older
fusion code generator), which users' programs do not get. Here a fresh Python process
with XLA's default flags runs solves of every kind (each explicit pair, the Rosenbrock
method, the exponential integrator, the Chebyshev expansion, with momentum, test outputs
and the end point of training) and the compensated float32 arithmetic, and its results
must agree with the same computations compiled the suite's way, in this process.

This module imports nothing from ``conftest`` so that the other process, which loads it
as a plain module, starts XLA with the default flags.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

import ntkflow as nt
from ntkflow._compensated import dot2, two_prod, two_sum


def _cross_entropy(f, y):
    return -jnp.mean(jax.nn.log_softmax(f) * y)


def _log_cosh(f, y):
    return jnp.mean(jnp.log(jnp.cosh(f - y)))


def _mse(f, y):
    return 0.5 * jnp.mean((f - y) ** 2)


def computations() -> dict[str, np.ndarray]:
    """Solves of every kind and compensated arithmetic, as named NumPy arrays."""
    dtype = jnp.zeros(()).dtype
    rng = np.random.default_rng(7)
    n, n_test, k = 24, 5, 3
    # Features whose kernel has eigenvalues 1 ... 1e-2 exactly, far above the null-mode
    # threshold (n * eps = 2.9e-6 in float32): a mode near it is classified by round-off,
    # differently by the two code generations, and moves the end point of training.
    lam = np.logspace(0, -2, n)
    q = np.linalg.qr(rng.normal(size=(n, n)))[0]
    j = q * np.sqrt(lam)
    j_test = rng.normal(size=(n_test, n)) @ q.T / np.sqrt(n) * np.sqrt(lam)
    arrays = (j @ j.T, j_test @ j.T, np.eye(k)[np.arange(n) % k],
              0.1 * rng.normal(size=(n, k)), 0.1 * rng.normal(size=(n_test, k)))
    kernel, k_test, y, f0, ft0 = (jnp.asarray(a, dtype) for a in arrays)
    ts = jnp.asarray([0.3, 3.0, 30.0], dtype)
    cases = {
        "tsit5_ce": (_cross_entropy, "tsit5", None, ts),
        "dopri5_ce": (_cross_entropy, "dopri5", None, ts),
        "rodas5p_logcosh": (_log_cosh, "rodas5p", None, ts),
        "rodas5p_logcosh_momentum": (_log_cosh, "rodas5p", 0.9, ts),
        "expo_mse_momentum": (_mse, "expo", 0.9, ts),
        "auto_mse": (_mse, "auto", None, ts),  # the Chebyshev expansion
        "auto_logcosh_end": (_log_cosh, "auto", None, jnp.asarray([jnp.inf], dtype)),
    }
    out = {}
    for name, (loss, solver, momentum, t) in cases.items():
        predict = nt.predict.gradient_descent(loss, kernel, y, 1.0, momentum, solver=solver)
        out[f"{name}_train"], out[f"{name}_test"] = predict(t, f0, ft0, k_test)
    out["mse_closed_form_test"] = nt.predict.gradient_descent_mse(kernel, y)(
        ts, f0, ft0, k_test)[1]
    a = jnp.asarray(rng.normal(size=4096), jnp.float32)
    b = jnp.asarray(rng.normal(size=4096) * 1e-3, jnp.float32)
    out["operand_a"], out["operand_b"] = a, b
    out["two_sum_hi"], out["two_sum_lo"] = two_sum(a, b)
    out["two_prod_hi"], out["two_prod_lo"] = two_prod(a, b)
    out["dot2_hi"], out["dot2_lo"] = dot2(a[None, :], b[:, None])
    return {key: np.asarray(v) for key, v in out.items()}


def test_default_code_generation_computes_what_the_suite_checks(tmp_path):
    assert "xla_backend_optimization_level=0" in os.environ.get("XLA_FLAGS", "")
    path = tmp_path / "default.npz"
    env = {key: v for key, v in os.environ.items() if key != "XLA_FLAGS"}
    script = (
        "import importlib.util, numpy as np\n"
        f"spec = importlib.util.spec_from_file_location('codegen', {__file__!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        f"np.savez({str(path)!r}, **module.computations())\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    default = dict(np.load(path))
    here = computations()
    assert set(default) == set(here)
    x64 = jnp.zeros(()).dtype == jnp.float64
    # Measured: float64 solves within 2.0e-10 of each other (relative to the outputs'
    # scale), float32 ones within 3.7e-6 (the same steps up to round-off).
    for key, value in here.items():
        if key.startswith(("two_", "dot2", "operand")):
            continue
        scale = max(float(np.max(np.abs(value))), 1e-12)
        gap = float(np.max(np.abs(default[key] - value))) / scale
        assert gap < (1e-9 if x64 else 1e-5), (key, gap)
    # Compensated float32 arithmetic in both: error-free sums and products (hi + lo is the
    # exact result, in float64), and a dot product far more accurate than float32's unit
    # round-off (6e-8) relative to the sum of |a_i b_i| (measured: 4.8e-10 in both).
    for where in (default, here):
        a, b = (where[name].astype(np.float64) for name in ("operand_a", "operand_b"))
        assert np.array_equal(where["two_sum_hi"].astype(np.float64) + where["two_sum_lo"],
                              a + b)
        assert np.array_equal(where["two_prod_hi"].astype(np.float64) + where["two_prod_lo"],
                              a * b)
        dot = float(where["dot2_hi"].astype(np.float64).sum() + where["dot2_lo"].sum())
        assert abs(dot - float(np.dot(a, b))) <= 2e-9 * float(np.abs(a) @ np.abs(b))
