r"""An exponential integrator in the kernel's eigenbasis, for stiff dynamics.

Gradient flow :math:`F' = -K G(F)` is stiff when the kernel's eigenvalues span
many orders of magnitude: an explicit method's step is capped by the largest
eigenvalue while training runs until the smallest has relaxed. Linearizing
the loss gradient with a scalar curvature, :math:`G(F) \approx G(F_n) + c
(F - F_n)`, splits the flow into a stiff linear part, solved exactly in the
eigenbasis :math:`K = V \Lambda V^T` (computed once per predictor), and a mild
remainder. Per eigenmode :math:`i` (coordinates :math:`z = V^T F`):

* plain gradient descent: :math:`z' = -c\lambda_i z + n(z)`, with
  :math:`n = -\lambda_i (V^T G - c z)`;
* momentum (heavy ball, damping :math:`d`): :math:`x = (z, q)`,
  :math:`x' = A_i x + (0, n)` with :math:`A_i = \begin{pmatrix} 0 & 1 \\
  -c\lambda_i & d \end{pmatrix}` (stiffness shows up as fast oscillation and
  damping; the :math:`2\times 2` matrix functions are evaluated by one batched
  ``expm`` of an augmented :math:`6 \times 6` matrix per mode, Al-Mohy & Higham
  2011).

Each step is the second-order exponential Runge-Kutta method ETD2RK (Cox &
Matthews 2002), with exponential Euler as the embedded error estimate:

.. math::

    a = e^{hA} x_n + h \varphi_1(hA) N(x_n), \qquad
    x_{n+1} = a + h \varphi_2(hA) \big(N(a) - N(x_n)\big),

:math:`\varphi_1(z) = (e^z - 1)/z`, :math:`\varphi_2(z) = (e^z - 1 - z)/z^2`.
The curvature :math:`c` is re-estimated at every step as a Rayleigh quotient
of the loss Hessian along the gradient (one Jacobian-vector product). For the
MSE loss :math:`N` is constant, the method is exact and the step size grows
geometrically: a long horizon costs a few dozen steps.

The gradient integrals that give the test outputs (``s1``, ``s2``, see
:mod:`ntkflow._dynamics`) are exact functions of the train state on non-null
modes (e.g. :math:`V^T S_1 = -(z - z_0)/\Lambda` without momentum, because
:math:`F' = -KG`); on null modes they are advanced by the exponential
trapezoidal rule.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import expm
from jaxtyping import Array

from ntkflow._dynamics import Dynamics, FlatState
from ntkflow._eigen import Eigen, phi1
from ntkflow._solvers import (
    SOLVERS,
    AbstractSolver,
    SolveInfo,
    converged,
    projected_gradient,
)

__all__ = ["Expo"]

_SAFETY, _FAC_MIN, _FAC_MAX = 0.9, 0.2, 10.0


def _rms(x: Array) -> Array:
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def _scalar_phis(x: Array) -> tuple[Array, Array, Array]:
    """``exp(x)``, ``phi1(x)``, ``phi2(x)`` elementwise, stable near 0."""
    small = jnp.abs(x) < 1e-3
    xs = jnp.where(small, -1.0, x)
    p1 = jnp.where(small, 1 + x / 2 + x * x / 6, jnp.expm1(xs) / xs)
    p2 = jnp.where(small, 0.5 + x / 6 + x * x / 24, (jnp.expm1(xs) - xs) / (xs * xs))
    return jnp.exp(x), p1, p2


def _matrix_phis(a: Array) -> tuple[Array, Array, Array]:
    """``exp(A)``, ``phi1(A)``, ``phi2(A)`` for a batch of 2x2 matrices ``A``."""
    m = a.shape[0]
    eye = jnp.broadcast_to(jnp.eye(2, dtype=a.dtype), (m, 2, 2))
    zero = jnp.zeros_like(eye)
    aug = jnp.concatenate(
        [
            jnp.concatenate([a, eye, zero], axis=2),
            jnp.concatenate([zero, zero, eye], axis=2),
            jnp.concatenate([zero, zero, zero], axis=2),
        ],
        axis=1,
    )
    e = expm(aug)
    return e[:, :2, :2], e[:, :2, 2:4], e[:, :2, 4:6]


class _Carry(NamedTuple):
    """Eigen-coordinates of the state: ``z = V^T F``, ``q = V^T Q``; ``b``, ``c``: the
    gradient integrals on null modes (``c`` with momentum only)."""

    z: Array
    q: Array | None
    b: Array
    c: Array | None


class Expo(AbstractSolver):
    """Adaptive ETD2RK exponential integrator in the eigenbasis of ``K`` (stiff problems)."""

    name: ClassVar[str] = "expo"
    stiff: ClassVar[bool] = True

    # -- one step -------------------------------------------------------------------------------

    @staticmethod
    def _curvature(dyn: Dynamics, f: Array, g: Array) -> Array:
        _, hg = jax.jvp(dyn.grad_fn, (f,), (g,))
        gg = jnp.vdot(g, g)
        c = jnp.where(gg > 0, jnp.vdot(g, hg) / jnp.where(gg > 0, gg, 1.0), 0.0)
        return jnp.maximum(c, 0.0)

    def _step(
        self, dyn: Dynamics, eig: Eigen, x: _Carry, h: Array, rtol: float, atol: float
    ) -> tuple[_Carry, Array]:
        lam = eig.evals[:, None]
        f = eig.evecs @ x.z
        g = dyn.grad_fn(f)
        c = self._curvature(dyn, f, g)
        gz = eig.evecs.T @ g
        n0 = -lam * (gz - c * x.z)
        if x.q is None:
            e, p1, p2 = _scalar_phis(-h * c * lam)
            a = e * x.z + h * p1 * n0
            gza = eig.evecs.T @ dyn.grad_fn(eig.evecs @ a)
            corr = h * p2 * (-lam * (gza - c * a) - n0)
            new = _Carry(a + corr, None, x.b + 0.5 * h * (gz + gza), None)
            err = _rms(corr) / (atol + rtol * jnp.maximum(_rms(x.z), _rms(new.z)))
            return new, jnp.where(jnp.isfinite(err), err, jnp.inf)
        assert dyn.damping is not None and x.c is not None
        d = jnp.asarray(dyn.damping, x.z.dtype)
        mat = jnp.stack(
            [
                jnp.stack([jnp.zeros_like(eig.evals), jnp.ones_like(eig.evals)], -1),
                jnp.stack([-c * eig.evals, jnp.broadcast_to(d, eig.evals.shape)], -1),
            ],
            -2,
        )
        e, p1, p2 = _matrix_phis(h * mat)  # (n, 2, 2) each
        col = lambda m, i, j: m[:, i, j][:, None]
        az = col(e, 0, 0) * x.z + col(e, 0, 1) * x.q + h * col(p1, 0, 1) * n0
        aq = col(e, 1, 0) * x.z + col(e, 1, 1) * x.q + h * col(p1, 1, 1) * n0
        gza = eig.evecs.T @ dyn.grad_fn(eig.evecs @ az)
        dn = -lam * (gza - c * az) - n0
        cz, cq = h * col(p2, 0, 1) * dn, h * col(p2, 1, 1) * dn
        # Null modes: b' = g + d b, c' = b, by the exponential trapezoidal rule.
        ed, pd1, pd2 = _scalar_phis(h * d)
        gbar = 0.5 * (gz + gza)
        b = ed * x.b + h * pd1 * gbar
        cc = x.c + h * pd1 * x.b + h * h * pd2 * gbar
        new = _Carry(az + cz, aq + cq, b, cc)
        size = jnp.maximum(_rms(jnp.stack([x.z, x.q])), _rms(jnp.stack([az + cz, aq + cq])))
        scale = atol + rtol * size
        err = _rms(jnp.stack([cz, cq])) / scale
        return new, jnp.where(jnp.isfinite(err), err, jnp.inf)

    @staticmethod
    def _next_h(h: Array, err: Array) -> Array:
        fac = _SAFETY * jnp.where(err > 0, err, 1e-10) ** -0.5
        return h * jnp.clip(fac, _FAC_MIN, _FAC_MAX)

    @staticmethod
    def _initial_h(dyn: Dynamics, y0: FlatState, rtol: float, atol: float) -> Array:
        kg = dyn.k @ dyn.grad_fn(y0.f)
        if y0.q is None:
            d1, scale = _rms(kg), atol + rtol * _rms(y0.f)
        else:
            assert dyn.damping is not None
            d1 = _rms(jnp.stack([y0.q, -kg + dyn.damping * y0.q]))
            scale = atol + rtol * _rms(jnp.stack([y0.f, y0.q]))
        return jnp.where(d1 > 0, 0.01 * scale / jnp.where(d1 > 0, d1, 1), 1.0)

    # -- state <-> eigen-coordinates ------------------------------------------------------------

    @staticmethod
    def _eigen(dyn: Dynamics) -> Eigen:
        return dyn.eigen if dyn.eigen is not None else Eigen.of(dyn.k)

    @staticmethod
    def _start(dyn: Dynamics, eig: Eigen, y0: FlatState) -> _Carry:
        z = eig.to_eigenbasis(y0.f)
        q = None if y0.q is None else eig.to_eigenbasis(y0.q)
        zeros = jnp.zeros_like(z)
        return _Carry(z, q, zeros, None if q is None else zeros)

    @staticmethod
    def _state(dyn: Dynamics, eig: Eigen, x0: _Carry, x: _Carry, tau: Array) -> FlatState:
        """The flat state at time ``tau`` (since the start ``x0`` of this solve)."""
        v = eig.evecs
        null = eig.null[:, None]
        lam = jnp.where(null, 1.0, eig.evals[:, None])
        q = None if x.q is None else v @ x.q
        if not dyn.with_test:
            return FlatState(v @ x.z, q, None, None)
        if x.q is None:
            s1 = jnp.where(null, x.b, -(x.z - x0.z) / lam)
            return FlatState(v @ x.z, None, v @ s1, None)
        assert dyn.damping is not None and x0.q is not None and x.c is not None
        d = jnp.asarray(dyn.damping, x.z.dtype)
        decay = jnp.exp(d * tau)
        phi = phi1(-d[None], tau[None])[0, 0]  # (e^{d tau} - 1) / d
        s1 = jnp.where(null, x.b, (decay * x0.q - x.q) / lam)
        s2 = jnp.where(null, x.c, (x0.z + phi * x0.q - x.z) / lam)
        return FlatState(v @ x.z, q, v @ s1, v @ s2)

    # -- the contract -----------------------------------------------------------------------------

    def integrate(self, dynamics, y0, taus, *, rtol, atol, max_steps):
        eig = self._eigen(dynamics)
        x0 = self._start(dynamics, eig, y0)
        m = taus.shape[0]
        saved = jax.tree.map(lambda a: jnp.zeros((m,) + a.shape, a.dtype), x0)
        h0 = self._initial_h(dynamics, y0, rtol, atol)
        tau0 = jnp.zeros((), taus.dtype)

        def cond(c):
            tau, x, h, i, saved, n, ok = c
            return (i < m) & (n < max_steps) & ok

        def body(c):
            tau, x, h, i, saved, n, ok = c
            target = taus[jnp.minimum(i, m - 1)]
            at_target = tau >= target
            # Record (repeated targets take one iteration each, without stepping).
            saved = jax.tree.map(
                lambda s, v: jnp.where(at_target, s.at[i].set(v), s), saved, x
            )
            h_try = jnp.minimum(h, target - tau)
            x1, err = self._step(dynamics, eig, x, h_try, rtol, atol)
            accept = (err <= 1.0) & ~at_target
            hit = h_try >= target - tau
            new_tau = jnp.where(accept, jnp.where(hit, target, tau + h_try), tau)
            x = jax.tree.map(lambda a, b: jnp.where(accept, a, b), x1, x)
            h_next = jnp.where(at_target, h, self._next_h(h_try, err))
            h_next = jnp.where(accept & hit, jnp.maximum(h_next, h), h_next)
            ok = ok & (jnp.isfinite(err) | at_target)
            return (new_tau, x, h_next, i + at_target, saved, n + ~at_target, ok)

        init = (tau0, x0, h0, jnp.zeros((), jnp.int32), saved, jnp.zeros((), jnp.int32),
                jnp.ones((), bool))
        tau, _, _, i, saved, n, ok = jax.lax.while_loop(cond, body, init)
        ys = jax.vmap(lambda x, t: self._state(dynamics, eig, x0, x, t))(saved, taus)
        done = i >= m
        code = jnp.where(done, 0, jnp.where(ok, 1, 2)).astype(jnp.int32)
        return ys, SolveInfo(done, tau, n, 4 * n, code)

    def converge(self, dynamics, y0, tau0, eigen, *, rtol, atol, max_steps):
        eig = self._eigen(dynamics)
        # Continue from y0 at tau0; the gradient integrals restart from y0's.
        x0 = self._start(dynamics, eig, y0)
        loss0 = dynamics.loss_fn(y0.f)
        _, curvature0 = projected_gradient(dynamics, eigen, y0.f)
        h0 = self._initial_h(dynamics, y0, rtol, atol)

        def is_done(x):
            q = None if x.q is None else eig.evecs @ x.q
            state = FlatState(eig.evecs @ x.z, q, None, None)
            return converged(dynamics, eigen, state, loss0, curvature0, rtol, atol)

        def cond(c):
            tau, x, h, n, done, ok = c
            return ~done & (n < max_steps) & ok

        def body(c):
            tau, x, h, n, done, ok = c
            x1, err = self._step(dynamics, eig, x, h, rtol, atol)
            accept = err <= 1.0
            tau = jnp.where(accept, tau + h, tau)
            x = jax.tree.map(lambda a, b: jnp.where(accept, a, b), x1, x)
            done = accept & is_done(x)
            return (tau, x, self._next_h(h, err), n + 1, done, ok & jnp.isfinite(err))

        init = (jnp.zeros_like(tau0), x0, h0, jnp.zeros((), jnp.int32), is_done(x0),
                jnp.ones((), bool))
        tau, x, _, n, done, ok = jax.lax.while_loop(cond, body, init)
        code = jnp.where(done, 0, jnp.where(ok, 1, 2)).astype(jnp.int32)
        y = self._state(dynamics, eig, x0, x, tau)
        # Gradient integrals are relative to y0: add y0's own.
        if dynamics.with_test:
            assert y.s1 is not None and y0.s1 is not None
            y = self._add_integrals(dynamics, y0, y, tau)
        return y, SolveInfo(done, tau0 + tau, n, 4 * n, code)

    @staticmethod
    def _add_integrals(dyn: Dynamics, y0: FlatState, y: FlatState, tau: Array) -> FlatState:
        """Compose gradient integrals: those up to ``y0`` followed by those since ``y0``."""
        assert y.s1 is not None and y0.s1 is not None
        if dyn.damping is None:
            return FlatState(y.f, y.q, y0.s1 + y.s1, None)
        assert y.s2 is not None and y0.s2 is not None
        d = jnp.asarray(dyn.damping, y.f.dtype)
        decay = jnp.exp(d * tau)
        phi = phi1(-d[None], tau[None])[0, 0]
        # s1(T + tau) = e^{d tau} s1(T) + s1_new; s2(T + tau) = s2(T) + phi * s1(T) + s2_new.
        return FlatState(y.f, y.q, decay * y0.s1 + y.s1, y0.s2 + phi * y0.s1 + y.s2)


SOLVERS["expo"] = Expo
