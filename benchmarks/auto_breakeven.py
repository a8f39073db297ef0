"""Does ``auto``'s stiffness rule for regression losses hold in both precisions?

For a regression loss (targets that minimize it, e.g. log-cosh) without momentum,
``solver="auto"`` takes the Rosenbrock method (``"rodas5p"``, one ``eigh`` and a few dozen
steps) when the request's stiffness ``S = c0 lam_max tau_max`` exceeds ``0.25 n + 250``,
and its explicit method otherwise (``ntkflow._auto``: ``c0`` is the loss curvature along
the initial gradient). That rule was measured against Tsit5 in float64; in float32 the
explicit method is Dormand-Prince 5(4) and both methods control their steps to a tenth of
the tolerances (``Dopri5.step_tolerances``, ``Rodas5P.step_tolerances``), so the
break-even may differ. This script measures it in the precision it runs in:

* problems: ``bench_solvers.py``'s (power-law spectrum over a condition number of 1e4,
  10 outputs, one-hot targets, seed 0), log-cosh, n train and n test points;
* horizons: ``t = S_nom / (c lam_max)`` with ``c = 1 / y.size``, the benchmark's
  definition of ``S`` (its "mid" horizon is ``S_nom = 1000``); ``S`` is what ``auto``
  computes for the same request (about half of ``S_nom`` here: the curvature along the
  initial gradient is below ``c``);
* times: ``gradient_descent(...)(t, f0, f0_test, k_test)`` with predictor construction,
  ``solver=`` the explicit method (``"dopri5"`` in float32, ``"tsit5"`` in float64) and
  ``"rodas5p"``, default tolerances, median of 5 runs after compilation (3 for n >= 1024),
  the two methods alternating.

Prints a markdown table: per cell the two times, their ratio, ``auto``'s pick (``S``
against the rule's threshold) and whether it is the faster method or within 10% of it.
Run: ``python benchmarks/auto_breakeven.py`` (float32) and ``JAX_ENABLE_X64=1 python
benchmarks/auto_breakeven.py`` (float64); about two minutes each on 2 cores.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_solvers import curvature, log_cosh, machine, make_problem  # noqa: E402

COND, SEED = 1e4, 0


def auto_stiffness(k, y, f0, t) -> float:  # noqa: ANN001
    """``S`` as ``solver="auto"`` computes it for this request (its classification)."""
    import jax
    import jax.numpy as jnp

    from ntkflow import _checks
    from ntkflow._auto import classify
    from ntkflow._dynamics import Dynamics
    from ntkflow.predict import _Boundary

    b = _Boundary(k, y, (-1,))
    lam_max = jnp.asarray(_checks.check_psd(b.k, "k", b.k_dtype), b.dtype)
    dyn = Dynamics(b.k, b.flat_loss(log_cosh), b.y, None, False)
    y0 = dyn.initial_state(jnp.asarray(f0, b.dtype), None)
    facts = jax.device_get(classify(dyn, y0, jnp.asarray([t], b.dtype), lam_max))
    return float(facts[3])


def solve(solver: str, arrays: tuple, t: float) -> object:
    """Build the predictor and predict the train and test outputs at ``t``."""
    import ntkflow as ntk

    k, k_test, y, f0, f0_test = arrays
    predict = ntk.predict.gradient_descent(log_cosh, k, y, solver=solver)
    return predict(t, f0, f0_test, k_test)


def median_times(runs: dict, repeats: int) -> dict[str, float]:
    """Median wall time of each run, after one call to compile, alternating the runs."""
    import jax

    for run in runs.values():
        jax.block_until_ready(run())
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            jax.block_until_ready(run())
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(ns: list[int], grid: list[float]) -> None:
    import jax
    import jax.numpy as jnp

    x64 = bool(jax.config.jax_enable_x64)
    dtype = jnp.float64 if x64 else jnp.float32
    explicit = "tsit5" if x64 else "dopri5"
    print(f"- {machine()}")
    print(f"- float{64 if x64 else 32}; explicit method `{explicit}`\n")
    print(f"| n | S_nom | S (auto) | threshold 0.25 n + 250 | {explicit} s | rodas5p s "
          f"| {explicit} / rodas5p | auto picks | faster or within 10% |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in ns:
        p = make_problem(n, n, COND, SEED)
        k, k_test, y, f0, f0_test = (jnp.asarray(a, dtype)
                                     for a in (p.k, p.k_test, p.y, p.f0, p.f0_test))
        c = curvature("logcosh", y.size)
        threshold = 0.25 * n + 250
        for s_nom in grid:
            t = s_nom / (c * p.lam[0])
            s = auto_stiffness(k, y, f0, t)

            arrays = (k, k_test, y, f0, f0_test)
            times = median_times({m: functools.partial(solve, m, arrays, t)
                                  for m in (explicit, "rodas5p")}, 3 if n >= 1024 else 5)
            ratio = times[explicit] / times["rodas5p"]
            pick = "rodas5p" if s > threshold else explicit
            best = min(times.values())
            ok = "yes" if times[pick] <= 1.1 * best else "no"
            print(f"| {n} | {s_nom:g} | {s:.0f} | {threshold:.0f} | {times[explicit]:.4f} "
                  f"| {times['rodas5p']:.4f} | {ratio:.2f} | {pick} | {ok} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--s-nom", type=float, nargs="+", default=[300, 600, 1000, 2000])
    args = parser.parse_args()
    main(args.n, args.s_nom)
