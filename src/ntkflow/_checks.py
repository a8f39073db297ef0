"""Validation at the public boundary.

Every check raises an error that names the argument, says what was expected
and shows what was received. Checks on *values* (finiteness, signs) run eagerly
when the value is concrete and through :func:`equinox.error_if` when it is
traced under ``jax.jit``, so they work in both settings.
"""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ntkflow._typing import is_concrete

__all__ = [
    "check_learning_rate",
    "check_momentum",
    "check_finite",
    "check_times",
    "check_scalar_loss",
    "describe",
]


def describe(x: Any) -> str:
    """A short description of a received value for error messages."""
    if x is None:
        return "None"
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"array of shape {tuple(x.shape)} and dtype {x.dtype}"
    text = repr(x)
    return text if len(text) < 80 else text[:77] + "..."


def check_learning_rate(learning_rate: Any) -> None:
    """``learning_rate`` must be a finite positive scalar."""
    if is_concrete(learning_rate):
        try:
            value = float(np.asarray(learning_rate))
        except (TypeError, ValueError):
            raise TypeError(
                f"`learning_rate` must be a positive finite scalar; got {describe(learning_rate)}."
            ) from None
        if not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"`learning_rate` must be a positive finite scalar; got {value!r}."
            )


def check_momentum(momentum: Any) -> None:
    """``momentum`` must be ``None`` or a scalar in ``[0, 1)``."""
    if momentum is None or not is_concrete(momentum):
        return
    try:
        value = float(np.asarray(momentum))
    except (TypeError, ValueError):
        raise TypeError(
            f"`momentum` must be None or a scalar in [0, 1); got {describe(momentum)}."
        ) from None
    if not 0.0 <= value < 1.0:
        raise ValueError(f"`momentum` must be None or a scalar in [0, 1); got {value!r}.")


def check_finite(x: Any, name: str) -> Any:
    """Raise if ``x`` has NaN or infinite entries (eagerly, or under ``jit``)."""
    if x is None:
        return x
    if is_concrete(x):
        arr = np.asarray(x)
        if arr.dtype.kind in "fc" and not np.all(np.isfinite(arr)):
            bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
            raise ValueError(
                f"`{name}` must be finite; got {describe(arr)} with {bad} NaN or infinite "
                f"entr{'y' if bad == 1 else 'ies'}."
            )
        return x
    x = jnp.asarray(x)
    return eqx.error_if(x, ~jnp.all(jnp.isfinite(x)), f"`{name}` must be finite; got NaN/inf.")


def check_times(t: Any, name: str = "t") -> Any:
    """Times must be non-negative and not NaN (``inf`` is allowed)."""
    if is_concrete(t):
        arr = np.asarray(t)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"`{name}` must be real numbers; got {describe(arr)}.")
        if np.any(np.isnan(arr)) or np.any(arr < 0):
            raise ValueError(
                f"`{name}` must be non-negative and not NaN (inf is allowed); got "
                f"{np.array2string(arr.ravel()[:8], threshold=8)}"
                f"{' ...' if arr.size > 8 else ''}."
            )
        return t
    t = jnp.asarray(t)
    return eqx.error_if(
        t, jnp.any(jnp.isnan(t) | (t < 0)), f"`{name}` must be non-negative and not NaN."
    )


def check_scalar_loss(value: Any) -> None:
    """The loss must return a scalar."""
    shape = getattr(value, "shape", ())
    if shape != ():
        raise ValueError(
            f"`loss(fx_train, y_train)` must return a scalar; got a value of shape {shape}."
        )
