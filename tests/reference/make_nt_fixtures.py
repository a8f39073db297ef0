"""Generate the neural-tangents 0.6.5 reference fixtures used by ``tests/test_nt_reference.py``.

neural-tangents 0.6.5 does not import on current JAX, so this script runs only in a separate,
pinned virtual environment. neural-tangents imports TensorFlow and ``tf2jax`` unconditionally
(from its ``experimental`` subpackage), so they must be installed; ``--no-deps`` keeps pip from
replacing the pinned JAX / NumPy. From the repository root::

    python3 -m venv .venv-nt
    .venv-nt/bin/pip install jax==0.4.30 jaxlib==0.4.30 "numpy<2" "scipy<1.14" \\
        frozendict dm-tree tensorflow-cpu==2.16.2
    .venv-nt/bin/pip install --no-deps neural-tangents==0.6.5 tf2jax==0.3.6
    .venv-nt/bin/python tests/reference/make_nt_fixtures.py

The script is deterministic (fixed seeds, float64) and rewrites, in ``tests/fixtures/``:

``nt_predict.npz`` / ``nt_predict.json``
    The manifest is a list of case dicts, each with ``name`` and ``function`` (one of
    ``"gradient_descent"``, ``"gradient_descent_mse"``, ``"max_learning_rate"``) plus the
    call parameters:

    * ``gradient_descent``: ``loss`` (a key of ``losses.LOSSES``), ``learning_rate``,
      ``momentum`` (``null`` or float), ``trace_axes`` (list), ``t`` (float or nested list,
      ascending, finite), ``mode``: ``"train"`` (``fx_test_0=None``), ``"test"``
      (``fx_train_or_state_0=None``), ``"train_test"``, or ``"ode_state"`` (start from
      ``ODEState(fx_train_0, fx_test_0)``, predict to ``t``, then call again from the returned
      state with ``t_resume``; neural-tangents restarts the clock at the given state, so
      ``t_resume`` is a duration measured from that state).
    * ``gradient_descent_mse``: ``learning_rate``, ``diag_reg``, ``diag_reg_absolute_scale``,
      ``trace_axes``, ``t`` (``null`` means ``t=None``, i.e. infinite time), ``mode`` as above
      (without ``"ode_state"``).
    * ``max_learning_rate``: ``y_train_size`` (``null`` for the default), ``momentum``.

    Arrays are stored under ``"<name>/<field>"``: inputs ``k_train_train``, ``y_train``,
    ``fx_train_0`` (absent in ``"test"`` mode), ``fx_test_0`` and ``k_test_train`` (absent in
    ``"train"`` mode); outputs ``out_train`` / ``out_test`` for array-returning modes;
    ``state_fx_train``, ``state_fx_test``, ``state_qx_train``, ``state_qx_test`` (first call)
    and ``resumed_state_*`` (second call) for ``"ode_state"`` (a field absent from the file
    is ``None`` in the returned ``ODEState``); ``out`` (0-d) for ``max_learning_rate``
    whose only input is ``"<name>/ntk_train_train"``.

``nt_empirical.npz`` / ``nt_empirical.json``
    The manifest is a list of case dicts with ``name``, ``model`` (a key of
    ``models.MODELS``), ``trace_axes`` and ``n_params``. Per model: ``"<model>/x1"``,
    ``"<model>/x2"``, outputs ``"<model>/fx1"``, ``"<model>/fx2"`` and parameters
    ``"<model>/param_<i>"`` (``jax.tree_util.tree_leaves`` of the ``stax`` parameters). Per
    case: ``"<name>/ntk_x1_x1"`` = ``kernel_fn(x1, None, params)`` and ``"<name>/ntk_x2_x1"``
    = ``kernel_fn(x2, x1, params)`` with
    ``kernel_fn = empirical_ntk_fn(f, trace_axes=trace_axes, vmap_axes=None)``.

Kernels for ``predict`` are positive semi-definite, ``J @ J.T / p`` for a Gaussian ``J``
(scaled by ``y_train.size`` so that the training dynamics happen on times of order one),
stored in neural-tangents' interleaved layout: shape ``zip(y.shape, y.shape)`` with the
``trace_axes`` pairs removed. The reference accuracy is that of neural-tangents' ODE solver
(``jax.experimental.ode.odeint`` with ``rtol = atol = 1.4e-8``) for ``gradient_descent``.
"""

import io
import json
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import losses
import models
import neural_tangents as nt
import numpy as np
from neural_tangents import stax

jax.config.update("jax_enable_x64", True)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"

N_TRAIN = 8
N_TEST = 5


# --------------------------------------------------------------------------------------------
# Helpers.


def _canonical_axes(axes, ndim):
    return sorted({a % ndim for a in axes})


def _interleave(g, n_axes):
    """``(a0, a1, ..., b0, b1, ...)`` -> ``(a0, b0, a1, b1, ...)``."""
    perm = [i for pair in zip(range(n_axes), range(n_axes, 2 * n_axes), strict=True) for i in pair]
    return np.transpose(g, perm)


def make_kernels(rng, y_shape, trace_axes, n_test=N_TEST, scale=None):
    """PSD ``k_train_train`` and matching ``k_test_train`` in neural-tangents' layout."""
    ndim = len(y_shape)
    traced = _canonical_axes(trace_axes, ndim)
    kept = [a for a in range(ndim) if a not in traced]
    assert kept[0] == 0, "the batch axis is never traced here"
    dims = [y_shape[a] for a in kept[1:]]
    n_train = y_shape[0]
    n_all = n_train + n_test
    d = int(np.prod(dims, dtype=int))
    p = 2 * n_all * d
    jac = rng.standard_normal((n_all * d, p))
    if scale is None:
        scale = float(np.prod(y_shape))
    g = scale * (jac @ jac.T) / p
    g = 0.5 * (g + g.T)
    g = g.reshape((n_all, *dims, n_all, *dims))
    g = _interleave(g, 1 + len(dims))
    return g[n_train:, :n_train].copy(), g[:n_train, :n_train].copy()


def make_targets(rng, y_shape, loss):
    if loss == "cross_entropy":
        labels = rng.integers(0, y_shape[-1], size=y_shape[:-1])
        return np.eye(y_shape[-1])[labels]
    return rng.standard_normal(y_shape)


def fx_test_shape(y_shape, n_test=N_TEST):
    return (n_test, *y_shape[1:])


def _to_list(t):
    if t is None:
        return None
    t = np.asarray(t, np.float64)
    return float(t) if t.ndim == 0 else t.tolist()


def _t_arg(t):
    """The ``t`` argument as a user would pass it: a Python float or an array."""
    if t is None:
        return None
    t = np.asarray(t, np.float64)
    return float(t) if t.ndim == 0 else t


def _np(x):
    x = np.asarray(x)
    assert x.dtype == np.float64, x.dtype
    assert np.all(np.isfinite(x)), "non-finite reference output"
    return x


def write_npz(path, arrays):
    """Like ``np.savez_compressed``, but with fixed timestamps so reruns give identical bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.array(arrays[key], order="C"), allow_pickle=False)
            info = zipfile.ZipInfo(key + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def write_json(path, cases):
    path.write_text(json.dumps(cases, indent=1) + "\n")


# --------------------------------------------------------------------------------------------
# nt.predict cases.


def gradient_descent_case(
    arrays,
    name,
    *,
    seed,
    loss,
    y_shape,
    trace_axes,
    t,
    mode,
    learning_rate=1.0,
    momentum=None,
    t_resume=None,
):
    rng = np.random.default_rng(seed)
    k_test_train, k_train_train = make_kernels(rng, y_shape, trace_axes)
    y_train = make_targets(rng, y_shape, loss)
    fx_train_0 = 0.5 * rng.standard_normal(y_shape)
    fx_test_0 = 0.5 * rng.standard_normal(fx_test_shape(y_shape))

    predict_fn = nt.predict.gradient_descent(
        losses.LOSSES[loss],
        jnp.asarray(k_train_train),
        jnp.asarray(y_train),
        learning_rate=learning_rate,
        momentum=momentum,
        trace_axes=tuple(trace_axes),
    )

    store = {"k_train_train": k_train_train, "y_train": y_train}
    if mode != "test":
        store["fx_train_0"] = fx_train_0
    if mode != "train":
        store["fx_test_0"] = fx_test_0
        store["k_test_train"] = k_test_train

    t_shape = np.shape(t)
    if mode == "train":
        out = predict_fn(_t_arg(t), fx_train_0)
        assert not isinstance(out, tuple)
        assert out.shape == t_shape + y_shape, out.shape
        store["out_train"] = _np(out)
    elif mode == "test":
        out = predict_fn(_t_arg(t), None, fx_test_0, k_test_train)
        assert not isinstance(out, tuple)
        assert out.shape == t_shape + fx_test_0.shape, out.shape
        store["out_test"] = _np(out)
    elif mode == "train_test":
        out = predict_fn(_t_arg(t), fx_train_0, fx_test_0, k_test_train)
        assert isinstance(out, tuple) and len(out) == 2
        assert out[0].shape == t_shape + y_shape
        assert out[1].shape == t_shape + fx_test_0.shape
        store["out_train"], store["out_test"] = _np(out[0]), _np(out[1])
    elif mode == "ode_state":
        state_0 = nt.predict.ODEState(fx_train_0, fx_test_0)
        state_1 = predict_fn(_t_arg(t), state_0, None, k_test_train)
        state_2 = predict_fn(_t_arg(t_resume), state_1, None, k_test_train)
        for prefix, state in (("state", state_1), ("resumed_state", state_2)):
            assert isinstance(state, nt.predict.ODEState)
            for field in ("fx_train", "fx_test", "qx_train", "qx_test"):
                value = getattr(state, field)
                if value is not None:
                    store[f"{prefix}_{field}"] = _np(value)
    else:
        raise ValueError(mode)

    for field, value in store.items():
        arrays[f"{name}/{field}"] = np.asarray(value, np.float64)
    case = {
        "name": name,
        "function": "gradient_descent",
        "loss": loss,
        "learning_rate": learning_rate,
        "momentum": momentum,
        "trace_axes": list(trace_axes),
        "t": _to_list(t),
        "mode": mode,
    }
    if mode == "ode_state":
        case["t_resume"] = _to_list(t_resume)
    return case


def gradient_descent_mse_case(
    arrays,
    name,
    *,
    seed,
    y_shape,
    trace_axes,
    t,
    mode,
    learning_rate=1.0,
    diag_reg=0.0,
    diag_reg_absolute_scale=False,
):
    rng = np.random.default_rng(seed)
    k_test_train, k_train_train = make_kernels(rng, y_shape, trace_axes)
    y_train = make_targets(rng, y_shape, "mse")
    fx_train_0 = 0.5 * rng.standard_normal(y_shape)
    fx_test_0 = 0.5 * rng.standard_normal(fx_test_shape(y_shape))

    predict_fn = nt.predict.gradient_descent_mse(
        jnp.asarray(k_train_train),
        jnp.asarray(y_train),
        learning_rate=learning_rate,
        diag_reg=diag_reg,
        diag_reg_absolute_scale=diag_reg_absolute_scale,
        trace_axes=tuple(trace_axes),
    )

    store = {"k_train_train": k_train_train, "y_train": y_train}
    t_shape = () if t is None else np.shape(t)
    if mode == "train":
        store["fx_train_0"] = fx_train_0
        out = predict_fn(_t_arg(t), fx_train_0)
        assert not isinstance(out, tuple)
        assert out.shape == t_shape + y_shape, out.shape
        store["out_train"] = _np(out)
    elif mode == "test":
        store["fx_test_0"] = fx_test_0
        store["k_test_train"] = k_test_train
        out = predict_fn(_t_arg(t), None, fx_test_0, k_test_train)
        assert not isinstance(out, tuple)
        assert out.shape == t_shape + fx_test_0.shape, out.shape
        store["out_test"] = _np(out)
    elif mode == "train_test":
        store["fx_train_0"] = fx_train_0
        store["fx_test_0"] = fx_test_0
        store["k_test_train"] = k_test_train
        out = predict_fn(_t_arg(t), fx_train_0, fx_test_0, k_test_train)
        assert isinstance(out, tuple) and len(out) == 2
        assert out[0].shape == t_shape + y_shape
        assert out[1].shape == t_shape + fx_test_0.shape
        store["out_train"], store["out_test"] = _np(out[0]), _np(out[1])
    else:
        raise ValueError(mode)

    for field, value in store.items():
        arrays[f"{name}/{field}"] = np.asarray(value, np.float64)
    return {
        "name": name,
        "function": "gradient_descent_mse",
        "learning_rate": learning_rate,
        "diag_reg": diag_reg,
        "diag_reg_absolute_scale": diag_reg_absolute_scale,
        "trace_axes": list(trace_axes),
        "t": _to_list(t),
        "mode": mode,
    }


def max_learning_rate_case(arrays, name, *, seed, y_shape, trace_axes, y_train_size, momentum):
    rng = np.random.default_rng(seed)
    _, ntk = make_kernels(rng, y_shape, trace_axes, n_test=0, scale=1.0)
    kwargs = {"momentum": momentum}
    if y_train_size is not None:
        kwargs["y_train_size"] = y_train_size
    out = nt.predict.max_learning_rate(jnp.asarray(ntk), **kwargs)
    arrays[f"{name}/ntk_train_train"] = ntk
    arrays[f"{name}/out"] = np.asarray(float(out), np.float64)
    return {
        "name": name,
        "function": "max_learning_rate",
        "y_train_size": y_train_size,
        "momentum": momentum,
    }


def check_gd_matches_closed_form(arrays, mse_name, **kwargs):
    """Self-check of the conventions: the ODE on MSE reproduces a closed-form case.

    ``kwargs`` must repeat the seed and shapes of the ``gradient_descent_mse`` case, so that
    both draw the same inputs.
    """
    scratch = {}
    gradient_descent_case(scratch, "check", loss="mse", **kwargs)
    for field in ("out_train", "out_test"):
        a, b = scratch[f"check/{field}"], arrays[f"{mse_name}/{field}"]
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def make_predict_fixtures():
    arrays, cases = {}, []
    grid = [0.0, 0.1, 0.5, 1.5, 4.0]
    grid_2d = [[0.05, 0.2, 0.6], [1.0, 2.0, 3.5]]
    n = N_TRAIN

    # gradient_descent: losses x t shapes x modes x trace_axes x momentum.
    gd = [
        # 2-D outputs y of shape (n, k): trace_axes (-1,) and ().
        dict(name="gd_mse_odestate_momentum_lr0.5", seed=10, loss="mse", y_shape=(n, 3),
             trace_axes=(-1,), t=1.0, t_resume=1.5, mode="ode_state",
             learning_rate=0.5, momentum=0.9),
        dict(name="gd_logcosh_notrace_odestate", seed=11, loss="log_cosh", y_shape=(n, 3),
             trace_axes=(), t=0.75, t_resume=[0.25, 1.25], mode="ode_state"),
        # N-D outputs y of shape (n, 3, 4): trace_axes (-1,), (1,), (1, 2) and ().
        dict(name="gd_xent_nd_trace_last_grid_train_test_lr0.5", seed=3,
             loss="cross_entropy", y_shape=(n, 3, 4), trace_axes=(-1,), t=grid,
             mode="train_test", learning_rate=0.5),
        dict(name="gd_logcosh_nd_trace1_momentum_scalar_t_lr2", seed=7, loss="log_cosh",
             y_shape=(n, 3, 4), trace_axes=(1,), t=2.0, mode="train_test",
             learning_rate=2.0, momentum=0.9),
        dict(name="gd_logcosh_nd_trace12_t2d_test_lr2", seed=4, loss="log_cosh",
             y_shape=(n, 3, 4), trace_axes=(1, 2), t=grid_2d, mode="test", learning_rate=2.0),
        dict(name="gd_xent_nd_notrace_momentum_grid_train", seed=9, loss="cross_entropy",
             y_shape=(6, 3, 4), trace_axes=(), t=grid, mode="train", momentum=0.9),
    ]
    for kw in gd:
        name = kw.pop("name")
        cases.append(gradient_descent_case(arrays, name, **kw))
        print("done", name, flush=True)

    # gradient_descent_mse: trace_axes x diag_reg x t (grid / scalar / 2-D / None) x modes.
    mse = [
        dict(name="mse_grid_train_test", seed=2, y_shape=(n, 3), trace_axes=(-1,), t=grid,
             mode="train_test"),
        dict(name="mse_notrace_reg_rel_t2d_lr0.5", seed=13, y_shape=(n, 3), trace_axes=(),
             t=grid_2d, mode="train_test", learning_rate=0.5, diag_reg=1e-2),
        dict(name="mse_nd_trace1_reg_abs_tnone", seed=14, y_shape=(n, 3, 4), trace_axes=(1,),
             t=None, mode="train_test", diag_reg=1e-2, diag_reg_absolute_scale=True),
        dict(name="mse_nd_trace12_reg_abs_scalar_test", seed=15, y_shape=(n, 3, 4),
             trace_axes=(1, 2), t=2.5, mode="test", diag_reg=1e-2,
             diag_reg_absolute_scale=True),
        dict(name="mse_nd_notrace_tnone_test", seed=16, y_shape=(6, 3, 4), trace_axes=(),
             t=None, mode="test"),
        dict(name="mse_nd_trace_last_reg_rel_grid_train_lr2", seed=17, y_shape=(n, 3, 4),
             trace_axes=(-1,), t=grid, mode="train", learning_rate=2.0, diag_reg=1e-2),
    ]
    for kw in mse:
        name = kw.pop("name")
        cases.append(gradient_descent_mse_case(arrays, name, **kw))
        print("done", name, flush=True)
    check_gd_matches_closed_form(
        arrays, "mse_grid_train_test", seed=2, y_shape=(n, 3), trace_axes=(-1,), t=grid,
        mode="train_test",
    )

    mlr = [
        dict(name="mlr_2d", seed=18, y_shape=(n, 3), trace_axes=(-1,), y_train_size=None,
             momentum=0.0),
        dict(name="mlr_2d_size_momentum", seed=19, y_shape=(n, 3), trace_axes=(-1,),
             y_train_size=3 * n, momentum=0.9),
        dict(name="mlr_4d", seed=20, y_shape=(n, 3), trace_axes=(), y_train_size=None,
             momentum=0.0),
        dict(name="mlr_4d_size_momentum", seed=21, y_shape=(n, 3), trace_axes=(),
             y_train_size=3 * n, momentum=0.5),
    ]
    for kw in mlr:
        name = kw.pop("name")
        cases.append(max_learning_rate_case(arrays, name, **kw))

    names = [c["name"] for c in cases]
    assert len(set(names)) == len(names)
    return arrays, cases


# --------------------------------------------------------------------------------------------
# nt.empirical_ntk_fn cases.


def make_empirical_fixtures():
    arrays, cases = {}, []
    key = jax.random.PRNGKey(0)
    specs = {
        "mlp": (
            stax.serial(
                stax.Dense(models.MLP_HIDDEN, W_std=models.MLP_W_STD, b_std=models.MLP_B_STD),
                stax.Erf(),
                stax.Dense(models.MLP_OUT),
            ),
            (4, 6),
            (3, 6),
        ),
        "conv": (
            stax.serial(
                stax.Conv(models.CONV_CHANNELS, models.CONV_FILTER, padding=models.CONV_PADDING),
                stax.Relu(),
                stax.Flatten(),
                stax.Dense(models.CONV_OUT),
            ),
            (3, 5, 5, 2),
            (2, 5, 5, 2),
        ),
    }
    for model, ((init_fn, apply_fn, _), shape_1, shape_2) in specs.items():
        key, k_init, k_1, k_2 = jax.random.split(key, 4)
        x1 = jax.random.normal(k_1, shape_1, jnp.float64)
        x2 = jax.random.normal(k_2, shape_2, jnp.float64)
        _, params = init_fn(k_init, x1.shape)
        leaves = jax.tree_util.tree_leaves(params)
        plain = models.MODELS[model]

        fx1, fx2 = apply_fn(params, x1), apply_fn(params, x2)
        for x, fx in ((x1, fx1), (x2, fx2)):
            np.testing.assert_allclose(plain(leaves, x), fx, rtol=0, atol=1e-10)

        arrays[f"{model}/x1"], arrays[f"{model}/x2"] = _np(x1), _np(x2)
        arrays[f"{model}/fx1"], arrays[f"{model}/fx2"] = _np(fx1), _np(fx2)
        for i, leaf in enumerate(leaves):
            arrays[f"{model}/param_{i}"] = _np(leaf)

        for trace_axes, suffix in (((), "notrace"), ((-1,), "trace_last")):
            name = f"{model}_{suffix}"
            kernel_fn = nt.empirical_ntk_fn(apply_fn, trace_axes=trace_axes, vmap_axes=None)
            k11 = kernel_fn(x1, None, params)
            k21 = kernel_fn(x2, x1, params)
            # The same kernels through the plain-JAX model and its flat parameter list.
            plain_kernel_fn = nt.empirical_ntk_fn(plain, trace_axes=trace_axes, vmap_axes=None)
            np.testing.assert_allclose(plain_kernel_fn(x1, None, leaves), k11, atol=1e-10)
            np.testing.assert_allclose(plain_kernel_fn(x2, x1, leaves), k21, atol=1e-10)
            arrays[f"{name}/ntk_x1_x1"], arrays[f"{name}/ntk_x2_x1"] = _np(k11), _np(k21)
            cases.append(
                {
                    "name": name,
                    "model": model,
                    "trace_axes": list(trace_axes),
                    "n_params": len(leaves),
                }
            )
            print("done", name, k11.shape, k21.shape, flush=True)
    return arrays, cases


def main():
    assert nt.__version__ == "0.6.5", nt.__version__
    assert jnp.zeros(()).dtype == jnp.float64
    FIXTURES.mkdir(parents=True, exist_ok=True)
    makers = {"nt_predict": make_predict_fixtures, "nt_empirical": make_empirical_fixtures}
    for stem, make in makers.items():
        arrays, cases = make()
        write_npz(FIXTURES / f"{stem}.npz", arrays)
        write_json(FIXTURES / f"{stem}.json", cases)
        size = (FIXTURES / f"{stem}.npz").stat().st_size
        print(f"wrote {stem}.npz ({size} bytes, {len(arrays)} arrays) and {stem}.json "
              f"({len(cases)} cases)")


if __name__ == "__main__":
    main()
