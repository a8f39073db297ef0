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

A float32 cell's error is round-off, which depends on the problem's particular numbers:
whether ntkflow's or the baseline's is the smaller can change from one random problem to
the next. ``--seeds S`` (default 6) therefore adds a second table: the cross-entropy cells
at all three finite horizons and the log-cosh cells at the short and mid horizons, with n
and 4n test points, on the benchmark's problem drawn with seeds ``0 .. S-1`` (seed 0 is
``bench_solvers.py``'s). Per cell: the ratio of ntkflow's error to the baseline's (max abs
over train and test outputs, against the exact inputs' reference) for each seed, their
geometric mean, and in how many seeds ntkflow's error is the smaller or equal.

Run: ``python benchmarks/float32_floor.py`` (prints two markdown tables; about two
minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import functools
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
SEED_CELLS = [(loss, horizon, factor)
              for loss, horizons in (("ce", ("short", "mid", "converged")),
                                     ("logcosh", ("short", "mid")))
              for horizon in horizons for factor in (1, 4)]
LOSS_NAMES = {"ce": "cross-entropy", "logcosh": "log-cosh"}


def _arrays(loss: str, horizon: str, factor: int, seed: int = SEED
            ) -> tuple[list[np.ndarray], float]:
    p = make_problem(N, N * factor, COND, seed)
    t = horizon_time(horizon, loss, p.lam, p.y.size)
    assert t is not None
    return [p.k, p.k_test, p.y, p.f0, p.f0_test], t


def _cells(seeds: int) -> list[tuple[str, str, int, int, tuple[str, ...]]]:
    """``(loss, horizon, factor, seed, kinds)``: the first table's cells (seed 0, both
    references) and the second's (the exact inputs' reference only)."""
    cells: list[tuple[str, str, int, int, tuple[str, ...]]] = [
        (loss, horizon, factor, SEED, ("exact", "rounded"))
        for loss, horizon, factor in CELLS]
    cells += [(loss, horizon, factor, seed, ("exact",))
              for seed in range(seeds) for loss, horizon, factor in SEED_CELLS
              if (loss, horizon, factor, seed) not in {c[:4] for c in cells}]
    return cells


def _key(loss: str, horizon: str, factor: int, seed: int) -> str:
    return f"{loss}-{horizon}-{factor}-{seed}"


def references(path: str, seeds: int) -> None:
    """Tight float64 solves on the exact and on the float32-rounded inputs (64-bit types
    enabled), saved to ``path``."""
    import jax.numpy as jnp

    import ntkflow as ntk

    out = {}
    for loss, horizon, factor, seed, kinds in _cells(seeds):
        exact, t = _arrays(loss, horizon, factor, seed)
        for kind in kinds:
            arrays = exact if kind == "exact" else [
                np.asarray(a, np.float32).astype(np.float64) for a in exact]
            k, k_test, y, f0, f0_test = (jnp.asarray(a) for a in arrays)
            predict = ntk.predict.gradient_descent(
                loss_fn(loss), k, y, solver="tsit5", rtol=1e-11, atol=1e-11, max_steps=10**8)
            train, test = predict(t, f0, f0_test, k_test)
            key = _key(loss, horizon, factor, seed)
            out[f"{key}-{kind}-train"] = np.asarray(train)
            out[f"{key}-{kind}-test"] = np.asarray(test)
    np.savez(path, **out)


@functools.cache  # the first table's cells are also seed 0's of the second
def _solve_both(loss: str, horizon: str, factor: int, seed: int, worker: Worker
                ) -> tuple[tuple[object, object], tuple[object, object]]:
    """ntkflow's and the baseline's float32 outputs ``(train, test)``."""
    import jax.numpy as jnp

    import ntkflow as ntk

    arrays, t = _arrays(loss, horizon, factor, seed)
    k, k_test, y, f0, f0_test = (jnp.asarray(a, jnp.float32) for a in arrays)
    predict = ntk.predict.gradient_descent(loss_fn(loss), k, y)
    ours = predict(t, f0, f0_test, k_test)
    base = worker.baseline_fn(loss, count=False)(
        f0, f0_test, k, k_test, y, jnp.asarray([0.0, t], jnp.float32))
    return ours, base


def _errors(out: tuple[object, object], refs: dict, key: str, kind: str) -> list[float]:
    """Max abs errors of ``(train, test)`` against the reference ``kind``."""
    return [float(np.max(np.abs(np.asarray(o, np.float64) - refs[f"{key}-{kind}-{part}"])))
            for o, part in zip(out, ("train", "test"), strict=True)]


def seed_table(refs: dict, seeds: int, worker: Worker) -> None:
    """The second table: ntkflow's error over the baseline's, seed by seed."""
    print(f"| loss | n_test | horizon | ntkflow / baseline, seeds 0-{seeds - 1} | geometric "
          "mean | ntkflow <= baseline | median error ntkflow / baseline |")
    print("|---|---|---|---|---|---|---|")
    for loss, horizon, factor in SEED_CELLS:
        ours_e, base_e = [], []
        for seed in range(seeds):
            key = _key(loss, horizon, factor, seed)
            ours, base = _solve_both(loss, horizon, factor, seed, worker)
            ours_e.append(max(_errors(ours, refs, key, "exact")))
            base_e.append(max(_errors(base, refs, key, "exact")))
        ratios = np.asarray(ours_e) / np.asarray(base_e)
        mean = float(np.exp(np.mean(np.log(ratios))))
        wins = int(np.sum(ratios <= 1.0))
        print(f"| {LOSS_NAMES[loss]} | {N * factor} | {horizon} | "
              f"{' '.join(f'{r:.2f}' for r in ratios)} | {mean:.2f} | {wins} of {seeds} | "
              f"{np.median(ours_e):.1e} / {np.median(base_e):.1e} |")


def main(seeds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "references.npz")
        env = dict(os.environ, JAX_ENABLE_X64="1")
        subprocess.run([sys.executable, __file__, "--references", path, str(seeds)], env=env,
                       check=True)
        refs = dict(np.load(path))

    import jax.numpy as jnp

    if jnp.zeros(()).dtype != jnp.float32:
        raise SystemExit("run with 64-bit types disabled (JAX_ENABLE_X64 unset or 0)")
    worker = Worker(None, x64=False)  # the benchmark's own baseline (its odeint solve)
    print("| loss | n | n_test | horizon | floor train / test | ntkflow train / test | "
          "baseline train / test | ntkflow own train / test | baseline own train / test |")
    print("|---|---|---|---|---|---|---|---|---|")
    for loss, horizon, factor in CELLS:
        key = _key(loss, horizon, factor, SEED)
        ours, base = _solve_both(loss, horizon, factor, SEED, worker)

        def err(out, kind: str, key: str = key) -> str:  # noqa: ANN001
            e = _errors(out, refs, key, kind)
            return f"{e[0]:.1e} / {e[1]:.1e}"

        floor = (refs[f"{key}-rounded-train"], refs[f"{key}-rounded-test"])
        print(f"| {LOSS_NAMES[loss]} | {N} | {N * factor} | {horizon} | {err(floor, 'exact')} "
              f"| {err(ours, 'exact')} | {err(base, 'exact')} | {err(ours, 'rounded')} "
              f"| {err(base, 'rounded')} |")
    if seeds > 1:
        print()
        seed_table(refs, seeds, worker)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--references":
        references(sys.argv[2], int(sys.argv[3]))
    else:
        parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
        parser.add_argument("--seeds", type=int, default=6,
                            help="problems drawn for the second table (1: first table only)")
        main(parser.parse_args().seeds)
