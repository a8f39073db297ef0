r"""The ``solver="auto"`` choice, explicit and documented.

Let :math:`S = c_0\,\lambda_\max\,\tau_\max` be the stiffness of a request:
the number of the fastest time scales of gradient flow spanned by the
requested horizon :math:`\tau_\max` (``learning_rate * max(t)``; with
momentum :math:`S = \tau_\max \max(|d|, \sqrt{c_0 \lambda_\max})`, the
fastest damping and oscillation rates of the heavy-ball system), with
:math:`\lambda_\max` the largest eigenvalue of the kernel (a few power
iterations, once per predictor) and :math:`c_0` the loss curvature along the
initial gradient (a Hessian-vector product). An explicit method needs at least
about :math:`S / 3.3` steps (its stability limit) of 6 kernel products each;
the exponential integrator needs one ``eigh`` (about ``n`` kernel products)
and a few dozen steps. So ``auto`` picks

* ``"tsit5"`` for non-stiff requests, :math:`S \le 0.55\,n +
  100`, and when ``t`` or the initial outputs are traced (under ``jax.jit``,
  ``jax.grad``, ``jax.vmap``: the horizon is unknown, and diffrax's solvers
  are reverse-mode differentiable while the exponential integrator's
  adaptive loop is not); pass ``solver="expo"`` explicitly for stiff problems
  under ``jit``;
* ``"expo"`` otherwise, and whenever ``t`` contains ``inf`` (the end of
  training).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array

from ntkflow._dynamics import Dynamics, FlatState
from ntkflow._solvers import AbstractSolver, Tsit5
from ntkflow._typing import is_concrete

__all__ = ["AUTO", "choose_solver", "largest_eigenvalue"]

AUTO = "auto"


def largest_eigenvalue(k: Array, iterations: int = 30) -> Array:
    """Power-iteration estimate of the largest eigenvalue of a PSD matrix (from below)."""
    v = jnp.ones((k.shape[0],), k.dtype) / jnp.sqrt(k.shape[0])
    v = v + 1e-3 * jnp.sin(jnp.arange(k.shape[0], dtype=k.dtype))

    def body(_: int, v: Array) -> Array:
        w = k @ v
        return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(k.dtype).tiny)

    v = jax.lax.fori_loop(0, iterations, body, v / jnp.linalg.norm(v))
    return jnp.vdot(v, k @ v)


def stiffness(dynamics: Dynamics, y0: FlatState, tau_max: Array, lam_max: Array) -> Array:
    """:math:`S = c_0 \\lambda_\\max \\tau_\\max` (see the module docstring)."""
    g = dynamics.grad_fn(y0.f)
    _, hg = jax.jvp(dynamics.grad_fn, (y0.f,), (g,))
    gg = jnp.vdot(g, g)
    c0 = jnp.where(gg > 0, jnp.vdot(g, hg) / jnp.where(gg > 0, gg, 1.0), 0.0)
    rate = jnp.maximum(c0, 0.0) * lam_max
    if dynamics.damping is not None:
        rate = jnp.maximum(jnp.abs(dynamics.damping), jnp.sqrt(rate))
    return rate * tau_max


def choose_solver(
    dynamics: Dynamics, y0: FlatState, taus: Array, lam_max: Array
) -> AbstractSolver:
    """The solver ``auto`` uses for this request (see the module docstring)."""
    from ntkflow._expo import Expo

    if not is_concrete(taus, y0.f, lam_max):
        return Tsit5()
    if bool(jnp.any(jnp.isinf(taus))):
        return Expo()
    tau_max = jnp.max(taus, initial=0.0)
    s = float(stiffness(dynamics, y0, tau_max, lam_max))
    return Expo() if s > 0.55 * dynamics.k.shape[0] + 100 else Tsit5()
