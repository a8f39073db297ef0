"""Core predictors against independent references: eigh/expm closed forms,
tight solves and a trained linearized network; invariants of the API."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

import ntkflow as nt
from tests.conftest import DTYPE, TOL, X64, float32_power_law_problem, psd_kernel, rel_err

mse = lambda fx, y: 0.5 * jnp.mean((fx - y) ** 2)
cross_entropy = lambda fx, y: -jnp.mean(jax.nn.log_softmax(fx) * y)
log_cosh = lambda fx, y: jnp.mean(jnp.log(jnp.cosh(fx - y)))


def _problem(n=6, k=3, n_test=4, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    j = jax.random.normal(keys[0], (n + n_test, 3 * n), DTYPE)
    full = j @ j.T / (3 * n)
    k_tt, k_st = full[:n, :n], full[n:, :n]
    y = jax.random.normal(keys[1], (n, k), DTYPE)
    f0 = 0.3 * jax.random.normal(keys[2], (n, k), DTYPE)
    ft0 = 0.3 * jax.random.normal(keys[3], (n_test, k), DTYPE)
    return k_tt, k_st, y, f0, ft0


def _expm_reference(k_tt, k_st, y, f0, ft0, lr, t, momentum=None):
    """Exact MSE dynamics of train+test outputs by scipy's expm (float64)."""
    k_tt, k_st, y, f0, ft0 = (np.asarray(a, np.float64) for a in (k_tt, k_st, y, f0, ft0))
    n, p = k_tt.shape[0], k_st.shape[0]
    size = y.size
    full = np.block([[k_tt], [k_st]])  # (n + p, n)
    # Residual coordinates: z = [f - y; f_test]; dz/dtau = -full @ (f - y) / size.
    a = np.zeros((n + p, n + p))
    a[:, :n] = -full / size
    z0 = np.concatenate([f0 - y, ft0])
    if momentum is None:
        out = [scipy.linalg.expm(a * lr * ti) @ z0 for ti in np.ravel(t)]
    else:
        d = (momentum - 1) / np.sqrt(lr)
        big = np.block([[np.zeros_like(a), np.eye(n + p)], [a, d * np.eye(n + p)]])
        w0 = np.concatenate([z0, np.zeros_like(z0)])
        out = [(scipy.linalg.expm(big * np.sqrt(lr) * ti) @ w0)[: n + p] for ti in np.ravel(t)]
    out = np.stack(out)
    return out[:, :n] + y, out[:, n:]


@pytest.mark.parametrize("momentum", [None, 0.9])
def test_ode_matches_expm_for_mse(momentum):
    k_tt, k_st, y, f0, ft0 = _problem()
    lr, t = 0.7, np.array([0.0, 0.5, 3.0, 20.0])
    ref_train, ref_test = _expm_reference(k_tt, k_st, y, f0, ft0, lr, t, momentum)
    predict = nt.predict.gradient_descent(mse, k_tt, y, lr, momentum)
    train, test = predict(t, f0, ft0, k_st)
    assert train.shape == (4,) + y.shape and test.shape == (4,) + ft0.shape
    assert rel_err(train, ref_train) < 10 * TOL["rtol"]
    assert rel_err(test, ref_test) < 10 * TOL["rtol"]


def test_closed_form_matches_expm():
    k_tt, k_st, y, f0, ft0 = _problem()
    lr, t = 0.7, np.array([[0.0, 0.5], [3.0, 20.0]])
    ref_train, ref_test = _expm_reference(k_tt, k_st, y, f0, ft0, lr, t)
    train, test = nt.predict.gradient_descent_mse(k_tt, y, lr)(t, f0, ft0, k_st)
    assert train.shape == (2, 2) + y.shape
    assert rel_err(train.reshape(ref_train.shape), ref_train) < TOL["rtol"] * 10
    assert rel_err(test.reshape(ref_test.shape), ref_test) < TOL["rtol"] * 10


@pytest.mark.parametrize("loss", [mse, log_cosh, cross_entropy], ids=["mse", "logcosh", "ce"])
def test_unsorted_and_repeated_times_equal_separate_calls(loss):
    k_tt, k_st, y, f0, ft0 = _problem()
    y = jax.nn.one_hot(jnp.arange(6) % 3, 3, dtype=DTYPE) if loss is cross_entropy else y
    predict = nt.predict.gradient_descent(loss, k_tt, y, 1.0)
    ts = [5.0, 1.0, 5.0, 0.0, 2.5]
    train, test = predict(ts, f0, ft0, k_st)
    for i, ti in enumerate(ts):
        a, b = predict(ti, f0, ft0, k_st)
        np.testing.assert_allclose(train[i], a, rtol=50 * TOL["rtol"], atol=50 * TOL["atol"])
        np.testing.assert_allclose(test[i], b, rtol=50 * TOL["rtol"], atol=50 * TOL["atol"])
    np.testing.assert_allclose(train[3], f0, rtol=0, atol=1e-6)  # t = 0 is the identity


@pytest.mark.parametrize("solver", ["auto", "tsit5", "expo", "rodas5p", "kvaerno5"])
@pytest.mark.parametrize("loss", [mse, cross_entropy], ids=["mse", "ce"])
def test_no_times_give_empty_outputs_as_the_closed_forms_do(loss, solver):
    k_tt, k_st, y, f0, ft0 = _problem()
    y = jax.nn.one_hot(jnp.arange(6) % 3, 3, dtype=DTYPE) if loss is cross_entropy else y
    closed = nt.predict.gradient_descent_mse(k_tt, y)
    for momentum in (None, 0.9):
        predict = nt.predict.gradient_descent(loss, k_tt, y, 0.5, momentum, solver=solver)
        for t in ([], np.zeros((2, 0)), jnp.zeros((0,), DTYPE)):
            train, test = predict(t, f0, ft0, k_st)
            ref_train, ref_test = closed(t, f0, ft0, k_st)
            assert train.shape == ref_train.shape == np.shape(t) + y.shape
            assert test.shape == ref_test.shape == np.shape(t) + ft0.shape
            assert train.dtype == f0.dtype and test.dtype == ft0.dtype
        jitted = jax.jit(lambda f: predict(jnp.zeros((0,), DTYPE), f))(f0)  # noqa: B023
        assert jitted.shape == (0,) + y.shape
        state = predict([], nt.predict.ODEState(f0, ft0), None, k_st)
        assert state.fx_train.shape == (0,) + y.shape and state.fx_test.shape == (0,) + ft0.shape
        if momentum is not None:
            assert state.qx_train.shape == (0,) + y.shape


@pytest.mark.parametrize("half", [jnp.bfloat16, jnp.float16], ids=["bfloat16", "float16"])
def test_half_precision_inputs_compute_in_float32(half):
    """Half-precision kernels and targets (e.g. a kernel computed in bfloat16) are computed
    with in float32: the same outputs as float32 arrays of the same values. (They crashed
    in XLA's eigh/solves, or, for gradient_descent_mse, gave bfloat16 outputs.)"""
    k_tt, k_st, y, f0, ft0 = _problem()
    halves = [a.astype(half) for a in (k_tt, k_st, y)]
    k32, kst32, y32 = (a.astype(jnp.float32) for a in halves)
    t = np.array([1.0, np.inf])
    for build in (lambda k, y_: nt.predict.gradient_descent(log_cosh, k, y_),
                  lambda k, y_: nt.predict.gradient_descent_mse(k, y_)):
        got = build(halves[0], halves[2])(t, 0.0, 0.0, halves[1])
        want = build(k32, y32)(t, 0.0, 0.0, kst32)
        for a, b in zip(got, want, strict=True):
            assert a.dtype == jnp.float32  # float32 inputs keep float32 with x64 too
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    steps = nt.predict.gradient_descent_discrete(log_cosh, halves[0], halves[2])(3, 0.0)
    assert steps.dtype != half
    lr = nt.predict.max_learning_rate(halves[0])
    assert lr == pytest.approx(nt.predict.max_learning_rate(k32), rel=1e-6)


@pytest.mark.parametrize("num_times", [3, 40])
def test_mse_float32_test_outputs_on_an_ill_conditioned_kernel(num_times):
    """Float32 inputs, cond(K) = 1e4: ``gradient_descent_mse``'s test outputs against the
    float64 closed form on the same inputs. The gradient integral is large on the slow
    modes, where ``K_test V`` is small: read out through a float32 ``K_test @ V`` they were
    off by 1.2e-4 at the converged horizon (1.9e-5 at the mid one); compensated, with the
    float64 eigenvectors' rounding error, 1.7e-6. 3 times form ``S`` first, 40 use
    ``K_test (V + V_lo)`` for all times (``MSEFlow.test_delta``)."""
    k_tt, k_st, y, f0, ft0, lam = float32_power_law_problem(128, 32, 4, seed=1)
    mid, converged = (10 * y.size / np.sqrt(lam[0] * lam[-1]), 10 * y.size / lam[-1])
    ts = np.concatenate([[mid, converged, np.inf], np.logspace(0, 7, num_times - 3)])
    ev, v = np.linalg.eigh(k_tt.astype(np.float64))
    coeff = v.T @ (f0 - y).astype(np.float64)
    kv = k_st.astype(np.float64) @ v
    predict = nt.predict.gradient_descent_mse(k_tt, y)
    train, test = predict(ts.astype(np.float32), f0, ft0, k_st)
    assert train.dtype == test.dtype == jnp.float32
    for i, t in enumerate(ts):
        ref_train = y + v @ (np.exp(-ev * t / y.size)[:, None] * coeff)
        ref_test = ft0 - kv @ ((-np.expm1(-ev * t / y.size) / ev)[:, None] * coeff)
        assert np.max(np.abs(np.asarray(train[i], np.float64) - ref_train)) < 5e-6
        assert np.max(np.abs(np.asarray(test[i], np.float64) - ref_test)) < 1e-5


def test_mse_infinite_time_matches_closed_form():
    k_tt, k_st, y, f0, ft0 = _problem()
    exact = nt.predict.gradient_descent_mse(k_tt, y)(None, f0, ft0, k_st)
    for t in (None, np.inf):
        train, test = nt.predict.gradient_descent(mse, k_tt, y, 1.0)(t, f0, ft0, k_st)
        assert rel_err(train, exact[0]) < 100 * TOL["rtol"]
        assert rel_err(test, exact[1]) < 100 * TOL["rtol"]
    np.testing.assert_allclose(exact[0], y, rtol=10 * TOL["rtol"], atol=10 * TOL["atol"])


def test_cross_entropy_infinite_time_is_finite_and_best():
    k_tt, k_st, _, f0, ft0 = _problem()
    y = jax.nn.one_hot(jnp.arange(6) % 3, 3, dtype=DTYPE)
    predict = nt.predict.gradient_descent(cross_entropy, k_tt, y, 1.0)
    ts = jnp.array([0.0, 1.0, 10.0, 100.0, 1000.0, jnp.inf])
    train, test = predict(ts, f0, ft0, k_st)
    assert bool(jnp.all(jnp.isfinite(train))) and bool(jnp.all(jnp.isfinite(test)))
    losses = np.array([float(cross_entropy(f, y)) for f in train])
    assert np.all(np.diff(losses) <= 1e-7), losses
    assert np.all(jnp.argmax(train[-1], -1) == jnp.argmax(y, -1))


@pytest.mark.parametrize(
    "shape, trace_axes",
    [((5, 3), (-1,)), ((5, 3), ()), ((5, 2, 3), (-1,)), ((5, 2, 3), (1,)), ((5, 2, 3), (1, 2)),
     ((5, 2, 3), ())],
)
def test_trace_axes_match_full_kernel(shape, trace_axes):
    """A kernel with traced axes equals the full kernel Theta (x) I with trace_axes=()."""
    key = jax.random.PRNGKey(1)
    ndim = len(shape)
    axes = tuple(a % ndim for a in trace_axes)
    kept = [a for a in range(ndim) if a not in axes]
    rows = int(np.prod([shape[a] for a in kept]))
    theta = psd_kernel(key, rows)
    traced = int(np.prod([shape[a] for a in axes]))
    kept_shape = tuple(shape[a] for a in kept)
    # Interleaved kernel for the traced layout.
    k_int = theta.reshape(kept_shape + kept_shape)
    nk = len(kept)
    perm = [i for pair in zip(range(nk), range(nk, 2 * nk), strict=True) for i in pair]
    k_int = jnp.transpose(k_int, perm)
    # Full kernel over all output entries: Theta (x) I_traced, in the (kept..., traced...) order.
    full = jnp.kron(theta, jnp.eye(traced, dtype=DTYPE))
    order = kept + list(axes)
    full_shape = tuple(shape[a] for a in order)
    full = full.reshape(full_shape + full_shape)
    inv = np.argsort(order)
    full = jnp.transpose(full, list(inv) + [ndim + i for i in inv])
    interleave = [i for pair in zip(range(ndim), range(ndim, 2 * ndim), strict=True) for i in pair]
    full = jnp.transpose(full, interleave)
    y = jax.random.normal(jax.random.PRNGKey(2), shape, DTYPE)
    t = jnp.array([0.5, 4.0])
    for fn in (lambda k, ax: nt.predict.gradient_descent(log_cosh, k, y, 1.0, None, ax)(t),
               lambda k, ax: nt.predict.gradient_descent_mse(k, y, 1.0, trace_axes=ax)(t)):
        a = fn(k_int, trace_axes)
        b = fn(full, ())
        assert a.shape == (2,) + shape
        np.testing.assert_allclose(a, b, rtol=50 * TOL["rtol"], atol=50 * TOL["atol"])


def test_ode_state_resume_continues_trajectory():
    k_tt, k_st, y, f0, ft0 = _problem()
    predict = nt.predict.gradient_descent(log_cosh, k_tt, y, 0.5, 0.8)
    s1 = predict(2.0, nt.predict.ODEState(f0, ft0), k_test_train=k_st)
    assert isinstance(s1, nt.predict.ODEState) and s1.qx_train is not None
    s2 = predict(3.0, s1, k_test_train=k_st)
    s_direct = predict(5.0, nt.predict.ODEState(f0, ft0), k_test_train=k_st)
    for a, b in zip(jax.tree.leaves(s2), jax.tree.leaves(s_direct), strict=True):
        np.testing.assert_allclose(a, b, rtol=50 * TOL["rtol"], atol=50 * TOL["atol"])
    with pytest.raises(ValueError, match="momentum"):
        nt.predict.gradient_descent(log_cosh, k_tt, y)(1.0, s1, k_test_train=k_st)


@pytest.mark.parametrize("momentum", [None, 0.9], ids=["gd", "momentum"])
@pytest.mark.parametrize("t", [2.0, [0.5, 2.0]], ids=["scalar", "list"])
def test_jit_over_the_outputs_with_python_times(t, momentum):
    """``jax.jit(lambda f: predict(t, f))`` with ``t`` a Python number or list (concrete while
    the outputs are traced): once a ``TracerBoolConversionError`` without momentum."""
    k_tt, k_st, y, f0, ft0 = _problem()
    predict = nt.predict.gradient_descent(log_cosh, k_tt, y, 0.5, momentum)
    eager = predict(t, f0, ft0, k_st)
    jitted = jax.jit(lambda f, ft: predict(t, f, ft, k_st))(f0, ft0)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(a, b, rtol=10 * TOL["rtol"], atol=10 * TOL["atol"])


def test_jit_grad_vmap():
    k_tt, k_st, y, f0, ft0 = _problem()
    predict = nt.predict.gradient_descent(log_cosh, k_tt, y, 1.0)
    t = jnp.array([0.5, 2.0])
    eager = predict(t, f0, ft0, k_st)
    jitted = jax.jit(predict)(t, f0, ft0, k_st)
    for a, b in zip(eager, jitted, strict=True):
        np.testing.assert_allclose(a, b, rtol=10 * TOL["rtol"], atol=10 * TOL["atol"])
    vm = jax.vmap(lambda s: predict(s, f0))(t)
    np.testing.assert_allclose(vm, eager[0], rtol=50 * TOL["rtol"], atol=50 * TOL["atol"])

    # d/dt <w, f(t)> = -<w, K grad L(f(t))> (times lr = 1).
    w = jnp.linspace(-1.0, 1.0, y.size, dtype=DTYPE).reshape(y.shape)
    dfdt = jax.grad(lambda s: jnp.vdot(w, predict(s, f0)))(jnp.asarray(1.0, DTYPE))
    f1 = predict(1.0, f0)
    expected = -jnp.vdot(w, k_tt @ jax.grad(lambda f: log_cosh(f, y))(f1))
    np.testing.assert_allclose(dfdt, expected, rtol=1e-3 if X64 else 2e-2, atol=1e-4)

    # Gradient with respect to the kernel, against central differences of the MSE closed form.
    def loss_of_kernel(scale):
        p = nt.predict.gradient_descent_mse(k_tt * scale, y, 1.0)
        return jnp.sum(p(3.0, f0, ft0, k_st * scale)[1] ** 2)

    g = jax.grad(loss_of_kernel)(jnp.asarray(1.0, DTYPE))
    h = 1e-5 if X64 else 1e-2
    fd = (loss_of_kernel(1.0 + h) - loss_of_kernel(1.0 - h)) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-5 if X64 else 5e-2)


@pytest.mark.parametrize("momentum", [None, 0.8])
def test_eager_and_jitted_predictors_agree_on_states_and_test_outputs(momentum):
    """Concrete calls (inputs converted and checked in one pass) match traced ones."""
    k_tt, k_st, y, f0, ft0 = _problem(n=5, k=2, n_test=3)
    k_full = jnp.einsum("ij,ab->ijab", k_tt, jnp.eye(2, dtype=DTYPE))
    k_st_full = jnp.einsum("ij,ab->ijab", k_st, jnp.eye(2, dtype=DTYPE))
    predict = nt.predict.gradient_descent(
        log_cosh, k_full, y, 0.5, momentum, trace_axes=(), solver="tsit5"
    )
    t = jnp.array([[2.0, 0.5], [0.0, 1.0]])
    state0 = nt.predict.ODEState(f0, ft0)
    eager = predict(t, state0, k_test_train=k_st_full)
    jitted = jax.jit(lambda t, s, k: predict(t, s, k_test_train=k))(t, state0, k_st_full)
    assert jax.tree.structure(eager) == jax.tree.structure(jitted)
    assert eager.fx_train.shape == (2, 2) + y.shape and eager.fx_test.shape == (2, 2) + ft0.shape
    assert (eager.qx_train is None) == (momentum is None)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        np.testing.assert_allclose(a, b, rtol=10 * TOL["rtol"], atol=10 * TOL["atol"])
    train, test = predict(t, f0.tolist(), np.asarray(ft0), np.asarray(k_st_full))
    np.testing.assert_allclose(train, eager.fx_train, rtol=TOL["rtol"], atol=TOL["atol"])
    np.testing.assert_allclose(test, eager.fx_test, rtol=TOL["rtol"], atol=TOL["atol"])


def test_lr_times_t_is_all_that_matters_without_momentum():
    k_tt, k_st, y, f0, ft0 = _problem()
    a = nt.predict.gradient_descent(log_cosh, k_tt, y, 2.0)(1.5, f0, ft0, k_st)
    b = nt.predict.gradient_descent(log_cosh, k_tt, y, 0.5)(6.0, f0, ft0, k_st)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u, v, rtol=50 * TOL["rtol"], atol=50 * TOL["atol"])


def test_permuting_training_points_permutes_outputs():
    k_tt, k_st, y, f0, ft0 = _problem()
    perm = np.array([3, 0, 5, 1, 4, 2])
    predict = nt.predict.gradient_descent(log_cosh, k_tt, y, 1.0)
    train, test = predict(2.0, f0, ft0, k_st)
    predict_p = nt.predict.gradient_descent(log_cosh, k_tt[perm][:, perm], y[perm], 1.0)
    train_p, test_p = predict_p(2.0, f0[perm], ft0, k_st[:, perm])
    np.testing.assert_allclose(train_p, train[perm], rtol=50 * TOL["rtol"], atol=50 * TOL["atol"])
    np.testing.assert_allclose(test_p, test, rtol=50 * TOL["rtol"], atol=50 * TOL["atol"])


def test_singular_kernel_mse_is_finite_everywhere():
    key = jax.random.PRNGKey(3)
    j = jax.random.normal(key, (8, 3), DTYPE)  # rank 3 < 8
    full = j @ j.T
    k_tt, k_st = full[:6, :6], full[6:, :6]
    y = jax.random.normal(key, (6, 2), DTYPE)
    predict = nt.predict.gradient_descent_mse(k_tt, y)
    for t in (None, np.inf, [0.0, 1e3, 1e9]):
        train, test = predict(t, 0.0, 0.0, k_st)
        assert bool(jnp.all(jnp.isfinite(train))) and bool(jnp.all(jnp.isfinite(test)))
    # Zero kernel: the test outputs do not move and the limit is finite (not 0/0).
    zero = jnp.zeros((6, 6), DTYPE)
    train, test = nt.predict.gradient_descent_mse(zero, y)([1.0, None and 0 or 5.0], 1.0, 2.0,
                                                           jnp.zeros((2, 6), DTYPE))
    np.testing.assert_allclose(train, 1.0)
    np.testing.assert_allclose(test, 2.0)


def test_numpy_inputs_and_mixed_dtypes():
    k_tt, k_st, y, f0, ft0 = _problem()
    a = nt.predict.gradient_descent_mse(np.asarray(k_tt), np.asarray(y))(
        np.array([1.0]), np.asarray(f0), np.asarray(ft0), np.asarray(k_st))
    b = nt.predict.gradient_descent_mse(k_tt, y)(jnp.array([1.0]), f0, ft0, k_st)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-6)
    # float32 kernel with (possibly float64) outputs (neural-tangents issue #112).
    c = nt.predict.gradient_descent(mse, np.asarray(k_tt, np.float32), np.asarray(y, np.float64))(
        1.0, np.asarray(f0, np.float64))
    assert c.dtype == (jnp.float64 if X64 else jnp.float32)
    np.testing.assert_allclose(c, b[0][0], rtol=1e-4, atol=1e-5)


def test_return_types_follow_neural_tangents():
    k_tt, k_st, y, f0, ft0 = _problem()
    predict = nt.predict.gradient_descent(mse, k_tt, y)
    assert isinstance(predict(1.0, f0), jax.Array)
    assert isinstance(predict(1.0, f0, ft0, k_st), tuple)
    test_only = predict(1.0, None, ft0, k_st)
    assert test_only.shape == ft0.shape
    np.testing.assert_allclose(test_only, predict(1.0, 0.0, ft0, k_st)[1], rtol=1e-6, atol=1e-7)
    scalar_init = predict(1.0, 0.0)
    assert scalar_init.shape == y.shape


def test_max_learning_rate():
    k = psd_kernel(jax.random.PRNGKey(4), 6)
    lam = float(np.linalg.eigvalsh(np.asarray(k, np.float64))[-1])
    assert nt.predict.max_learning_rate(k) == pytest.approx(2 * 6 / lam, rel=1e-5)
    assert nt.predict.max_learning_rate(k, 18, 0.9) == pytest.approx(2 * 1.9 * 18 / lam, rel=1e-5)
    k4 = jnp.einsum("ij,ab->ijab", k, jnp.eye(2, dtype=DTYPE))
    assert nt.predict.max_learning_rate(k4) == pytest.approx(2 * 12 / lam, rel=1e-5)
    # Under jax.jit (a traced kernel) a scalar array, the same number; a NaN kernel fails
    # at run time instead of giving NaN.
    jitted = jax.jit(nt.predict.max_learning_rate)
    assert float(jitted(k)) == pytest.approx(2 * 6 / lam, rel=1e-5)
    with pytest.raises(Exception, match="`ntk_train_train` must be finite"):
        jax.block_until_ready(jitted(k.at[0, 1].set(jnp.nan)))


def _mlp(params, x):
    (w1, b1), (w2, b2) = params
    h = jnp.tanh(x @ w1 / jnp.sqrt(x.shape[-1]) + b1)
    return h @ w2 / jnp.sqrt(h.shape[-1]) + b2


@pytest.mark.parametrize("loss, momentum", [(mse, None), (cross_entropy, None), (mse, 0.9)],
                         ids=["mse", "ce", "mse-momentum"])
def test_trained_linearized_network_agrees(loss, momentum):
    """Full-batch GD of the linearized network at a small learning rate."""
    keys = jax.random.split(jax.random.PRNGKey(5), 6)
    n, n_test, d, width, k = 8, 5, 4, 64, 3
    x = jax.random.normal(keys[0], (n + n_test, d), DTYPE)
    params = [(jax.random.normal(keys[1], (d, width), DTYPE), jnp.zeros(width, DTYPE)),
              (jax.random.normal(keys[2], (width, k), DTYPE), jnp.zeros(k, DTYPE))]
    labels = jax.random.randint(keys[3], (n,), 0, k)
    y = jax.nn.one_hot(labels, k, dtype=DTYPE)
    flat0, unravel = jax.flatten_util.ravel_pytree(params)
    f = lambda p, xs: _mlp(unravel(p), xs)
    jac = jax.jacobian(f)(flat0, x).reshape((n + n_test) * k, -1)
    f0_all = f(flat0, x)
    lin = lambda p: f0_all + (jac @ (p - flat0)).reshape(n + n_test, k)
    ntk = (jac @ jac.T).reshape(n + n_test, k, n + n_test, k).transpose(0, 2, 1, 3)
    k_tt, k_st = ntk[:n, :n], ntk[n:, :n]  # interleaved (n, n, k, k) for trace_axes=()
    lr = 0.01 * nt.predict.max_learning_rate(k_tt, momentum=momentum or 0.0)
    steps = 400
    opt = optax.sgd(lr, momentum=momentum)
    state = opt.init(flat0)
    p = flat0
    train_loss = lambda p: loss(lin(p)[:n], y)
    for _ in range(steps):
        g = jax.grad(train_loss)(p)
        upd, state = opt.update(g, state)
        p = optax.apply_updates(p, upd)
    trained = lin(p)
    predict = nt.predict.gradient_descent(loss, k_tt, y, lr, momentum, trace_axes=())
    train, test = predict(float(steps), f0_all[:n], f0_all[n:], k_st)
    moved = float(jnp.max(jnp.abs(trained - f0_all)))
    assert moved > 0.1  # training did something
    # Discrete GD differs from the flow at O(lr); momentum's heavy-ball ODE more (see README).
    tol = 0.02 if momentum is None else 0.1
    assert float(jnp.max(jnp.abs(train - trained[:n]))) < tol * moved
    assert float(jnp.max(jnp.abs(test - trained[n:]))) < tol * moved


def test_grad_with_respect_to_the_kernel_of_the_ode_predictor():
    k_tt, _, y, f0, _ = _problem()

    def loss_of_scale(scale):
        predict = nt.predict.gradient_descent(log_cosh, k_tt * scale, y, 1.0)
        return jnp.sum(predict(2.0, f0) ** 2)

    g = jax.grad(loss_of_scale)(jnp.asarray(1.0, DTYPE))
    h = 1e-5 if X64 else 1e-2
    fd = (loss_of_scale(1.0 + h) - loss_of_scale(1.0 - h)) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-5 if X64 else 5e-2)


def test_closed_form_keeps_small_eigenvalues_accurate():
    """cond(K) = 1e4: the long-horizon closed form is as accurate as the inputs allow
    (an eigh in float32 would lose eps * max(lam) on every eigenvalue)."""
    n = 128
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(n, n)))
    lam = np.logspace(0, -4, n) * n
    k = jnp.asarray((q * lam) @ q.T, DTYPE)
    y = np.eye(4)[np.arange(n) % 4]
    t = 10 * y.size / np.sqrt(lam[0] * lam[-1])
    got = nt.predict.gradient_descent_mse(k, jnp.asarray(y, DTYPE))(t, 0.0)
    w, v = np.linalg.eigh(np.asarray(k, np.float64))
    ref = y - v @ np.diag(np.exp(-w * t / y.size)) @ v.T @ y
    assert rel_err(got, ref) < (1e-10 if X64 else 1e-5)
