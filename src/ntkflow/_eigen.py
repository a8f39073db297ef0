"""Eigendecomposition of the flat kernel and stable spectral functions.

The kernel ``K`` is symmetric positive semi-definite in exact arithmetic.
Round-off can make small eigenvalues slightly negative; they are clamped to
``0`` here, explicitly, and eigenvalues below ``rcond * max(lambda)`` are
treated as exact zeros ("null modes").
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from ntkflow._typing import is_concrete

__all__ = [
    "Eigen",
    "add_diagonal_regularizer",
    "matmul",
    "matmul_t",
    "phi1",
    "row_products",
    "transposed_layout",
]


def _cpu_has_avx512() -> bool:
    """Whether the host CPU has AVX-512 (``AVX512F``), as NumPy's run-time dispatch
    detected it; ``False`` where that record is unavailable."""
    for name in ("numpy._core._multiarray_umath", "numpy.core._multiarray_umath"):
        try:  # the second name for NumPy < 2
            features = importlib.import_module(name).__cpu_features__
        except (ImportError, AttributeError):
            continue
        return bool(features.get("AVX512F", False))
    return False


#: Whether the host CPU has AVX-512; it sets the float64 limit of the row form below.
CPU_AVX512 = _cpu_has_avx512()
#: Loops work on transposed arrays (:func:`transposed_layout`) for this many columns, ...
TRANSPOSED_COLUMNS = (2, 16)
#: ... and a kernel with at most this many rows (on CPU).
TRANSPOSED_MAX_ROWS = 2048
#: A product ``A x`` is computed as ``(x^T A^T)^T`` (:func:`row_products`) for ``x``
#: with this many columns, ...
ROW_PRODUCT_COLUMNS = (2, 10)
#: ... and ``A`` with at most this many rows, by item size (bytes; on CPU).
ROW_PRODUCT_MAX_ROWS = {4: 1024, 8: 1024 if CPU_AVX512 else 256}


def row_products(rows: int, columns: int, dtype: Any) -> bool:
    """Whether ``A x``, for ``A`` of shape ``(rows, rows)`` and ``x`` of shape
    ``(rows, columns)``, is faster as ``x^T A^T``: on CPU, for 2-10 columns (e.g. 10
    classes) and at most 1024 rows in float32; in float64 at most 1024 rows on CPUs
    with AVX-512, 256 on others.

    XLA's CPU kernels multiply ``(k, m) @ (m, n)`` 1.3-2.1x faster than ``(n, m) @
    (m, k)`` there (10 columns, float32 n = 256-1280, float64 n = 256), on two AMD EPYC
    machines: an earlier one, whose vector extensions were not recorded, and a Zen 3
    (AVX2). Past that the row form's speed depends on the CPU: on the Zen 3 it was
    0.67-1.1x in float64 for n = 384-1000 and 4-10 columns, and it fell off a cliff at
    kernels of about 8 MB (float64 n = 1024: 1.7-2.9 ms against 0.5-0.6 ms; float32 n =
    1448), while the earlier machine ran float64 n = 1024 1.5-2.5x faster in the row
    form. On an Intel Xeon with AVX-512 (10 columns, 40 products in a loop, medians of
    9) the row form took 0.41, 0.72, 0.63, 0.84, 0.70 and 0.81 of the column form's
    time in float64 at n = 256, 512, 768, 1024, 1448 and 2048, and in float32 0.43,
    0.51, 0.82 and 0.87 at n = 256-1024, 1.03-1.08 at n = 1448-2048. On an AMD EPYC
    Zen 4 (family 25, model 17, AVX-512; same loop) the float64 ratios were 0.98-1.06,
    0.85-0.98, 0.86-0.90, 0.99-1.15, 1.19-1.22 and 1.82-1.98 at n = 256-2048, yet
    within the cross-entropy solve at n = 1024 the row form made the whole prediction
    1.1x (1024 test points) and 1.6x (4096) faster. AVX-512 is what tells the machines
    that favour the float64 row form up to 1024 rows from the Zen 3 that does not; past
    1024 rows the two AVX-512 machines disagree, and the column form is kept.
    Above 10 columns it lost in float64 at n = 256 (0.5-0.7x) and in float32 at n =
    724.
    """
    return (
        jax.default_backend() == "cpu"
        and ROW_PRODUCT_COLUMNS[0] <= columns <= ROW_PRODUCT_COLUMNS[1]
        and rows <= ROW_PRODUCT_MAX_ROWS.get(jnp.dtype(dtype).itemsize, 0)
    )


def transposed_layout(rows: int, columns: int) -> bool:
    """Whether a solver loop should work on transposed arrays ``(columns, rows)`` for a
    kernel of ``rows`` rows and outputs of ``columns`` columns: on CPU, for 2-16
    columns and at most 2048 rows. Entrywise functions and reductions over the outputs
    then vectorize along the rows (the loss gradient: 24 -> 5.5 us for log-cosh, 6.1 ->
    3.2 us for cross-entropy, float32, n = 256, 10 classes); the kernel products take
    the form :func:`matmul_t` finds faster."""
    return (
        jax.default_backend() == "cpu"
        and TRANSPOSED_COLUMNS[0] <= columns <= TRANSPOSED_COLUMNS[1]
        and rows <= TRANSPOSED_MAX_ROWS
    )


def matmul(a: Float[Array, "n m"], a_t: Float[Array, "m n"], x: Array) -> Array:
    """``a @ x``, given ``a`` and ``a_t = a^T`` (the same array for a symmetric ``a``).

    Where :func:`row_products` holds (on CPU, a tall, skinny ``x`` of shape ``(m,
    k)``), it is computed as ``(x^T a_t)^T`` with both transposes materialized
    (``optimization_barrier`` keeps XLA from folding them back into the product);
    transposing the ``(m, k)`` operands costs little. Elsewhere it is ``a @ x``. The
    two agree to round-off.
    """
    if x.ndim != 2 or not row_products(a.shape[0], x.shape[1], a.dtype):
        return a @ x
    return _through_transposes(lambda x_t: x_t @ a_t, x)


def matmul_t(x_t: Float[Array, "k m"], a: Float[Array, "n m"], a_t: Float[Array, "m n"]
             ) -> Float[Array, "k n"]:
    """``x_t @ a_t = (a @ x_t^T)^T`` on transposed arrays, given ``a`` and ``a_t = a^T``
    (the same array for a symmetric ``a``): ``x_t @ a_t`` where :func:`row_products`
    holds, else ``(a @ x_t^T)^T`` with both transposes materialized (see
    :func:`matmul`)."""
    if row_products(a.shape[0], x_t.shape[0], a.dtype):
        return x_t @ a_t
    return _through_transposes(lambda x: a @ x, x_t)


def _through_transposes(product: Callable[[Array], Array], x: Array) -> Array:
    """``product(x^T)^T`` with both transposes materialized: ``optimization_barrier``
    keeps XLA from folding them back into the product, whose operand layout is the
    point (:func:`matmul`, :func:`matmul_t`)."""
    return jax.lax.optimization_barrier(product(jax.lax.optimization_barrier(x.T))).T


def add_diagonal_regularizer(
    k: Float[Array, "n n"], diag_reg: float, absolute_scale: bool
) -> Float[Array, "n n"]:
    """``K + diag_reg * I`` (``diag_reg * trace(K) / n * I`` unless ``absolute_scale``).

    One program (op by op, a new kernel size compiled eight small ones, 0.55 s)."""
    return _add_diagonal_regularizer(k, diag_reg, bool(absolute_scale))


@functools.partial(jax.jit, static_argnums=2)
def _add_diagonal_regularizer(k: Array, diag_reg: Any, absolute_scale: bool) -> Array:
    n = k.shape[0]
    scale = diag_reg if absolute_scale else diag_reg * jnp.trace(k) / n
    return k + scale * jnp.eye(n, dtype=k.dtype)


class Eigen(eqx.Module):
    """``K = V diag(lam) V^T`` with ``lam >= 0``, kept as a pytree.

    Attributes:
      evals: eigenvalues, ascending, clamped to be non-negative.
      evecs: orthonormal eigenvectors (columns).
      null: mask of eigenvalues treated as exact zeros
        (``lam <= rcond * max(lam)``, ``rcond = n * eps``).
      lowest: the lowest eigenvalue before clamping (to check positive
        semi-definiteness without another decomposition).
      evecs_t: ``evecs.T`` stored as its own array, for products ``V^T x``: XLA on
        CPU multiplies by a transposed operand 2-3x slower than by a stored one
        (measured at n = 1024), and those products are half of a solver step's.
      evecs_lo: where the decomposition was computed in float64 for a float32 kernel
        (see :meth:`of`), the float64 eigenvectors' rounding error, ``V_64 - evecs``,
        in the kernel's precision (``None`` otherwise), for read-outs that need ``V``
        beyond its own precision (:mod:`ntkflow._adaptive`).
    """

    evals: Float[Array, " n"]
    evecs: Float[Array, "n n"]
    null: Bool[Array, " n"]
    lowest: Float[Array, ""]
    evecs_t: Float[Array, "n n"]
    evecs_lo: Float[Array, "n n"] | None = None

    @classmethod
    def of(cls, k: Float[Array, "n n"]) -> Eigen:
        """Eigendecomposition of ``k``.

        A concrete kernel of less than double precision is decomposed in float64
        (XLA, with 64-bit types enabled for this one call) and the result rounded
        back: a float32 ``eigh`` loses about ``eps * max(lam)`` on every
        eigenvalue, i.e. most of the relative accuracy of the small ones that set
        long-horizon dynamics. (XLA rather than NumPy: on few cores, LAPACK's and
        XLA's thread pools alternating made calls 2-5x slower.) Traced kernels
        (under ``jit``/``grad``) use ``jnp.linalg.eigh`` in their own precision.
        """
        if is_concrete(k) and jnp.dtype(k.dtype).itemsize < 8:
            with jax.enable_x64(True):
                raw, vecs, vecs_lo, lowest = _eigh64(jnp.asarray(k), k.dtype)
            return _finish(raw, vecs, lowest, vecs_lo)
        return _eigen_of(k)

    def smallest_nonnull(self) -> Float[Array, ""]:
        """The smallest eigenvalue not treated as zero (``inf`` if every one is)."""
        return jnp.min(jnp.where(self.null, jnp.inf, self.evals))

    def condition_number(self) -> Float[Array, ""]:
        """``max(lambda) / min(lambda)`` over the non-null modes."""
        return jnp.max(self.evals) / self.smallest_nonnull()

    def to_eigenbasis(self, x: Float[Array, "n ..."]) -> Float[Array, "n ..."]:
        """``V^T x``."""
        if x.ndim == 2:
            return matmul(self.evecs_t, self.evecs, x)
        return jnp.tensordot(self.evecs_t, x, axes=1)

    def from_eigenbasis(self, x: Float[Array, "... n k"]) -> Float[Array, "... n k"]:
        """``V x`` (for each leading index)."""
        if x.ndim == 2:
            return matmul(self.evecs, self.evecs_t, x)
        return jnp.einsum("ij,...jk->...ik", self.evecs, x)


@functools.partial(jax.jit, static_argnums=1)
def _eigh64(k: Array, dtype: Any) -> tuple[Array, Array, Array, Array]:
    """``eigh`` of ``k`` in float64 (call with 64-bit types enabled), rounded to ``dtype``:
    eigenvalues, eigenvectors and their rounding error, and the lowest eigenvalue."""
    k64 = k.astype(jnp.float64)
    raw, vecs = jnp.linalg.eigh(0.5 * (k64 + k64.T))
    hi = vecs.astype(dtype)
    lo = (vecs - hi.astype(jnp.float64)).astype(dtype)
    return raw.astype(dtype), hi, lo, jnp.min(raw, initial=jnp.inf).astype(dtype)


@jax.jit
def _eigen_of(k: Float[Array, "n n"]) -> Eigen:
    raw, evecs = jnp.linalg.eigh(0.5 * (k + k.T))
    return _finish(raw, evecs, jnp.min(raw, initial=jnp.inf))


def _finish(raw: Array, evecs: Array, lowest: Any, evecs_lo: Array | None = None) -> Eigen:
    """Clamp negative eigenvalues and mark null modes."""
    evals = jnp.maximum(raw, 0.0)
    rcond = raw.shape[0] * jnp.finfo(raw.dtype).eps
    null = evals <= rcond * jnp.max(evals, initial=0.0)
    return Eigen(
        jnp.where(null, 0.0, evals), evecs, null, jnp.asarray(lowest, raw.dtype), evecs.T,
        evecs_lo,
    )


def phi1(evals: Float[Array, " n"], tau: Float[Array, " m"]) -> Float[Array, "m n"]:
    r"""``(1 - exp(-lam * tau)) / lam`` for every time and eigenvalue, stably.

    Tends to ``tau`` as ``lam -> 0`` (no ``0/0``), with a finite gradient
    (the double-``where`` trick). For ``tau = inf`` it is ``1 / lam``, and ``inf``
    for ``lam = 0``.
    """
    tau = tau[:, None]
    lam = evals[None, :]
    small = lam * jnp.minimum(tau, jnp.finfo(evals.dtype).max) < 1e-6
    safe_lam = jnp.where(small, 1.0, lam)
    regular = -jnp.expm1(-safe_lam * tau) / safe_lam
    # Series 1 - x/2 + x^2/6 for x = lam * tau small.
    x = jnp.where(small, lam * tau, 0.0)
    series = tau * (1.0 - x / 2.0 + x * x / 6.0)
    return jnp.where(small, series, regular)
