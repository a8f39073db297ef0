r"""Function-space training dynamics on flat arrays.

Train outputs ``F`` (shape ``(rows, traced)``) follow, in the time units of
neural-tangents (``tau = learning_rate * t`` without momentum,
``tau = sqrt(learning_rate) * t`` with momentum):

* gradient descent: :math:`F' = -K G(F)`, with :math:`G = \nabla_F L`;
* momentum (heavy ball): :math:`F' = Q,\; Q' = -K G(F) + d\, Q`, with the
  damping :math:`d = (m - 1) / \sqrt{\eta}`.

Test outputs are *not* integrated: they are linear in the gradient history,

.. math::

    F_\text{test}(\tau) = F_\text{test}(0) - K_\text{test} S_1(\tau),
    \qquad S_1(\tau) = \int_0^\tau G\, ds

without momentum, and with momentum

.. math::

    Q_\text{test}(\tau) = e^{d\tau} Q_\text{test}(0) - K_\text{test} S_1(\tau),\quad
    F_\text{test}(\tau) = F_\text{test}(0) + \varphi(\tau) Q_\text{test}(0)
        - K_\text{test} S_2(\tau),

where :math:`S_1' = G + d S_1` (a discounted integral), :math:`S_2' = S_1` and
:math:`\varphi(\tau) = (e^{d\tau} - 1)/d`. So the ODE state holds train
quantities only and ``K_test`` is applied once per output time: the cost of a
solver step does not depend on the number of test points.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ntkflow._axes import Layout, outputs_from_2d, outputs_to_2d
from ntkflow._compensated import minus_product
from ntkflow._eigen import Eigen, matmul, matmul_t, phi1

__all__ = ["FlatState", "FlatLoss", "Dynamics", "TransposedField", "rms", "rayleigh_curvature"]


def rms(x: Array) -> Array:
    """Root-mean-square of all entries."""
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def rayleigh_curvature(g: Array, hg: Array) -> Array:
    """The loss curvature along ``g``: ``max(<g, H g> / <g, g>, 0)`` (0 if ``g = 0``)."""
    gg = jnp.vdot(g, g)
    return jnp.maximum(jnp.where(gg > 0, jnp.vdot(g, hg) / jnp.where(gg > 0, gg, 1.0), 0.0), 0.0)


class FlatState(eqx.Module):
    """ODE state on flat arrays. Unused fields are ``None``.

    Attributes:
      f: train outputs ``F``.
      q: train velocity ``Q = F'`` (momentum only).
      s1: accumulated gradient (plain) or discounted gradient integral
        (momentum); only when test outputs are requested.
      s2: integral of ``s1`` (momentum with test outputs only).
      lo: low-order parts of a compensated state, whose value is then the unevaluated
        sum of the fields and ``lo``'s (see :mod:`ntkflow._compensated`); kept in
        single precision by ntkflow's own solver loops (explicit, eigenbasis,
        Chebyshev), ``None`` otherwise.
    """

    f: Float[Array, "rows traced"]
    q: Float[Array, "rows traced"] | None = None
    s1: Float[Array, "rows traced"] | None = None
    s2: Float[Array, "rows traced"] | None = None
    lo: FlatState | None = None


class FlatLoss(eqx.Module):
    """A user loss ``loss(fx, y)`` seen on flat outputs ``F``.

    Hashable by ``(loss, layout, rows_shape)``, so predictors built from the
    same loss function and shapes share compiled code.
    """

    loss: Callable[[Array, Array], Array] = eqx.field(static=True)
    layout: Layout = eqx.field(static=True)
    rows_shape: tuple[int, ...] = eqx.field(static=True)

    def value(self, f: Float[Array, "rows traced"], y: Array) -> Array:
        return self.loss(outputs_from_2d(f, self.layout, self.rows_shape), y)

    def grad(self, f: Float[Array, "rows traced"], y: Array) -> Float[Array, "rows traced"]:
        return jax.grad(self.value)(f, y)


class Dynamics(eqx.Module):
    """The flat ODE ``y' = vector_field(tau, y)`` and its test-set read-out.

    Attributes:
      k: flat train-train kernel.
      loss: the loss on flat outputs.
      y: the targets, as the user passed them (shape ``y_train.shape``).
      damping: ``(m - 1) / sqrt(lr)`` with momentum, ``None`` without.
      with_test: whether ``s1``/``s2`` are integrated.
      eigen: the eigendecomposition of ``k``, when precomputed (stiff solvers).
    """

    k: Float[Array, "rows rows"]
    loss: FlatLoss
    y: Array
    damping: Float[Array, ""] | None
    with_test: bool = eqx.field(static=True)
    eigen: Eigen | None = None

    def grad_fn(self, f: Float[Array, "rows traced"]) -> Float[Array, "rows traced"]:
        """``G = dL/dF``."""
        return self.loss.grad(f, self.y)

    def gradient_and_curvature(self, f: Float[Array, "rows traced"]) -> tuple[Array, Array]:
        """``(G, c)``: the loss gradient at ``f`` and the loss curvature along it (one
        Hessian-vector product; see :func:`rayleigh_curvature`)."""
        g = self.grad_fn(f)
        return g, rayleigh_curvature(g, jax.jvp(self.grad_fn, (f,), (g,))[1])

    def loss_fn(self, f: Float[Array, "rows traced"]) -> Array:
        return self.loss.value(f, self.y)

    def with_eigen(self) -> Dynamics:
        """These dynamics with the eigendecomposition of ``k`` (computed if not yet)."""
        if self.eigen is not None:
            return self
        return Dynamics(self.k, self.loss, self.y, self.damping, self.with_test, Eigen.of(self.k))

    @property
    def momentum(self) -> bool:
        return self.damping is not None

    def initial_state(
        self, f0: Float[Array, "rows traced"], q0: Float[Array, "rows traced"] | None
    ) -> FlatState:
        zeros = jnp.zeros_like(f0)
        if not self.momentum:
            return FlatState(f0, None, zeros if self.with_test else None, None)
        q0 = zeros if q0 is None else q0
        if self.with_test:
            return FlatState(f0, q0, zeros, zeros)
        return FlatState(f0, q0, None, None)

    def vector_field(self, tau: Float[Array, ""], y: FlatState, args: object = None) -> FlatState:
        del tau, args
        g = self.grad_fn(y.f)
        return self.field(y, g, matmul(self.k, self.k, g))  # K is symmetric

    def field(self, y: FlatState, g: Array, kg: Array) -> FlatState:
        """The vector field at ``y`` given its loss gradient ``g`` and ``kg = K g``
        (entrywise otherwise, so it holds for transposed arrays too)."""
        if not self.momentum:
            return FlatState(-kg, None, g if self.with_test else None, None)
        assert y.q is not None and self.damping is not None
        dq = -kg + self.damping * y.q
        if not self.with_test:
            return FlatState(y.q, dq, None, None)
        assert y.s1 is not None
        return FlatState(y.q, dq, g + self.damping * y.s1, y.s1)

    def transposed(self) -> TransposedField:
        """The vector field on transposed arrays (see :class:`TransposedField`)."""
        return TransposedField(self, jax.lax.optimization_barrier(
            outputs_to_2d(self.y, self.loss.layout).T))

    def rate(self, y: FlatState) -> tuple[Array, Array]:
        """``(F', L')``: output velocity and loss rate, for convergence tests."""
        g = self.grad_fn(y.f)
        df = -matmul(self.k, self.k, g) if not self.momentum else y.q
        assert df is not None
        return df, jnp.vdot(g, df)

    def test_outputs(
        self,
        tau: Float[Array, " m"],
        ys: FlatState,
        f_test0: Float[Array, "p traced"],
        q_test0: Float[Array, "p traced"] | None,
        k_test: Float[Array, "p rows"],
    ) -> tuple[Float[Array, "m p traced"], Float[Array, "m p traced"] | None]:
        """Test outputs (and velocities) at times ``tau`` from saved states ``ys``.

        In single precision the products with ``k_test`` are compensated
        (:func:`ntkflow._compensated.minus_product`, with the states' low-order parts if
        kept): their terms can be far larger than the result.
        """
        assert ys.s1 is not None
        lo = ys.lo
        if not self.momentum:
            return minus_product(f_test0[None], k_test, ys.s1, None if lo is None else lo.s1), None
        assert ys.s2 is not None and self.damping is not None
        q_test0 = jnp.zeros_like(f_test0) if q_test0 is None else q_test0
        d = jnp.asarray(self.damping)
        decay = jnp.exp(d * tau)[:, None, None]
        phi = phi1(-d[None], tau)[:, :, None]  # (e^{d tau} - 1) / d, stable at d = 0
        q_test = minus_product(decay * q_test0[None], k_test, ys.s1, None if lo is None else lo.s1)
        f_test = minus_product(f_test0[None] + phi * q_test0[None], k_test, ys.s2,
                               None if lo is None else lo.s2)
        return f_test, q_test


class TransposedField(eqx.Module):
    r"""The vector field of :class:`Dynamics` on transposed flat arrays, shape ``(traced,
    rows)``: ``field(tau, y^T) = vector_field(tau, y)^T`` (``y^T``: every field
    transposed).

    On CPU XLA vectorizes along an array's last axis, which in the flat layout ``(rows,
    traced)`` holds a handful of outputs (e.g. 10 classes): the loss gradient's
    entrywise functions and its reductions over the classes run nearly scalar there.
    On transposed arrays the last axis holds the rows and the product is ``G^T K``
    (``K`` symmetric), in the form :func:`ntkflow._eigen.matmul_t` finds faster. The
    loss still sees its usual shapes, ``F = (F^T)^T`` and the targets from their
    transposed copy ``targets_t`` (made once), as views XLA fuses into the gradient.
    Measured (10 classes, n = 256): one loss gradient 24 -> 5.5 us for log-cosh, 6.1 ->
    3.2 us for cross-entropy (float32); solves of ntkflow's explicit
    loop (cross-entropy at S = 10 and 1000 and log-cosh at S = 10 with n = 256,
    cross-entropy at S = 10 with n = 1024) took 22-54% less time in float32 and 9-15%
    less in float64, with the same steps (on an earlier machine, every product as
    ``G^T K``).
    """

    dynamics: Dynamics
    targets_t: Array

    def __call__(self, tau: Float[Array, ""], y_t: FlatState) -> FlatState:
        del tau
        g_t = self.gradient(y_t.f)
        return self.dynamics.field(y_t, g_t, matmul_t(g_t, self.dynamics.k, self.dynamics.k))

    def gradient(self, f_t: Float[Array, "traced rows"]) -> Float[Array, "traced rows"]:
        """The loss gradient on transposed arrays: ``G(F)^T`` for ``f_t = F^T``,
        materialized transposed, as products ``G^T A`` want it."""
        loss = self.dynamics.loss
        targets = outputs_from_2d(self.targets_t.T, loss.layout, loss.rows_shape)
        return jax.lax.optimization_barrier(loss.grad(f_t.T, targets).T)
