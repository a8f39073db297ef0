r"""The ``solver="auto"`` choice, explicit and documented.

Two properties of a request decide (measured in ``benchmarks/RESULTS.md``):

* **Is the loss's curvature isotropic?** The exponential integrator
  (:mod:`ntkflow._expo`) linearizes the loss gradient with a *scalar*
  curvature :math:`c`. For the MSE (Hessian :math:`I/|y|`) this is exact and
  long horizons cost a few dozen steps (100-300x faster than the
  predecessor's explicit solver). For losses whose Hessian varies across
  outputs (cross-entropy, log-cosh, ...) the remainder is itself stiff and the
  second-order method needs many small steps, slower than an explicit
  fifth-order one. Isotropy is tested at the initial outputs with Rayleigh
  quotients of the Hessian along the gradient and four fixed pseudo-random
  directions (Hessian-vector products): isotropic if they agree to
  ``1e-3`` relative.
* **Is the request stiff?** Let :math:`S = c_0\,\lambda_\max\,\tau_\max`
  be the number of the fastest time scales of gradient flow within the
  horizon :math:`\tau_\max` (``learning_rate * max(t)``; with momentum
  :math:`S = \tau_\max \max(|d|, \sqrt{c_0 \lambda_\max})`, the fastest
  damping and oscillation rates), with :math:`\lambda_\max` the largest
  eigenvalue of the kernel (a few power iterations, once per predictor) and
  :math:`c_0` the curvature along the initial gradient. An explicit method
  needs at least about :math:`S / 3.3` steps of 6 kernel products each; the
  exponential integrator one ``eigh`` (about ``n`` kernel products) and a
  few dozen steps: stiff means :math:`S > 0.55\,n + 100`.

``auto`` picks ``"expo"`` for isotropic losses when the request is stiff or
``t`` contains ``inf``, and ``"tsit5"`` (Tsitouras 5(4), explicit, with the
test outputs kept out of the ODE state) otherwise: for anisotropic losses,
short horizons, and when ``t`` or the initial outputs are traced (under
``jax.jit``, ``jax.grad``, ``jax.vmap``: the horizon is unknown, and diffrax's
solvers are reverse-mode differentiable while the exponential integrator's
adaptive loop is not). Pass ``solver="expo"`` to force the exponential
integrator (e.g. for MSE under ``jit``).
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array

from ntkflow._dynamics import Dynamics, FlatState
from ntkflow._solvers import AbstractSolver, Tsit5
from ntkflow._typing import is_concrete

__all__ = ["AUTO", "choose_solver", "isotropic_curvature", "largest_eigenvalue"]

AUTO = "auto"


@functools.partial(jax.jit, static_argnames="iterations")
def largest_eigenvalue(k: Array, iterations: int = 30) -> Array:
    """Power-iteration estimate of the largest eigenvalue of a PSD matrix (from below)."""
    v = jnp.ones((k.shape[0],), k.dtype) / jnp.sqrt(k.shape[0])
    v = v + 1e-3 * jnp.sin(jnp.arange(k.shape[0], dtype=k.dtype))

    def body(_: int, v: Array) -> Array:
        w = k @ v
        return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(k.dtype).tiny)

    v = jax.lax.fori_loop(0, iterations, body, v / jnp.linalg.norm(v))
    return jnp.vdot(v, k @ v)


@eqx.filter_jit
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


@eqx.filter_jit
def isotropic_curvature(dynamics: Dynamics, f: Array, rtol: float = 1e-3) -> Array:
    """Whether the loss Hessian at ``f`` looks like ``c * I`` (see the module docstring)."""
    g = dynamics.grad_fn(f)
    dirs = jax.random.normal(jax.random.PRNGKey(0), (4,) + f.shape, f.dtype)
    dirs = jnp.concatenate([g[None], dirs])

    def rayleigh(v: Array) -> Array:
        _, hv = jax.jvp(dynamics.grad_fn, (f,), (v,))
        return jnp.vdot(v, hv) / jnp.maximum(jnp.vdot(v, v), jnp.finfo(f.dtype).tiny)

    q = jax.vmap(rayleigh)(dirs)
    q = jnp.where(jnp.vdot(g, g) > 0, q, jnp.concatenate([q[1:2], q[1:]]))  # g = 0: skip it
    return (jnp.max(q) - jnp.min(q) <= rtol * jnp.max(jnp.abs(q))) & (jnp.min(q) > 0)


def choose_solver(
    dynamics: Dynamics, y0: FlatState, taus: Array, lam_max: Array
) -> AbstractSolver:
    """The solver ``auto`` uses for this request (see the module docstring)."""
    from ntkflow._expo import Expo

    if not is_concrete(taus, y0.f, lam_max):
        return Tsit5()
    if not bool(isotropic_curvature(dynamics, y0.f)):
        return Tsit5()
    if bool(jnp.any(jnp.isinf(taus))):
        return Expo()
    tau_max = jnp.max(taus, initial=0.0)
    s = float(stiffness(dynamics, y0, tau_max, lam_max))
    return Expo() if s > 0.55 * dynamics.k.shape[0] + 100 else Tsit5()
