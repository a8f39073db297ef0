r"""The ``solver="auto"`` choice, explicit and documented.

Three properties of a request decide (measured in ``benchmarks/RESULTS.md``):

* **Is the loss's curvature isotropic?** The exponential integrator
  (:mod:`ntkflow._expo`) linearizes the loss gradient with a *scalar*
  curvature :math:`c`. For the MSE (Hessian :math:`I/|y|`) this is exact and
  long horizons cost a few dozen steps (100-300x faster than the
  predecessor's explicit solver). Isotropy is tested at the initial outputs
  with Rayleigh quotients of the Hessian along the gradient and four fixed
  pseudo-random directions (Hessian-vector products): isotropic if they agree
  to ``1e-3`` relative.
* **Are the targets a minimizer?** For regression losses (log-cosh, Huber,
  ...; :math:`\nabla L(y) = 0`, tested to ``sqrt(eps)`` relative to the
  gradient at the initial outputs) training converges to finite outputs with
  positive curvature, and the Rosenbrock method with the true Jacobian
  (:mod:`ntkflow._rosenbrock`) takes large steps at every stage of training.
  For classification losses (cross-entropy) the minimizer is at infinity: the
  softmax saturates, the curvature collapses and the problem loses its
  stiffness, so an explicit method does well and the Rosenbrock method's
  linear solves become ill-conditioned (measured, n = 256, condition number 1e4,
  converged horizon: 0.35 s against Tsit5's 0.25 s in float64; ``t = inf`` in
  float32: 0.68 s against Dormand-Prince's 0.39 s). Not so with
  momentum: the damping rate :math:`|d|` then stays while the outputs drift ever
  more slowly, a stiff pair for an explicit method (cross-entropy, n = 256,
  momentum 0.9, converged horizon: Tsit5 62,916 steps, 17.6 s; the Rosenbrock
  method 227 steps, 0.5 s), so with momentum every non-isotropic loss gets the
  Rosenbrock method when stiff. Nor to ``t = inf`` on an ill-conditioned kernel in
  double precision: the explicit method's last stretch, at its stability limit, takes
  a number of steps that grows with the condition number :math:`\kappa` of the kernel's
  non-null modes, while the Rosenbrock method's steps grow with the time scales passed
  (measured, float64, cross-entropy, 10 classes, power-law spectra, ``t = inf``,
  explicit / Rosenbrock: n = 256 at :math:`\kappa` = 1e2 0.043 / 0.223 s, 2e3 0.215 /
  0.330 s, 5e3 0.341 / 0.354 s, 1e4 0.58 / 0.38 s, 1e5 3.8 / 0.51 s, 1e6 and 1e8 out of
  100,000 steps / 0.56 and 3.7 s; n = 1024 at 2e3 2.82 / 3.22 s, 5e3 4.62 / 3.65 s, 1e4
  7.42 / 3.85 s; the same loss reached, 5e-9 - 7e-9). The Rosenbrock method has no
  dense output, so each finite output time requested with ``inf`` costs it about a
  step, some 30 of the explicit method's (n = 256, :math:`\kappa` = 1e4, ``inf`` and
  30 / 100 / 300 times between 0.1 and 1e5: 0.58 / 0.59 / 0.59 s explicit against
  0.57 / 0.60 / 0.79 s). So there ``auto`` takes the Rosenbrock method above
  :math:`\kappa = 4000 + 60 m`, with :math:`m` finite output times
  (``_CLASSIFICATION_END_COND``), from the eigendecomposition that the end-of-training
  test needs with either method. In
  float32 the explicit method stays (n = 256 / 512 / 1024 at :math:`\kappa` = 1e4:
  0.39 / 1.55 / 6.4 s against 0.68 / 1.85 / 7.5 s).
* **Is the request stiff?** Let :math:`S = c_0\,\lambda_\max\,\tau_\max`
  be the number of the fastest time scales of gradient flow within the
  horizon :math:`\tau_\max` (``learning_rate * max(t)``; with momentum
  :math:`S = \tau_\max \max(|d|, \sqrt{c_0 \lambda_\max})`, the fastest
  damping and oscillation rates), with :math:`\lambda_\max` the largest
  eigenvalue of the kernel (once per predictor: from the Lanczos steps of the
  input check, or power iterations for a traced kernel) and
  :math:`c_0` the curvature along the initial gradient. An explicit method
  needs at least about :math:`S / 3.3` steps of 6 kernel products each; the
  exponential integrator one ``eigh`` (about ``n`` kernel products) and a
  few dozen steps, the Rosenbrock method one ``eigh`` and a few thousand
  kernel-sized products. Stiff means :math:`S > a\,n + b`, the break-even
  horizon measured against Tsit5 (float64, power-law spectra of condition 1e4,
  n = 256 and 1024, log-cosh and cross-entropy; ``_STIFF`` below):

  ============================================  =======  ======
  stiff solver, request                         a        b
  ============================================  =======  ======
  exponential integrator                        0.55     100
  Rosenbrock, regression loss                   0.25     250
  Rosenbrock, regression loss, momentum         0.8      600
  Rosenbrock, classification loss, momentum     0.55     3000
  ============================================  =======  ======

  (Cross-entropy's :math:`S` uses the curvature at the start, which then
  collapses, so its break-even :math:`S` is higher: about 5,000 at n = 256
  against 800 for log-cosh.)

  The regression rule holds in float32 too, within the flat cost near the
  break-even (``benchmarks/auto_breakeven.py``, log-cosh): there Dormand-Prince
  and the Rosenbrock method break even near :math:`S` = 470 at n = 256 and 380
  at n = 1024 (float64: 350 and 470). At the measured horizons the rule's pick
  took at most 1.2x the faster method's time (interpolated, about 1.3x just
  above the threshold at n = 256).

``auto`` picks, for plain gradient descent with an isotropic loss (MSE) at finite
times whose horizon satisfies :math:`W = c_0 \lambda_\text{ub} \tau_\max \le 200`
(:math:`\lambda_\text{ub} \ge \lambda_\max`, a bound from one pass over the
kernel), the Chebyshev expansion of the exact solution (:mod:`ntkflow._chebyshev`;
about 20 kernel products at :math:`S = 10`, where Tsit5 needs 80-130). Otherwise,
when the request is stiff or ``t`` contains ``inf``:
``"expo"`` for isotropic losses, ``"rodas5p"`` for regression losses (and, with
momentum, for every other loss; and for classification losses to ``t = inf`` in double
precision on kernels of condition number above 4e3, plus 60 per finite output time); and
an explicit 5(4) method, with the test outputs kept out of the ODE state,
otherwise: for classification losses, short horizons, and when ``t`` or the
initial outputs are traced (under ``jax.jit``, ``jax.grad``, ``jax.vmap``: the
horizon is unknown, and diffrax's solvers are reverse-mode differentiable while
the eigenbasis solvers' adaptive loops are not; with concrete inputs the explicit
methods run in ntkflow's own, leaner loop, :mod:`ntkflow._explicit`). The explicit
method is ``"tsit5"`` (Tsitouras) in double precision and ``"dopri5"``
(Dormand-Prince) in single precision, where its smaller solution weights carry a
fifth of Tsit5's round-off (:class:`ntkflow._explicit.Dopri5`). In double precision,
finite horizons with :math:`S \le 50` and at most :math:`\max(2, \sqrt S)` distinct
output times after 0 get Prince and Dormand's 8(7) pair, ``"dopri8"``
(:class:`ntkflow._explicit.Dopri8`), at the user's tolerances: 13 kernel products a
step against Tsit5's 6, for a third of the steps or fewer (cross-entropy, n = 128,
S = 10: 10 steps against 36 at a third of the tolerance, with errors 5.2e-9 and
9.2e-9 against Dormand-Prince 5(4)'s 5.0e-8 at the tolerance; 13 steps and 1.3e-8
before its first step was sized by the dynamics' rate, see
:func:`ntkflow._explicit._initial_h`). Its steps end at the output times, about one
more step each. Measured against Tsit5 with that earlier start (float64,
cross-entropy, one output time): n = 1024 1.26x faster at S = 10, 1.15x at 30, 1.12x
at 50, 1.01x at 100, 0.88x at 300; n = 256 1.18x, 1.17x, 1.12x, 1.06x, 0.98x;
log-cosh at S = 10 1.20x; with momentum 0.9 1.32-1.38x. With more output times: S =
10, 4 times 1.18x and 20 times 0.77x; S = 30, 5 times 1.07x; S = 50, 7 times 1.02x. Pass
``solver="expo"`` or ``"rodas5p"`` to force one (e.g. under ``jit``).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ntkflow._axes import outputs_to_2d
from ntkflow._chebyshev import MAX_WIDTH, Chebyshev, spectral_bound
from ntkflow._checks import start_vector
from ntkflow._compensated import compensate
from ntkflow._dynamics import Dynamics, FlatState, rms
from ntkflow._explicit import Dopri5, Dopri8, Tsit5
from ntkflow._solvers import AbstractSolver
from ntkflow._typing import is_concrete

__all__ = [
    "AUTO",
    "choose_solver",
    "explicit_solver",
    "classify",
    "end_spectrum_decides",
    "isotropic_curvature",
    "isotropic_quadratic",
    "largest_eigenvalue",
    "targets_minimize",
]

AUTO = "auto"

#: ``(a, b)``: a request is stiff for the solver when ``S > a n + b`` (module docstring).
_STIFF = {
    "expo": (0.55, 100.0),
    "rodas5p": (0.25, 250.0),
    "rodas5p, momentum": (0.8, 600.0),
    "rodas5p, classification, momentum": (0.55, 3000.0),
}


#: Float64, plain gradient descent, classification losses to ``t = inf``: the Rosenbrock
#: method above this condition number of the kernel (over its non-null modes) plus
#: ``_CLASSIFICATION_END_PER_OUTPUT`` per finite output time, the explicit method at or
#: below it (module docstring).
_CLASSIFICATION_END_COND = 4e3
_CLASSIFICATION_END_PER_OUTPUT = 60.0


def end_spectrum_decides(dynamics: Dynamics, facts: Any, dtype: Any) -> bool:
    """Whether ``auto``'s choice for this request depends on the kernel's condition number
    (then the predictor computes the eigendecomposition first, which the end-of-training
    test needs with either method): a classification loss (neither isotropic nor
    minimized by the targets) to ``t = inf``, without momentum, in double precision."""
    isotropic, minimize, infinite, _, _ = facts
    return (bool(infinite) and not isotropic and not minimize and not dynamics.momentum
            and not compensate(dtype))


@functools.partial(jax.jit, static_argnames="iterations")
def largest_eigenvalue(k: Array, iterations: int = 30) -> Array:
    """Power-iteration estimate of the largest eigenvalue of a PSD matrix (from below)."""
    def body(_: int, v: Array) -> Array:
        w = k @ v
        return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(k.dtype).tiny)

    v = jax.lax.fori_loop(0, iterations, body, start_vector(k.shape[0], k.dtype))
    return jnp.vdot(v, k @ v)


def stiffness(dynamics: Dynamics, c0: Array, tau_max: Array, lam_max: Array) -> Array:
    """:math:`S = c_0 \\lambda_\\max \\tau_\\max` (see the module docstring), with
    ``c0`` the curvature along the initial gradient."""
    rate = c0 * lam_max
    if dynamics.damping is not None:
        rate = jnp.maximum(jnp.abs(dynamics.damping), jnp.sqrt(rate))
    return rate * tau_max


def _normal_constant(seed: int, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """Standard normal numbers from NumPy's generator: constants of the program.

    Not work per call (generating them at run time took 0.26 ms of a 0.41 ms
    classification; cross-entropy, n = 256, float32), and not JAX's generator under
    :func:`jax.ensure_compile_time_eval` either, whose two programs were compiled for
    every new shape (1.0 s the first time, n = 40, float64).
    """
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _rayleigh_quotients(dynamics: Dynamics, f: Array) -> Array:
    """Rayleigh quotients of the loss Hessian at ``f`` along the gradient and four fixed
    pseudo-random directions (the gradient's replaced by the first of those if it is 0)."""
    g = dynamics.grad_fn(f)
    dirs = jnp.concatenate([g[None], _normal_constant(0, (4,) + f.shape, f.dtype)])

    def rayleigh(v: Array) -> Array:
        _, hv = jax.jvp(dynamics.grad_fn, (f,), (v,))
        return jnp.vdot(v, hv) / jnp.maximum(jnp.vdot(v, v), jnp.finfo(f.dtype).tiny)

    q = jax.vmap(rayleigh)(dirs)
    return jnp.where(jnp.vdot(g, g) > 0, q, jnp.concatenate([q[1:2], q[1:]]))


def _agree(q: Array, rtol: float) -> Array:
    return (jnp.max(q) - jnp.min(q) <= rtol * jnp.max(jnp.abs(q))) & (jnp.min(q) > 0)


@eqx.filter_jit
def isotropic_curvature(dynamics: Dynamics, f: Array, rtol: float = 1e-3) -> Array:
    """Whether the loss Hessian at ``f`` looks like ``c * I`` (see the module docstring)."""
    return _agree(_rayleigh_quotients(dynamics, f), rtol)


@eqx.filter_jit
def isotropic_quadratic(dynamics: Dynamics, f: Array, rtol: float = 1e-3) -> Array:
    """Whether the loss looks quadratic with Hessian ``c * I``: the Rayleigh quotients agree
    at ``f`` and at a second, pseudo-random point ``f + u`` (``rms(u) = max(1, rms(f))``).

    Isotropy at one point is not enough for the Chebyshev expansion, which assumes it
    everywhere: log-cosh with targets of equal magnitude (e.g. ``+-1``) starting from ``f =
    0`` has the same curvature in every entry there, and not elsewhere.
    """
    u = _normal_constant(1, f.shape, f.dtype)
    f1 = f + jnp.maximum(1.0, rms(f)) * u
    q = jnp.concatenate([_rayleigh_quotients(dynamics, f), _rayleigh_quotients(dynamics, f1)])
    return _agree(q, rtol)


@eqx.filter_jit
def targets_minimize(dynamics: Dynamics, f0: Array) -> Array:
    """Whether the gradient vanishes at the targets (a regression loss; see the module
    docstring)."""
    y = outputs_to_2d(dynamics.y, dynamics.loss.layout).astype(f0.dtype)
    if y.shape != f0.shape:
        return jnp.zeros((), bool)
    g_y, g_0 = rms(dynamics.grad_fn(y)), rms(dynamics.grad_fn(f0))
    return g_y <= jnp.sqrt(jnp.finfo(f0.dtype).eps) * g_0


@eqx.filter_jit
def classify(
    dynamics: Dynamics, y0: FlatState, taus: Array, lam_max: Array
) -> tuple[Array, Array, Array, Array, Array]:
    """``(isotropic, targets minimize, any t infinite, S, W)`` in one compiled call (or
    inside the caller's: predictors compute them with their input checks). ``W``: ``S``
    with an upper bound of the kernel's spectrum instead of ``lambda_max`` (the Chebyshev
    expansion's interval), ``inf`` unless the loss looks quadratic and isotropic."""
    infinite = jnp.any(jnp.isinf(taus))
    tau_max = jnp.max(jnp.where(jnp.isinf(taus), 0.0, taus), initial=0.0)
    _, c0 = dynamics.gradient_and_curvature(y0.f)
    s = stiffness(dynamics, c0, tau_max, lam_max)
    isotropic = isotropic_curvature(dynamics, y0.f)

    def width(_: None) -> Array:  # only for isotropic losses: 5 more Hessian products
        w = c0 * tau_max * spectral_bound(dynamics.k)
        return jnp.where(isotropic_quadratic(dynamics, y0.f), w, jnp.inf).astype(s.dtype)

    no_width = lambda _: jnp.full((), jnp.inf, s.dtype)
    return (
        isotropic,
        targets_minimize(dynamics, y0.f),
        infinite,
        s,
        jax.lax.cond(isotropic, width, no_width, None),
    )


#: In double precision ``auto`` takes the 8th-order pair up to this stiffness ``S`` and
#: ``max(2, sqrt(S))`` output times (module docstring).
_DOPRI8_MAX_STIFFNESS = 50.0


def explicit_solver(dtype: Any, s: Any = None, taus: Any = None) -> AbstractSolver:
    """``auto``'s explicit method for this float type and, if known, the request's
    stiffness ``s`` and times ``taus`` (see the module docstring)."""
    if compensate(dtype):
        return Dopri5()
    if s is None or taus is None:
        return Tsit5()
    if np.any(np.isinf(np.asarray(taus))) or not float(s) <= _DOPRI8_MAX_STIFFNESS:
        return Tsit5()
    return Dopri8() if _finite_outputs(taus) <= max(2.0, math.sqrt(float(s))) else Tsit5()


def _finite_outputs(taus: Any) -> int:
    """The number of distinct finite output times after the start (concrete ``taus``)."""
    times = np.asarray(taus)
    return int(np.unique(times[np.isfinite(times) & (times > 0)]).size)


def choose_solver(
    dynamics: Dynamics, y0: FlatState, taus: Array, lam_max: Array, facts: Any = None
) -> AbstractSolver:
    """The solver ``auto`` uses for this request (see the module docstring); ``facts``:
    :func:`classify`'s values if already computed."""
    from ntkflow._expo import Expo
    from ntkflow._rosenbrock import Rodas5P

    if not is_concrete(taus, y0.f, lam_max):
        return explicit_solver(y0.f.dtype)
    if facts is None:
        facts = jax.device_get(classify(dynamics, y0, taus, lam_max))
    isotropic, minimize, infinite, s, width = facts
    if isotropic and not dynamics.momentum and not infinite and width <= MAX_WIDTH:
        return Chebyshev()
    stiff_solver: AbstractSolver
    if isotropic:
        stiff_solver, (a, b) = Expo(), _STIFF["expo"]
    elif minimize:
        stiff_solver = Rodas5P()
        a, b = _STIFF["rodas5p, momentum" if dynamics.momentum else "rodas5p"]
    elif dynamics.momentum:
        stiff_solver, (a, b) = Rodas5P(), _STIFF["rodas5p, classification, momentum"]
    else:
        if end_spectrum_decides(dynamics, facts, y0.f.dtype) and dynamics.eigen is not None:
            threshold = (_CLASSIFICATION_END_COND
                         + _CLASSIFICATION_END_PER_OUTPUT * _finite_outputs(taus))
            if float(dynamics.eigen.condition_number()) > threshold:
                return Rodas5P()
        return explicit_solver(y0.f.dtype, s, taus)
    if infinite or s > a * dynamics.k.shape[0] + b:
        return stiff_solver
    return explicit_solver(y0.f.dtype, s, taus)
