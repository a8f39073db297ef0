r"""An exponential integrator in the kernel's eigenbasis, for stiff gradient flow.

Gradient flow :math:`F' = -K G(F)` is stiff when the kernel's eigenvalues span
many orders of magnitude: an explicit method's step is capped by the largest
eigenvalue while training runs until the smallest has relaxed. Linearizing
the loss gradient with a scalar curvature, :math:`G(F) \approx G(F_n) + c
(F - F_n)`, splits the flow into a stiff linear part :math:`L = -cK`, solved
exactly in the eigenbasis :math:`K = V \Lambda V^T` (computed once per
predictor), and a mild remainder :math:`N(F) = -K (G(F) - cF)`.

Each step is the second-order exponential Runge-Kutta method ETD2RK (Cox &
Matthews 2002) with the first-order exponential Euler as embedded error
estimate:

.. math::

    a = e^{hL} F_n + h \varphi_1(hL) N(F_n), \qquad
    F_{n+1} = a + h \varphi_2(hL) \big(N(a) - N(F_n)\big),

where :math:`\varphi_1(z) = (e^z - 1)/z` and :math:`\varphi_2(z) = (e^z - 1 -
z)/z^2`, diagonal in the eigenbasis. The curvature :math:`c` is re-estimated at
every step as a Rayleigh quotient of the loss Hessian along the gradient (one
Jacobian-vector product). For the MSE loss :math:`N` is constant, the method is
exact and the step size grows geometrically: a long horizon costs a few dozen
steps. The accumulated gradient :math:`S_1 = \int G` (for test outputs) is
advanced consistently: :math:`\Delta (V^T S_1) = -\Delta (V^T F) / \Lambda` on
non-null modes (exact, since :math:`F' = -KG`), and by the trapezoidal rule on
null modes.

Without momentum only; with momentum ``auto`` uses an explicit method.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array

from ntkflow._dynamics import Dynamics, FlatState
from ntkflow._eigen import Eigen
from ntkflow._solvers import (
    SOLVERS,
    AbstractSolver,
    SolveInfo,
    converged,
    projected_gradient,
)

__all__ = ["Expo"]

_SAFETY, _FAC_MIN, _FAC_MAX = 0.9, 0.2, 10.0


def _phis(z: Array) -> tuple[Array, Array, Array]:
    """``exp(z)``, ``phi1(z)``, ``phi2(z)`` for ``z <= 0``, stable near 0."""
    small = jnp.abs(z) < 1e-3
    zs = jnp.where(small, -1.0, z)
    e = jnp.exp(z)
    phi1 = jnp.where(small, 1 + z / 2 + z * z / 6, jnp.expm1(zs) / zs)
    phi2 = jnp.where(small, 0.5 + z / 6 + z * z / 24, (jnp.expm1(zs) - zs) / (zs * zs))
    return e, phi1, phi2


class Expo(AbstractSolver):
    """Adaptive ETD2RK exponential integrator in the eigenbasis of ``K`` (stiff, no momentum)."""

    name: ClassVar[str] = "expo"
    stiff: ClassVar[bool] = True

    # -- one step -------------------------------------------------------------------------------

    @staticmethod
    def _step(dyn: Dynamics, eig: Eigen, z: Array, w: Array, h: Array, rtol: float, atol: float):
        """One ETD2RK step from eigen-coordinates ``z = V^T F``, ``w = V^T S1``."""
        lam = eig.evals[:, None]
        f = eig.evecs @ z
        g = dyn.grad_fn(f)
        _, hg = jax.jvp(dyn.grad_fn, (f,), (g,))
        gg = jnp.vdot(g, g)
        c = jnp.where(gg > 0, jnp.vdot(g, hg) / jnp.where(gg > 0, gg, 1.0), 0.0)
        c = jnp.maximum(c, 0.0)
        gz = eig.evecs.T @ g
        n0 = -lam * (gz - c * z)  # V^T N(F_n)
        e, p1, p2 = _phis(-h * c * lam)
        a = e * z + h * p1 * n0
        fa = eig.evecs @ a
        ga = dyn.grad_fn(fa)
        gza = eig.evecs.T @ ga
        na = -lam * (gza - c * a)
        corr = h * p2 * (na - n0)
        z_new = a + corr
        # Accumulated gradient: exact on non-null modes, trapezoid on null modes.
        null = eig.null[:, None]
        safe = jnp.where(null, 1.0, lam)
        dw = jnp.where(null, 0.5 * h * (gz + gza), -(z_new - z) / safe)
        rms = lambda x: jnp.sqrt(jnp.mean(jnp.square(x)))
        scale = atol + rtol * jnp.maximum(rms(z), rms(z_new))
        err = rms(corr) / scale
        err = jnp.where(jnp.isfinite(err), err, jnp.inf)
        return z_new, w + dw, err

    @staticmethod
    def _next_h(h: Array, err: Array) -> Array:
        fac = _SAFETY * jnp.where(err > 0, err, 1e-10) ** -0.5
        return h * jnp.clip(fac, _FAC_MIN, _FAC_MAX)

    @staticmethod
    def _eigen(dyn: Dynamics) -> Eigen:
        return dyn.eigen if dyn.eigen is not None else Eigen.of(dyn.k)

    @staticmethod
    def _initial_h(dyn: Dynamics, eig: Eigen, z: Array, rtol: float, atol: float) -> Array:
        f = eig.evecs @ z
        df = dyn.k @ dyn.grad_fn(f)
        rms = lambda x: jnp.sqrt(jnp.mean(jnp.square(x)))
        d1 = rms(df)
        return jnp.where(d1 > 0, 0.01 * (atol + rtol * rms(f)) / jnp.where(d1 > 0, d1, 1), 1.0)

    def _state(self, eig: Eigen, z: Array, w: Array, with_test: bool) -> FlatState:
        return FlatState(eig.evecs @ z, None, (eig.evecs @ w) if with_test else None, None)

    # -- the contract -----------------------------------------------------------------------------

    def integrate(self, dynamics, y0, taus, *, rtol, atol, max_steps):
        if dynamics.momentum:
            raise ValueError("solver='expo' supports momentum=None only; use 'tsit5' or 'auto'.")
        eig = self._eigen(dynamics)
        z0 = eig.to_eigenbasis(y0.f)
        w0 = jnp.zeros_like(z0)
        m = taus.shape[0]
        zs = jnp.zeros((m,) + z0.shape, z0.dtype)
        ws = jnp.zeros((m,) + z0.shape, z0.dtype)
        h0 = self._initial_h(dynamics, eig, z0, rtol, atol)
        tau0 = jnp.zeros((), taus.dtype)

        def cond(c):
            tau, z, w, h, i, zs, ws, n, ok = c
            return (i < m) & (n < max_steps) & ok

        def body(c):
            tau, z, w, h, i, zs, ws, n, ok = c
            target = taus[jnp.minimum(i, m - 1)]
            at_target = tau >= target
            # Record (possibly several repeated targets, one per iteration).
            zs = jnp.where(at_target, zs.at[i].set(z), zs)
            ws = jnp.where(at_target, ws.at[i].set(w), ws)
            h_try = jnp.minimum(h, target - tau)
            z1, w1, err = self._step(dynamics, eig, z, w, h_try, rtol, atol)
            accept = (err <= 1.0) & ~at_target
            hit = h_try >= target - tau
            new_tau = jnp.where(accept, jnp.where(hit, target, tau + h_try), tau)
            z = jnp.where(accept, z1, z)
            w = jnp.where(accept, w1, w)
            h_next = jnp.where(at_target, h, self._next_h(h_try, err))
            h_next = jnp.where(accept & hit, jnp.maximum(h_next, h), h_next)
            ok = ok & jnp.isfinite(err) | at_target
            return (new_tau, z, w, h_next, i + at_target, zs, ws, n + ~at_target, ok)

        init = (tau0, z0, w0, h0, jnp.zeros((), jnp.int32), zs, ws, jnp.zeros((), jnp.int32),
                jnp.ones((), bool))
        tau, z, w, h, i, zs, ws, n, ok = jax.lax.while_loop(cond, body, init)
        ys = jax.vmap(lambda zz, ww: self._state(eig, zz, ww, dynamics.with_test))(zs, ws)
        done = i >= m
        code = jnp.where(done, 0, jnp.where(ok, 1, 2)).astype(jnp.int32)
        return ys, SolveInfo(done, tau, n, 4 * n, code)

    def converge(self, dynamics, y0, tau0, eigen, *, rtol, atol, max_steps):
        if dynamics.momentum:
            raise ValueError("solver='expo' supports momentum=None only; use 'tsit5' or 'auto'.")
        eig = self._eigen(dynamics)
        z0 = eig.to_eigenbasis(y0.f)
        w0 = eig.to_eigenbasis(y0.s1) if y0.s1 is not None else jnp.zeros_like(z0)
        loss0 = dynamics.loss_fn(y0.f)
        _, curvature0 = projected_gradient(dynamics, eigen, y0.f)
        h0 = self._initial_h(dynamics, eig, z0, rtol, atol)

        def is_done(tau, z, w):
            state = self._state(eig, z, w, False)
            return converged(dynamics, eigen, state, loss0, curvature0, rtol, atol)

        def cond(c):
            tau, z, w, h, n, done, ok = c
            return ~done & (n < max_steps) & ok

        def body(c):
            tau, z, w, h, n, done, ok = c
            z1, w1, err = self._step(dynamics, eig, z, w, h, rtol, atol)
            accept = err <= 1.0
            tau = jnp.where(accept, tau + h, tau)
            z = jnp.where(accept, z1, z)
            w = jnp.where(accept, w1, w)
            done = accept & is_done(tau, z, w)
            return (tau, z, w, self._next_h(h, err), n + 1, done, ok & jnp.isfinite(err))

        init = (tau0, z0, w0, h0, jnp.zeros((), jnp.int32), is_done(tau0, z0, w0),
                jnp.ones((), bool))
        tau, z, w, h, n, done, ok = jax.lax.while_loop(cond, body, init)
        code = jnp.where(done, 0, jnp.where(ok, 1, 2)).astype(jnp.int32)
        y = self._state(eig, z, w, dynamics.with_test)
        return y, SolveInfo(done, tau, n, 4 * n, code)


SOLVERS["expo"] = Expo
