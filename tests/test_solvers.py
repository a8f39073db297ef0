"""Every solver strategy against references, on small problems; the ``auto`` choice."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ntkflow as nt
from ntkflow._auto import choose_solver, largest_eigenvalue
from ntkflow._axes import make_layout
from ntkflow._dynamics import Dynamics, FlatLoss
from ntkflow._expo import Expo
from ntkflow._solvers import Tsit5
from tests.conftest import DTYPE, TOL, X64, rel_err

mse = lambda fx, y: 0.5 * jnp.mean((fx - y) ** 2)
log_cosh = lambda fx, y: jnp.mean(jnp.log(jnp.cosh(fx - y)))
cross_entropy = lambda fx, y: -jnp.mean(jax.nn.log_softmax(fx) * y)


def _stiff_problem(n=24, k=3, cond=1e4, n_test=5):
    """A kernel with a power-law spectrum over ``cond`` and a consistent test kernel."""
    key = jax.random.PRNGKey(7)
    q, _ = jnp.linalg.qr(jax.random.normal(key, (n + n_test, n + n_test), DTYPE))
    lam = jnp.logspace(0, -np.log10(cond), n + n_test, dtype=DTYPE) * n
    full = (q * lam) @ q.T
    y = jax.random.normal(jax.random.PRNGKey(8), (n, k), DTYPE)
    f0 = 0.1 * jax.random.normal(jax.random.PRNGKey(9), (n, k), DTYPE)
    ft0 = jnp.zeros((n_test, k), DTYPE)
    return full[:n, :n], full[n:, :n], y, f0, ft0


@pytest.mark.parametrize("solver", ["expo", "tsit5", "dopri5", "auto"])
def test_mse_every_solver_matches_closed_form(solver):
    k_tt, k_st, y, f0, ft0 = _stiff_problem(cond=1e2)
    ts = jnp.array([0.0, 3.0, 30.0, 300.0])
    exact = nt.predict.gradient_descent_mse(k_tt, y)(ts, f0, ft0, k_st)
    got = nt.predict.gradient_descent(mse, k_tt, y, solver=solver)(ts, f0, ft0, k_st)
    for a, b in zip(got, exact, strict=True):
        assert rel_err(a, b) < 100 * TOL["rtol"], solver


def test_expo_reaches_long_horizons_and_infinity_on_stiff_mse():
    k_tt, k_st, y, f0, ft0 = _stiff_problem(cond=1e4)
    ts = jnp.array([1.0, 1e3, 1e5, 1e7, jnp.inf])
    exact = nt.predict.gradient_descent_mse(k_tt, y)(ts, f0, ft0, k_st)
    predict = nt.predict.gradient_descent(mse, k_tt, y, solver="expo", max_steps=2000)
    got = predict(ts, f0, ft0, k_st)
    for a, b in zip(got, exact, strict=True):
        assert rel_err(a, b) < (1e-6 if X64 else 5e-3)


def test_expo_matches_tight_explicit_solve_for_nonquadratic_loss():
    """log-cosh: the exponential integrator against a tight explicit (Tsit5) solve."""
    k_tt, k_st, y, f0, ft0 = _stiff_problem(cond=1e2)
    ts = jnp.array([0.5, 5.0, 50.0])
    tight = dict(rtol=1e-10, atol=1e-10) if X64 else {}
    ref = nt.predict.gradient_descent(log_cosh, k_tt, y, solver="tsit5", **tight)(
        ts, f0, ft0, k_st)
    got = nt.predict.gradient_descent(log_cosh, k_tt, y, solver="expo")(ts, f0, ft0, k_st)
    for a, b in zip(got, ref, strict=True):
        assert rel_err(a, b) < (1e-6 if X64 else 5e-3)


def test_cross_entropy_expo_and_tsit5_agree():
    k_tt, k_st, _, f0, ft0 = _stiff_problem(cond=1e2)
    y = jax.nn.one_hot(jnp.arange(k_tt.shape[0]) % 3, 3, dtype=DTYPE)
    ts = jnp.array([1.0, 20.0, 200.0])
    a = nt.predict.gradient_descent(cross_entropy, k_tt, y, solver="expo")(ts, f0, ft0, k_st)
    b = nt.predict.gradient_descent(cross_entropy, k_tt, y, solver="tsit5")(ts, f0, ft0, k_st)
    for u, v in zip(a, b, strict=True):
        assert rel_err(u, v) < (1e-5 if X64 else 5e-3)


def test_solver_that_gives_up_says_so():
    k_tt, _, y, f0, _ = _stiff_problem(cond=1e4)
    predict = nt.predict.gradient_descent(mse, k_tt, y, solver="tsit5", max_steps=20)
    with pytest.raises(RuntimeError, match="max_steps"):
        predict(1e4, f0)
    predict = nt.predict.gradient_descent(mse, k_tt, y, solver="expo", max_steps=3)
    with pytest.raises(RuntimeError, match="max_steps"):
        predict(1e4, f0)


@pytest.mark.parametrize("loss", [mse, log_cosh], ids=["mse", "logcosh"])
def test_expo_with_momentum_matches_tight_explicit_solve(loss):
    k_tt, k_st, y, f0, ft0 = _stiff_problem(cond=1e2)
    ts = jnp.array([0.5, 3.0, 20.0])
    tight = dict(rtol=1e-11, atol=1e-11) if X64 else {}
    ref = nt.predict.gradient_descent(loss, k_tt, y, 0.5, 0.9, solver="tsit5", **tight)
    got = nt.predict.gradient_descent(loss, k_tt, y, 0.5, 0.9, solver="expo")
    for a, b in zip(got(ts, f0, ft0, k_st), ref(ts, f0, ft0, k_st), strict=True):
        assert rel_err(a, b) < (1e-6 if X64 else 5e-3)
    state0 = nt.predict.ODEState(f0, ft0)
    got_state, ref_state = got(3.0, state0, k_test_train=k_st), ref(3.0, state0, k_test_train=k_st)
    for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(ref_state), strict=True):
        assert rel_err(a, b) < (1e-6 if X64 else 5e-3)


def test_expo_with_momentum_reaches_the_end_of_training():
    k_tt, k_st, y, f0, ft0 = _stiff_problem(cond=1e3)
    exact = nt.predict.gradient_descent_mse(k_tt, y)(None, f0, ft0, k_st)
    got = nt.predict.gradient_descent(mse, k_tt, y, 0.5, 0.9, solver="expo")(None, f0, ft0, k_st)
    for a, b in zip(got, exact, strict=True):
        assert rel_err(a, b) < (1e-6 if X64 else 5e-3)


def test_auto_choice_is_explicit():
    k_tt, _, y, f0, _ = _stiff_problem(cond=1e4)
    layout = make_layout(y.shape, (-1,))
    dyn = Dynamics(k_tt, FlatLoss(mse, layout, (y.shape[0],)), y, None, False)
    y0 = dyn.initial_state(f0, None)
    lam = largest_eigenvalue(k_tt)
    assert abs(float(lam) - float(jnp.linalg.eigvalsh(k_tt)[-1])) < 1e-3 * float(lam)
    assert isinstance(choose_solver(dyn, y0, jnp.array([1e-3]), lam), Tsit5)
    assert isinstance(choose_solver(dyn, y0, jnp.array([1e6]), lam), Expo)
    assert isinstance(choose_solver(dyn, y0, jnp.array([1.0, jnp.inf]), lam), Expo)
    # Anisotropic curvature (log-cosh away from its minimum, cross-entropy): explicit.
    for loss in (log_cosh, cross_entropy):
        other = Dynamics(k_tt, FlatLoss(loss, layout, (y.shape[0],)), y, None, False)
        assert isinstance(choose_solver(other, y0, jnp.array([1e6]), lam), Tsit5)
    with_momentum = Dynamics(k_tt, dyn.loss, y, jnp.asarray(-0.1, DTYPE), False)
    assert isinstance(choose_solver(with_momentum, y0, jnp.array([1e-3]), lam), Tsit5)
    assert isinstance(choose_solver(with_momentum, y0, jnp.array([1e6]), lam), Expo)
