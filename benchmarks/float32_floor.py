"""How much of a float32 cell's error is the rounding of its inputs?

``bench_solvers.py`` measures a float32 solve's error against the float64 reference on
the exact (float64) inputs. Part of that error belongs to no solver: the kernels,
targets and initial outputs are rounded to float32 before any solver sees them, and
the exact solution moves with them. This script separates the two, for the float32
cells of the benchmark's problem (n = 256, condition number 1e4) where ntkflow's error
was not below the baseline's:

* **floor**: a tight float64 solve (Tsit5, rtol = atol = 1e-11) on the float32-rounded
  inputs, against the reference on the exact inputs: the error of an exact solver given
  float32 inputs;
* for ntkflow (``solver="auto"``, default tolerances) and the baseline (the
  predecessor's algorithm: ``jax.experimental.ode.odeint`` on the full train + test
  state, default tolerances, as in ``bench_solvers.py``), both in float32: the error
  against the exact inputs' reference (what ``bench_solvers.py`` reports), and the
  solver's own error, against the tight solve on the rounded inputs.

Errors are max abs over the train and test outputs, reported separately. The float64
solves run in a subprocess with 64-bit types enabled.

Run: ``python benchmarks/float32_floor.py`` (prints a markdown table; about a minute).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_solvers import Worker, horizon_time, loss_fn, make_problem  # noqa: E402

N, COND, SEED = 256, 1e4, 0
CELLS = [("ce", "short", 1), ("ce", "short", 4), ("logcosh", "mid", 1), ("logcosh", "mid", 4)]
LOSS_NAMES = {"ce": "cross-entropy", "logcosh": "log-cosh"}


def _arrays(loss: str, horizon: str, factor: int) -> tuple[list[np.ndarray], float]:
    p = make_problem(N, N * factor, COND, SEED)
    t = horizon_time(horizon, loss, p.lam, p.y.size)
    assert t is not None
    return [p.k, p.k_test, p.y, p.f0, p.f0_test], t


def references(path: str) -> None:
    """Tight float64 solves on the exact and on the float32-rounded inputs (64-bit types
    enabled), saved to ``path``."""
    import jax.numpy as jnp

    import ntkflow as ntk

    out = {}
    for loss, horizon, factor in CELLS:
        arrays, t = _arrays(loss, horizon, factor)
        for kind in ("exact", "rounded"):
            if kind == "rounded":
                arrays = [np.asarray(a, np.float32).astype(np.float64) for a in arrays]
            k, k_test, y, f0, f0_test = (jnp.asarray(a) for a in arrays)
            predict = ntk.predict.gradient_descent(
                loss_fn(loss), k, y, solver="tsit5", rtol=1e-11, atol=1e-11, max_steps=10**8)
            train, test = predict(t, f0, f0_test, k_test)
            out[f"{loss}-{horizon}-{factor}-{kind}-train"] = np.asarray(train)
            out[f"{loss}-{horizon}-{factor}-{kind}-test"] = np.asarray(test)
    np.savez(path, **out)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "references.npz")
        env = dict(os.environ, JAX_ENABLE_X64="1")
        subprocess.run([sys.executable, __file__, "--references", path], env=env, check=True)
        refs = dict(np.load(path))

    import jax.numpy as jnp

    import ntkflow as ntk

    if jnp.zeros(()).dtype != jnp.float32:
        raise SystemExit("run with 64-bit types disabled (JAX_ENABLE_X64 unset or 0)")
    worker = Worker(None, x64=False)  # the benchmark's own baseline (its odeint solve)
    print("| loss | n | n_test | horizon | floor train / test | ntkflow train / test | "
          "baseline train / test | ntkflow own train / test | baseline own train / test |")
    print("|---|---|---|---|---|---|---|---|---|")
    for loss, horizon, factor in CELLS:
        arrays, t = _arrays(loss, horizon, factor)
        k, k_test, y, f0, f0_test = (jnp.asarray(a, jnp.float32) for a in arrays)
        key = f"{loss}-{horizon}-{factor}"
        predict = ntk.predict.gradient_descent(loss_fn(loss), k, y)
        ours = predict(t, f0, f0_test, k_test)
        base = worker.baseline_fn(loss, count=False)(
            f0, f0_test, k, k_test, y, jnp.asarray([0.0, t], jnp.float32))

        def err(out, kind: str, key: str = key) -> str:  # noqa: ANN001
            e = [np.max(np.abs(np.asarray(o, np.float64) - refs[f"{key}-{kind}-{part}"]))
                 for o, part in zip(out, ("train", "test"), strict=True)]
            return f"{e[0]:.1e} / {e[1]:.1e}"

        floor = (refs[f"{key}-rounded-train"], refs[f"{key}-rounded-test"])
        print(f"| {LOSS_NAMES[loss]} | {N} | {N * factor} | {horizon} | {err(floor, 'exact')} "
              f"| {err(ours, 'exact')} | {err(base, 'exact')} | {err(ours, 'rounded')} "
              f"| {err(base, 'rounded')} |")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--references":
        references(sys.argv[2])
    else:
        main()
