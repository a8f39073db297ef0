"""ntkflow's ``gradient_descent`` against neural-tangents' ODE algorithm, cell by cell.

What is compared
----------------
* **ntkflow**: ``ntkflow.predict.gradient_descent(loss, k_train_train, y_train,
  solver="auto")`` called as a user calls it: build the predictor, then ask it for
  ``(fx_train, fx_test)`` at one time ``t``. The time covers both calls (the predictor
  runs input checks, including one ``eigvalsh`` for the PSD check, and ``auto`` may run
  an ``eigh`` for the exponential integrator); the time of the second call alone is
  reported too ("of which predict"), for a predictor reused at several times. The
  solver ``auto`` picked and its step count are read by wrapping
  ``ntkflow.predict.solve_at`` (instrumentation only).
* **baseline**: the algorithm of ``neural_tangents.predict.gradient_descent``:
  ``jax.experimental.ode.odeint`` (Dormand-Prince 5(4), its defaults ``rtol = atol =
  1.4e-8``, ``mxstep = inf``, in float32 too) on the full state ``(fx_train, fx_test)``
  with right-hand side ``(-K_tt G, -K_st G)``, ``G = dL/df_train``, the whole solve under
  ``jax.jit`` (compiled ahead of time, compilation not timed).
* **floor**: what any eigenbasis method must do at least: one ``jnp.linalg.eigh`` of
  ``K_tt`` plus the kernel products that apply the result, ``V @ x`` and ``K_st @ (V @ x)``
  (jitted). Reported once per (precision, n, n_test) and as the ratio ntkflow / floor.

Problem
-------
Synthetic kernel with a power-law spectrum ``lam_i ~ i^-a`` over a condition number
``--cond`` (default 1e4), scaled to ``trace(K_tt) = n``: ``K_tt = Q diag(lam) Q^T`` with
``Q`` random orthogonal, and test rows from the same feature map, ``K_st = W diag(lam)
Q^T`` with ``W`` i.i.d. ``N(0, 1/n)``; so ``[[K_tt, K_st^T], [K_st, K_ss]]`` is positive
semi-definite (a consistent train + test kernel) and the training problem, hence its
stiffness, is the same for every number of test points. Targets: one-hot, 10 classes,
shape ``(n, 10)``; initial outputs ``0.1 * N(0, 1)`` on train and test. Losses (``N =
y.size``): MSE ``0.5 * mean((f - y)^2)``, cross-entropy ``-mean(log_softmax(f) * y)``,
log-cosh ``mean(log(cosh(f - y)))``.

Horizons are set by the spectrum and ``c``, the largest eigenvalue of the loss Hessian at
``f = 0`` (``1/N`` for MSE and log-cosh, ``1/(10 N)`` for cross-entropy), so the
stiffness ``S = c * lam_max * t`` of each horizon is the same for every loss and size:

* short: ``t = 10 / (c lam_max)`` (S = 10: the fastest modes have relaxed);
* mid: ``t = 10 / (c sqrt(lam_max lam_min))`` (S = 10 sqrt(cond): the middle of the
  spectrum on a log scale);
* converged: ``t = 10 / (c lam_min)`` (S = 10 cond: all modes have relaxed, for MSE);
* t=None: the end point of training (ntkflow only; the baseline cannot integrate to
  infinity).

Momentum
--------
With ``--momentum M`` every cell runs heavy-ball momentum instead, with ``momentum=M`` and
``learning_rate=1`` (so neural-tangents' time ``tau = sqrt(learning_rate) t`` is ``t``):
``f'' = -K G + d f'`` and ``f_test'' = -K_st G + d f_test'``, damping ``d = M - 1``,
starting at rest. ntkflow is called as above with ``momentum=M, learning_rate=1.0``; the
baseline is neural-tangents' momentum algorithm: ``odeint`` (same defaults, jitted) on the
full first-order state ``(f, q, f_test, q_test)`` with right-hand side ``(q, -K_tt G + d q,
q_test, -K_st G + d q_test)`` from ``q = q_test = 0``. The horizons use the momentum time
scales (the fastest rate is ``max(|d|, sqrt(c lam_max))``, damping or oscillation; a slow,
overdamped mode, ``d^2 >> 4 c lam``, relaxes at the rate ``c lam / |d|``):

* short: ``t = 10 / max(|d|, sqrt(c lam_max))`` (the fastest mode relaxes or oscillates
  10 times);
* mid: ``t = sqrt(t_short t_converged)``, the geometric mean;
* converged: ``t = 10 |d| / (c lam_min)`` (the slowest mode has relaxed);
* t=None: as above.

The stiffness reported is then ``S = t max(|d|, sqrt(c lam_max))`` (as ntkflow's ``auto``
measures it with momentum): 10 for short, and for mid and converged it depends on n. The
references are ntkflow with ``solver="tsit5"``, ``rtol = atol = 1e-10`` at every finite
horizon (MSE included: with momentum it has no closed form), and at t=None, for MSE and
log-cosh, the closed form ``gradient_descent_mse``: integrating ``f'' - d f' = -K G`` from
rest to rest gives ``-d (f(inf) - f(0)) = -K int G`` (and the same with ``K_st`` for the
test outputs), so the momentum flow has the end point of gradient flow (targets on the
kernel's range, null-space components unchanged), which was also checked numerically on
small problems. Results go to the section "## Solvers with momentum" of the results file,
with the momentum in the table header.

Measurements
------------
* Time: median of wall-clock runs after a warm-up (ntkflow: one untimed call that also
  compiles; baseline: ahead-of-time compilation), each ended by ``jax.block_until_ready``:
  ``--repeats`` (3) runs, more for fast solves until they add up to 0.3 s (at most 21),
  with Python's garbage collector off (as ``timeit``). Where both methods are timed
  several times (fast solves), that is one batch of each, and ``--rounds`` (3) batches
  of each run in all, alternating (ntkflow, baseline, then baseline and ntkflow in each
  further round): each time is the median of all its batches' runs, so that the two
  methods sample the same stretches of the machine's state (on a machine whose speed
  drifts by tens of percent within seconds, two batches timed one after the other moved
  a cell's ratio by up to 1.8x between runs of the script). A solve slower than
  ``--single-run`` seconds is timed once (marked ``*``); where the warm-up also compiled
  (ntkflow, the floor) and took longer than that, a second untimed run decides, so that a
  slow compilation does not leave a fast solve timed once. A solve slower than its cap
  (``--baseline-timeout``, ``--ntkflow-timeout``) is abandoned (its process is killed)
  and reported as ``> cap``; the same method is then skipped, as ``> cap``, on the cells
  of the same precision, loss and horizon with at least as many train and test points
  (and a cap no larger).
  Speed-ups against a capped baseline are lower bounds (``>``). ``--baseline-timeout-stiff``
  (default: ``--baseline-timeout``) sets the baseline's cap for the converged cells with
  n >= 1024 alone, so that their long solves can be measured instead of capped.
* Error: the largest absolute difference of ``(fx_train, fx_test)`` from a float64
  reference computed once per cell (and shared by both precisions): the closed form
  ``gradient_descent_mse`` for MSE and for the end point of log-cosh (whose minimizer is
  ``f = y``, so its ``t = inf`` limit is the MSE one); otherwise ntkflow with
  ``solver="tsit5"``, ``rtol = atol = 1e-10`` (an explicit method, independent of the
  exponential integrator that ``auto`` picks for stiff requests), capped by
  ``--reference-timeout`` (``n/a`` beyond). Cross-entropy has no finite end point (the
  outputs grow without bound); its ``t=None`` cell reports the training loss reached.
* Work: ntkflow's solver steps (``auto``'s choice: ``expo`` = exponential integrator,
  ``rodas5p`` = Rosenbrock method, ``tsit5``, ``dopri5``, ``dopri8`` = explicit; for ``chebyshev``,
  the Chebyshev expansion of the MSE solution, its degree, i.e. kernel products); the
  baseline's right-hand-side evaluations (each one product
  with the ``(n + n_test) x n`` kernel), counted by a ``jax.debug.callback`` in a
  separate, untimed run when a solve takes under ``--single-run`` seconds (else ``n/a``).
* Memory: the peak growth of the process's resident set size during one run, sampled
  every 2 ms from ``/proc/self/statm`` after ``malloc_trim``, in MiB (Linux; an estimate:
  memory the allocator already holds is not counted). It is a separate, untimed run for
  solves timed several times: the sampler's thread competes for the interpreter lock and
  slowed ntkflow's few-millisecond calls (Python dispatch between compiled calls) by up
  to a third, the baseline's single compiled call much less.

Each precision runs in its own processes (``JAX_ENABLE_X64`` set accordingly): one for
ntkflow and the floor, one for the baseline, one (float64) for the references, so a
capped solve can be killed without touching the others. Everything runs one at a time.

Run: ``python benchmarks/bench_solvers.py``. Default, the reduced matrix: n in {256,
1024}, test points n and 4n, all losses and horizons, float64, plus float32 for n = 256,
plus n = 4096 (MSE, converged and t=None, ntkflow and the floor only; ``--big-n`` with no
value drops it); ``--help`` for the flags. It prints a markdown table and writes it to
``benchmarks/RESULTS.md`` (section "## Solvers", or "## Solvers with momentum" with
``--momentum``; other sections are kept; ``--output`` for another file).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import hashlib
import importlib.util
import math
import multiprocessing as mp
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HORIZONS = ("short", "mid", "converged", "inf")
LOSSES = ("mse", "ce", "logcosh")
LOSS_NAMES = {"mse": "MSE", "ce": "cross-entropy", "logcosh": "log-cosh"}
HORIZON_NAMES = {"short": "short", "mid": "mid", "converged": "converged", "inf": "t=None"}
N_CLASSES = 10
SECTION = "## Solvers"
MOMENTUM_SECTION = "## Solvers with momentum"
STIFF_N = 1024  # --baseline-timeout-stiff: converged cells with n >= this
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
GRACE = 15.0  # seconds a worker may overrun a deadline (process start, messaging)
MIN_TIMED = 0.3  # fast solves are repeated until their timed runs add up to this (s)
MAX_REPEATS = 21


# ---------------------------------------------------------------------------
# The problem (NumPy, deterministic; built in each worker)


def loss_fn(name: str) -> Callable[[Any, Any], Any]:
    """The loss ``name(fx, y) -> scalar`` (module-level functions: stable compile caches)."""
    return {"mse": mse, "ce": cross_entropy, "logcosh": log_cosh}[name]


def mse(f: Any, y: Any) -> Any:
    import jax.numpy as jnp

    return 0.5 * jnp.mean((f - y) ** 2)


def cross_entropy(f: Any, y: Any) -> Any:
    import jax
    import jax.numpy as jnp

    return -jnp.mean(jax.nn.log_softmax(f) * y)


def log_cosh(f: Any, y: Any) -> Any:
    import jax.numpy as jnp

    return jnp.mean(jnp.log(jnp.cosh(f - y)))


@dataclass(frozen=True)
class Problem:
    """Kernels, targets and initial outputs (float64 NumPy) for one (n, n_test)."""

    k: np.ndarray
    k_test: np.ndarray
    y: np.ndarray
    f0: np.ndarray
    f0_test: np.ndarray
    lam: np.ndarray


def make_problem(n: int, n_test: int, cond: float, seed: int) -> Problem:
    """Power-law kernel over condition number ``cond`` (see the module docstring)."""
    rng = np.random.default_rng([seed, n])
    lam = spectrum(n, cond)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    k = (q * lam) @ q.T
    k = 0.5 * (k + k.T)
    y = np.eye(N_CLASSES)[rng.integers(0, N_CLASSES, n)]
    f0 = 0.1 * rng.standard_normal((n, N_CLASSES))
    rng_test = np.random.default_rng([seed, n, n_test])
    w = rng_test.standard_normal((n_test, n)) / math.sqrt(n)
    k_test = (w * lam) @ q.T
    f0_test = 0.1 * rng_test.standard_normal((n_test, N_CLASSES))
    return Problem(k, k_test, y, f0, f0_test, lam)


def spectrum(n: int, cond: float) -> np.ndarray:
    """The eigenvalues of ``K_tt``: ``i^-a`` over condition number ``cond``, trace ``n``."""
    alpha = math.log(cond) / math.log(n) if n > 1 else 0.0
    lam = np.arange(1, n + 1, dtype=np.float64) ** -alpha
    lam *= n / lam.sum()
    return lam


def curvature(loss: str, size: int) -> float:
    """Largest eigenvalue of the loss Hessian at ``f = 0`` (one-hot targets)."""
    return 1.0 / (N_CLASSES * size) if loss == "ce" else 1.0 / size


def horizon_time(horizon: str, loss: str, lam: np.ndarray, size: int,
                 momentum: float | None = None) -> float | None:
    """The time ``t`` of a horizon (``None``: the end point of training)."""
    c = curvature(loss, size)
    lam_max, lam_min = float(lam.max()), float(lam.min())
    if momentum is not None and horizon != "inf":  # learning rate 1: tau = t
        d = abs(momentum - 1.0)
        short = 10.0 / max(d, math.sqrt(c * lam_max))
        converged = 10.0 * d / (c * lam_min)
        return {"short": short, "mid": math.sqrt(short * converged),
                "converged": converged}[horizon]
    if horizon == "short":
        return 10.0 / (c * lam_max)
    if horizon == "mid":
        return 10.0 / (c * math.sqrt(lam_max * lam_min))
    if horizon == "converged":
        return 10.0 / (c * lam_min)
    return None


def stiffness(horizon: str, cond: float) -> str:
    return {"short": "10", "mid": f"{10 * math.sqrt(cond):.0e}", "converged": f"{10 * cond:.0e}",
            "inf": "inf"}[horizon]


def momentum_stiffness(horizon: str, loss: str, n: int, cond: float, momentum: float) -> str:
    """``S = t max(|d|, sqrt(c lam_max))``, the momentum counterpart of ``c lam_max t``."""
    if horizon in ("short", "inf"):
        return stiffness(horizon, cond)
    lam, size = spectrum(n, cond), n * N_CLASSES
    t = horizon_time(horizon, loss, lam, size, momentum)
    assert t is not None
    rate = max(abs(momentum - 1.0), math.sqrt(curvature(loss, size) * float(lam.max())))
    return f"{t * rate:.0e}"


# ---------------------------------------------------------------------------
# Measuring (in workers)


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: the peak so far, a coarse stand-in
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@contextlib.contextmanager
def peak_rss_growth(out: dict[str, float]) -> Iterator[None]:
    """Sample the RSS every 2 ms; store the peak growth (MiB) in ``out["mib"]``."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            stop.wait(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes())
        out["mib"] = (peak[0] - base) / 2**20


class Worker:
    """Runs tasks in a process of one precision; state: problems and compiled functions."""

    def __init__(self, conn: Any, x64: bool):
        import jax

        jax.config.update("jax_enable_x64", x64)
        self.conn = conn
        self.dtype = np.float64 if x64 else np.float32
        self.problems: dict[tuple[int, int, float, int], Problem] = {}
        self.baselines: dict[tuple[str, bool], Any] = {}
        self.compiled: dict[tuple, Any] = {}
        self.solve_infos: list[tuple[str, Any]] = []
        #: The timed closure of the last cell of each method, for ``retime``.
        self.timed: dict[str, tuple[Callable[[], Any], dict, float, list[float] | None]] = {}
        self._instrument_ntkflow()

    def _instrument_ntkflow(self) -> None:
        """Wrap ``ntkflow.predict.solve_at`` to record the solver and its step count."""
        import ntkflow.predict as ntk_predict

        original = getattr(ntk_predict, "solve_at", None)
        if original is None:
            return
        infos = self.solve_infos

        def solve_at(*args: Any, **kwargs: Any) -> Any:
            ys, info = original(*args, **kwargs)
            solver = args[3] if len(args) > 3 else kwargs.get("solver")
            infos.append((getattr(solver, "name", type(solver).__name__), info))
            return ys, info

        ntk_predict.solve_at = solve_at

    # -- messaging ----------------------------------------------------------------------

    def deadline(self, seconds: float) -> None:
        """Tell the parent how long the next step may take."""
        self.conn.send(("deadline", seconds))

    def problem(self, task: dict) -> Problem:
        key = (task["n"], task["n_test"], task["cond"], task["seed"])
        if key not in self.problems:
            self.problems.clear()
            self.problems[key] = make_problem(*key)
        return self.problems[key]

    def arrays(self, task: dict) -> tuple[Any, ...]:
        import jax.numpy as jnp

        p = self.problem(task)
        return tuple(jnp.asarray(a, self.dtype) for a in (p.k, p.k_test, p.y, p.f0, p.f0_test))

    # -- timing ---------------------------------------------------------------------------

    def compiled_time(self, run: Callable[[], Any], first: float, task: dict,
                      cap: float) -> float:
        """The time of a compiled run, given ``first``, that of the run that compiled:
        ``first`` itself unless over ``single_run`` (then a second, untimed run's, so that
        a slow compilation does not leave a fast solve timed once)."""
        import jax

        if first <= task["single_run"]:
            return first
        self.deadline(cap)
        start = time.perf_counter()
        jax.block_until_ready(run())
        return time.perf_counter() - start

    def timed_runs(self, run: Callable[[], Any], first: float, task: dict, cap: float,
                   memory: bool = True) -> dict:
        """Median of the timed runs (see the module docstring), and the RSS growth.

        Fast solves: ``repeats`` runs, more (up to ``MAX_REPEATS``) until they add up to
        ``MIN_TIMED`` seconds, with the garbage collector off (as ``timeit``) and no memory
        sampler, whose thread would compete for the interpreter lock; the memory is
        measured in one more run. A slow solve (``first`` over ``single_run``) is timed
        once, with the sampler (its overhead is then negligible).
        """
        import jax

        single = first > task["single_run"]
        times: list[float] = []
        mem = {"mib": float("nan")}
        out = None
        sampler = peak_rss_growth(mem) if single else contextlib.nullcontext()
        gc.collect()
        gc.disable()
        try:
            with sampler:
                while not times or (not single and (
                        len(times) < task["repeats"]
                        or (sum(times) < MIN_TIMED and len(times) < MAX_REPEATS))):
                    self.deadline(cap)
                    start = time.perf_counter()
                    out = jax.block_until_ready(run())
                    times.append(time.perf_counter() - start)
                    if times[-1] > cap:
                        return {"status": "cap"}
        finally:
            gc.enable()
        if not single and memory:
            self.deadline(cap)
            with peak_rss_growth(mem):
                jax.block_until_ready(run())
        return {"status": "ok", "time": statistics.median(times), "runs": len(times),
                "out": out, "mem": mem["mib"], "times": times}

    # -- tasks --------------------------------------------------------------------------

    def reference(self, task: dict) -> dict:
        """Float64 reference outputs for one cell, saved to ``task["path"]``."""
        import ntkflow as ntk

        p = self.problem(task)
        momentum = task.get("momentum")
        t = horizon_time(task["horizon"], task["loss"], p.lam, p.y.size, momentum)
        k, k_test, y, f0, f0_test = self.arrays(task)
        self.deadline(task["cap"])
        start = time.perf_counter()
        if task["loss"] == "ce" and t is None:
            return {"status": "ok", "kind": "loss", "time": 0.0}
        if ((task["loss"] == "mse" and momentum is None)
                or (task["loss"] in ("mse", "logcosh") and t is None)):
            # t=None with momentum: the same end point as gradient flow (module docstring)
            predict = ntk.predict.gradient_descent_mse(k, y)
            how = "closed form"
        else:
            extra = {} if momentum is None else {"learning_rate": 1.0, "momentum": momentum}
            predict = ntk.predict.gradient_descent(
                loss_fn(task["loss"]), k, y, solver="tsit5", rtol=1e-10, atol=1e-10,
                max_steps=10**8, **extra,
            )
            how = "tsit5 1e-10"
        train, test = predict(t, f0, f0_test, k_test)
        np.savez(task["path"], train=np.asarray(train), test=np.asarray(test))
        return {"status": "ok", "kind": how, "time": time.perf_counter() - start}

    def error(self, task: dict, out: tuple[Any, Any]) -> float | None:
        """Max abs error vs the reference, or the training loss for cross-entropy at inf."""
        train, test = (np.asarray(o, np.float64) for o in out)
        if task["loss"] == "ce" and task["horizon"] == "inf":
            import jax.numpy as jnp

            return float(cross_entropy(jnp.asarray(train), jnp.asarray(self.problem(task).y)))
        path = task.get("reference")
        if not path or not os.path.exists(path):
            return None
        ref = np.load(path)
        return float(max(np.max(np.abs(train - ref["train"])), np.max(np.abs(test - ref["test"]))))

    def ntkflow(self, task: dict) -> dict:
        import jax

        import ntkflow as ntk

        p = self.problem(task)
        momentum = task.get("momentum")
        t = horizon_time(task["horizon"], task["loss"], p.lam, p.y.size, momentum)
        k, k_test, y, f0, f0_test = self.arrays(task)
        loss, cap = loss_fn(task["loss"]), task["cap"]
        extra = {} if momentum is None else {"learning_rate": 1.0, "momentum": momentum}
        builds: list[float] = []

        def run() -> Any:
            start = time.perf_counter()
            predict = ntk.predict.gradient_descent(loss, k, y, solver=task["solver"], **extra)
            builds.append(time.perf_counter() - start)
            return predict(t, f0, f0_test, k_test)

        self.deadline(cap + task["compile_slack"])
        start = time.perf_counter()
        try:
            jax.block_until_ready(run())
        except RuntimeError as e:  # ntkflow reports a failed solve
            return {"status": "fail", "error": _short_error(e)}
        first = time.perf_counter() - start
        if first > cap:
            return {"status": "cap"}
        first = self.compiled_time(run, first, task, cap)
        if first > cap:
            return {"status": "cap"}
        self.solve_infos.clear()
        timed_from = len(builds)
        result = self.timed_runs(run, first, task, cap)
        if result["status"] != "ok":
            return result
        result["error"] = self.error(task, result.pop("out"))
        totals = result["times"]
        timed_builds = builds[timed_from:timed_from + len(totals)]
        result["predict_times"] = [a - b for a, b in zip(totals, timed_builds, strict=True)]
        result["predict"] = statistics.median(result["predict_times"])
        self.timed["ntkflow"] = (run, task, cap, builds)
        if self.solve_infos:
            name, info = self.solve_infos[-1]
            result["solver"] = name
            result["steps"] = int(info.num_steps)
        return result

    def baseline_fn(self, loss_name: str, count: bool, momentum: float | None = None) -> Any:
        """Jitted odeint solve of the full state; with ``count``, RHS calls are counted."""
        import jax
        import jax.numpy as jnp
        from jax.experimental.ode import odeint

        key = (loss_name, count) if momentum is None else (loss_name, count, momentum)
        if key in self.baselines:
            return self.baselines[key]
        loss = loss_fn(loss_name)
        counter = self.rhs_counter = getattr(self, "rhs_counter", [0])

        def tick() -> None:
            counter[0] += 1

        def rhs(state: Any, t: Any, k: Any, k_test: Any, y: Any) -> Any:
            del t
            g = jax.grad(loss)(state[0], y)
            if count:
                jax.debug.callback(tick)
            return -(k @ g), -(k_test @ g)

        def solve(f0: Any, f0_test: Any, k: Any, k_test: Any, y: Any, ts: Any) -> Any:
            fs, fs_test = odeint(rhs, (f0, f0_test), ts, k, k_test, y)
            return fs[-1], fs_test[-1]

        d = 0.0 if momentum is None else momentum - 1.0  # heavy ball at learning rate 1

        def rhs_momentum(state: Any, t: Any, k: Any, k_test: Any, y: Any) -> Any:
            del t
            f, q, _, q_test = state
            g = jax.grad(loss)(f, y)
            if count:
                jax.debug.callback(tick)
            return q, -(k @ g) + d * q, q_test, -(k_test @ g) + d * q_test

        def solve_momentum(f0: Any, f0_test: Any, k: Any, k_test: Any, y: Any,
                           ts: Any) -> Any:
            state = (f0, jnp.zeros_like(f0), f0_test, jnp.zeros_like(f0_test))
            fs, _, fs_test, _ = odeint(rhs_momentum, state, ts, k, k_test, y)
            return fs[-1], fs_test[-1]

        self.baselines[key] = jax.jit(solve if momentum is None else solve_momentum)
        return self.baselines[key]

    def compile_baseline(self, loss_name: str, count: bool, args: tuple,
                         momentum: float | None = None) -> Any:
        key = (loss_name, count) + tuple((a.shape, str(a.dtype)) for a in args)
        if momentum is not None:
            key += (momentum,)
        if key not in self.compiled:
            fn = self.baseline_fn(loss_name, count, momentum)
            self.compiled[key] = fn.lower(*args).compile()
        return self.compiled[key]

    def baseline(self, task: dict) -> dict:
        import jax
        import jax.numpy as jnp

        p = self.problem(task)
        momentum = task.get("momentum")
        t = horizon_time(task["horizon"], task["loss"], p.lam, p.y.size, momentum)
        assert t is not None
        k, k_test, y, f0, f0_test = self.arrays(task)
        args = (f0, f0_test, k, k_test, y, jnp.asarray([0.0, t], self.dtype))
        self.deadline(task["compile_slack"])
        fn = self.compile_baseline(task["loss"], False, args, momentum)
        cap = task["cap"]
        self.deadline(cap)
        mem = {"mib": float("nan")}
        with peak_rss_growth(mem):
            start = time.perf_counter()
            out = jax.block_until_ready(fn(*args))
            first = time.perf_counter() - start
        if first > cap:
            return {"status": "cap"}
        if first <= task["single_run"]:
            result = self.timed_runs(lambda: fn(*args), first, task, cap)
            self.timed["baseline"] = (lambda: fn(*args), task, cap, None)
        else:  # the first (compiled) run is already a clean measurement
            result = {"status": "ok", "time": first, "runs": 1, "out": out, "mem": mem["mib"]}
        if result["status"] != "ok":
            return result
        result["error"] = self.error(task, result.pop("out"))
        if first <= task["single_run"]:
            self.deadline(task["compile_slack"] + 3 * cap)
            counted = self.compile_baseline(task["loss"], True, args, momentum)
            self.rhs_counter[0] = 0
            jax.block_until_ready(counted(*args))
            result["rhs"] = self.rhs_counter[0]
        return result

    def retime(self, task: dict) -> dict:
        """Another batch of timed runs of the last cell of ``task["method"]`` (see
        ``--rounds``): its times (and, for ntkflow, those of the predict calls)."""
        run, cell_task, cap, builds = self.timed[task["method"]]
        timed_from = 0 if builds is None else len(builds)
        result = self.timed_runs(run, 0.0, cell_task, cap, memory=False)
        result.pop("out", None)
        if result["status"] == "ok" and builds is not None:
            totals = result["times"]
            timed_builds = builds[timed_from:timed_from + len(totals)]
            result["predict_times"] = [
                a - b for a, b in zip(totals, timed_builds, strict=True)]
        return result

    def floor(self, task: dict) -> dict:
        import jax
        import jax.numpy as jnp

        k, k_test, y, f0, _ = self.arrays(task)

        @jax.jit
        def apply(k: Any, k_test: Any, r: Any) -> Any:
            lam, v = jnp.linalg.eigh(k)
            z = v.T @ r
            u = v @ (z / jnp.maximum(lam, jnp.finfo(lam.dtype).tiny)[:, None])
            return v @ (z * lam[:, None]), k_test @ u

        run = lambda: apply(k, k_test, f0 - y)
        self.deadline(task["cap"] + task["compile_slack"])
        start = time.perf_counter()
        jax.block_until_ready(run())
        first = self.compiled_time(run, time.perf_counter() - start, task, task["cap"])
        result = self.timed_runs(run, first, task, task["cap"])
        result.pop("out", None)
        result.pop("times", None)
        return result


def _short_error(e: BaseException) -> str:
    text = str(e)
    if "max_steps" in text:
        m = re.search(r"after (\d+) steps", text)
        return f"max_steps ({m.group(1)} steps)" if m else "max_steps"
    return f"{type(e).__name__}: {text.splitlines()[0][:60] if text else ''}"


def worker_main(conn: Any, x64: bool) -> None:
    """Entry point of a worker process: answer tasks until ``None``."""
    worker = Worker(conn, x64)
    while True:
        task = conn.recv()
        if task is None:
            return
        try:
            result = getattr(worker, task["kind"])(task)
        except Exception as e:  # report, keep serving
            result = {"status": "fail", "error": _short_error(e)}
        conn.send(("result", result))


# ---------------------------------------------------------------------------
# The parent: processes, caps, the matrix


class Pool:
    """One lazily started worker process per (role, precision); killed on overrun."""

    def __init__(self) -> None:
        self.ctx = mp.get_context("spawn")
        self.procs: dict[tuple[str, int], tuple[Any, Any]] = {}

    def _start(self, role: str, bits: int) -> tuple[Any, Any]:
        key = (role, bits)
        if key not in self.procs:
            os.environ["JAX_ENABLE_X64"] = "1" if bits == 64 else "0"
            parent, child = self.ctx.Pipe()
            proc = self.ctx.Process(target=worker_main, args=(child, bits == 64), daemon=True)
            proc.start()
            child.close()
            self.procs[key] = (proc, parent)
        return self.procs[key]

    def run(self, role: str, bits: int, task: dict) -> dict:
        """Send ``task``; wait as long as the worker's announced deadlines allow."""
        proc, conn = self._start(role, bits)
        try:
            conn.send(task)
        except OSError:  # the worker died since its last task (BrokenPipeError): a new one
            self.kill(role, bits)
            proc, conn = self._start(role, bits)
            conn.send(task)
        deadline = 120.0 + GRACE  # process start, imports
        while True:
            if not conn.poll(deadline):
                self.kill(role, bits)
                return {"status": "cap"}
            try:
                kind, value = conn.recv()
            except EOFError:
                self.kill(role, bits)
                return {"status": "fail", "error": "worker died"}
            if kind == "deadline":
                deadline = float(value) + GRACE
            else:
                return value

    def kill(self, role: str, bits: int) -> None:
        proc, conn = self.procs.pop((role, bits))
        proc.kill()
        proc.join()
        conn.close()

    def close(self) -> None:
        for proc, conn in self.procs.values():
            with contextlib.suppress(OSError, BrokenPipeError):
                conn.send(None)
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self.procs.clear()


@dataclass
class Cell:
    bits: int
    n: int
    n_test: int
    loss: str
    horizon: str
    ntk: dict = field(default_factory=dict)
    base: dict = field(default_factory=dict)
    ref: dict = field(default_factory=dict)


def cell_keys(args: argparse.Namespace) -> list[tuple[int, int, int, str, str]]:
    keys = []
    for bits in args.precisions:
        for n in sorted(args.n):
            if bits == 32 and n > args.f32_max_n:
                continue
            for factor in sorted(args.test_factors):
                for loss in args.losses:
                    for horizon in args.horizons:
                        keys.append((bits, n, factor * n, loss, horizon))
    for n in sorted(args.big_n):
        for horizon in ("converged", "inf"):
            keys.append((64, n, n, "mse", horizon))
    return keys


def _dominated(done: list[tuple[tuple, dict]], family: tuple, n: int, n_test: int,
               cap: float | None = None) -> bool:
    """Whether a cell of the same family with at most as many points hit the cap (one at
    least as long as ``cap``)."""
    return any(
        fam == family and n0 <= n and t0 <= n_test and res.get("status") == "cap"
        and (cap is None or res.get("cap_s", cap) >= cap)
        for (fam, n0, t0), res in done
    )


def baseline_cap(args: argparse.Namespace, n: int, horizon: str) -> float:
    """The baseline's cap for a cell: ``--baseline-timeout-stiff`` for the converged cells
    with n >= 1024, ``--baseline-timeout`` otherwise."""
    if horizon == "converged" and n >= STIFF_N and args.baseline_timeout_stiff is not None:
        return args.baseline_timeout_stiff
    return args.baseline_timeout


def interleave(pool: Pool, cell: Cell, rounds: int) -> None:
    """For a cell whose two methods were both timed several times (fast solves): ``rounds
    - 1`` more batches of timed runs of each, alternating (baseline, ntkflow, baseline,
    ...), so that both sample the same stretches of the machine's state; each time is
    then the median of all its runs. (A machine whose speed drifts by tens of percent
    within seconds otherwise moves the ratio of two batches timed one after the other.)"""
    sides = (("baseline", cell.base), ("ntkflow", cell.ntk))
    if rounds <= 1 or not all(r.get("status") == "ok" and r.get("runs", 0) > 1
                              for _, r in sides):
        return
    for _ in range(rounds - 1):
        for method, result in sides:
            more = pool.run(method, cell.bits, {"kind": "retime", "method": method,
                                                "cap": result["cap_s"]})
            if more.get("status") != "ok":
                return
            result["times"] += more["times"]
            if "predict_times" in result:
                result["predict_times"] += more["predict_times"]
    for _, result in sides:
        result["time"] = statistics.median(result["times"])
        result["runs"] = len(result["times"])
        result["rounds"] = rounds
        if "predict_times" in result:
            result["predict"] = statistics.median(result["predict_times"])


def run_matrix(args: argparse.Namespace) -> tuple[list[Cell], dict, float]:
    pool = Pool()
    tmp = tempfile.mkdtemp(prefix="bench_solvers_")
    common = {"cond": args.cond, "seed": args.seed, "repeats": args.repeats,
              "single_run": args.single_run, "compile_slack": args.compile_slack,
              "solver": args.solver}
    if args.momentum is not None:
        common["momentum"] = args.momentum
    cells: list[Cell] = []
    floors: dict[tuple[int, int, int], dict] = {}
    history: list[tuple[tuple, dict]] = []
    refs: dict[tuple, dict] = {}
    big = set(args.big_n)
    start = time.perf_counter()
    try:
        for bits, n, n_test, loss, horizon in cell_keys(args):
            cell = Cell(bits, n, n_test, loss, horizon)
            base = {**common, "n": n, "n_test": n_test, "loss": loss, "horizon": horizon}
            if (bits, n, n_test) not in floors:
                floors[bits, n, n_test] = pool.run(
                    "ntkflow", bits, {**base, "kind": "floor", "cap": args.ntkflow_timeout})
                _log(f"[{bits}] floor n={n} n_test={n_test}: {floors[bits, n, n_test]}")
            ref_key = (n, n_test, loss, horizon)
            if ref_key not in refs:
                path = os.path.join(tmp, "ref_{}_{}_{}_{}.npz".format(*ref_key))
                if _dominated(history, ("ref", loss, horizon), n, n_test):
                    refs[ref_key] = {"status": "cap"}
                else:
                    refs[ref_key] = pool.run("reference", 64, {
                        **base, "kind": "reference", "cap": args.reference_timeout,
                        "path": path})
                    history.append(((("ref", loss, horizon), n, n_test), refs[ref_key]))
                refs[ref_key]["path"] = path
            cell.ref = refs[ref_key]
            reference = cell.ref["path"] if cell.ref.get("status") == "ok" else None
            for role, method, cap in (("ntkflow", "ntkflow", args.ntkflow_timeout),
                                      ("baseline", "baseline", baseline_cap(args, n, horizon))):
                family = (method, bits, loss, horizon)
                if method == "baseline" and (horizon == "inf" or n in big):
                    result = {"status": "na" if horizon == "inf" else "skipped"}
                elif _dominated(history, family, n, n_test, cap):
                    result = {"status": "cap", "inherited": True}
                else:
                    result = pool.run(role, bits, {**base, "kind": method, "cap": cap,
                                                   "reference": reference})
                    history.append(((family, n, n_test), result))
                result["cap_s"] = cap
                if method == "ntkflow":
                    cell.ntk = result
                else:
                    cell.base = result
            interleave(pool, cell, args.rounds)
            cells.append(cell)
            _log(format_progress(cell, args))
    finally:
        pool.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return cells, floors, time.perf_counter() - start


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Reporting


def fmt_time(result: dict, cap: float) -> str:
    status = result.get("status")
    if status == "ok":
        mark = "*" if result.get("runs", 0) == 1 else ""
        return f"{result['time']:.3g}{mark}"
    if status == "cap":
        return f"> {cap:g}"
    if status == "na":
        return "—"
    if status == "skipped":
        return f"> {cap:g} (not run)"
    return f"FAIL: {result.get('error', '?')}"


def fmt_err(result: dict, cell: Cell) -> str:
    if result.get("status") != "ok":
        return ""
    err = result.get("error")
    if err is None:
        return "n/a"
    if cell.loss == "ce" and cell.horizon == "inf":
        return f"loss {err:.1e}"
    return f"{err:.1e}"


def speedup(cell: Cell, args: argparse.Namespace) -> tuple[str, float | None, bool]:
    """``(text, value, is_lower_bound)`` of baseline time / ntkflow time."""
    nt_ok, b = cell.ntk.get("status") == "ok", cell.base
    if not nt_ok or b.get("status") in (None, "na", "fail"):
        return "", None, False
    if b.get("status") == "ok":
        v = b["time"] / cell.ntk["time"]
        return f"{v:.3g}", v, False
    v = b.get("cap_s", args.baseline_timeout) / cell.ntk["time"]
    return f"> {v:.3g}", v, True


def format_progress(cell: Cell, args: argparse.Namespace) -> str:
    return (f"[{cell.bits}] n={cell.n} n_test={cell.n_test} {cell.loss} {cell.horizon}: "
            f"ntkflow {fmt_time(cell.ntk, args.ntkflow_timeout)} "
            f"({cell.ntk.get('solver', '')} {cell.ntk.get('steps', '')}) "
            f"baseline {fmt_time(cell.base, cell.base.get('cap_s', args.baseline_timeout))} "
            f"err {fmt_err(cell.ntk, cell)} / {fmt_err(cell.base, cell)}")


def cell_stiffness(c: Cell, args: argparse.Namespace) -> str:
    if args.momentum is None:
        return stiffness(c.horizon, args.cond)
    return momentum_stiffness(c.horizon, c.loss, c.n, args.cond, args.momentum)


def table(cells: list[Cell], floors: dict, args: argparse.Namespace) -> str:
    horizon = ("horizon (S)" if args.momentum is None
               else f"horizon (S), momentum {args.momentum:g}, lr 1")
    head = (f"| float | n | n_test | loss | {horizon} | solver | ntkflow s | of which predict "
            "| baseline s | speed-up | ntkflow / floor | ntkflow err | baseline err "
            "| ntkflow steps | baseline RHS | ntkflow ΔRSS MiB | baseline ΔRSS MiB |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for c in cells:
        floor = floors.get((c.bits, c.n, c.n_test), {})
        ratio = (f"{c.ntk['time'] / floor['time']:.3g}"
                 if c.ntk.get("status") == "ok" and floor.get("status") == "ok" else "")
        rows.append("| " + " | ".join([
            str(c.bits), str(c.n), str(c.n_test), LOSS_NAMES[c.loss],
            f"{HORIZON_NAMES[c.horizon]} ({cell_stiffness(c, args)})",
            c.ntk.get("solver", ""), fmt_time(c.ntk, args.ntkflow_timeout),
            f"{c.ntk['predict']:.3g}" if "predict" in c.ntk else "",
            fmt_time(c.base, c.base.get("cap_s", args.baseline_timeout)),
            speedup(c, args)[0], ratio,
            fmt_err(c.ntk, c), fmt_err(c.base, c), str(c.ntk.get("steps", "")),
            str(c.base.get("rhs", "n/a" if c.base.get("status") == "ok" else "")),
            _mib(c.ntk), _mib(c.base),
        ]) + " |")
    return "\n".join(rows)


def _mib(result: dict) -> str:
    v = result.get("mem")
    return "" if v is None or v != v else f"{v:.0f}"


def floor_table(floors: dict) -> str:
    rows = ["| float | n | n_test | floor s (eigh + kernel products) |", "|---|---|---|---|"]
    for (bits, n, n_test), res in sorted(floors.items()):
        text = f"{res['time']:.3g}" if res.get("status") == "ok" else res.get("status", "?")
        rows.append(f"| {bits} | {n} | {n_test} | {text} |")
    return "\n".join(rows)


def summary(cells: list[Cell], floors: dict, args: argparse.Namespace) -> str:
    """Headline numbers, computed from the table."""
    lines = []

    def label(c: Cell) -> str:
        return (f"float{c.bits} n={c.n} n_test={c.n_test} {LOSS_NAMES[c.loss]} "
                f"{HORIZON_NAMES[c.horizon]}")

    stiff = [c for c in cells if c.loss in ("mse", "logcosh") and c.horizon == "converged"]
    for c in stiff:
        text, _, _ = speedup(c, args)
        floor = floors.get((c.bits, c.n, c.n_test), {})
        fl = (f", {c.ntk['time'] / floor['time']:.3g}x the floor"
              if c.ntk.get("status") == "ok" and floor.get("status") == "ok" else "")
        pred = ""
        if c.ntk.get("status") == "ok" and c.base.get("status") in ("ok", "cap"):
            b = (c.base["time"] if c.base["status"] == "ok"
                 else c.base.get("cap_s", args.baseline_timeout))
            pred = f" (predict only: {'> ' if c.base['status'] == 'cap' else ''}" \
                   f"{b / c.ntk['predict']:.3g})"
        lines.append(f"- stiff, {label(c)}: speed-up {text or 'n/a'}{pred}{fl}")
    for c in cells:
        if c.loss == "ce" and c.horizon != "inf":
            lines.append(f"- cross-entropy, {label(c)}: speed-up {speedup(c, args)[0] or 'n/a'}")
    slower = [label(c) for c in cells
              if (s := speedup(c, args))[1] is not None and not s[2] and s[1] < 1]
    lines.append("- ntkflow slower than the baseline: " + ("; ".join(slower) or "none"))
    failed = [f"{label(c)} ({c.ntk.get('error') or '> cap'})" for c in cells
              if c.ntk.get("status") in ("fail", "cap")]
    lines.append("- ntkflow failed or over its cap: " + ("; ".join(failed) or "none"))
    by_key = {(c.bits, c.n, c.n_test, c.loss, c.horizon): c for c in cells}
    for c in cells:
        conv = by_key.get((c.bits, c.n, c.n_test, c.loss, "converged"))
        if c.horizon == "inf" and conv and c.ntk.get("status") == conv.ntk.get("status") == "ok":
            lines.append(f"- t=None / converged, {label(c)}: "
                         f"{c.ntk['time'] / conv.ntk['time']:.3g}")
    return "\n".join(lines)


def machine() -> str:
    import diffrax
    import jax

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        info: dict[str, str] = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
        if "model name" in info:
            # Two CPUs with one model name can round float32 sums differently (XLA's
            # kernels follow the vector width): name the family, model and widest set.
            flags = info.get("flags", "").split()
            vector = next((f for f in ("avx512f", "avx2", "avx") if f in flags), "")
            cpu = (f"{info['model name']} (family {info.get('cpu family', '?')}, "
                   f"model {info.get('model', '?')}{', ' + vector if vector else ''})")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"CPU: {cpu}, {cores} cores; Python {platform.python_version()}, "
            f"jax {jax.__version__}, diffrax {diffrax.__version__}, numpy {np.__version__}")


def source_state() -> dict[str, str]:
    """The git commit, whether ntkflow's sources have uncommitted changes, and their hash."""
    spec = importlib.util.find_spec("ntkflow")
    root = Path(spec.origin).parent if spec and spec.origin else None
    digest = hashlib.sha256()
    if root is not None:
        for path in sorted(root.rglob("*.py")):
            digest.update(path.read_bytes())
    state = {"hash": digest.hexdigest()[:12], "commit": "unknown", "dirty": ""}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        cwd = root or Path.cwd()
        run = lambda *a: subprocess.run(["git", *a], cwd=cwd, capture_output=True, text=True,
                                        timeout=10, check=True).stdout.strip()
        state["commit"] = run("rev-parse", "--short", "HEAD")
        state["dirty"] = run("status", "--porcelain", "--", ".")
    return state


def section(args: argparse.Namespace) -> str:
    """The results section of this run: "## Solvers", or "## Solvers with momentum"."""
    return SECTION if args.momentum is None else MOMENTUM_SECTION


def render(cells: list[Cell], floors: dict, args: argparse.Namespace, info: dict) -> str:
    """The "## Solvers" section (or "## Solvers with momentum"): the run's context, the
    table, the floor, a summary."""
    command = "python benchmarks/bench_solvers.py " + shlex.join(_recorded_args(sys.argv[1:]))
    src0, src1 = info["sources"]
    version = f"commit {src0['commit']}" + (" with uncommitted changes" if src0["dirty"] else "")
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    intro = (
        "ntkflow `gradient_descent(solver=\"auto\")` against the predecessor's algorithm "
        "(`jax.experimental.ode.odeint`, Dopri5, rtol = atol = 1.4e-8, on the full train + "
        "test state, jitted). Methodology: the docstring of `benchmarks/bench_solvers.py`."
    )
    if args.momentum is not None:
        intro = (
            f"ntkflow `gradient_descent(momentum={args.momentum:g}, learning_rate=1.0, "
            "solver=\"auto\")` against the predecessor's momentum algorithm "
            "(`jax.experimental.ode.odeint`, Dopri5, rtol = atol = 1.4e-8, on the full "
            "first-order state (f, q, f_test, q_test) from q = 0, jitted), damping d = "
            f"{args.momentum - 1:g}. Methodology: the docstring of "
            "`benchmarks/bench_solvers.py` (section Momentum)."
        )
    parts = [
        section(args),
        "",
        intro,
        "",
        f"- Command: `{command}`",
        f"- Date: {date}; total wall time {info['wall'] / 60:.1f} min",
        f"- Machine: {machine()}",
        f"- ntkflow: {version} (sources {src0['hash']})",
        f"- Load average (1, 5, 15 min) at start {_load(info['loads'][0])}, "
        f"at end {_load(info['loads'][1])}",
    ]
    if src1["hash"] != src0["hash"]:
        parts.append(f"- WARNING: ntkflow's sources changed during the run ({src0['hash']} -> "
                     f"{src1['hash']}); cells run in restarted processes used the new code.")
    if args.note:
        parts.append(f"- Note: {args.note}")
    stiff_cap = ""
    if args.baseline_timeout_stiff not in (None, args.baseline_timeout):
        stiff_cap = (f"; {args.baseline_timeout_stiff:g} s for the converged cells with "
                     f"n >= {STIFF_N}")
    s_text = "S = c lam_max t, the horizon's stiffness."
    if args.momentum is not None:
        s_text = ("S = t max(|d|, sqrt(c lam_max)), the horizon's stiffness with momentum "
                  "(the fastest damping or oscillation rate times t).")
    parts += [
        "",
        f"Times in seconds (median of at least {args.repeats} runs, up to {MAX_REPEATS} for "
        f"fast solves, until {MIN_TIMED:g} s, in {args.rounds} batches per method, "
        "alternating between the methods, where both are fast; `*`: timed once, the solve "
        f"being slower than {args.single_run:g} s). `> cap`: abandoned after the cap "
        f"(baseline {args.baseline_timeout:g} s{stiff_cap}, ntkflow "
        f"{args.ntkflow_timeout:g} s), or "
        "skipped because a smaller cell of the same kind hit it; speed-ups against a capped "
        f"baseline are lower bounds. {s_text} Errors: max "
        "abs error of (fx_train, fx_test) vs a float64 reference (`n/a`: reference over its "
        f"{args.reference_timeout:g} s cap); for cross-entropy at t=None, the training loss "
        "reached. ΔRSS: peak resident-memory growth during one run (a separate, untimed "
        "one for solves timed several times).",
        "",
        table(cells, floors, args),
        "",
        "Floor (one `eigh` of K_tt plus `V @ x` and `K_st @ (V @ x)`, jitted):",
        "",
        floor_table(floors),
        "",
        "Summary:",
        "",
        summary(cells, floors, args),
        "",
    ]
    return "\n".join(parts)


def _recorded_args(argv: list[str]) -> list[str]:
    """The command-line arguments that shape the results: without ``--output`` (a path
    of the machine that ran it) and ``--no-write``."""
    kept: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a == "--output":
            skip = True
        elif not (a.startswith("--output=") or a == "--no-write"):
            kept.append(a)
    return kept


def _load(values: tuple[float, ...]) -> str:
    return ", ".join(f"{v:.1f}" for v in values) if values else "n/a"


def write_results(text: str, path: Path, name: str = SECTION) -> None:
    """Replace (or append) the section ``name`` ("## Solvers") of ``path``, keeping other
    sections."""
    old = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(name)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(old):
        new = pattern.sub(lambda _: text + "\n", old, count=1)
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(new.rstrip("\n") + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[256, 1024], help="train points")
    p.add_argument("--test-factors", type=int, nargs="+", default=[1, 4],
                   help="test points as multiples of n")
    p.add_argument("--losses", nargs="+", choices=LOSSES, default=list(LOSSES))
    p.add_argument("--horizons", nargs="+", choices=HORIZONS, default=list(HORIZONS))
    p.add_argument("--precisions", type=int, nargs="+", choices=(32, 64), default=[64, 32])
    p.add_argument("--f32-max-n", type=int, default=256,
                   help="run float32 only for n up to this")
    p.add_argument("--big-n", type=int, nargs="*", default=[4096],
                   help="extra n (n_test = n, float64, MSE, converged and t=None) for ntkflow "
                        "and the floor only, e.g. 4096")
    p.add_argument("--cond", type=float, default=1e4, help="condition number of K_tt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--solver", default="auto", help="ntkflow solver")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3,
                   help="batches of timed runs per method, alternating, for fast cells")
    p.add_argument("--single-run", type=float, default=5.0,
                   help="time a solve once when it takes longer than this (s)")
    p.add_argument("--baseline-timeout", type=float, default=120.0, help="cap per solve (s)")
    p.add_argument("--baseline-timeout-stiff", type=float, default=None, metavar="SECONDS",
                   help=f"baseline cap for the converged cells with n >= {STIFF_N} (s; "
                        "default: --baseline-timeout)")
    p.add_argument("--ntkflow-timeout", type=float, default=60.0, help="cap per solve (s)")
    p.add_argument("--reference-timeout", type=float, default=60.0, help="cap (s)")
    p.add_argument("--compile-slack", type=float, default=120.0,
                   help="allowance for compilation (s)")
    p.add_argument("--note", default="", help="a line added to the results (e.g. load)")
    p.add_argument("--momentum", type=float, default=None, metavar="M",
                   help="run every cell with heavy-ball momentum M in [0, 1) at learning "
                        "rate 1 (section \"## Solvers with momentum\")")
    p.add_argument("--output", type=Path, default=RESULTS)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    if args.momentum is not None and not 0.0 <= args.momentum < 1.0:
        p.error("--momentum must be in [0, 1)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    load = lambda: os.getloadavg() if hasattr(os, "getloadavg") else ()
    sources, load0 = source_state(), load()
    cells, floors, wall = run_matrix(args)
    info = {"wall": wall, "loads": (load0, load()), "sources": (sources, source_state())}
    text = render(cells, floors, args, info)
    print(text)
    if not args.no_write:
        write_results(text, args.output, section(args))
        _log(f"wrote {args.output}")


if __name__ == "__main__":
    main()
