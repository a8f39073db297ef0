"""Validation at the public boundary.

Every check raises an error that names the argument, says what was expected
and shows what was received. Checks on *values* (finiteness, signs) run eagerly
when the value is concrete and through :func:`equinox.error_if` when it is
traced under ``jax.jit``, so they work in both settings: such checks return
their (possibly wrapped) argument, which the caller must use in place of the
original for the traced check to run.

Eager checks inspect a concrete value at once even while an enclosing function
is being traced (e.g. a kernel closed over by a jitted function): their
compiled programs run through :func:`concrete_call`, other computations under
:func:`jax.ensure_compile_time_eval`.

Checks that need a decomposition or a host round trip (kernel symmetry and
positive semi-definiteness, the loss at the initial outputs) run only when the
values are concrete; under ``jit`` a bad kernel shows up as a solver failure
(non-finite solution) instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ntkflow._typing import is_concrete

__all__ = [
    "check_learning_rate",
    "check_momentum",
    "check_finite",
    "raise_if_nonfinite",
    "raise_nonfinite_initial_loss",
    "check_kernel_and_targets",
    "check_times",
    "check_scalar_loss",
    "check_loss",
    "check_initial_loss",
    "check_trace_axes",
    "check_nonempty",
    "check_symmetric",
    "check_psd",
    "check_psd_eigen",
    "check_psd_eigenvalues",
    "check_diag_reg",
    "check_max_steps",
    "check_tolerance",
    "check_ode_state",
    "check_array",
    "check_y_train_size",
    "check_eps",
    "kernel_tolerances",
    "describe",
    "start_vector",
]


# Eager checks run these small compiled programs (one compilation per shape and
# dtype) rather than op by op, which would compile every operation separately.


@jax.jit
def _count_nonfinite(x: Any) -> Any:
    return jnp.sum(~jnp.isfinite(x))


@jax.jit
def _symmetry_stats(k: Any) -> tuple[Any, Any]:
    """``(max|K|, max|K - K^T|)``."""
    return jnp.max(jnp.abs(k)), jnp.max(jnp.abs(k - k.T))


@jax.jit
def _eigenvalue_range(k: Any) -> tuple[Any, Any]:
    """``(min eig, max |eig|)`` of the symmetric part of ``k``."""
    evals = jnp.linalg.eigvalsh(0.5 * (k + k.T))
    return jnp.min(evals), jnp.max(jnp.abs(evals))


def broadcasts_to(shape: Any, target: Any) -> bool:
    """Whether an array of ``shape`` broadcasts to exactly ``target``."""
    try:
        return np.broadcast_shapes(tuple(shape), tuple(target)) == tuple(target)
    except ValueError:
        return False


def describe(x: Any) -> str:
    """A short description of a received value for error messages."""
    if x is None:
        return "None"
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"array of shape {tuple(x.shape)} and dtype {x.dtype}"
    text = repr(x)
    return text if len(text) < 80 else text[:77] + "..."


#: NumPy dtype kinds accepted as real numbers: integers and floats, not booleans.
_REAL_KINDS = "iuf"


def _scalar(x: Any, name: str, expectation: str) -> float:
    """``float(x)`` for a concrete real scalar, else a ``TypeError`` naming ``name``."""
    arr = np.asarray(x) if not isinstance(x, (str, bytes)) else None
    if arr is None or arr.shape != () or arr.dtype.kind not in _REAL_KINDS:
        raise TypeError(f"`{name}` must be {expectation}; got {describe(x)}.")
    return float(arr)


def _positive_scalar(x: Any, name: str) -> Any:
    """``x`` must be a finite positive scalar (eagerly, or under ``jit``)."""
    expectation = "a positive finite scalar"
    if is_concrete(x):
        value = _scalar(x, name, expectation)
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"`{name}` must be {expectation}; got {value!r}.")
        return x
    x = jnp.asarray(x)
    return eqx.error_if(
        x, ~(jnp.isfinite(x) & (x > 0)), f"`{name}` must be {expectation}; got NaN/inf or <= 0."
    )


def check_learning_rate(learning_rate: Any) -> Any:
    """``learning_rate`` must be a finite positive scalar."""
    return _positive_scalar(learning_rate, "learning_rate")


def check_momentum(momentum: Any) -> Any:
    """``momentum`` must be ``None`` or a scalar in ``[0, 1)``."""
    expectation = "None or a scalar in [0, 1)"
    if momentum is None:
        return momentum
    if is_concrete(momentum):
        value = _scalar(momentum, "momentum", expectation)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"`momentum` must be {expectation}; got {value!r}.")
        return momentum
    m = jnp.asarray(momentum)
    return eqx.error_if(
        m, ~((m >= 0) & (m < 1)), f"`momentum` must be {expectation}; got a value outside."
    )


def check_diag_reg(diag_reg: Any) -> Any:
    """``diag_reg`` must be a finite non-negative scalar."""
    expectation = "a finite non-negative scalar"
    if is_concrete(diag_reg):
        value = _scalar(diag_reg, "diag_reg", expectation)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"`diag_reg` must be {expectation}; got {value!r}.")
        return diag_reg
    d = jnp.asarray(diag_reg)
    return eqx.error_if(
        d, ~(jnp.isfinite(d) & (d >= 0)), f"`diag_reg` must be {expectation}; got NaN/inf or < 0."
    )


def concrete_call(fn: Callable[..., Any], *args: Any) -> Any:
    """``jax.device_get(fn(*args))`` for a jitted ``fn`` and concrete ``args``.

    Outside traces ``fn`` runs as its one compiled program. Inside an enclosing
    trace the call would be staged into it, so there it runs again under
    :func:`jax.ensure_compile_time_eval`, which evaluates it at once but computes
    the parts that do not depend on ``args`` op by op, each op a small program
    compiled anew for every shape: calling the checks under that context
    everywhere cost 24 such compilations, about 1 s, the first time a predictor
    was built for a kernel size.
    """
    out = fn(*args)
    if not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(out)):
        return jax.device_get(out)
    with jax.ensure_compile_time_eval():
        return jax.device_get(fn(*args))


def check_finite(x: Any, name: str) -> Any:
    """Raise if ``x`` has NaN or infinite entries (eagerly, or under ``jit``)."""
    if x is None:
        return x
    if is_concrete(x):
        arr = jnp.asarray(x)
        bad = 0
        if jnp.issubdtype(arr.dtype, jnp.inexact) and arr.size:
            bad = int(concrete_call(_count_nonfinite, arr))
        raise_if_nonfinite(bad, arr, name)
        return x
    x = jnp.asarray(x)
    return eqx.error_if(x, ~jnp.all(jnp.isfinite(x)), f"`{name}` must be finite; got NaN/inf.")


def raise_if_nonfinite(bad: int, arr: Any, name: str) -> None:
    """:func:`check_finite`'s error, given the number ``bad`` of non-finite entries of ``arr``."""
    if bad:
        raise ValueError(
            f"`{name}` must be finite; got {describe(arr)} with {bad} NaN or infinite "
            f"entr{'y' if bad == 1 else 'ies'}."
        )


def _checkable_in_one_pass(*arrays: Any) -> bool:
    """Concrete, non-empty floating arrays: value checks can be batched (one host transfer)."""
    return all(
        hasattr(a, "shape") and hasattr(a, "dtype") and is_concrete(a) and a.size
        and jnp.issubdtype(a.dtype, jnp.inexact)
        for a in arrays
    )


def check_times(t: Any, name: str = "t") -> Any:
    """Times must be real numbers (not booleans), non-negative and not NaN (``inf`` is
    allowed)."""
    concrete = is_concrete(t)
    arr: Any = np.asarray(t) if concrete else jnp.asarray(t)
    if arr.dtype.kind not in _REAL_KINDS:
        raise TypeError(f"`{name}` must be real numbers; got {describe(t if concrete else arr)}.")
    if concrete:
        if np.any(np.isnan(arr)) or np.any(arr < 0):
            raise ValueError(
                f"`{name}` must be non-negative and not NaN (inf is allowed); got "
                f"{np.array2string(arr.ravel()[:8], threshold=8)}"
                f"{' ...' if arr.size > 8 else ''}."
            )
        return t
    return eqx.error_if(
        arr, jnp.any(jnp.isnan(arr) | (arr < 0)), f"`{name}` must be non-negative and not NaN."
    )


def _real_dtype(dtype: Any) -> bool:
    """Booleans, integers and floats (bfloat16 included), not complex numbers or others."""
    try:
        return any(jnp.issubdtype(dtype, kind) for kind in (jnp.bool_, jnp.integer, jnp.floating))
    except TypeError:  # not a dtype JAX knows
        return False


def check_array(x: Any, name: str) -> Any:
    """``x`` must be convertible to a real numeric array: booleans, integers or floats
    (``TypeError`` naming ``name`` if not: complex numbers, strings, objects)."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        if not _real_dtype(x.dtype):
            raise TypeError(
                f"`{name}` must be a real array (bool, integer or floating); got "
                f"{describe(x)}."
            )
        return x
    try:
        arr = np.asarray(x)
    except (TypeError, ValueError):
        arr = None
    if arr is None or not _real_dtype(arr.dtype):
        raise TypeError(f"`{name}` must be an array or a scalar; got {describe(x)}.")
    return x  # unchanged: Python scalars stay weakly typed


# ---------------------------------------------------------------------------
# Loss


def check_loss(loss: Any) -> None:
    """``loss`` must be callable."""
    if not callable(loss):
        raise TypeError(f"`loss` must be a callable loss(fx, y); got {describe(loss)}.")


def check_scalar_loss(value: Any) -> None:
    """The loss must return a real floating-point scalar (its gradient drives training)."""
    shape = getattr(value, "shape", ())
    if shape != ():
        raise ValueError(
            f"`loss(fx_train, y_train)` must return a scalar; got a value of shape {shape}."
        )
    dtype = np.dtype(getattr(value, "dtype", np.asarray(value).dtype))
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            "`loss(fx_train, y_train)` must return a real floating-point scalar (training "
            f"follows its gradient); got a scalar of dtype {dtype}."
        )


def check_initial_loss(loss_fn: Callable[[Any, Any], Any], f0: Any, y: Any) -> None:
    """``loss(fx_train_0, y_train)`` must be finite (checked eagerly, when concrete)."""
    if not is_concrete(f0, y):
        return
    with jax.ensure_compile_time_eval():
        value = loss_fn(f0, y)
        finite = bool(jnp.isfinite(value))
    if not finite:
        raise_nonfinite_initial_loss(value)


def raise_nonfinite_initial_loss(value: Any) -> None:
    """:func:`check_initial_loss`'s error for a non-finite loss ``value``."""
    with jax.ensure_compile_time_eval():
        number = float(value)
    raise ValueError(
        "`loss(fx_train_0, y_train)` must be finite at the initial outputs; got "
        f"{number!r}. Check `loss` (e.g. a log of zero or of a negative number), "
        "`fx_train_0` and `y_train`."
    )


# ---------------------------------------------------------------------------
# Shapes and axes


def check_trace_axes(trace_axes: Any) -> None:
    """``trace_axes`` must be an int or a sequence of ints (ranges are checked later)."""
    ok = isinstance(trace_axes, (int, np.integer)) or (
        isinstance(trace_axes, Sequence) and not isinstance(trace_axes, (str, bytes))
    )
    if isinstance(trace_axes, Sequence) and ok:
        ok = all(
            isinstance(a, (int, np.integer)) and not isinstance(a, bool) for a in trace_axes
        )
    if not ok or isinstance(trace_axes, bool):
        raise TypeError(
            f"`trace_axes` must be an int or a sequence of ints; got {describe(trace_axes)}."
        )


def check_nonempty(shape: tuple[int, ...], name: str) -> None:
    """An output array must have at least one dimension and at least one entry."""
    if len(shape) == 0:
        raise ValueError(f"`{name}` must have at least one (batch) dimension; got a scalar.")
    if math.prod(shape) == 0:
        raise ValueError(f"`{name}` must have at least one entry; got shape {shape}.")


def check_ode_state(
    state: Any,
    momentum: Any,
    train_shape: tuple[int, ...],
    test_shape: tuple[int, ...] | None,
) -> None:
    """An ``ODEState`` passed to a predictor must fit the predictor.

    ``test_shape`` is the shape of the test outputs (``None`` if unknown).
    """
    if momentum is None and (state.qx_train is not None or state.qx_test is not None):
        raise ValueError(
            "Got momentum state variables (`qx_train`/`qx_test` of the ODEState passed as "
            "`fx_train_or_state_0`), while `momentum is None`; build the predictor with the "
            "`momentum` the state came from, or pass `ODEState(fx_train, fx_test)`."
        )
    for q, f in (("qx_train", "fx_train"), ("qx_test", "fx_test")):
        if getattr(state, q) is not None and getattr(state, f) is None:
            raise ValueError(
                f"The ODEState passed as `fx_train_or_state_0` has `{q}` but `{f}=None`; "
                f"pass `{f}` too, or drop `{q}`."
            )
    for field, expected in (
        ("fx_train", train_shape), ("qx_train", train_shape),
        ("fx_test", test_shape), ("qx_test", test_shape),
    ):
        value = getattr(state, field)
        if value is None or expected is None:
            continue
        shape = tuple(np.shape(value))
        if not broadcasts_to(shape, expected):
            raise ValueError(
                f"`fx_train_or_state_0.{field}` (ODEState) must be a scalar or broadcastable "
                f"to shape {tuple(expected)}; got shape {shape}. A state returned for an "
                "array of times `t` has leading time axes: pick one time, e.g. "
                "`jax.tree.map(lambda x: x[-1], state)`."
            )


# ---------------------------------------------------------------------------
# Kernels


def kernel_tolerances(dtype: Any) -> tuple[float, float]:
    """``(symmetry, psd)`` relative tolerances for a kernel of floating ``dtype``.

    ``max|K - K^T| <= symmetry * max|K|`` and
    ``min(eig) >= -psd * max|eig|``: ``(1e-4, 1e-3)`` up to float32,
    ``(1e-6, 1e-6)`` in float64, never below ``(100, 1000) * eps``.
    """
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.dtype(jnp.result_type(float))
    eps = float(jnp.finfo(dtype).eps)
    sym, psd = (1e-6, 1e-6) if dtype.itemsize >= 8 else (1e-4, 1e-3)
    return max(sym, 100 * eps), max(psd, 1000 * eps)


def check_symmetric(k: Any, name: str, dtype: Any) -> None:
    """A flat kernel must be symmetric up to round-off (checked eagerly, when concrete).

    ``dtype`` is the kernel's own floating dtype (it sets the tolerance).
    """
    if not is_concrete(k):
        return
    k = jnp.asarray(k)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"`{name}` must be square once flattened; got shape {tuple(k.shape)}.")
    if k.size == 0:
        return
    scale, asym = (float(v) for v in concrete_call(_symmetry_stats, k))
    _raise_if_asymmetric(scale, asym, tuple(k.shape), name, dtype)


def check_kernel_and_targets(
    k: Any, y: Any, k_name: str, y_name: str, k_dtype: Any
) -> tuple[Any, Any]:
    """``check_finite`` on ``k`` then ``y``, then ``check_symmetric(k)``, in one device pass.

    Same errors, in the same order, as the three checks run one after the
    other (which is what happens for traced or unusual arrays); returns the
    (possibly wrapped) ``(k, y)``.
    """
    square = getattr(k, "ndim", 0) == 2 and k.shape[0] == k.shape[1]
    if not (square and _checkable_in_one_pass(k, y)):
        k = check_finite(k, k_name)
        y = check_finite(y, y_name)
        check_symmetric(k, k_name, k_dtype)
        return k, y
    bad_k, bad_y, scale, asym = concrete_call(_kernel_and_targets_stats, k, y)
    raise_if_nonfinite(int(bad_k), k, k_name)
    raise_if_nonfinite(int(bad_y), y, y_name)
    _raise_if_asymmetric(float(scale), float(asym), tuple(k.shape), k_name, k_dtype)
    return k, y


@jax.jit
def _kernel_and_targets_stats(k: Any, y: Any) -> tuple[Any, Any, Any, Any]:
    return (_count_nonfinite(k), _count_nonfinite(y), *_symmetry_stats(k))


def _raise_if_asymmetric(
    scale: float, asym: float, shape: tuple[int, ...], name: str, dtype: Any
) -> None:
    tol, _ = kernel_tolerances(dtype)
    if asym > tol * scale:
        raise ValueError(
            f"`{name}` must be symmetric (a kernel): max|K - K^T| must be at most {tol:g} * "
            f"max|K| = {tol * scale:.3g}; got max|K - K^T| = {asym:.3g} (for the flattened "
            f"kernel of shape {shape}). Check the layout: neural-tangents kernels "
            "interleave the axes of the two inputs, e.g. (n, n, k, k) rather than (n, k, n, k). "
            "If the asymmetry is round-off from a lower precision, pass (K + K^T) / 2."
        )


def check_psd_eigenvalues(evals: Any, name: str, dtype: Any, hint: str = "") -> None:
    """Eigenvalues (ascending) of a kernel must not be clearly negative.

    Round-off-level negative eigenvalues (``>= -tol * max|eig|``, see
    :func:`kernel_tolerances`) are accepted; the predictors clamp them to zero.
    """
    if not is_concrete(evals):
        return
    evals = jnp.asarray(evals)
    if evals.size == 0:
        return
    with jax.ensure_compile_time_eval():
        lowest, largest = float(jnp.min(evals)), float(jnp.max(jnp.abs(evals)))
    _check_eigenvalue_range(lowest, largest, name, dtype, hint)


def _check_eigenvalue_range(
    lowest: float, largest: float, name: str, dtype: Any, hint: str
) -> None:
    _, tol = kernel_tolerances(dtype)
    if lowest < -tol * largest:
        raise ValueError(
            f"`{name}` must be positive semi-definite (a kernel): its eigenvalues must be at "
            f"least -{tol:g} * max|eigenvalue| = {-tol * largest:.3g}; got a most negative "
            f"eigenvalue of {lowest:.3g} (largest magnitude {largest:.3g}).{hint}"
        )


#: Above this many rows, :func:`check_psd` uses a Lanczos estimate instead of ``eigvalsh``.
PSD_EXACT_MAX_ROWS = 512
#: Lanczos steps (kernel products) of the estimate above ``PSD_EXACT_MAX_ROWS`` rows.
LANCZOS_STEPS = 40
#: Lanczos steps of the bound that scales the Cholesky check's shift.
LANCZOS_STEPS_SHIFT = 12


def start_vector(n: int, dtype: Any) -> Any:
    """A fixed unit start vector with components along every direction but few."""
    v = jnp.ones((n,), dtype) / jnp.sqrt(jnp.asarray(n, dtype))
    v = v + 1e-3 * jnp.sin(jnp.arange(n, dtype=dtype))
    return v / jnp.linalg.norm(v)


def _lanczos_ritz_range(s: Any, steps: int) -> tuple[Any, Any]:
    r"""The lowest and largest Ritz values of the symmetric ``s`` after ``steps`` Lanczos
    steps from :func:`start_vector`: the extreme eigenvalues of the tridiagonal
    matrix of the recurrence, which approach the ends of the spectrum after far fewer
    products with ``s`` than power iterations need (one product per step).

    Without reorthogonalization, so each step costs about a power iteration. In
    floating point the basis then loses orthogonality once a Ritz value converges,
    which repeats converged values but does not move them out of the spectrum: they
    stay within :math:`[\lambda_\min, \lambda_\max]` up to a few :math:`\epsilon
    \|S\|` (Paige, 1980), far below the checks' tolerances. A recurrence that stops
    (an invariant subspace) continues from its normalized round-off or from zeros,
    which add Ritz values of 0.
    """
    n = s.shape[0]
    m = min(steps, n)
    tiny = jnp.finfo(s.dtype).tiny

    def body(j: Any, carry: tuple[Any, Any, Any, Any, Any]) -> tuple[Any, Any, Any, Any, Any]:
        alpha, beta, v, v_prev, b_prev = carry
        w = s @ v - b_prev * v_prev
        a = jnp.vdot(v, w)
        w = w - a * v
        b = jnp.linalg.norm(w)
        return (alpha.at[j].set(a), beta.at[j].set(b), w / jnp.maximum(b, tiny), v, b)

    zero = jnp.zeros((), s.dtype)
    v0 = start_vector(n, s.dtype)
    init = (jnp.zeros((m,), s.dtype), jnp.zeros((m,), s.dtype), v0, jnp.zeros_like(v0), zero)
    alpha, beta, *_ = jax.lax.fori_loop(0, m, body, init)
    t = jnp.diag(alpha) + jnp.diag(beta[:-1], 1) + jnp.diag(beta[:-1], -1)
    ritz = jnp.linalg.eigvalsh(t)
    return ritz[0], ritz[-1]


@jax.jit
def _randomized_eigenvalue_range(k: Any) -> tuple[Any, Any]:
    """``(lowest, largest)`` estimates: the Ritz range of ``LANCZOS_STEPS`` Lanczos steps
    (the lowest Ritz value bounds the lowest eigenvalue from above, so a clearly
    negative one is real), and the lowest diagonal entry. On ``k`` itself, whose
    symmetry is checked before (its symmetric part would cost a transposed copy,
    3 ms at n = 1024, as long as 40 steps)."""
    lowest, largest = _lanczos_ritz_range(k, LANCZOS_STEPS)
    lowest = jnp.minimum(lowest, jnp.min(jnp.diagonal(k)))
    return lowest, jnp.maximum(jnp.abs(largest), jnp.abs(lowest))


@jax.jit
def _screening_eigenvalue_range(k: Any) -> tuple[Any, Any]:
    """:func:`_randomized_eigenvalue_range` of a single-precision copy of ``k``.

    The Lanczos steps are memory-bound, and the copy halves the bytes each one reads:
    n = 1024, float64, 8.3 ms -> 3.2 ms with the copy. Its Ritz values are within a
    few single-precision epsilons of ``max|eig|`` (6e-8) of the double-precision
    ones, below float64's tolerance (1e-6), so a kernel it flags is decided again in
    the kernel's own precision (:func:`check_psd`)."""
    return _randomized_eigenvalue_range(k.astype(jnp.float32))


@jax.jit
def _passes_shifted_cholesky(k: Any, tol: Any) -> Any:
    """Whether ``S + (tol / 2) * b * I`` has a Cholesky factor, ``S = (K + K^T) / 2``.

    ``b <= max|eig(S)|`` is a cheap lower bound (the largest ``|S_ii|`` and the
    largest magnitude of the Ritz values of ``LANCZOS_STEPS_SHIFT`` Lanczos steps),
    returned too: an estimate of the largest eigenvalue for the ``auto`` solver
    choice. Success means ``min(eig) >= -(tol / 2) * b - e`` with ``e`` the round-off
    of the factorization (far below ``(tol / 2) * max|eig|``, as ``tol >= 1000 eps``),
    so ``min(eig) >= -tol * max|eig|``: the kernel passes the exact check.
    Failure decides nothing (the exact check then runs).
    """
    s = 0.5 * (k + k.T)
    n = s.shape[0]
    lowest, largest = _lanczos_ritz_range(s, LANCZOS_STEPS_SHIFT)
    bound = jnp.maximum(jnp.max(jnp.abs(jnp.diagonal(s))),
                        jnp.maximum(jnp.abs(lowest), jnp.abs(largest)))
    shifted = s + (0.5 * tol * bound) * jnp.eye(n, dtype=s.dtype)
    factor = jax.lax.linalg.cholesky(shifted, symmetrize_input=False)
    return jnp.all(jnp.isfinite(factor)), bound


def check_psd(k: Any, name: str, dtype: Any, hint: str = "") -> float | None:
    """A flat kernel must be positive semi-definite up to round-off (eagerly, when concrete).

    For up to ``PSD_EXACT_MAX_ROWS`` rows the check is exact: a shifted
    Cholesky factorization (O(n^3 / 3)) accepts a kernel whose lowest eigenvalue
    is clearly above the tolerance; otherwise (an indefinite kernel, or one
    close to the tolerance) one ``eigvalsh`` decides and gives the numbers for
    the message. Above ``PSD_EXACT_MAX_ROWS`` rows, ``LANCZOS_STEPS`` Lanczos steps (as
    many kernel products) estimate the lowest eigenvalue from above, which catches
    clearly indefinite kernels but may miss slightly negative ones; a double-precision
    kernel is screened on a single-precision copy first, and decided in its own
    precision only if the screen flags it (:func:`_screening_eigenvalue_range`).

    Returns an estimate (from below) of the largest eigenvalue, a by-product of
    the check, or ``None`` for a traced or empty kernel.
    """
    if not is_concrete(k):
        return None
    k = jnp.asarray(k)
    if k.size == 0:
        return None
    exact = k.shape[0] <= PSD_EXACT_MAX_ROWS
    if exact:
        _, tol = kernel_tolerances(dtype)
        passes, bound = concrete_call(_passes_shifted_cholesky, k, tol)
        if bool(passes):
            return float(bound)
    if exact:
        stats = _eigenvalue_range
    elif jnp.dtype(k.dtype).itemsize > 4:  # a single-precision screen first
        lowest, largest = (float(v) for v in concrete_call(_screening_eigenvalue_range, k))
        _, tol = kernel_tolerances(dtype)
        if lowest >= -tol * largest:
            return largest
        stats = _randomized_eigenvalue_range
    else:
        stats = _randomized_eigenvalue_range
    lowest, largest = (float(v) for v in concrete_call(stats, k))
    _check_eigenvalue_range(lowest, largest, name, dtype, hint)
    return largest


def check_psd_eigen(eigen: Any, name: str, dtype: Any, hint: str = "") -> None:
    """As :func:`check_psd`, from an existing ``Eigen`` (no new decomposition)."""
    if not is_concrete(eigen.lowest, eigen.evals):
        return
    if eigen.evals.size == 0:
        return
    with jax.ensure_compile_time_eval():
        lowest = float(eigen.lowest)
        largest = max(float(jnp.max(eigen.evals)), abs(lowest))
    _check_eigenvalue_range(lowest, largest, name, dtype, hint)


# ---------------------------------------------------------------------------
# Solver options and max_learning_rate


def check_max_steps(max_steps: Any) -> int:
    """``max_steps`` must be a positive int."""
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)):
        raise TypeError(f"`max_steps` must be a positive int; got {describe(max_steps)}.")
    if max_steps <= 0:
        raise ValueError(f"`max_steps` must be a positive int; got {int(max_steps)}.")
    return int(max_steps)


def check_tolerance(name: str, value: Any, default: float) -> float:
    """A solver tolerance (``rtol``/``atol``): ``None`` (default) or a positive finite float."""
    if value is None:
        return default
    expectation = "None or a positive finite float"
    if not is_concrete(value):
        raise TypeError(f"`{name}` must be {expectation} known before tracing; got a tracer.")
    number = _scalar(value, name, expectation)
    if not (math.isfinite(number) and number > 0):
        raise ValueError(f"`{name}` must be {expectation}; got {number!r}.")
    return number


def check_y_train_size(y_train_size: Any, default: int) -> int:
    """``y_train_size`` for ``max_learning_rate``: ``None`` or a positive int."""
    if y_train_size is None:
        return default
    if isinstance(y_train_size, bool) or not isinstance(y_train_size, (int, np.integer)):
        raise TypeError(
            f"`y_train_size` must be None or a positive int; got {describe(y_train_size)}."
        )
    if y_train_size <= 0:
        raise ValueError(f"`y_train_size` must be None or a positive int; got {y_train_size}.")
    return int(y_train_size)


def check_eps(eps: Any) -> float:
    """``eps`` for ``max_learning_rate``: a finite non-negative scalar."""
    expectation = "a finite non-negative scalar"
    value = _scalar(eps, "eps", expectation)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"`eps` must be {expectation}; got {value!r}.")
    return value
