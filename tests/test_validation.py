"""Bad input at the public boundary: every error names the argument at fault.

One case per bad input: the error type and a pattern that the message must
contain (the argument's name, backquoted as in the messages). Checks on values
also run under ``jax.jit`` (through ``equinox.error_if``); solver failures are
reported eagerly and under ``jit``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkflow as nt
from ntkflow._checks import kernel_tolerances
from tests.conftest import DTYPE, X64, psd_kernel

ODEState = nt.predict.ODEState
N, K, N_TEST = 4, 2, 3

mse = lambda fx, y: 0.5 * jnp.mean((fx - y) ** 2)
log_loss = lambda fx, y: jnp.mean(jnp.log(fx - y))  # NaN at fx = 0 for y > 0


def _data():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    j = jax.random.normal(keys[0], (N + N_TEST, 2 * (N + N_TEST)), DTYPE)
    full = j @ j.T / j.shape[1]
    y = jax.random.normal(keys[1], (N, K), DTYPE)
    f0 = 0.1 * jax.random.normal(keys[2], (N, K), DTYPE)
    return full[:N, :N], full[N:, :N], y, f0, jnp.zeros((N_TEST, K), DTYPE)


K_TT, K_ST, Y, F0, FT0 = _data()
NAN_K = K_TT.at[0, 0].set(jnp.nan)
ASYM_K = K_TT.at[0, 1].add(0.1 * jnp.max(K_TT))
NEG_K = K_TT - 2 * jnp.eye(N, dtype=DTYPE) * jnp.max(jnp.linalg.eigvalsh(K_TT))
BAD = pytest.param  # readability below


# ---------------------------------------------------------------------------
# Constructors


def _mse(**kw):
    args = dict(k_train_train=K_TT, y_train=Y)
    args.update(kw)
    return nt.predict.gradient_descent_mse(**args)


def _gd(**kw):
    args = dict(loss=mse, k_train_train=K_TT, y_train=Y)
    args.update(kw)
    return nt.predict.gradient_descent(**args)


SHARED_CONSTRUCTOR_CASES = [
    BAD(dict(k_train_train=K_TT[:, :3]), ValueError, "`k_train_train`", id="k-not-square"),
    BAD(dict(k_train_train=K_TT[:3, :3]), ValueError, "`k_train_train`", id="k-vs-y"),
    BAD(dict(k_train_train=jnp.zeros((N, N, K, K), DTYPE)), ValueError, "`k_train_train`",
        id="k-rank-vs-trace_axes"),
    BAD(dict(y_train=jnp.zeros((N, 3, K), DTYPE)), ValueError, "`k_train_train`",
        id="k-rank-vs-nd-y"),
    BAD(dict(k_train_train=jnp.zeros((N, N, 3, 3), DTYPE), trace_axes=()), ValueError,
        "`k_train_train`", id="k-sizes-vs-y"),
    BAD(dict(k_train_train=NAN_K), ValueError, "`k_train_train` must be finite", id="k-nan"),
    BAD(dict(k_train_train=ASYM_K), ValueError, "`k_train_train` must be symmetric",
        id="k-asymmetric"),
    BAD(dict(k_train_train=NEG_K), ValueError, "`k_train_train` must be positive semi",
        id="k-not-psd"),
    BAD(dict(y_train=Y.at[1, 1].set(jnp.inf)), ValueError, "`y_train` must be finite",
        id="y-inf"),
    BAD(dict(y_train=jnp.zeros((), DTYPE)), ValueError, "`y_train`", id="y-scalar"),
    BAD(dict(y_train=jnp.zeros((0, K), DTYPE), k_train_train=jnp.zeros((0, 0), DTYPE)),
        ValueError, "`y_train`", id="y-empty"),
    BAD(dict(trace_axes=(1, -1)), ValueError, "`trace_axes`", id="trace_axes-duplicate"),
    BAD(dict(trace_axes=(2,)), ValueError, "`trace_axes`", id="trace_axes-out-of-range"),
    BAD(dict(trace_axes=(-3,)), ValueError, "`trace_axes`", id="trace_axes-negative-range"),
    BAD(dict(trace_axes=(1.0,)), TypeError, "`trace_axes`", id="trace_axes-float"),
    BAD(dict(trace_axes=None), TypeError, "`trace_axes`", id="trace_axes-none"),
    BAD(dict(trace_axes=True), TypeError, "`trace_axes`", id="trace_axes-bool"),
    BAD(dict(learning_rate=0.0), ValueError, "`learning_rate`", id="lr-zero"),
    BAD(dict(learning_rate=-1.0), ValueError, "`learning_rate`", id="lr-negative"),
    BAD(dict(learning_rate=np.nan), ValueError, "`learning_rate`", id="lr-nan"),
    BAD(dict(learning_rate=np.inf), ValueError, "`learning_rate`", id="lr-inf"),
    BAD(dict(learning_rate="fast"), TypeError, "`learning_rate`", id="lr-str"),
    BAD(dict(learning_rate=[0.1, 0.2]), TypeError, "`learning_rate`", id="lr-array"),
    BAD(dict(learning_rate=True), TypeError, "`learning_rate` must be", id="lr-bool"),
    BAD(dict(k_train_train=K_TT.astype(jnp.complex64)), TypeError,
        "`k_train_train` must be a real array", id="k-complex"),
    BAD(dict(y_train=np.asarray(Y).astype(str)), TypeError, "`y_train` must be a real array",
        id="y-strings"),
]


@pytest.mark.parametrize("kwargs, error, match", SHARED_CONSTRUCTOR_CASES)
@pytest.mark.parametrize("make", [_mse, _gd], ids=["mse", "gd"])
def test_constructor_rejects(make, kwargs, error, match):
    with pytest.raises(error, match=match):
        make(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        BAD(dict(diag_reg=-1e-3), ValueError, "`diag_reg`", id="diag_reg-negative"),
        BAD(dict(diag_reg=np.nan), ValueError, "`diag_reg`", id="diag_reg-nan"),
        BAD(dict(diag_reg=np.inf), ValueError, "`diag_reg`", id="diag_reg-inf"),
        BAD(dict(diag_reg="a"), TypeError, "`diag_reg`", id="diag_reg-str"),
        # diag_reg does not rescue a clearly indefinite kernel ...
        BAD(dict(k_train_train=NEG_K, diag_reg=1e-3), ValueError, "`diag_reg`",
            id="k-not-psd-after-diag_reg"),
    ],
)
def test_mse_constructor_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        _mse(**kwargs)


def test_diag_reg_can_make_an_indefinite_kernel_acceptable():
    # ... but a large enough one does: the check is on the kernel actually used.
    lam = float(jnp.max(jnp.abs(jnp.linalg.eigvalsh(NEG_K))))
    out = _mse(k_train_train=NEG_K, diag_reg=2 * lam, diag_reg_absolute_scale=True)(1.0, F0)
    assert bool(jnp.all(jnp.isfinite(out)))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        BAD(dict(loss="mse"), TypeError, "`loss`", id="loss-not-callable"),
        BAD(dict(loss=lambda fx, y: (fx - y) ** 2), ValueError, "`loss", id="loss-not-scalar"),
        BAD(dict(loss=lambda fx: jnp.sum(fx**2)), TypeError, "`loss` must be a function",
            id="loss-one-argument"),
        BAD(dict(loss=lambda fx, y: jnp.sum(fx > y)), ValueError, "real floating-point",
            id="loss-integer"),
        BAD(dict(loss=lambda fx, y: jnp.sum(fx - y).astype(jnp.complex64)), ValueError,
            "real floating-point", id="loss-complex"),
        BAD(dict(momentum=1.0), ValueError, "`momentum`", id="momentum-one"),
        BAD(dict(momentum=-0.1), ValueError, "`momentum`", id="momentum-negative"),
        BAD(dict(momentum=np.nan), ValueError, "`momentum`", id="momentum-nan"),
        BAD(dict(momentum="heavy"), TypeError, "`momentum`", id="momentum-str"),
        BAD(dict(momentum=True), TypeError, "`momentum` must be", id="momentum-bool"),
        BAD(dict(max_steps=0), ValueError, "`max_steps`", id="max_steps-zero"),
        BAD(dict(max_steps=-5), ValueError, "`max_steps`", id="max_steps-negative"),
        BAD(dict(max_steps=10.5), TypeError, "`max_steps`", id="max_steps-float"),
        BAD(dict(max_steps=None), TypeError, "`max_steps`", id="max_steps-none"),
        BAD(dict(max_steps=True), TypeError, "`max_steps`", id="max_steps-bool"),
        BAD(dict(rtol=0.0), ValueError, "`rtol`", id="rtol-zero"),
        BAD(dict(rtol=-1e-6), ValueError, "`rtol`", id="rtol-negative"),
        BAD(dict(rtol=np.nan), ValueError, "`rtol`", id="rtol-nan"),
        BAD(dict(atol=0.0), ValueError, "`atol`", id="atol-zero"),
        BAD(dict(atol=np.inf), ValueError, "`atol`", id="atol-inf"),
        BAD(dict(atol="tight"), TypeError, "`atol`", id="atol-str"),
        BAD(dict(solver="rk45"), ValueError, "`solver`", id="solver-unknown"),
        BAD(dict(solver=3), ValueError, "`solver`", id="solver-not-a-solver"),
    ],
)
def test_gradient_descent_constructor_rejects(kwargs, error, match):
    with pytest.raises(error, match=match):
        _gd(**kwargs)


# ---------------------------------------------------------------------------
# Kernels: round-off is tolerated, clear violations are not.


def _tolerances():
    return kernel_tolerances(DTYPE)


def test_roundoff_asymmetry_and_negative_eigenvalues_are_accepted():
    sym_tol, psd_tol = _tolerances()
    # Rank-deficient kernel with a round-off-level negative eigenvalue and asymmetry.
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(1), (N, N), DTYPE))
    lam = jnp.array([1.0, 0.5, 0.0, -0.1 * psd_tol], DTYPE)
    k = (q * lam) @ q.T
    k = k + 0.1 * sym_tol * jnp.triu(jnp.ones((N, N), DTYPE), 1)
    for predict in (_mse(k_train_train=k), _gd(k_train_train=k)):
        out = predict(jnp.array([0.0, 1.0, jnp.inf]), F0)
        assert bool(jnp.all(jnp.isfinite(out)))
    assert np.isfinite(nt.predict.max_learning_rate(k))


def test_clearly_negative_eigenvalue_is_rejected_at_the_threshold():
    _, psd_tol = _tolerances()
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(1), (N, N), DTYPE))
    k = (q * jnp.array([1.0, 0.5, 0.2, -3 * psd_tol], DTYPE)) @ q.T
    with pytest.raises(ValueError, match="`k_train_train` must be positive semi-definite"):
        _gd(k_train_train=k)
    with pytest.raises(ValueError, match="`ntk_train_train` must be positive semi-definite"):
        nt.predict.max_learning_rate(k)


def test_kernel_tolerance_follows_the_kernels_own_precision():
    sym32, psd32 = kernel_tolerances(jnp.float32)
    sym64, psd64 = kernel_tolerances(jnp.float64)
    assert sym64 < sym32 and psd64 < psd32
    assert (sym32, psd32) == (1e-4, 1e-3) and (sym64, psd64) == (1e-6, 1e-6)


def test_layout_mistake_is_reported_as_asymmetry():
    """A (n, k, n, k) kernel passed where (n, n, k, k) is expected (n == k)."""
    theta = psd_kernel(jax.random.PRNGKey(2), N)
    a = jax.random.normal(jax.random.PRNGKey(3), (N, N), DTYPE)
    full = jnp.einsum("ij,ab->iajb", theta, a @ a.T)  # (n, k, n, k): not interleaved
    y = jnp.zeros((N, N), DTYPE)
    with pytest.raises(ValueError, match="interleave"):
        nt.predict.gradient_descent_mse(full, y, trace_axes=())


# ---------------------------------------------------------------------------
# predict_fn


_PREDICT_CASES = [
    BAD(dict(t=-1.0), ValueError, "`t`", id="t-negative"),
    BAD(dict(t=[1.0, np.nan]), ValueError, "`t`", id="t-nan"),
    BAD(dict(t=-np.inf), ValueError, "`t`", id="t-minus-inf"),
    BAD(dict(t="soon"), TypeError, "`t`", id="t-str"),
    BAD(dict(t=True), TypeError, "`t` must be real numbers", id="t-bool"),
    BAD(dict(t=np.array([True, False])), TypeError, "`t` must be real numbers",
        id="t-bool-array"),
    BAD(dict(fx_train_0=F0.at[0, 0].set(jnp.nan)), ValueError, "`fx_train_0` must be finite",
        id="fx_train_0-nan"),
    BAD(dict(fx_train_0=jnp.zeros((N + 1, K), DTYPE)), ValueError, "`fx_train_0`",
        id="fx_train_0-shape"),
    BAD(dict(fx_train_0=None), ValueError, "`fx_train_0`", id="nothing-to-predict"),
    BAD(dict(fx_train_0="zeros"), TypeError, "`fx_train_0`", id="fx_train_0-str"),
    BAD(dict(fx_test_0=FT0), ValueError, "`k_test_train`", id="fx_test_0-without-k_test_train"),
    BAD(dict(fx_test_0=FT0, k_test_train=K_ST[:, :3]), ValueError, "`k_test_train`",
        id="k_test_train-vs-train-rows"),
    BAD(dict(fx_test_0=FT0, k_test_train=K_ST[:, :, None]), ValueError, "`k_test_train`",
        id="k_test_train-rank"),
    BAD(dict(fx_test_0=FT0, k_test_train=K_ST.at[0, 0].set(jnp.inf)), ValueError,
        "`k_test_train` must be finite", id="k_test_train-inf"),
    BAD(dict(fx_test_0=FT0.at[0, 0].set(jnp.nan), k_test_train=K_ST), ValueError,
        "`fx_test_0` must be finite", id="fx_test_0-nan"),
    BAD(dict(fx_test_0=jnp.zeros((N_TEST + 1, K), DTYPE), k_test_train=K_ST), ValueError,
        "`fx_test_0`", id="fx_test_0-vs-k_test_train"),
    BAD(dict(fx_train_0=F0.astype(jnp.complex64)), TypeError,
        "`fx_train_0` must be a real array", id="fx_train_0-complex"),
    BAD(dict(fx_test_0=FT0, k_test_train=K_ST.astype(jnp.complex64)), TypeError,
        "`k_test_train` must be a real array", id="k_test_train-complex"),
]


def _call(predict, kwargs):
    """Positional call (the second argument is `fx_train_or_state_0` for gradient_descent)."""
    args = dict(t=1.0, fx_train_0=F0, fx_test_0=None, k_test_train=None)
    args.update(kwargs)
    return predict(*args.values())


@pytest.fixture(scope="module")
def predictors():
    return {"mse": _mse(), "gd": _gd(), "gd-momentum": _gd(momentum=0.9)}


@pytest.mark.parametrize("kwargs, error, match", _PREDICT_CASES)
@pytest.mark.parametrize("which", ["mse", "gd"])
def test_predict_fn_rejects(predictors, which, kwargs, error, match):
    with pytest.raises(error, match=match):
        _call(predictors[which], kwargs)


def test_mse_predict_fn_rejects_an_ode_state(predictors):
    with pytest.raises(TypeError, match="`fx_train_0`"):
        predictors["mse"](1.0, ODEState(F0))


def test_loss_not_finite_at_the_start():
    predict = _gd(loss=log_loss, y_train=jnp.abs(Y) + 1.0)
    with pytest.raises(ValueError, match=r"`loss\(fx_train_0, y_train\)` must be finite"):
        predict(1.0, 0.0)


@pytest.mark.parametrize(
    "state, extra, match",
    [
        BAD(ODEState(F0, FT0), dict(fx_test_0=FT0), "`fx_test_0`", id="fx_test_0-with-state"),
        BAD(ODEState(F0, None, jnp.zeros_like(F0)), {}, "`momentum", id="qx-without-momentum"),
        BAD(ODEState(jnp.stack([F0, F0])), {}, r"fx_train_or_state_0\.fx_train",
            id="state-with-time-axis"),
        BAD(ODEState(F0, FT0[:2]), {}, r"fx_train_or_state_0\.fx_test", id="state-fx_test-shape"),
        BAD(ODEState(F0.at[0, 0].set(jnp.nan)), {}, "`fx_train_0` must be finite",
            id="state-fx_train-nan"),
    ],
)
def test_plain_predict_fn_rejects_bad_states(predictors, state, extra, match):
    with pytest.raises(ValueError, match=match):
        predictors["gd"](1.0, state, k_test_train=K_ST, **extra)


@pytest.mark.parametrize(
    "state, match",
    [
        BAD(ODEState(None, FT0, jnp.zeros_like(F0)), "`qx_train`", id="qx_train-without-fx_train"),
        BAD(ODEState(F0, None, None, jnp.zeros_like(FT0)), "`qx_test`",
            id="qx_test-without-fx_test"),
        BAD(ODEState(F0, None, jnp.zeros((N, K + 1), DTYPE)), r"fx_train_or_state_0\.qx_train",
            id="qx_train-shape"),
        BAD(ODEState(F0, None, jnp.full_like(F0, jnp.inf)), "`qx_train` must be finite",
            id="qx_train-inf"),
        BAD(ODEState(F0, FT0, None, jnp.full_like(FT0, jnp.nan)), "`qx_test` must be finite",
            id="qx_test-nan"),
    ],
)
def test_momentum_predict_fn_rejects_bad_states(predictors, state, match):
    with pytest.raises(ValueError, match=match):
        predictors["gd-momentum"](1.0, state, k_test_train=K_ST)


def test_t_inf_and_none_are_allowed(predictors):
    for t in (None, np.inf, [0.0, np.inf, 1.0]):
        out = predictors["mse"](t, F0)
        assert bool(jnp.all(jnp.isfinite(out)))


# ---------------------------------------------------------------------------
# max_learning_rate


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        BAD(dict(ntk_train_train=jnp.zeros((N, N, K), DTYPE)), ValueError, "`ntk_train_train`",
            id="odd-rank"),
        BAD(dict(ntk_train_train=jnp.zeros((N, N + 1), DTYPE)), ValueError, "`ntk_train_train`",
            id="not-square"),
        BAD(dict(ntk_train_train=NAN_K), ValueError, "`ntk_train_train` must be finite",
            id="nan"),
        BAD(dict(ntk_train_train=ASYM_K), ValueError, "`ntk_train_train` must be symmetric",
            id="asymmetric"),
        BAD(dict(ntk_train_train=NEG_K), ValueError, "`ntk_train_train` must be positive",
            id="not-psd"),
        BAD(dict(ntk_train_train="kernel"), TypeError, "`ntk_train_train`", id="str"),
        BAD(dict(y_train_size=0), ValueError, "`y_train_size`", id="y_train_size-zero"),
        BAD(dict(y_train_size=2.5), TypeError, "`y_train_size`", id="y_train_size-float"),
        BAD(dict(momentum=1.0), ValueError, "`momentum`", id="momentum-one"),
        BAD(dict(eps=-1.0), ValueError, "`eps`", id="eps-negative"),
        BAD(dict(eps=np.nan), ValueError, "`eps`", id="eps-nan"),
    ],
)
def test_max_learning_rate_rejects(kwargs, error, match):
    args = dict(ntk_train_train=K_TT)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        nt.predict.max_learning_rate(**args)


# ---------------------------------------------------------------------------
# Under jit: value checks through equinox.error_if. Under `equinox.filter_jit` they
# raise `equinox.EquinoxRuntimeError`; under `jax.jit`, JAX's own runtime error
# (a RuntimeError, or a ValueError on JAX's cached-dispatch path) whose text holds
# the message.

#: What a failed run-time check raises under `jax.jit`.
JIT_ERRORS = (RuntimeError, ValueError)


_JIT_CASES = [
    BAD(dict(t=jnp.asarray(-1.0, DTYPE)), "`t` must be non-negative", id="t-negative"),
    BAD(dict(t=jnp.asarray(jnp.nan, DTYPE)), "`t` must be non-negative", id="t-nan"),
    BAD(dict(fx_train_0=F0.at[0, 0].set(jnp.nan)), "`fx_train_0` must be finite",
        id="fx_train_0-nan"),
    BAD(dict(fx_test_0=FT0.at[1, 1].set(jnp.inf)), "`fx_test_0` must be finite",
        id="fx_test_0-inf"),
    BAD(dict(k_test_train=K_ST.at[0, 0].set(jnp.nan)), "`k_test_train` must be finite",
        id="k_test_train-nan"),
]


@pytest.fixture(scope="module")
def jitted(predictors):
    return {
        (name, jit_name): jit(p)
        for name, p in predictors.items() if name != "gd-momentum"
        for jit_name, jit in (("jax.jit", jax.jit), ("eqx.filter_jit", eqx.filter_jit))
    }


@pytest.mark.parametrize("kwargs, match", _JIT_CASES)
@pytest.mark.parametrize("jit_name", ["jax.jit", "eqx.filter_jit"])
@pytest.mark.parametrize("which", ["mse", "gd"])
def test_jit_value_checks(jitted, which, jit_name, kwargs, match):
    args = dict(t=jnp.asarray(1.0, DTYPE), fx_train_0=F0, fx_test_0=FT0, k_test_train=K_ST)
    args.update(kwargs)
    fn = jitted[which, jit_name]
    # Good inputs of the same shapes run (and share the compiled code).
    good = dict(t=jnp.asarray(1.0, DTYPE), fx_train_0=F0, fx_test_0=FT0, k_test_train=K_ST)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in fn(*good.values()))
    error = JIT_ERRORS if jit_name == "jax.jit" else eqx.EquinoxRuntimeError
    with pytest.raises(error, match=match):
        jax.block_until_ready(fn(*args.values()))


def test_jit_constructor_checks():
    """Checks on constructor arguments also run when the constructor itself is traced."""

    @jax.jit
    def f(k, lr, reg):
        return nt.predict.gradient_descent_mse(k, Y, lr, reg)(1.0, F0)

    assert bool(jnp.all(jnp.isfinite(f(K_TT, 1.0, 0.0))))
    with pytest.raises(JIT_ERRORS, match="`k_train_train` must be finite"):
        jax.block_until_ready(f(NAN_K, 1.0, 0.0))
    with pytest.raises(JIT_ERRORS, match="`learning_rate`"):
        jax.block_until_ready(f(K_TT, -1.0, 0.0))
    with pytest.raises(JIT_ERRORS, match="`diag_reg`"):
        jax.block_until_ready(f(K_TT, 1.0, -1.0))


def test_concrete_kernel_closed_over_by_a_jitted_function_is_checked_while_tracing():
    """A concrete kernel inside a traced function is still checked at once, with the eager
    errors (the checks' programs then run under ``jax.ensure_compile_time_eval``)."""
    log_cosh = lambda fx, y: jnp.mean(jnp.log(jnp.cosh(fx - y)))
    cases = ((K_TT, None), (NAN_K, "must be finite"), (NEG_K, "positive semi-definite"))
    for kernel, match in cases:
        @jax.jit
        def f(fx, kernel=kernel):
            return nt.predict.gradient_descent(log_cosh, kernel, Y)(1.0, fx)

        if match is None:
            assert bool(jnp.all(jnp.isfinite(f(F0))))
        else:
            with pytest.raises(ValueError, match=match):
                f(F0)


# ---------------------------------------------------------------------------
# Solver failures


def _stiff():
    """Eigenvalues 1e3 and 1e-3: an explicit method needs many steps to reach t = 100."""
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(4), (N, N), DTYPE))
    lam = jnp.array([1e3, 1.0, 1e-2, 1e-3], DTYPE)
    return (q * lam) @ q.T


def test_max_steps_failure_is_reported_eagerly():
    predict = _gd(k_train_train=_stiff(), solver="tsit5", max_steps=5)
    with pytest.raises(RuntimeError, match="`max_steps`") as info:
        predict(100.0, F0)
    assert "stopped at t =" in str(info.value)


def test_max_steps_failure_is_reported_under_jit():
    predict = _gd(k_train_train=_stiff(), solver="tsit5", max_steps=5)
    with pytest.raises(eqx.EquinoxRuntimeError, match="`max_steps`"):
        jax.block_until_ready(eqx.filter_jit(predict)(jnp.asarray(100.0, DTYPE), F0))
    with pytest.raises(JIT_ERRORS, match="`max_steps`"):
        jax.block_until_ready(jax.jit(predict)(jnp.asarray(100.0, DTYPE), F0))


def test_enough_steps_succeed():
    predict = _gd(k_train_train=_stiff(), solver="tsit5", max_steps=100_000)
    assert bool(jnp.all(jnp.isfinite(predict(100.0, F0))))


@pytest.mark.skipif(not X64, reason="float64 only: the float32 run covers the same code")
def test_float32_kernel_with_float64_targets_uses_float32_tolerances():
    """Tolerances follow the kernel's own dtype, not the promoted one."""
    k = np.asarray(K_TT, np.float32)
    k = k + 1e-5 * np.triu(np.ones((N, N), np.float32), 1) * np.max(k)  # 1e-5 asymmetry
    out = nt.predict.gradient_descent_mse(k, np.asarray(Y, np.float64))(1.0, F0)
    assert out.dtype == jnp.float64
    with pytest.raises(ValueError, match="symmetric"):
        nt.predict.gradient_descent_mse(np.asarray(k, np.float64), np.asarray(Y, np.float64))


def test_large_kernels_get_a_randomized_psd_check():
    """Above the exact-check size, Lanczos steps still catch clearly indefinite kernels."""
    from ntkflow import _checks

    n = _checks.PSD_EXACT_MAX_ROWS + 8
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(3), (n, n)))
    evals = jnp.linspace(-0.5, 1.0, n)
    k = (q * evals) @ q.T
    with pytest.raises(ValueError, match="k_train_train.*positive semi-definite"):
        _checks.check_psd(k, "k_train_train", k.dtype)
    _checks.check_psd((q * jnp.abs(evals)) @ q.T, "k_train_train", k.dtype)  # PSD: accepted


@pytest.mark.parametrize("lowest", [-1e-1, -1e-2, -1e-3])
def test_randomized_psd_check_finds_an_isolated_negative_eigenvalue(lowest):
    """Above the exact-check size, one negative eigenvalue of ``lowest * max(eig)`` among
    a power-law spectrum (n = 520), beyond the tolerance, is caught by the Lanczos
    estimate (90 power iterations, as before, caught only -1e-1: their lowest estimates
    were 4.7e-4 and 6.1e-4 for the other two); the largest eigenvalue is found to
    round-off, and the spectrum without the negative eigenvalue passes."""
    from ntkflow import _checks

    n = _checks.PSD_EXACT_MAX_ROWS + 8
    q, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(n, n)))
    lam = np.arange(1, n + 1, dtype=np.float64) ** -1.5
    positive = jnp.asarray((q * lam) @ q.T, DTYPE)
    lam[-1] = lowest
    k = jnp.asarray((q * lam) @ q.T, DTYPE)
    low, largest = (float(v) for v in _checks._randomized_eigenvalue_range(k))
    assert low < 0.5 * lowest and abs(largest - 1.0) < (1e-10 if X64 else 1e-5)
    _, psd_tol = kernel_tolerances(DTYPE)
    if -lowest <= psd_tol:  # float32's tolerance is 1e-3: accepted as round-off
        _checks.check_psd(k, "k_train_train", k.dtype)
    else:
        with pytest.raises(ValueError, match="k_train_train.*positive semi-definite"):
            _checks.check_psd(k, "k_train_train", k.dtype)
    # (a float64 kernel's estimate comes from its single-precision screen)
    assert abs(_checks.check_psd(positive, "k_train_train", k.dtype) - 1.0) < 1e-5


@pytest.mark.skipif(not X64, reason="float64 kernels: runs with JAX_ENABLE_X64=1")
def test_single_precision_screen_defers_to_the_kernel_precision(monkeypatch):
    """A double-precision kernel that the single-precision Lanczos screen flags is decided
    by the estimate in its own precision: accepted if PSD there, rejected if not."""
    from ntkflow import _checks

    n = _checks.PSD_EXACT_MAX_ROWS + 8
    q, _ = np.linalg.qr(np.random.default_rng(4).normal(size=(n, n)))
    lam = np.arange(1, n + 1, dtype=np.float64) ** -1.5
    k = np.asarray((q * lam) @ q.T)
    calls = []

    def flagging(k):
        calls.append(k.dtype)
        return jnp.asarray(-0.5), jnp.asarray(1.0)  # "lowest eigenvalue -0.5": flagged

    monkeypatch.setattr(_checks, "_screening_eigenvalue_range", flagging)
    largest = _checks.check_psd(jnp.asarray(k), "k_train_train", np.float64)
    assert calls and abs(largest - 1.0) < 1e-10  # decided in float64: accepted
    lam[-1] = -1e-3
    indefinite = jnp.asarray((q * lam) @ q.T)
    with pytest.raises(ValueError, match="k_train_train.*positive semi-definite"):
        _checks.check_psd(indefinite, "k_train_train", np.float64)
    monkeypatch.undo()  # the real screen flags it too, and float64 gives the numbers
    with pytest.raises(ValueError, match="most negative eigenvalue of -0.001"):
        _checks.check_psd(indefinite, "k_train_train", np.float64)


@pytest.mark.parametrize("factor", [-3.0, -1.5, -1.1, -0.9, -0.6, -0.3, 0.0, 0.5])
def test_psd_check_decides_as_the_eigenvalues_do_near_the_threshold(factor):
    """The Cholesky shortcut accepts only what the eigenvalue test accepts, same message."""
    from ntkflow import _checks

    _, psd_tol = _tolerances()
    n = 12
    q, _ = jnp.linalg.qr(jax.random.normal(jax.random.PRNGKey(5), (n, n), DTYPE))
    lam = jnp.linspace(0.05, 2.0, n, dtype=DTYPE).at[0].set(factor * psd_tol * 2.0)
    k = (q * lam) @ q.T
    lowest, largest = (float(v) for v in _checks._eigenvalue_range(k))
    expected = None
    try:
        _checks._check_eigenvalue_range(lowest, largest, "k_train_train", DTYPE, "")
    except ValueError as e:
        expected = str(e)
    assert (expected is None) == (factor > -1.0)
    if expected is None:
        _checks.check_psd(k, "k_train_train", DTYPE)
    else:
        with pytest.raises(ValueError) as info:
            _checks.check_psd(k, "k_train_train", DTYPE)
        assert str(info.value) == expected


def test_psd_check_accepts_zero_and_rank_deficient_kernels():
    from ntkflow import _checks

    _checks.check_psd(jnp.zeros((5, 5), DTYPE), "k_train_train", DTYPE)
    j = jax.random.normal(jax.random.PRNGKey(6), (40, 3), DTYPE)
    _checks.check_psd(j @ j.T, "k_train_train", DTYPE)  # rank 3 of 40


@pytest.mark.parametrize(
    "kwargs, match",
    [
        BAD(dict(fx_train_0=F0.at[0, 0].set(jnp.nan), fx_test_0=jnp.zeros((N_TEST + 1, K), DTYPE),
                 k_test_train=K_ST), "`fx_train_0` must be finite", id="f0-nan-before-ft0-shape"),
        BAD(dict(fx_train_0=jnp.zeros((N + 1, K), DTYPE), fx_test_0=FT0,
                 k_test_train=K_ST.at[0, 0].set(jnp.nan)), "`fx_train_0` must be a scalar",
            id="f0-shape-before-k_test-nan"),
        BAD(dict(fx_test_0=FT0.at[0, 0].set(jnp.inf), k_test_train=K_ST.at[0, 0].set(jnp.nan)),
            "`fx_test_0` must be finite", id="ft0-inf-before-k_test-nan"),
        BAD(dict(fx_test_0=FT0.at[0, 0].set(jnp.inf), k_test_train=K_ST, t=-1.0), "`t`",
            id="t-before-ft0-inf"),
    ],
)
def test_predict_fn_reports_the_first_bad_input(predictors, kwargs, match):
    """Checks run in argument order, whether batched (concrete inputs) or one by one."""
    with pytest.raises(ValueError, match=match):
        _call(predictors["gd"], kwargs)


def test_loss_check_comes_before_test_input_checks():
    predict = _gd(loss=log_loss, y_train=jnp.abs(Y) + 1.0)
    with pytest.raises(ValueError, match=r"`loss\(fx_train_0, y_train\)` must be finite"):
        predict(1.0, 0.0, FT0.at[0, 0].set(jnp.nan), K_ST)
    with pytest.raises(ValueError, match="`fx_train_0` must be finite"):
        predict(1.0, F0.at[0, 0].set(jnp.nan), FT0, K_ST)


def test_momentum_state_checks_keep_their_order(predictors):
    state = ODEState(F0, FT0.at[0, 0].set(jnp.nan), jnp.full_like(F0, jnp.inf))
    with pytest.raises(ValueError, match="`qx_train` must be finite"):
        predictors["gd-momentum"](1.0, state, k_test_train=K_ST)


def test_complex_inputs_are_rejected_by_every_predictor():
    """Complex kernels, targets or outputs are not a training problem ntkflow solves: a
    TypeError naming the argument, not a solver's type error deep inside (or, for the
    closed forms, complex outputs)."""
    loss = mse
    complex_k = K_TT.astype(jnp.complex64)
    for build in (lambda k, y: nt.predict.gradient_descent_discrete(loss, k, y),
                  lambda k, y: nt.predict.gradient_descent_mse_discrete(k, y)):
        with pytest.raises(TypeError, match="`k_train_train` must be a real array"):
            build(complex_k, Y)
        predict = build(K_TT, Y)
        with pytest.raises(TypeError, match="`fx_train_0` must be a real array"):
            predict(3, F0.astype(jnp.complex64))
        with pytest.raises(TypeError, match="`k_test_train` must be a real array"):
            predict(3, F0, FT0, K_ST.astype(jnp.complex64))
    with pytest.raises(TypeError, match="`ntk_train_train` must be a real array"):
        nt.predict.max_learning_rate(complex_k)
    # Real dtypes of every kind still work: booleans, integers, bfloat16.
    nt.predict.gradient_descent(loss, K_TT.astype(jnp.bfloat16), (Y > 0))(1.0, 0.0)
    nt.predict.gradient_descent_mse(jnp.eye(N, dtype=jnp.int32), Y)(1.0, 0.0)
