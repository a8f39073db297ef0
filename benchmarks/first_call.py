"""What a first call costs: compilation, with and without JAX's persistent cache.

``bench_solvers.py`` times predictors after compilation. A user's first call in a fresh
process also traces and compiles the predictor's programs (the input checks, the
preparation, the solve), once per loss, shapes, dtype and solver. This script measures that
cost in fresh processes, for one request per solver ``auto`` picks on
``bench_solvers.py``'s problem (n = 256 train and 256 test points, 10 outputs):

* MSE, short horizon (the Chebyshev expansion); MSE, converged horizon (the exponential
  integrator); cross-entropy, short horizon (the explicit method); log-cosh, mid horizon
  (the Rosenbrock method); and, for comparison, the predecessor's algorithm
  (``jax.experimental.ode.odeint`` on the full state, jitted, as in ``bench_solvers.py``)
  for cross-entropy at the short horizon;
* per request: the import of ``ntkflow``, building the predictor, the first and the
  second call (wall times, one process each), in three processes: without a persistent
  cache, with an empty one (``jax_compilation_cache_dir`` set to a new directory, every
  program cached), and with the cache the previous process filled.

Prints a markdown table. Run: ``python benchmarks/first_call.py`` (float32) and
``JAX_ENABLE_X64=1 python benchmarks/first_call.py`` (float64), about a minute each.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

REQUESTS = [("mse", "short"), ("mse", "converged"), ("ce", "short"), ("logcosh", "mid"),
            ("ce", "short", "baseline")]
NAMES = {"mse": "MSE", "ce": "cross-entropy", "logcosh": "log-cosh"}


def child(loss_name: str, horizon: str, method: str, cache: str) -> None:
    """One fresh process: import, build, first and second call; prints JSON."""
    start = time.perf_counter()
    import jax

    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    import jax.numpy as jnp
    from bench_solvers import Worker, horizon_time, loss_fn, make_problem

    import ntkflow as ntk

    imported = time.perf_counter() - start
    p = make_problem(256, 256, 1e4, 0)
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    k, k_test, y, f0, f0_test = (jnp.asarray(a, dtype)
                                 for a in (p.k, p.k_test, p.y, p.f0, p.f0_test))
    t = horizon_time(horizon, loss_name, p.lam, p.y.size)
    out: dict[str, float] = {"import": imported}
    if method == "baseline":
        solve = Worker(None, x64=dtype == jnp.float64).baseline_fn(loss_name, count=False)
        times = jnp.asarray([0.0, t], dtype)
        call = lambda: solve(f0, f0_test, k, k_test, y, times)  # noqa: E731
        out["build"] = 0.0
    else:
        start = time.perf_counter()
        predict = ntk.predict.gradient_descent(loss_fn(loss_name), k, y)
        out["build"] = time.perf_counter() - start
        call = lambda: predict(t, f0, f0_test, k_test)  # noqa: E731
    for name in ("first", "second"):
        start = time.perf_counter()
        jax.block_until_ready(call())
        out[name] = time.perf_counter() - start
    print(json.dumps(out))


def run_child(request: tuple[str, ...], cache: str) -> dict[str, float]:
    loss_name, horizon, *rest = request
    method = rest[0] if rest else "ntkflow"
    result = subprocess.run(
        [sys.executable, __file__, "--child", loss_name, horizon, method, cache],
        capture_output=True, text=True, check=True, env=dict(os.environ))
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    import jax
    from bench_solvers import machine

    print(f"- {machine()}")
    print(f"- float{64 if jax.config.jax_enable_x64 else 32}; wall times in seconds "
          "(import / build / first call / second call)\n")
    print("| request | no persistent cache | empty cache | warm cache |")
    print("|---|---|---|---|")
    for request in REQUESTS:
        cells = []
        with tempfile.TemporaryDirectory() as cache:
            for directory in ("", cache, cache):
                r = run_child(request, directory)
                cells.append(f"{r['import']:.2f} / {r['build']:.2f} / {r['first']:.2f} / "
                             f"{r['second']:.3f}")
        label = f"{NAMES[request[0]]}, {request[1]}"
        if len(request) > 2:
            label += " (predecessor's algorithm)"
        print(f"| {label} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--child":
        child(*sys.argv[2:])
    else:
        main()
