"""Property-based tests of the predictors' invariants (hypothesis).

Bounded for speed: compilation dominates, so examples are drawn from a few
output layouts (1-3 dimensional outputs, several ``trace_axes`` including
negative ones) and time shapes, and the ``gradient_descent`` properties use
one loss function object and one layout, so that their predictors share
compiled code. Most properties use the closed form ``gradient_descent_mse``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import ntkflow as nt
from tests.conftest import DTYPE, X64

ODEState = nt.predict.ODEState

SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None)
FEW = settings(max_examples=10, deadline=None, derandomize=True, database=None)

#: (output shape, trace_axes); the batch axis 0 is never traced.
LAYOUTS = [
    ((4,), ()),
    ((3, 2), (-1,)),
    ((3, 2), ()),
    ((2, 3, 2), (2,)),
    ((2, 2, 3), (1, -1)),
    ((2, 3, 2), (-2,)),
]
N_TEST = 2
#: Relative tolerance (to the outputs' scale) for equalities that hold exactly in
#: exact arithmetic: closed form, and ODE solves at the default tolerances.
RTOL_MSE = 1e-9 if X64 else 2e-5
RTOL_ODE = 1e-6 if X64 else 1e-3


def log_cosh(fx, y):
    """The one loss object of the ``gradient_descent`` properties (shared compilation)."""
    return jnp.mean(jnp.log(jnp.cosh(fx - y)))


class Problem(NamedTuple):
    k_tt: np.ndarray
    k_st: np.ndarray
    y: np.ndarray
    f0: np.ndarray
    ft0: np.ndarray
    trace_axes: tuple[int, ...]


def _interleave(flat: np.ndarray, first: tuple[int, ...], second: tuple[int, ...]) -> np.ndarray:
    """Flat ``(prod(first), prod(second))`` kernel to the interleaved layout."""
    m = len(first)
    k = flat.reshape(first + second)
    return np.transpose(k, [i for pair in zip(range(m), range(m, 2 * m), strict=True)
                            for i in pair])


def make_problem(shape, trace_axes, seed, deficient, dtype=DTYPE) -> Problem:
    """Train and test kernels from one PSD kernel ``J J^T / r`` on all points.

    ``deficient``: rank below the number of training rows.
    """
    ndim = len(shape)
    traced = {a % ndim for a in trace_axes}
    kept = [a for a in range(ndim) if a not in traced]
    test_shape = (N_TEST,) + tuple(shape[1:])
    rows_shape = tuple(shape[a] for a in kept)
    test_rows_shape = tuple(test_shape[a] for a in kept)
    rows, test_rows = math.prod(rows_shape), math.prod(test_rows_shape)
    rng = np.random.default_rng(seed)
    rank = max(1, rows - 1) if deficient else 2 * (rows + test_rows)
    j = rng.standard_normal((rows + test_rows, rank))
    full = j @ j.T / rank
    full = 0.5 * (full + full.T)
    cast = lambda a: np.asarray(a, dtype)
    return Problem(
        cast(_interleave(full[:rows, :rows], rows_shape, rows_shape)),
        cast(_interleave(full[rows:, :rows], test_rows_shape, rows_shape)),
        cast(rng.standard_normal(shape)),
        cast(0.3 * rng.standard_normal(shape)),
        cast(0.3 * rng.standard_normal(test_shape)),
        tuple(trace_axes),
    )


@st.composite
def problems(draw, layouts=LAYOUTS):
    shape, trace_axes = draw(st.sampled_from(layouts))
    return make_problem(shape, trace_axes, draw(st.integers(0, 2**16)), draw(st.booleans()))


TIME = st.one_of(st.sampled_from([0.0, 0.5, 2.5]), st.floats(0.0, 5.0, width=32))


@st.composite
def times(draw, shapes=((), (4,), (2, 2))):
    """Times of a few shapes, any order, with repeats and zeros."""
    shape = draw(st.sampled_from(shapes))
    values = draw(st.lists(TIME, min_size=math.prod(shape), max_size=math.prod(shape)))
    return np.asarray(values, DTYPE).reshape(shape)


def assert_close(a, b, rtol):
    """Entries agree to ``rtol`` times the scale of ``b`` (plus one)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = 1.0 + float(np.max(np.abs(b), initial=0.0))
    err = float(np.max(np.abs(a - b), initial=0.0))
    assert err <= rtol * scale, f"max error {err:.3g} > {rtol:g} * {scale:.3g}"


def _mse(p: Problem, lr=1.0):
    return nt.predict.gradient_descent_mse(p.k_tt, p.y, lr, trace_axes=p.trace_axes)


# ---------------------------------------------------------------------------
# Closed form (gradient_descent_mse)


@SETTINGS
@given(data=st.data(), p=problems(), t=times())
def test_mse_permutation_equivariance(data, p, t):
    n = p.y.shape[0]
    perm = np.asarray(data.draw(st.permutations(range(n))))
    train, test = _mse(p)(t, p.f0, p.ft0, p.k_st)
    q = p._replace(k_tt=p.k_tt[perm][:, perm], k_st=p.k_st[:, perm], y=p.y[perm], f0=p.f0[perm])
    train_p, test_p = _mse(q)(t, q.f0, q.ft0, q.k_st)
    lead = (slice(None),) * np.ndim(t)
    assert_close(train_p, train[lead + (perm,)], RTOL_MSE)
    assert_close(test_p, test, RTOL_MSE)


@SETTINGS
@given(p=problems(), t=times(), lr=st.sampled_from([0.25, 3.0]))
def test_mse_only_lr_times_t_matters(p, t, lr):
    a = _mse(p, lr)(t, p.f0, p.ft0, p.k_st)
    b = _mse(p, 1.0)(lr * t, p.f0, p.ft0, p.k_st)
    for u, v in zip(a, b, strict=True):
        assert_close(u, v, RTOL_MSE)


@SETTINGS
@given(p=problems(), t=times(), zero_init=st.booleans())
def test_mse_train_only_and_test_only_equal_joint_call(p, t, zero_init):
    f0 = np.zeros_like(p.f0) if zero_init else p.f0
    predict = _mse(p)
    train, test = predict(t, f0, p.ft0, p.k_st)
    assert_close(predict(t, f0), train, RTOL_MSE)
    if zero_init:  # test-only calls start the training outputs at zero (neural-tangents)
        assert_close(predict(t, None, p.ft0, p.k_st), test, RTOL_MSE)


@SETTINGS
@given(p=problems(), t1=TIME, t2=times())
def test_mse_resume_equals_one_call(p, t1, t2):
    predict = _mse(p)
    f1, g1 = predict(t1, p.f0, p.ft0, p.k_st)
    train, test = predict(t2, f1, g1, p.k_st)
    train_1, test_1 = predict(t1 + t2, p.f0, p.ft0, p.k_st)
    assert_close(train, train_1, 10 * RTOL_MSE)
    assert_close(test, test_1, 10 * RTOL_MSE)


@SETTINGS
@given(p=problems(), t=times(shapes=((4,), (2, 2))))
def test_mse_grid_equals_per_time_calls(p, t):
    predict = _mse(p)
    train, test = predict(t, p.f0, p.ft0, p.k_st)
    assert train.shape == t.shape + p.y.shape and test.shape == t.shape + p.ft0.shape
    for idx in np.ndindex(t.shape):
        a, b = predict(t[idx], p.f0, p.ft0, p.k_st)
        assert_close(train[idx], a, RTOL_MSE)
        assert_close(test[idx], b, RTOL_MSE)


@SETTINGS
@given(p=problems(), shape=st.sampled_from([(), (1,), (2, 2)]))
def test_mse_t_zero_is_the_identity(p, shape):
    train, test = _mse(p)(np.zeros(shape, DTYPE), p.f0, p.ft0, p.k_st)
    np.testing.assert_array_equal(train, np.broadcast_to(p.f0, train.shape))
    np.testing.assert_array_equal(test, np.broadcast_to(p.ft0, test.shape))


@SETTINGS
@given(p=problems(), t=st.sampled_from([None, np.inf, [0.0, 1e3, np.inf, 1e9]]),
       diag_reg=st.sampled_from([0.0, 1e-3]))
def test_mse_finite_for_psd_kernels_including_rank_deficient(p, t, diag_reg):
    predict = nt.predict.gradient_descent_mse(p.k_tt, p.y, diag_reg=diag_reg,
                                              trace_axes=p.trace_axes)
    train, test = predict(t, p.f0, p.ft0, p.k_st)
    assert bool(jnp.all(jnp.isfinite(train))) and bool(jnp.all(jnp.isfinite(test)))


@FEW
@given(seed=st.integers(0, 2**16), k_dtype=st.sampled_from([np.float32, np.float64]),
       y_dtype=st.sampled_from([np.float32, np.float64]), t=times(shapes=((4,),)))
def test_mse_dtypes(seed, k_dtype, y_dtype, t):
    """The result dtype is JAX's promotion of the inputs; values do not depend on it
    beyond the precision of the lower one."""
    p = make_problem((3, 2), (-1,), seed, False, np.float64)
    k, k_st, y = p.k_tt.astype(k_dtype), p.k_st.astype(k_dtype), p.y.astype(y_dtype)
    f0, ft0 = p.f0.astype(y_dtype), p.ft0.astype(y_dtype)
    train, test = nt.predict.gradient_descent_mse(k, y)(t, f0, ft0, k_st)
    expected = jnp.result_type(float, k, y)
    assert train.dtype == expected and test.dtype == expected
    ref = make_problem((3, 2), (-1,), seed, False, DTYPE)
    ref_train, ref_test = _mse(ref)(t, ref.f0, ref.ft0, ref.k_st)
    rtol = RTOL_MSE if X64 and k_dtype == y_dtype == np.float64 else 2e-5
    assert_close(train, ref_train, rtol)
    assert_close(test, ref_test, rtol)


# ---------------------------------------------------------------------------
# ODE solves (gradient_descent): one loss object, one layout, three times.

GD_LAYOUT = ((3, 2), (-1,))


def _gd(p: Problem, lr=1.0, momentum=None):
    return nt.predict.gradient_descent(log_cosh, p.k_tt, p.y, lr, momentum, p.trace_axes,
                                       solver="tsit5")


GD_PROBLEMS = problems(layouts=[GD_LAYOUT])
GD_TIMES = times(shapes=((3,),))


@FEW
@given(data=st.data(), p=GD_PROBLEMS, t=GD_TIMES, lr=st.sampled_from([0.5, 2.0]))
def test_gd_permutation_equivariance_and_lr_times_t(data, p, t, lr):
    perm = np.asarray(data.draw(st.permutations(range(p.y.shape[0]))))
    train, test = _gd(p, lr)(t, p.f0, p.ft0, p.k_st)
    q = p._replace(k_tt=p.k_tt[perm][:, perm], k_st=p.k_st[:, perm], y=p.y[perm], f0=p.f0[perm])
    train_p, test_p = _gd(q, lr)(t, q.f0, q.ft0, q.k_st)
    assert_close(train_p, train[:, perm], RTOL_ODE)
    assert_close(test_p, test, RTOL_ODE)
    # Without momentum only lr * t matters.
    train_1, test_1 = _gd(p, 1.0)(lr * t, p.f0, p.ft0, p.k_st)
    assert_close(train_1, train, RTOL_ODE)
    assert_close(test_1, test, RTOL_ODE)


@FEW
@given(p=GD_PROBLEMS, t=GD_TIMES, momentum=st.sampled_from([None, 0.5]))
def test_gd_calls_agree(p, t, momentum):
    """Train-only and test-only calls equal the joint call; a time's result does not
    depend on the other requested times; t = 0 is the identity."""
    predict = _gd(p, 1.0, momentum)
    train, test = predict(t, p.f0, p.ft0, p.k_st)
    assert_close(predict(t, p.f0), train, RTOL_ODE)
    zero_train, zero_test = predict(t, 0.0, p.ft0, p.k_st)
    assert_close(predict(t, None, p.ft0, p.k_st), zero_test, RTOL_ODE)
    for i in range(t.shape[0]):
        a, b = predict(np.full_like(t, t[i]), p.f0, p.ft0, p.k_st)
        assert_close(a[0], train[i], RTOL_ODE)
        assert_close(b[0], test[i], RTOL_ODE)
    t0 = np.concatenate([t[:2], [0.0]]).astype(DTYPE)
    a, b = predict(t0, p.f0, p.ft0, p.k_st)
    np.testing.assert_allclose(a[2], p.f0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(b[2], p.ft0, rtol=0, atol=1e-6)
    assert bool(jnp.all(jnp.isfinite(zero_train)))


@FEW
@given(p=GD_PROBLEMS, t1=GD_TIMES, t2=GD_TIMES, momentum=st.sampled_from([None, 0.5]))
def test_gd_resume_from_state_equals_one_call(p, t1, t2, momentum):
    predict = _gd(p, 1.0, momentum)
    s1 = predict(t1, ODEState(p.f0, p.ft0), k_test_train=p.k_st)
    last = jax.tree.map(lambda x: x[-1], s1)
    if momentum is None:
        assert last.qx_train is None
    s2 = predict(t2, last, k_test_train=p.k_st)
    direct = predict(t1[-1] + t2, ODEState(p.f0, p.ft0), k_test_train=p.k_st)
    for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(direct), strict=True):
        assert_close(a, b, RTOL_ODE)
