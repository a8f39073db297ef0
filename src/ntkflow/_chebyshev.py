r"""A Chebyshev expansion of the exact solution, for the MSE at modest stiffness.

When the loss Hessian is a constant multiple of the identity, :math:`H = cI`
(the MSE: :math:`c = 1/|y|`), the loss gradient is affine, :math:`G(F) = G_0 +
c\,(F - F_0)`, and gradient flow :math:`F' = -K G` has the exact solution

.. math::

    G(\tau) = e^{-c\tau K} G_0, \qquad
    S_1(\tau) = \int_0^\tau G = \tau\,\varphi_1(-c\tau K)\, G_0, \qquad
    F(\tau) = F_0 - K S_1(\tau),

with :math:`\varphi_1(z) = (e^z - 1)/z`. The exponential integrator
(:mod:`ntkflow._expo`) evaluates it through one ``eigh`` of the kernel, which
pays off over long horizons. Over short ones a polynomial in :math:`K` is
cheaper: with :math:`\lambda_\text{ub} \ge \lambda_\max(K)` and :math:`\tilde K =
(2/\lambda_\text{ub}) K - I` (spectrum in :math:`[-1, 1]`),

.. math::

    S_1(\tau_j) \approx \sum_{k=0}^{d} a_{jk}\, T_k(\tilde K)\, G_0,

where :math:`T_k` are the Chebyshev polynomials, computed by the three-term
recurrence :math:`T_{k+1} = 2\tilde K T_k - T_{k-1}` (one kernel product
each, stable), and :math:`a_{jk}` are the Chebyshev coefficients of
:math:`x \mapsto \tau_j \varphi_1(-c\tau_j x)` on :math:`[0, \lambda_\text{ub}]`,
from a discrete cosine transform of its values at ``NODES`` Chebyshev
points. Every output time shares the same products. Since
:math:`\|T_k(\tilde K)\| \le 1`, truncating after degree :math:`d` changes
:math:`F = F_0 - K S_1` by at most :math:`\lambda_\text{ub} \sum_{k>d} |a_{jk}|
\, \|G_0\|` (root-mean-square norms); :math:`d` is the smallest degree that
keeps this below a tenth of ``atol + rtol * rms(F_0)``. The coefficients decay
faster than geometrically once :math:`k` exceeds about :math:`\sqrt{c
\tau \lambda_\text{ub}}`: a horizon of stiffness :math:`S = c\tau\lambda_\max
= 10` costs about 20 kernel products, against about 80-130 for an adaptive
explicit method at ntkflow's default tolerances.

:math:`\lambda_\text{ub} = \min(\max_i \sum_j |K_{ij}|, \|K\|_F)`, a bound
that needs no decomposition (one pass over ``K``). A request whose degree
would exceed ``NODES - 1`` is reported as failed, not truncated; the
``auto`` choice (:mod:`ntkflow._auto`) uses this solver only for plain
gradient descent with an isotropic loss, finite times and
``c * tau * lambda_ub <= MAX_WIDTH``, well within that limit.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ntkflow._compensated import DoubleWord, compensate, dw_add, minus_product, two_prod
from ntkflow._dynamics import FlatState, rms
from ntkflow._eigen import matmul
from ntkflow._solvers import AbstractSolver, SolveInfo

__all__ = ["MAX_WIDTH", "NODES", "Chebyshev", "spectral_bound"]

#: Chebyshev points of the coefficient transform (the largest degree is ``NODES - 1``).
NODES = 256
#: ``auto`` uses the expansion for ``c * tau_max * lambda_ub`` up to this (degree <= ~110).
MAX_WIDTH = 200.0
#: Coefficients below this many ``eps`` times the largest are the transform's round-off and
#: dropped, by precision (single: ``True``). Dropping them changes ``F`` by up to about that
#: fraction of ``c tau lambda_ub |F_0 - y|``, negligible in float64 but in float32 at 16 eps
#: (2e-6) the largest part of the error (MSE, n = 256, S = 10: 8e-7 against the
#: predecessor's 3.2e-7; at 2 eps 1.2e-7). The transform's noise is about eps / 8.
_NOISE = {False: 16.0, True: 2.0}


def spectral_bound(k: Array) -> Array:
    """An upper bound on the largest eigenvalue of the symmetric ``k``: the smaller of its
    largest absolute row sum and its Frobenius norm."""
    return jnp.minimum(jnp.max(jnp.sum(jnp.abs(k), axis=1)), jnp.sqrt(jnp.sum(k * k)))


def _coefficients(taus: Array, width: Array, dtype: jnp.dtype) -> Array:
    r"""Chebyshev coefficients ``(m, NODES)`` of ``x -> tau_j phi1(-x tau_j / tau_max)`` in
    ``u = 2 x / width - 1``, ``x`` in ``[0, width]`` (``width = c tau_max lambda_ub``)."""
    i = np.arange(NODES)
    theta = np.pi * (i + 0.5) / NODES
    cos = np.cos(np.outer(np.arange(NODES), theta)) * (2.0 / NODES)  # (k, i)
    cos[0] *= 0.5
    x = 0.5 * width * (1.0 + jnp.asarray(np.cos(theta), dtype))  # nodes in [0, width]
    tau_max = jnp.max(taus)
    rel = jnp.where(tau_max > 0, taus / jnp.where(tau_max > 0, tau_max, 1.0), 0.0)
    z = rel[:, None] * x[None, :]  # c tau_j lambda at the nodes
    small = z < 1e-6
    zs = jnp.where(small, 1.0, z)
    phi = jnp.where(small, 1.0 - 0.5 * z, -jnp.expm1(-zs) / zs)
    return (taus[:, None] * phi) @ jnp.asarray(cos.T, dtype)


class Chebyshev(AbstractSolver):
    """Chebyshev expansion of the exact MSE solution (plain gradient descent, modest
    stiffness; see the module docstring). Used by ``solver="auto"``."""

    name: ClassVar[str] = "chebyshev"
    stiff: ClassVar[bool] = False

    def integrate(self, dynamics, y0, taus, *, rtol, atol, max_steps):
        if dynamics.momentum:
            raise ValueError("The Chebyshev expansion solves plain gradient descent only.")
        del max_steps
        k, f0 = dynamics.k, y0.f
        g0, c = dynamics.gradient_and_curvature(f0)
        bound = spectral_bound(k)
        width = c * jnp.max(taus) * bound
        coef = _coefficients(taus, width, f0.dtype)  # (m, NODES)
        # Coefficients at the transform's round-off level are noise, not tail.
        noise = _NOISE[compensate(f0.dtype)] * jnp.finfo(f0.dtype).eps * jnp.max(
            jnp.abs(coef), axis=1, keepdims=True)
        coef = jnp.where(jnp.abs(coef) <= noise, 0.0, coef)
        # Degree: the tail sum_{k > d} |a_jk| of every time within tolerance.
        tails = jnp.cumsum(jnp.abs(coef[:, ::-1]), axis=1)[:, ::-1]  # tails[:, d] = sum_{k>=d}
        tiny = jnp.finfo(f0.dtype).tiny
        allowed = 0.1 * (atol + rtol * rms(f0)) / jnp.maximum(bound * rms(g0), tiny)
        fits = jnp.all(tails <= allowed, axis=0)  # fits[d]: degree d - 1 suffices
        first = jnp.argmax(fits)
        degree = jnp.where(jnp.any(fits), jnp.maximum(first - 1, 1), NODES).astype(jnp.int32)
        scale = 2.0 / jnp.maximum(bound, tiny)

        compensated = compensate(f0.dtype)
        s1, s1_lo = _expansion(k, g0, coef, degree, scale, compensated)
        f = minus_product(f0[None], k, s1, s1_lo)  # terms far larger than f - f0
        if dynamics.with_test:
            base = jnp.zeros_like(f0) if y0.s1 is None else y0.s1
            # (low-order parts: the same structure as the eigenbasis solvers' states)
            lo = None if s1_lo is None else FlatState(jnp.zeros_like(f), None, s1_lo, None)
            ys = FlatState(f, None, base[None] + s1, None, lo)
        else:
            ys = FlatState(f, None, None, None)
        finite = jnp.all(jnp.isfinite(f)) & jnp.all(jnp.isfinite(s1))
        represented = degree < NODES
        ok = finite & represented
        code = jnp.where(ok, 0, jnp.where(finite, 3, 2)).astype(jnp.int32)
        tau_end = jnp.where(ok, jnp.max(taus), jnp.zeros_like(jnp.max(taus)))
        products = jnp.asarray(degree + 1, jnp.asarray(0).dtype)  # as the eigenbasis solvers'
        return ys, SolveInfo(ok, tau_end, degree, products, code)

    def converge(self, dynamics, y0, tau0, eigen, *, rtol, atol, max_steps, active=None):
        from ntkflow._expo import Expo

        return Expo().converge(
            dynamics, y0, tau0, eigen, rtol=rtol, atol=atol, max_steps=max_steps, active=active
        )


def _expansion(k: Array, g0: Array, coef: Array, degree: Array, scale: Array,
               compensated: bool) -> tuple[Array, Array | None]:
    r"""``S_1 = sum_k a_jk T_k(K~) G_0`` for every output time ``j``: the recurrence, and
    the sum as a double word ``(hi, lo)`` if ``compensated`` (single precision; ``lo``
    ``None`` otherwise), each term ``a_jk T_k`` then formed exactly
    (:func:`ntkflow._compensated.two_prod`) and added error-free.

    The sum's terms are far larger than :math:`F - F_0 = -K S_1` along the kernel's
    small eigendirections, so a float32 sum loses what the product with ``K`` then
    reads out. Measured in float32 (MSE, n = 64, S = 10, two problems): summed plainly
    1.1e-6 and 6.7e-7, against the predecessor's 4.9e-7 and 1.9e-6; in double words
    4.2e-7 and 3.4e-7 (the closed form: 4.2e-7 and 4.0e-7; carrying the recurrence's
    vectors in double words too, 3.6e-7 and 2.5e-7, at ten times the cost).
    """
    def apply(v: Array) -> Array:  # the shifted, scaled kernel (2 / lambda_ub) K - I
        return scale * matmul(k, k, v) - v

    def add(acc: DoubleWord | None, i: Array, v: Array) -> Any:
        col = jax.lax.dynamic_index_in_dim(coef, i, axis=1, keepdims=False)[:, None, None]
        if not compensated:
            term = col * v[None]
            return term if acc is None else acc + term
        term_dw = two_prod(col, jnp.broadcast_to(v[None], (col.shape[0],) + v.shape))
        return term_dw if acc is None else dw_add(acc, term_dw)

    t1 = apply(g0)
    acc = add(add(None, jnp.zeros((), jnp.int32), g0), jnp.ones((), jnp.int32), t1)

    def cond(carry: tuple) -> Array:
        return carry[0] < jnp.minimum(degree, NODES - 1)

    def body(carry: tuple) -> tuple:
        i, prev, cur, acc = carry
        nxt = 2.0 * apply(cur) - prev
        return i + 1, cur, nxt, add(acc, i + 1, nxt)

    _, _, _, acc = jax.lax.while_loop(cond, body, (jnp.ones((), jnp.int32), g0, t1, acc))
    return acc if compensated else (acc, None)
