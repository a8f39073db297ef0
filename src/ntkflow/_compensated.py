r"""Compensated arithmetic: sums and kernel products to about twice the working precision.

Test outputs are read out as :math:`F_\text{test}(0) - K_\text{test} S_1` (see
:mod:`ntkflow._dynamics`): one product whose terms are far larger than the result once
the gradient integral :math:`S_1` has grown along the kernel's small eigendirections
(which :math:`K_\text{test}` nearly annihilates). In float32 its round-off,
:math:`\epsilon \sum_j |K_{ij}| |S_{jc}|`, then dominates the test error: measured
(n = 256, cross-entropy, mid horizon) 1.5e-4, against 4.6e-6 for the same :math:`S_1`
multiplied exactly. Two tools remove it:

* :func:`two_sum`, Knuth's error-free addition (and :func:`two_prod`, Dekker's
  multiplication; :func:`dw_add`), lets an integrator carry its state as an unevaluated
  sum ``hi + lo`` (a double word), so :math:`S_1` keeps the steps' small increments that
  a float32 accumulation rounds away;
* :func:`dot2` multiplies a matrix by such a double word with the exact product of
  leading parts (Ozaki, Ogita, Oishi and Rump, "Error-free transformations of matrix
  multiplication by using fast routines of matrix multiplication and its applications",
  Numer. Algorithms 59, 2012): each operand is split as :math:`A = A_1 + A_2`, with
  :math:`A_1` rounded to :math:`\beta` bits below the largest entry of its row (column
  for :math:`X`), where :math:`2\beta + \lceil\log_2 n\rceil \le p` (:math:`p` = 24
  significand bits in float32). Then every product and partial sum in :math:`A_1 X_1`
  is an exactly representable multiple of the two units, so the ordinary matrix
  product computes it without error, and the remaining products, about
  :math:`2^{-\beta}` of the size, carry only their own round-off: the error drops from
  :math:`\epsilon \sum |A||X|` to about :math:`2^{-\beta}\epsilon \sum|A||X|`
  (:math:`2^{-8}` at n = 256, :math:`2^{-6}` at n = 4096), at two matrix products of
  twice the size instead of one.

Predictors use these in single precision only (:func:`compensate`); in float64 the
product's round-off is far below the solvers' tolerances.

All of this presumes that a float32 product is computed in float32. JAX's default lets
accelerators trade that for speed: TF32 (10-bit significands) on recent NVIDIA GPUs,
bfloat16 passes on TPUs, relative errors near 1e-3 in every kernel product. The public
predictors therefore trace under :func:`full_precision`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

__all__ = [
    "DoubleWord", "compensate", "dot2", "dot2_split", "dw_add", "full_precision",
    "minus_product", "two_prod", "two_sum",
]

_HIGHEST = jax.lax.Precision.HIGHEST
_F = TypeVar("_F", bound=Callable[..., Any])


def full_precision(fn: _F) -> _F:
    """``fn``, tracing its matrix products at full precision (``"highest"``).

    ``jax.default_matmul_precision`` is the default of every product traced inside,
    including those of compiled functions first called there (the setting is part of
    their cache key) and of a caller's ``jax.jit`` that traces ``fn``. It overrides a
    lower precision set globally by the user: a prediction is a numerical solve, whose
    error tolerances mean nothing over TF32 or bfloat16 products. On CPU, where float32
    products are always float32, nothing changes.
    """
    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with jax.default_matmul_precision("highest"):
            return fn(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def compensate(dtype: Any) -> bool:
    """Whether ``dtype`` is below double precision, where predictors use compensated sums
    and products."""
    return bool(jnp.finfo(dtype).eps > 1e-10)


def two_sum(a: Array, b: Array) -> tuple[Array, Array]:
    """``(s, e)`` with ``s = fl(a + b)`` and ``s + e = a + b`` exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def two_prod(a: Array, b: Array) -> tuple[Array, Array]:
    """``(p, e)`` with ``p = fl(a b)`` and ``p + e = a b`` exactly (Dekker, without a fused
    multiply-add: each factor is split into halves whose products are exact)."""
    factor = float(2 ** ((int(jnp.finfo(jnp.result_type(a, b)).nmant) + 2) // 2) + 1)

    def halves(x: Array) -> tuple[Array, Array]:
        c = factor * x
        hi = c - (c - x)
        return hi, x - hi

    p = a * b
    (ah, al), (bh, bl) = halves(a), halves(b)
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


DoubleWord = tuple[Array, Array]


def dw_add(x: DoubleWord, y: DoubleWord) -> DoubleWord:
    """The sum of two double words ``(hi, lo)``, renormalized (``hi = fl(hi + lo)``)."""
    s, e = two_sum(x[0], y[0])
    return two_sum(s, e + (x[1] + y[1]))


def _power_of_two_above(x: Array) -> Array:
    """The power of two ``2^e`` with ``2^(e-1) <= x < 2^e`` for normal ``x > 0`` (1 for 0 and
    subnormals), from the exponent bits (XLA's ``frexp``/``ldexp`` are slow on CPU)."""
    info = jnp.finfo(x.dtype)
    int_type = jnp.int32 if info.bits == 32 else jnp.int64
    mantissa_bits = int(info.nmant)
    exponent_mask = ((1 << (info.bits - 1)) - 1) & ~((1 << mantissa_bits) - 1)
    floor = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(x, int_type) & exponent_mask, x.dtype)
    return jnp.where(floor > 0, 2 * floor, jnp.ones_like(floor))


def _split(x: Array, axis: int, bits: int) -> tuple[Array, Array]:
    """``x = hi + lo`` exactly, ``hi`` a multiple of ``unit = 2^(e - bits)`` where ``2^e``
    bounds ``|x|`` along ``axis`` (so ``|hi| / unit <= 2^bits``); scalings by powers of two
    and rounding to integers are exact."""
    unit = _power_of_two_above(jnp.max(jnp.abs(x), axis=axis, keepdims=True)) * 2.0**-bits
    hi = jnp.round(x * (1 / unit)) * unit
    return hi, x - hi


def _bits(a: Array) -> int:
    """Bits kept in the leading parts for products with ``a``'s rows (0: no exact split)."""
    digits = int(jnp.finfo(a.dtype).nmant) + 1
    bits = (digits - int(np.ceil(np.log2(max(a.shape[-1], 2))))) // 2
    return bits if bits >= 2 else 0  # (n > 2^20 in float32: no exact split left)


def dot2(a: Array, x: Array, x_lo: Array | None = None) -> tuple[Array, Array]:
    r"""``a @ (x + x_lo)`` as a double word ``(hi, lo)``, with about
    :math:`2^{-\beta}` times the round-off of the plain product (module docstring).

    ``a``: ``(p, n)``; ``x``, ``x_lo``: ``(..., n, k)``; returns two ``(..., p, k)``
    arrays with ``hi = fl(hi + lo)``. Two matrix products of twice the plain one's size:
    ``a_hi @ [x_hi, x_rest]`` (its first half exact) and ``[a_lo, a] @ [x; x_lo]``.

    >>> import jax.numpy as jnp
    >>> a = jnp.array([[1.0, 1.0, 1.0]], jnp.float32)
    >>> x = jnp.array([[1e8], [1.0], [-1e8]], jnp.float32)
    >>> hi, lo = dot2(a, x, jnp.array([[0.0], [0.25], [0.0]], jnp.float32))
    >>> float(hi[0, 0]) + float(lo[0, 0])  # float32 sums of 1e8 + 1 lose the 1
    1.25
    """
    bits = _bits(a)
    if not bits:
        p = jnp.matmul(a, x if x_lo is None else x + x_lo, precision=_HIGHEST)
        return p, jnp.zeros_like(p)
    a_hi, a_lo = _split(a, -1, bits)
    x_hi, x_rest = _split(x, -2, bits)
    k = x.shape[-1]
    both = jnp.matmul(a_hi, jnp.concatenate([x_hi, x_rest], axis=-1), precision=_HIGHEST)
    exact, small = both[..., :k], both[..., k:]
    if x_lo is None:
        small = small + jnp.matmul(a_lo, x, precision=_HIGHEST)
    else:
        small = small + jnp.matmul(jnp.concatenate([a_lo, a], axis=-1),
                                   jnp.concatenate([x, x_lo], axis=-2), precision=_HIGHEST)
    return two_sum(exact, small)


def dot2_split(a: Array, a_lo: Array | None, x: Array) -> tuple[Array, Array]:
    """``(a + a_lo) @ x`` as ``hi + lo``: :func:`dot2` of ``a`` and ``x``, plus ``a_lo @ x``
    where ``a``'s own rounding error ``a_lo`` is known (e.g. ``Eigen.evecs_lo``)."""
    hi, lo = dot2(a, x)
    return (hi, lo) if a_lo is None else (hi, lo + a_lo @ x)


def minus_product(base: Array, a: Array, x: Array, x_lo: Array | None = None) -> Array:
    """``base - a @ (x + x_lo)`` for each leading index of ``x`` (shape ``(m, n, k)``): a
    read-out such as ``F_test(0) - K_test S_1``, whose terms can be far larger than its
    result, compensated (:func:`dot2`) in single precision and plain in double."""
    if not compensate(a.dtype):
        return base - jnp.einsum("pr,mrk->mpk", a, x if x_lo is None else x + x_lo)
    hi, lo = dot2(a, x, x_lo)
    return (base - hi) - lo
