r"""Closed-form gradient flow on the mean squared error.

For the loss :math:`L(f) = \frac{1}{2 |y|} \|f - y\|^2` (the mean over every
entry of ``y``), gradient flow :math:`\dot f = -\eta K \nabla L(f)` is linear:

.. math::

    f(t) - y = e^{-\eta t K / |y|} (f_0 - y), \qquad
    f_\text{test}(t) = f_\text{test}(0) - K_\text{test} \,
        \frac{1 - e^{-\eta t K / |y|}}{K} \, (f_0 - y),

evaluated in the eigenbasis of ``K``: any number of times costs one ``eigh``
(done once, when the predictor is built) plus matrix products.

Null modes (zero eigenvalues) never move the train outputs; for the test
outputs they contribute the exact ``lam -> 0`` limit ``-t/|y|`` at finite
``t`` and nothing at ``t = inf`` (the pseudo-inverse limit).
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float

from ntkflow._eigen import Eigen, phi1

__all__ = ["MSEFlow"]


class MSEFlow(eqx.Module):
    """Precomputed closed form of MSE gradient flow (a pytree).

    Attributes:
      eigen: eigendecomposition of the (regularized) flat kernel.
      size: ``y_train.size``, the normalization of the mean.
    """

    eigen: Eigen
    size: int = eqx.field(static=True)

    def decay(self, tau: Float[Array, " m"]) -> Float[Array, "m n"]:
        """Per-eigenvalue ``phi1(lam / size, tau) / size`` (test-set factor)."""
        lam = self.eigen.evals / self.size
        p = phi1(lam, tau) / self.size
        # At tau = inf, null modes contribute nothing (pseudo-inverse limit).
        return jnp.where(jnp.isinf(tau)[:, None] & self.eigen.null[None, :], 0.0, p)

    @eqx.filter_jit
    def train_delta(
        self, tau: Float[Array, " m"], r0: Float[Array, "n k"]
    ) -> Float[Array, "m n k"]:
        """``f(tau) - f0`` for residual ``r0 = f0 - y``."""
        lam = self.eigen.evals / self.size
        g = jnp.expm1(-lam[None, :] * tau[:, None])  # in [-1, 0]
        g = jnp.where(jnp.isinf(tau)[:, None] & self.eigen.null[None, :], 0.0, g)
        coeff = self.eigen.to_eigenbasis(r0)
        return self.eigen.from_eigenbasis(g[:, :, None] * coeff[None])

    @eqx.filter_jit
    def test_delta(
        self,
        tau: Float[Array, " m"],
        r0: Float[Array, "n k"],
        k_test: Float[Array, "p n"],
    ) -> Float[Array, "m p k"]:
        """``f_test(tau) - f_test(0)`` for residual ``r0 = f0 - y``."""
        coeff = self.eigen.to_eigenbasis(r0)
        kv = k_test @ self.eigen.evecs
        return -jnp.einsum("pi,mi,ik->mpk", kv, self.decay(tau), coeff)
