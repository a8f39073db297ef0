"""Loss functions shared by the reference-fixture generator and the tests.

Both sides must use exactly these definitions, so that fixtures produced with
neural-tangents 0.6.5 and the predictions made by ``ntkflow`` solve the same
function-space ODE. This module depends only on JAX.
"""

import jax
import jax.numpy as jnp


def mse(fx, y):
    """Mean squared error with the conventional factor ``1/2``."""
    return 0.5 * jnp.mean((fx - y) ** 2)


def cross_entropy(fx, y):
    """Cross entropy with a softmax over the last axis; ``y`` holds (one-hot) targets."""
    return -jnp.mean(jax.nn.log_softmax(fx) * y)


def log_cosh(fx, y):
    """Mean log-cosh error."""
    return jnp.mean(jnp.log(jnp.cosh(fx - y)))


LOSSES = {
    "mse": mse,
    "cross_entropy": cross_entropy,
    "log_cosh": log_cosh,
}
