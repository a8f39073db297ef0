"""Exact discrete-time predictions (``ntkflow._discrete``).

Checked against a real linearized MLP trained with optax (plain SGD, momentum,
Nesterov; MSE and cross-entropy), between the closed form and the loop, against
the exact gradient-flow solution in the small-learning-rate limit, and for the
argument conventions, state resumption, divergence reporting and validation.
"""

from __future__ import annotations

import warnings
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.flatten_util import ravel_pytree

from ntkflow._discrete import (
    DiscreteState,
    gradient_descent_discrete,
    gradient_descent_mse_discrete,
)

X64 = bool(jax.config.jax_enable_x64)
DTYPE = jnp.float64 if X64 else jnp.float32
# Relative tolerances keyed by dtype.
RTOL_NET = 1e-6 if X64 else 5e-4  # trained linearized network vs prediction
RTOL_CLOSED = 1e-9 if X64 else 2e-4  # closed form vs loop
RTOL = 1e-10 if X64 else 1e-5  # two evaluations of the same computation

needs_x64 = pytest.mark.skipif(
    not X64,
    reason="measures a first-order discretization error of ~1e-7 relative over thousands of "
    "steps, below float32 round-off; runs with JAX_ENABLE_X64=1",
)


def mse(fx, y):
    return 0.5 * jnp.mean((fx - y) ** 2)


def cross_entropy(fx, y):
    return -jnp.mean(jax.nn.log_softmax(fx) * y)


LOSSES = {"mse": mse, "cross_entropy": cross_entropy}


def rel_err(a, b):
    """max |a - b| / max |b| over all entries."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def max_lr(k2d, y_size, momentum=None, nesterov=False):
    """Maximal stable learning rate of discrete GD on MSE.

    ``2 * (1 + m) * y.size / lam_max`` (as neural-tangents' ``max_learning_rate``); with
    Nesterov momentum the iteration is only stable up to ``1 / (1 + 2 m)`` of that.
    """
    m = 0.0 if momentum is None else momentum
    lam_max = float(np.linalg.eigvalsh(np.asarray(k2d, np.float64))[-1])
    lr = 2 * (1 + m) * y_size / lam_max
    return lr / (1 + 2 * m) if nesterov else lr


def random_psd(rng, n, rank=None):
    rank = n if rank is None else rank
    a = rng.standard_normal((n, rank))
    return a @ a.T / rank


def to_interleaved(k2d, rows_shape):
    """Flat ``(R, R)`` kernel to neural-tangents' interleaved layout over ``rows_shape``."""
    nd = len(rows_shape)
    k = np.asarray(k2d).reshape(tuple(rows_shape) * 2)
    perm = [i for pair in zip(range(nd), range(nd, 2 * nd), strict=True) for i in pair]
    return np.transpose(k, perm)


# ----------------------------------------------------------------------------
# A real linearized network.

N_TRAIN, N_TEST, D_IN, HIDDEN, N_OUT = 12, 5, 8, 64, 3
STEPS = np.array([1000, 0, 1, 3, 10, 100, 500, 999])


def _mlp_apply(params, x):
    for i, (w, b) in enumerate(params):
        x = x @ w / np.sqrt(w.shape[0]) + 0.1 * b
        if i < len(params) - 1:
            x = jnp.tanh(x)
    return x


@pytest.fixture(scope="module")
def net():
    key = jax.random.PRNGKey(0)
    kx, kt, ky, kp = jax.random.split(key, 4)
    x_train = jax.random.normal(kx, (N_TRAIN, D_IN), DTYPE)
    x_test = jax.random.normal(kt, (N_TEST, D_IN), DTYPE)
    labels = jax.random.randint(ky, (N_TRAIN,), 0, N_OUT)
    y_train = jax.nn.one_hot(labels, N_OUT, dtype=DTYPE)
    sizes = [D_IN, HIDDEN, HIDDEN, N_OUT]
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        kw, kb = jax.random.split(jax.random.fold_in(kp, i))
        params.append(
            (jax.random.normal(kw, (a, b), DTYPE), jax.random.normal(kb, (b,), DTYPE))
        )
    p0, unravel = ravel_pytree(params)
    x_all = jnp.concatenate([x_train, x_test])

    def f_all(p):
        return _mlp_apply(unravel(p), x_all)

    # Linearized model f_lin(p) = f(p0) + J(p0) (p - p0), via jax.linearize.
    f0_all, f_jvp = jax.linearize(f_all, p0)

    def f_lin(p):
        return f0_all + f_jvp(p - p0)

    # Exact empirical NTK (trace_axes=()): J J^T from the full Jacobian.
    jac = jax.jacobian(f_all)(p0).reshape(-1, p0.size)
    k_full = (jac @ jac.T).reshape(N_TRAIN + N_TEST, N_OUT, N_TRAIN + N_TEST, N_OUT)
    k_full = jnp.transpose(k_full, (0, 2, 1, 3))  # (n1, n2, k1, k2), interleaved
    k_train_train = k_full[:N_TRAIN, :N_TRAIN]
    k_test_train = k_full[N_TRAIN:, :N_TRAIN]
    k2d = jnp.transpose(k_train_train, (0, 2, 1, 3)).reshape(N_TRAIN * N_OUT, -1)

    @partial(jax.jit, static_argnames=("loss_name", "kind"))
    def train(lr, momentum, loss_name, kind):
        """Full-batch optax training of the linearized net; outputs at steps 0..1000."""
        if kind == "sgd":
            opt = optax.sgd(lr)
        else:
            opt = optax.sgd(lr, momentum=momentum, nesterov=kind == "nesterov")
        loss = LOSSES[loss_name]

        def step(carry, _):
            p, state = carry
            g = jax.grad(lambda q: loss(f_lin(q)[:N_TRAIN], y_train))(p)
            updates, state = opt.update(g, state, p)
            p = optax.apply_updates(p, updates)
            return (p, state), f_lin(p)

        _, fs = lax.scan(step, (p0, opt.init(p0)), None, length=int(STEPS.max()))
        return jnp.concatenate([f0_all[None], fs])

    return dict(
        y_train=y_train,
        f0_train=f0_all[:N_TRAIN],
        f0_test=f0_all[N_TRAIN:],
        k_train_train=k_train_train,
        k_test_train=k_test_train,
        k2d=k2d,
        train=train,
        n_params=int(p0.size),
    )


OPTIMIZERS = {"sgd": (None, False), "momentum": (0.9, False), "nesterov": (0.9, True)}


@pytest.mark.parametrize("loss_name", ["mse", "cross_entropy"])
@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_matches_trained_linearized_network(net, loss_name, kind):
    momentum, nesterov = OPTIMIZERS[kind]
    assert 2000 <= net["n_params"] <= 10000
    y = net["y_train"]
    lr_max = max_lr(net["k2d"], y.size, momentum, nesterov)
    for frac in (0.1, 0.5, 0.95):
        lr = frac * lr_max
        traj = net["train"](lr, 0.0 if momentum is None else momentum, loss_name, kind)
        want_train = traj[STEPS, :N_TRAIN]
        want_test = traj[STEPS, N_TRAIN:]
        predict_fn = gradient_descent_discrete(
            LOSSES[loss_name], net["k_train_train"], y, lr, momentum, nesterov, trace_axes=()
        )
        got_train, got_test = predict_fn(
            STEPS, net["f0_train"], net["f0_test"], net["k_test_train"]
        )
        assert got_train.shape == want_train.shape and got_test.shape == want_test.shape
        assert rel_err(got_train, want_train) < RTOL_NET, (frac, rel_err(got_train, want_train))
        assert rel_err(got_test, want_test) < RTOL_NET, (frac, rel_err(got_test, want_test))
        if loss_name == "mse":
            predict_mse = gradient_descent_mse_discrete(
                net["k_train_train"], y, lr, momentum, nesterov, trace_axes=()
            )
            got_train, got_test = predict_mse(
                STEPS, net["f0_train"], net["f0_test"], net["k_test_train"]
            )
            assert rel_err(got_train, want_train) < RTOL_NET
            assert rel_err(got_test, want_test) < RTOL_NET


# ----------------------------------------------------------------------------
# Closed form vs loop.

def _problem(y_shape, trace_axes, n_test, key=1, full_rank=False):
    """Random PSD train/test kernels in interleaved layout plus targets and outputs."""
    ndim = len(y_shape)
    axes = tuple(sorted(a % ndim for a in trace_axes))
    rows_shape = tuple(s for i, s in enumerate(y_shape) if i not in axes)
    test_rows_shape = (n_test,) + rows_shape[1:] if 0 not in axes else rows_shape
    r, rt = int(np.prod(rows_shape)), int(np.prod(test_rows_shape))
    # Built with numpy (no per-shape compilation), then cast to the tested dtype.
    rng = np.random.default_rng(key)
    # One kernel over train + test rows, rank-deficient to exercise lambda ~ 0.
    k_all = random_psd(rng, r + rt, rank=None if full_rank else max(2, (r + rt) * 2 // 3))
    nd = len(rows_shape)
    perm = [i for pair in zip(range(nd), range(nd, 2 * nd), strict=True) for i in pair]
    k_tt = to_interleaved(k_all[:r, :r], rows_shape)
    k_st = np.transpose(k_all[r:, :r].reshape(test_rows_shape + rows_shape), perm)
    test_shape = list(test_rows_shape)
    for a in axes:
        test_shape.insert(a, y_shape[a])
    y = rng.standard_normal(y_shape)
    f0 = 0.3 * rng.standard_normal(y_shape)
    ft0 = 0.3 * rng.standard_normal(tuple(test_shape))
    k_tt, k_st, y, f0, ft0, k_all = (
        jnp.asarray(x, DTYPE) for x in (k_tt, k_st, y, f0, ft0, k_all)
    )
    return dict(k=k_tt, kt=k_st, y=y, f0=f0, ft0=ft0, k2d=k_all[:r, :r])


CLOSED_STEPS = np.array([[0, 7, 64], [1, 300, 7]])

# (y_train shape, trace_axes, n_test, optimizer): every optimizer with exact kernels
# (trace_axes=()), and N-D outputs with traced axes, one optimizer each.
CLOSED_CASES = [
    ((6, 2), (), 3, "sgd"),
    ((6, 2), (), 3, "momentum"),
    ((6, 2), (), 3, "nesterov"),
    ((4, 3, 2), (-1,), 2, "sgd"),
    ((4, 3, 2), (-1,), 2, "nesterov"),
    ((4, 3, 2), (0, 2), 2, "momentum"),
    ((4, 3, 2), (), 2, "nesterov"),
]


@pytest.mark.parametrize("case", CLOSED_CASES, ids=str)
def test_closed_form_equals_loop(case):
    y_shape, trace_axes, n_test, kind = case
    momentum, nesterov = OPTIMIZERS[kind]
    p = _problem(y_shape, trace_axes, n_test)
    lr = 0.7 * max_lr(p["k2d"], p["y"].size, momentum, nesterov)
    loop = gradient_descent_discrete(mse, p["k"], p["y"], lr, momentum, nesterov, trace_axes)
    closed = gradient_descent_mse_discrete(p["k"], p["y"], lr, momentum, nesterov,
                                           trace_axes=trace_axes)
    if momentum is None:
        state0 = DiscreteState(p["f0"], p["ft0"])
    else:  # start from a non-zero velocity
        state0 = DiscreteState(p["f0"], p["ft0"], 0.1 * p["f0"], -0.1 * p["ft0"])
    got_loop = loop(CLOSED_STEPS, state0, None, p["kt"])
    got_closed = closed(CLOSED_STEPS, state0, None, p["kt"])
    assert got_closed.fx_train.shape == CLOSED_STEPS.shape + y_shape
    assert got_closed.fx_test.shape == CLOSED_STEPS.shape + p["ft0"].shape
    leaves_closed = jax.tree_util.tree_leaves(got_closed)
    leaves_loop = jax.tree_util.tree_leaves(got_loop)
    assert len(leaves_closed) == len(leaves_loop) == (2 if momentum is None else 4)
    for a, b in zip(leaves_closed, leaves_loop, strict=True):
        assert rel_err(a, b) < RTOL_CLOSED


def test_closed_form_diag_reg_equals_loop_on_regularized_kernel():
    p = _problem((6, 2), (-1,), 3)
    k2d = p["k2d"]
    for absolute, reg in ((False, 0.1), (True, 0.05)):
        shift = reg if absolute else reg * jnp.trace(k2d) / k2d.shape[0]
        k_reg = k2d + shift * jnp.eye(k2d.shape[0], dtype=k2d.dtype)
        lr = 0.5 * max_lr(k_reg, p["y"].size, 0.5)
        closed = gradient_descent_mse_discrete(
            p["k"], p["y"], lr, 0.5, diag_reg=reg, diag_reg_absolute_scale=absolute
        )
        loop = gradient_descent_discrete(mse, k_reg, p["y"], lr, 0.5)
        a = closed(CLOSED_STEPS, p["f0"], p["ft0"], p["kt"])
        b = loop(CLOSED_STEPS, p["f0"], p["ft0"], p["kt"])
        assert rel_err(a[0], b[0]) < RTOL_CLOSED and rel_err(a[1], b[1]) < RTOL_CLOSED


def test_closed_form_repeated_roots_and_zero_eigenvalues_are_finite():
    # h = lr * lam / n = (1 - sqrt(m))**2 gives a double root of the heavy-ball
    # companion matrix; lam = 0 directions must stay put with finite test outputs.
    m = 0.81
    y = jnp.array([[1.0], [-2.0], [0.5]], DTYPE)
    n = y.size
    lam = 2.0
    k2d = jnp.diag(jnp.array([lam, 0.0, 0.0], DTYPE))
    lr = (1 - np.sqrt(m)) ** 2 * n / lam
    f0 = jnp.array([[0.3], [0.2], [-0.1]], DTYPE)
    kt = jnp.array([[1.0, 0.5, 0.0]], DTYPE)
    closed = gradient_descent_mse_discrete(k2d, y, lr, m)
    loop = gradient_descent_discrete(mse, k2d, y, lr, m)
    steps = np.array([0, 1, 2, 50, 5000])
    a, b = closed(steps, f0, 0.0, kt), loop(steps, f0, 0.0, kt)
    for x in (*a, *b):
        assert bool(jnp.isfinite(x).all())
    assert rel_err(a[0], b[0]) < RTOL_CLOSED and rel_err(a[1], b[1]) < RTOL_CLOSED
    np.testing.assert_allclose(a[0][:, 1:], np.broadcast_to(f0[1:], (5, 2, 1)), rtol=RTOL)


def test_many_steps_constant_memory():
    # Full rank: with exactly-zero eigenvalues the test outputs would accumulate the
    # round-off of k_test_train along the kernel's null space linearly in the step count.
    p = _problem((5, 2), (-1,), 2, key=3, full_rank=True)
    lr = 0.01 * max_lr(p["k2d"], p["y"].size, 0.9)
    steps = np.array([100_000, 0, 50_000])
    loop = gradient_descent_discrete(mse, p["k"], p["y"], lr, momentum=0.9)
    closed = gradient_descent_mse_discrete(p["k"], p["y"], lr, momentum=0.9)
    a = loop(steps, p["f0"], p["ft0"], p["kt"])
    b = closed(steps, p["f0"], p["ft0"], p["kt"])
    assert a[0].shape == (3, 5, 2)
    assert rel_err(a[0], b[0]) < (1e-9 if X64 else 1e-3)
    # float32: once converged, the training residual stalls at round-off level and the
    # loop keeps adding it to the test-set sums, for 1e5 steps.
    assert rel_err(a[1], b[1]) < (1e-9 if X64 else 5e-2)


# ----------------------------------------------------------------------------
# Small learning rates: gradient flow.


def _gradient_flow(k2d, y, f0, kt, ft0, t):
    """Exact gradient flow on MSE (flat outputs), independent of the library."""
    lam, v = jnp.linalg.eigh(k2d)
    lam = jnp.maximum(lam, 0.0)
    n = y.size
    r0 = v.T @ (f0 - y)
    decay = jnp.exp(-t * lam / n)
    f = y + v @ (decay[:, None] * r0)
    # f_test(t) - f_test(0) = -Kt V diag((1 - e^{-t lam/n}) / lam) V^T (f0 - y)
    safe = jnp.where(lam > 0, lam, 1.0)
    w = jnp.where(lam > 0, -jnp.expm1(-t * lam / n) / safe, t / n)
    ft = ft0 - kt @ (v @ (w[:, None] * r0))
    return f, ft


@needs_x64
@pytest.mark.parametrize("closed_form", [True, False])
def test_small_learning_rate_converges_to_gradient_flow_first_order(closed_form):
    p = _problem((6, 2), (-1,), 3, key=5)
    k2d, y = p["k2d"], p["y"]
    y2d, f02d = y, p["f0"]  # (rows, traced) already for trace_axes=(-1,)
    kt2d = p["kt"]
    ft0 = p["ft0"]
    base = max_lr(k2d, y.size)
    t = 40.0 * base  # lr * steps held fixed
    want = _gradient_flow(k2d, y2d, f02d, kt2d, ft0, t)
    errors = []
    for frac in (0.02, 0.01, 0.005):
        lr = frac * base
        steps = int(round(t / lr))
        if closed_form:
            fn = gradient_descent_mse_discrete(p["k"], y, lr)
        else:
            fn = gradient_descent_discrete(mse, p["k"], y, lr)
        got = fn(steps, p["f0"], ft0, p["kt"])
        errors.append(max(rel_err(got[0], want[0]), rel_err(got[1], want[1])))
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert errors[0] < 0.05
    for r in ratios:
        assert 1.8 < r < 2.2, (errors, ratios)


# ----------------------------------------------------------------------------
# Conventions: steps, states, shapes, jit.


@pytest.fixture(scope="module")
def small():
    p = _problem((4, 3, 2), (-1,), 2, key=7)
    lr = 0.6 * max_lr(p["k2d"], p["y"].size, 0.9, True)
    p["predictors"] = {
        "loop": gradient_descent_discrete(mse, p["k"], p["y"], lr, 0.9, True),
        "closed": gradient_descent_mse_discrete(p["k"], p["y"], lr, 0.9, True),
    }
    return p


@pytest.mark.parametrize("which", ["loop", "closed"])
def test_permuted_repeated_steps_equal_separate_calls(small, which):
    fn = small["predictors"][which]
    steps = np.array([[9, 0, 9], [3, 3, 20]])
    train, test = fn(steps, small["f0"], small["ft0"], small["kt"])
    assert train.shape == (2, 3) + small["y"].shape
    assert test.shape == (2, 3) + small["ft0"].shape
    for idx in np.ndindex(steps.shape):
        tr, te = fn(int(steps[idx]), small["f0"], small["ft0"], small["kt"])
        np.testing.assert_allclose(train[idx], tr, rtol=RTOL, atol=RTOL)
        np.testing.assert_allclose(test[idx], te, rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("which", ["loop", "closed"])
def test_resume_from_state_continues_trajectory(small, which):
    fn = small["predictors"][which]
    zeros = jnp.zeros_like
    state0 = DiscreteState(small["f0"], small["ft0"], zeros(small["f0"]), zeros(small["ft0"]))
    direct = fn(np.array([12, 30]), state0, None, small["kt"])
    assert isinstance(direct, DiscreteState)
    assert direct.vx_train.shape == (2,) + small["y"].shape
    assert direct.vx_test.shape == (2,) + small["ft0"].shape
    mid = jax.tree_util.tree_map(lambda x: x[0], fn(np.array([7, 7]), state0, None,
                                                      small["kt"]))
    resumed = fn(np.array([5, 23]), mid, None, small["kt"])
    for a, b in zip(jax.tree_util.tree_leaves(resumed), jax.tree_util.tree_leaves(direct),
                    strict=True):
        assert rel_err(a, b) < (1e-9 if X64 else 1e-4)
    # A state without velocities starts from zero velocity (a fresh optimizer).
    fresh = fn(np.array([12, 30]), DiscreteState(small["f0"], small["ft0"]), None,
               small["kt"])
    np.testing.assert_allclose(fresh.fx_test, direct.fx_test, rtol=RTOL, atol=RTOL)


STEPS_2 = np.array([0, 4])


@pytest.mark.parametrize("which", ["loop", "closed"])
def test_return_conventions(small, which):
    fn = small["predictors"][which]
    f0, ft0, kt = small["f0"], small["ft0"], small["kt"]
    train_only = fn(STEPS_2, f0)
    test_from_zero = fn(STEPS_2, None, ft0, kt)
    assert train_only.shape == (2,) + f0.shape and test_from_zero.shape == (2,) + ft0.shape
    # Step 0 returns the initial outputs.
    np.testing.assert_allclose(train_only[0], f0, rtol=RTOL)
    np.testing.assert_allclose(test_from_zero[0], ft0, rtol=RTOL)
    if which == "closed":
        return  # the rest is shared code, checked once with the loop
    both = fn(STEPS_2, f0, ft0, kt)
    np.testing.assert_allclose(both[0], train_only, rtol=RTOL)
    # fx_train=None: training starts from zeros, as in neural-tangents.
    np.testing.assert_allclose(
        test_from_zero, fn(STEPS_2, jnp.zeros_like(f0), ft0, kt)[1], rtol=RTOL, atol=RTOL
    )
    # Scalars broadcast to the output shapes.
    a = fn(STEPS_2, 0.5, -0.25, kt)
    b = fn(STEPS_2, jnp.full(f0.shape, 0.5, DTYPE), jnp.full(ft0.shape, -0.25, DTYPE), kt)
    np.testing.assert_allclose(a[0], b[0], rtol=RTOL)
    np.testing.assert_allclose(a[1], b[1], rtol=RTOL)


@pytest.mark.skipif(not X64, reason="float64 initial outputs need JAX_ENABLE_X64=1")
@pytest.mark.parametrize("which", ["loop", "closed"])
@pytest.mark.parametrize("momentum", [None, 0.9])
def test_higher_precision_initial_outputs_promote(which, momentum):
    """A float32 kernel with float64 initial outputs computes in float64, as the
    continuous-time predictors do: step 0 returns the initial outputs bit for bit (they
    were rounded to float32 before), later steps agree with an all-float64 run to float32
    accuracy, and Python scalars (weakly typed) keep the kernel's precision."""
    p = _problem((5, 2), (-1,), 3, key=11)
    k64, y64 = jnp.asarray(p["k"], jnp.float64), jnp.asarray(p["y"], jnp.float64)
    kt64 = jnp.asarray(p["kt"], jnp.float64)
    f0 = jnp.asarray(p["f0"], jnp.float64) + 1e-11 * jnp.arange(p["f0"].size).reshape(
        p["f0"].shape)
    ft0 = jnp.asarray(p["ft0"], jnp.float64) + 1e-11
    lr = 0.5 * max_lr(jnp.asarray(p["k2d"], jnp.float64), y64.size, momentum)

    def build(k, y):
        if which == "loop":
            return gradient_descent_discrete(mse, k, y, lr, momentum)
        return gradient_descent_mse_discrete(k, y, lr, momentum)

    f32 = [a.astype(jnp.float32) for a in (k64, y64, kt64)]
    got = build(f32[0], f32[1])(np.array([0, 7]), f0, ft0, f32[2])
    want = build(k64, y64)(np.array([0, 7]), f0, ft0, kt64)
    for a, b, a0 in zip(got, want, (f0, ft0), strict=True):
        assert a.dtype == jnp.float64
        np.testing.assert_array_equal(a[0], a0)
        np.testing.assert_allclose(a[1], b[1], rtol=2e-5, atol=2e-5)
    assert build(f32[0], f32[1])(3, 0.5).dtype == jnp.float32


@pytest.mark.parametrize("which", ["loop", "closed"])
def test_jit_with_concrete_and_traced_steps(small, which):
    fn = small["predictors"][which]
    steps = jnp.array([5, 0, 11])
    want = fn(steps, small["f0"], small["ft0"], small["kt"])
    traced = jax.jit(fn)(steps, small["f0"], small["ft0"], small["kt"])
    np.testing.assert_allclose(traced[0], want[0], rtol=RTOL, atol=RTOL)
    np.testing.assert_allclose(traced[1], want[1], rtol=RTOL, atol=RTOL)
    concrete = jax.jit(lambda f0: fn(np.array([5, 0, 11]), f0, small["ft0"], small["kt"]))
    np.testing.assert_allclose(concrete(small["f0"])[1], want[1], rtol=RTOL, atol=RTOL)
    state = jax.jit(fn)(steps, DiscreteState(small["f0"]))
    assert isinstance(state, DiscreteState) and state.fx_train.shape == (3,) + small["y"].shape
    np.testing.assert_allclose(state.fx_train, want[0], rtol=RTOL, atol=RTOL)


def test_closed_form_is_differentiable():
    k2d = jnp.array([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 0.5]], DTYPE)
    y = jnp.array([[1.0], [-1.0], [0.5]], DTYPE)
    lr, steps = 0.8, 13
    fn = gradient_descent_mse_discrete(k2d, y, lr)
    grad = jax.grad(lambda f0: fn(steps, f0).sum())(jnp.zeros_like(y))
    # f_s = y + M^s (f_0 - y) with M = I - lr K / n, so d sum(f_s) / d f_0 = (M^s)^T 1.
    m = np.eye(3) - lr * np.asarray(k2d, np.float64) / y.size
    want = np.linalg.matrix_power(m, steps).T @ np.ones((3, 1))
    np.testing.assert_allclose(grad, want, rtol=1e-9 if X64 else 1e-4)


# ----------------------------------------------------------------------------
# Divergence.


def _diverging():
    k2d = jnp.array([[2.0, 0.5], [0.5, 1.0]], DTYPE)
    y = jnp.array([[1.0], [-1.0]], DTYPE)
    lr = 3.0 * max_lr(k2d, y.size)
    return k2d, y, lr


def test_divergence_raises_naming_step():
    k2d, y, lr = _diverging()
    fn = gradient_descent_discrete(mse, k2d, y, lr)
    with pytest.raises(FloatingPointError, match=r"at step \d+.*smaller learning_rate"):
        fn(np.array([10, 5000]), 1.0)
    # Large but finite values before the overflow are returned without complaint.
    assert bool(jnp.isfinite(fn(np.array([10, 20]), 1.0)).all())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jax logs the failing callback
        with pytest.raises(Exception, match=r"at step \d+") as info:
            jax.block_until_ready(jax.jit(fn)(jnp.array([10, 5000]), 1.0))
    assert "learning_rate" in str(info.value)


def test_divergence_warn_and_ignore_modes():
    k2d, y, lr = _diverging()
    warn_fn = gradient_descent_discrete(mse, k2d, y, lr, on_nonfinite="warn")
    with pytest.warns(RuntimeWarning, match=r"at step \d+"):
        out = warn_fn(np.array([10, 5000]), 1.0)
    assert not bool(jnp.isfinite(out).all())
    ignore_fn = gradient_descent_discrete(mse, k2d, y, lr, on_nonfinite="ignore")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not bool(jnp.isfinite(ignore_fn(np.array([10, 5000]), 1.0)).all())


@pytest.mark.parametrize("momentum,nesterov", [(None, False), (0.9, False), (0.9, True)])
def test_closed_form_warns_above_max_learning_rate(momentum, nesterov):
    k2d, y, _ = _diverging()
    lr_max = max_lr(k2d, y.size, momentum, nesterov)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradient_descent_mse_discrete(k2d, y, 0.95 * lr_max, momentum, nesterov)
    with pytest.warns(RuntimeWarning, match="maximal stable learning rate"):
        fn = gradient_descent_mse_discrete(k2d, y, 1.05 * lr_max, momentum, nesterov)
    # At the bound, as the kernel's float64 eigenvalue gives it (a rounding above or below
    # the predictor's own): the fastest mode neither grows nor decays, and no warning.
    at_bound = max_lr(k2d, y.size, momentum, nesterov)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gradient_descent_mse_discrete(k2d, y, at_bound, momentum, nesterov)
    if momentum is None:  # exact, but growing, predictions
        out = fn(np.array([10, 200]), 1.0)
        assert float(jnp.abs(out[1]).max()) > 10 * float(jnp.abs(out[0]).max())


# ----------------------------------------------------------------------------
# Validation.


@pytest.mark.parametrize("builder", ["loop", "closed"])
def test_validation_errors_name_the_argument(builder):
    k2d = jnp.eye(3, dtype=DTYPE)
    y = jnp.ones((3, 1), DTYPE)

    def build(*args, **kwargs):
        if builder == "loop":
            return gradient_descent_discrete(mse, *args, **kwargs)
        return gradient_descent_mse_discrete(*args, **kwargs)

    for lr in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="`learning_rate`.*> 0"):
            build(k2d, y, lr)
    for m in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"`momentum`.*\[0, 1\)"):
            build(k2d, y, 0.1, m)
    with pytest.raises(ValueError, match="`nesterov.*momentum"):
        build(k2d, y, 0.1, None, True)
    with pytest.raises(ValueError, match="`k_train_train`.*shape"):
        build(jnp.eye(4, dtype=DTYPE), y, 0.1)
    with pytest.raises(ValueError, match="`k_train_train`.*shape"):
        build(k2d, y, 0.1, trace_axes=())

    fn = build(k2d, y, 0.1)
    np.testing.assert_allclose(fn(3.0, 0.0), fn(3, 0.0), rtol=RTOL)  # integral floats are fine
    with pytest.raises(ValueError, match="`steps`.*negative"):
        fn(np.array([3, -1]))
    with pytest.raises(ValueError, match="`steps`.*non-integer"):
        fn(1.5)
    with pytest.raises(TypeError, match="`steps`"):
        fn(None)
    with pytest.raises(ValueError, match="`k_test_train`"):
        fn(3, 0.0, 0.0)
    with pytest.raises(ValueError, match="`fx_train_0`.*broadcastable"):
        fn(3, jnp.ones((2, 1)))
    with pytest.raises(ValueError, match="`k_test_train`.*shape"):
        fn(3, 0.0, 0.0, jnp.ones((2, 4)))
    with pytest.raises(ValueError, match="vx_train.*momentum=None"):
        fn(3, DiscreteState(fx_train=y, vx_train=y))
    with pytest.raises(ValueError, match="`fx_test_0` must be None"):
        fn(3, DiscreteState(fx_train=y), 0.0, jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="nothing to predict"):
        fn(3, None)
