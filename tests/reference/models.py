"""Plain-JAX versions of the two neural-tangents ``stax`` models used for the fixtures.

The models take their parameters as the flat list ``jax.tree_util.tree_leaves(params)``
of the ``stax`` parameters (in that order), and use the NTK parameterization of ``stax``:

* ``Dense(out, W_std, b_std)``: ``x @ W * W_std / sqrt(fan_in) + b * b_std`` with
  ``fan_in = x.shape[-1]``, ``W`` of shape ``(fan_in, out)``, ``b`` of shape ``(1, out)``;
  with ``stax``'s default ``b_std=None`` the layer has no bias (no leaf).
* ``Conv(out, (kh, kw), padding)``: NHWC inputs, HWIO filters,
  ``conv(x, W) * W_std / sqrt(kh * kw * c_in)``; ``W_std=1.0`` and no bias by default.

The fixture generator asserts that these functions reproduce the ``stax`` ``apply_fn``
outputs before it saves anything. This module depends only on JAX.
"""

import jax.numpy as jnp
from jax import lax
from jax.scipy.special import erf

# Hyperparameters of the models, shared with the fixture generator.
MLP_HIDDEN = 32
MLP_W_STD = 1.5
MLP_B_STD = 0.1
MLP_OUT = 5

CONV_CHANNELS = 4
CONV_FILTER = (3, 3)
CONV_PADDING = "SAME"
CONV_OUT = 3


def _dense(x, w, w_std=1.0, b=None, b_std=None):
    out = (x @ w) * (w_std / x.shape[-1] ** 0.5)
    if b is not None:
        out = out + b * b_std
    return out


def mlp_apply(params, x):
    """``stax.serial(Dense(32, W_std=1.5, b_std=0.1), Erf(), Dense(5))``.

    ``params`` is ``[W1, b1, W2]``; ``x`` has shape ``(batch, features)``.
    """
    w1, b1, w2 = params
    h = _dense(x, w1, MLP_W_STD, b1, MLP_B_STD)
    h = erf(h)
    return _dense(h, w2)


def conv_apply(params, x):
    """``stax.serial(Conv(4, (3, 3), padding='SAME'), Relu(), Flatten(), Dense(3))``.

    ``params`` is ``[W_conv, W_dense]``; ``x`` has shape ``(batch, height, width, channels)``.
    """
    w_conv, w_dense = params
    fan_in = w_conv.shape[0] * w_conv.shape[1] * x.shape[-1]
    h = lax.conv_general_dilated(
        x,
        w_conv,
        window_strides=(1, 1),
        padding=CONV_PADDING,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
    ) / fan_in**0.5
    h = jnp.maximum(h, 0.0)
    h = h.reshape((h.shape[0], -1))
    return _dense(h, w_dense)


MODELS = {
    "mlp": mlp_apply,
    "conv": conv_apply,
}
