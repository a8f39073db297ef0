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

import jax.numpy as jnp
from jax.scipy.linalg import expm
from jaxtyping import Array

from ntkflow._adaptive import EigenbasisSolver
from ntkflow._dynamics import Dynamics, FlatState, rms
from ntkflow._eigen import Eigen
from ntkflow._solvers import SOLVERS

__all__ = ["Expo"]


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
    e = expm(aug, max_squarings=64)  # the default (16) returns NaN beyond norm ~3.5e5
    return e[:, :2, :2], e[:, :2, 2:4], e[:, :2, 4:6]


def _scaled_matrix_phis(h: Array, a: Array) -> tuple[Array, Array, Array]:
    r"""``exp(hA)``, ``h phi1(hA)``, ``h phi2(hA)`` for a batch of 2x2 matrices ``A``.

    From the augmented ``expm`` (:func:`_matrix_phis`), ``phi1(hA) ~ -(hA)^{-1}`` carries an
    absolute error of about ``eps``, i.e. ``h eps`` after the factor ``h``: with momentum at
    ``h = 1e10`` (float64) ``h phi1`` was off by 1.2e-7, at ``1e15`` by 1.6e-2, at ``1e20`` by
    1, and the outputs with it (the MSE's exact steps grow geometrically, so long horizons
    take such steps). Where ``A`` is invertible and ``h`` exceeds ``||A^{-1}||`` (the
    cancellation in ``e^{hA} - I`` then costs less than the factor ``h``), the same
    quantities come from :math:`h\varphi_1(hA) = A^{-1}(e^{hA} - I)` and
    :math:`h\varphi_2(hA) = A^{-1}(\varphi_1(hA) - I)`, bounded as ``h`` grows.
    """
    e, p1, p2 = _matrix_phis(h * a)
    hp1, hp2 = h * p1, h * p2
    det = a[:, 0, 0] * a[:, 1, 1] - a[:, 0, 1] * a[:, 1, 0]
    safe = jnp.where(det != 0, det, 1.0)[:, None, None]
    inv = jnp.stack(
        [jnp.stack([a[:, 1, 1], -a[:, 0, 1]], -1), jnp.stack([-a[:, 1, 0], a[:, 0, 0]], -1)], -2
    ) / safe
    eye = jnp.eye(2, dtype=a.dtype)
    hp1_inv = inv @ (e - eye)
    hp2_inv = inv @ (hp1_inv / h - eye)
    use = (det != 0) & (h > jnp.max(jnp.abs(inv), axis=(1, 2)))
    use = use[:, None, None]
    return e, jnp.where(use, hp1_inv, hp1), jnp.where(use, hp2_inv, hp2)


class _Carry(NamedTuple):
    """Eigen-coordinates of the state: ``z = V^T F``, ``q = V^T Q``; ``b``, ``c``: the
    gradient integrals on null modes (``c`` with momentum only)."""

    z: Array
    q: Array | None
    b: Array
    c: Array | None


class Expo(EigenbasisSolver):
    """Adaptive ETD2RK exponential integrator in the eigenbasis of ``K`` (stiff problems)."""

    name: ClassVar[str] = "expo"
    error_exponent: ClassVar[float] = 2.0  # exponential Euler estimate: error ~ h^2

    # -- one step -------------------------------------------------------------------------------

    def _step(
        self, dyn: Dynamics, eig: Eigen, x: _Carry, h: Array, rtol: float, atol: float,
        left: Array,
    ) -> tuple[_Carry, Array]:
        del left  # errors are not weighed by the time to the next output
        lam = eig.evals[:, None]
        f = eig.from_eigenbasis(x.z)
        g, c = dyn.gradient_and_curvature(f)
        gz = eig.to_eigenbasis(g)
        n0 = -lam * (gz - c * x.z)
        if x.q is None:
            e, p1, p2 = _scalar_phis(-h * c * lam)
            a = e * x.z + h * p1 * n0
            gza = eig.to_eigenbasis(dyn.grad_fn(eig.from_eigenbasis(a)))
            corr = h * p2 * (-lam * (gza - c * a) - n0)
            new = _Carry(a + corr, None, x.b + 0.5 * h * (gz + gza), None)
            err = rms(corr) / (atol + rtol * jnp.maximum(rms(x.z), rms(new.z)))
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
        e, hp1, hp2 = _scaled_matrix_phis(h, mat)  # (n, 2, 2) each
        col = lambda m, i, j: m[:, i, j][:, None]
        az = col(e, 0, 0) * x.z + col(e, 0, 1) * x.q + col(hp1, 0, 1) * n0
        aq = col(e, 1, 0) * x.z + col(e, 1, 1) * x.q + col(hp1, 1, 1) * n0
        gza = eig.to_eigenbasis(dyn.grad_fn(eig.from_eigenbasis(az)))
        dn = -lam * (gza - c * az) - n0
        cz, cq = col(hp2, 0, 1) * dn, col(hp2, 1, 1) * dn
        # Null modes: b' = g + d b, c' = b, by the exponential trapezoidal rule.
        ed, pd1, pd2 = _scalar_phis(h * d)
        gbar = 0.5 * (gz + gza)
        b = ed * x.b + h * pd1 * gbar
        cc = x.c + h * pd1 * x.b + h * h * pd2 * gbar
        new = _Carry(az + cz, aq + cq, b, cc)
        size = jnp.maximum(rms(jnp.stack([x.z, x.q])), rms(jnp.stack([az + cz, aq + cq])))
        scale = atol + rtol * size
        err = rms(jnp.stack([cz, cq])) / scale
        return new, jnp.where(jnp.isfinite(err), err, jnp.inf)

    # -- state <-> eigen-coordinates ------------------------------------------------------------

    @staticmethod
    def _start(dyn: Dynamics, eig: Eigen, y0: FlatState) -> _Carry:
        z = eig.to_eigenbasis(y0.f)
        q = None if y0.q is None else eig.to_eigenbasis(y0.q)
        zeros = jnp.zeros_like(z)
        return _Carry(z, q, zeros, None if q is None else zeros)


SOLVERS["expo"] = Expo
