"""ntkflow against reference outputs of neural-tangents 0.6.5.

The fixtures ``tests/fixtures/nt_predict.{npz,json}`` and ``tests/fixtures/nt_empirical.{npz,json}``
were computed in float64 with neural-tangents 0.6.5 by ``tests/reference/make_nt_fixtures.py``
(its docstring says how to regenerate them and describes their layout). Every case calls
ntkflow exactly as one would call neural-tangents (``import ntkflow as nt``), with the fixture
arrays converted to JAX's current default float dtype, so the file runs in float32 and in
float64 (``JAX_ENABLE_X64=0`` / ``=1``).
"""

import json
from functools import cache
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from reference import losses, models

import ntkflow as nt

# Current default float dtype and the tolerances for it. The float64 references are accurate to
# about 1e-7 (neural-tangents' ODE solver runs with rtol = atol = 1.4e-8).
FLOAT = jnp.zeros(()).dtype
X64 = FLOAT == jnp.float64
RTOL, ATOL = (1e-5, 1e-6) if X64 else (1e-3, 1e-3)

FIXTURES = Path(__file__).parent / "fixtures"


@cache
def _manifest(stem):
    return json.loads((FIXTURES / f"{stem}.json").read_text())


@cache
def _npz(stem):
    with np.load(FIXTURES / f"{stem}.npz") as data:
        return {key: data[key] for key in data.files}


def _cases(stem, function=None):
    cases = _manifest(stem)
    if function is not None:
        cases = [c for c in cases if c["function"] == function]
    return pytest.mark.parametrize("case", cases, ids=[c["name"] for c in cases])


def _has(stem, name, field):
    return f"{name}/{field}" in _npz(stem)


def _ref(stem, name, field):
    """A reference array exactly as stored (float64)."""
    return _npz(stem)[f"{name}/{field}"]


def _in(stem, name, field):
    """A fixture input as an array of the current default float dtype."""
    return jnp.asarray(np.asarray(_ref(stem, name, field), dtype=FLOAT))


def _t(t):
    """``t`` from the manifest as a user would pass it: None, a float, or an array."""
    if t is None or isinstance(t, float):
        return t
    return jnp.asarray(np.asarray(t, dtype=FLOAT))


def assert_matches(actual, expected, what):
    assert actual is not None, f"{what}: got None"
    assert not isinstance(actual, tuple), f"{what}: got a tuple"
    actual = jnp.asarray(actual)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == FLOAT, f"{what}: dtype {actual.dtype} != {FLOAT}"
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), expected, rtol=RTOL, atol=ATOL, err_msg=what
    )


def _check_outputs(stem, name, mode, out):
    """Check a predictor's return value for ``mode`` in ("train", "test", "train_test")."""
    if mode == "train_test":
        assert isinstance(out, tuple) and len(out) == 2, type(out)
        assert_matches(out[0], _ref(stem, name, "out_train"), "fx_train_t")
        assert_matches(out[1], _ref(stem, name, "out_test"), "fx_test_t")
    else:
        field = "out_train" if mode == "train" else "out_test"
        assert_matches(out, _ref(stem, name, field), f"fx_{mode}_t")


def _check_state(stem, name, prefix, state):
    assert isinstance(state, nt.predict.ODEState), type(state)
    for field in ("fx_train", "fx_test", "qx_train", "qx_test"):
        value = getattr(state, field)
        if _has(stem, name, f"{prefix}_{field}"):
            assert_matches(value, _ref(stem, name, f"{prefix}_{field}"), f"{prefix}.{field}")
        else:
            assert value is None, f"{prefix}.{field} should be None"


# --------------------------------------------------------------------------------------------
# nt.predict


@_cases("nt_predict", "gradient_descent")
def test_gradient_descent(case):
    stem, name, mode = "nt_predict", case["name"], case["mode"]
    predict_fn = nt.predict.gradient_descent(
        losses.LOSSES[case["loss"]],
        _in(stem, name, "k_train_train"),
        _in(stem, name, "y_train"),
        learning_rate=case["learning_rate"],
        momentum=case["momentum"],
        trace_axes=tuple(case["trace_axes"]),
    )
    t = _t(case["t"])

    if mode == "ode_state":
        k_test_train = _in(stem, name, "k_test_train")
        state_0 = nt.predict.ODEState(_in(stem, name, "fx_train_0"), _in(stem, name, "fx_test_0"))
        state_1 = predict_fn(t, state_0, None, k_test_train)
        _check_state(stem, name, "state", state_1)
        # Resume from the returned state; the clock restarts at that state.
        state_2 = predict_fn(_t(case["t_resume"]), state_1, k_test_train=k_test_train)
        _check_state(stem, name, "resumed_state", state_2)
        return

    if mode == "train":
        out = predict_fn(t, _in(stem, name, "fx_train_0"))
    elif mode == "test":
        out = predict_fn(
            t,
            fx_train_or_state_0=None,
            fx_test_0=_in(stem, name, "fx_test_0"),
            k_test_train=_in(stem, name, "k_test_train"),
        )
    else:
        out = predict_fn(
            t,
            _in(stem, name, "fx_train_0"),
            _in(stem, name, "fx_test_0"),
            _in(stem, name, "k_test_train"),
        )
    _check_outputs(stem, name, mode, out)


@_cases("nt_predict", "gradient_descent_mse")
def test_gradient_descent_mse(case):
    stem, name, mode = "nt_predict", case["name"], case["mode"]
    predict_fn = nt.predict.gradient_descent_mse(
        _in(stem, name, "k_train_train"),
        _in(stem, name, "y_train"),
        learning_rate=case["learning_rate"],
        diag_reg=case["diag_reg"],
        diag_reg_absolute_scale=case["diag_reg_absolute_scale"],
        trace_axes=tuple(case["trace_axes"]),
    )
    t = _t(case["t"])

    if mode == "train":
        out = predict_fn(t, _in(stem, name, "fx_train_0"))
    elif mode == "test":
        out = predict_fn(
            t=t,
            fx_train_0=None,
            fx_test_0=_in(stem, name, "fx_test_0"),
            k_test_train=_in(stem, name, "k_test_train"),
        )
    else:
        out = predict_fn(
            t,
            _in(stem, name, "fx_train_0"),
            _in(stem, name, "fx_test_0"),
            _in(stem, name, "k_test_train"),
        )
    _check_outputs(stem, name, mode, out)


@_cases("nt_predict", "max_learning_rate")
def test_max_learning_rate(case):
    stem, name = "nt_predict", case["name"]
    kwargs = {"momentum": case["momentum"]}
    if case["y_train_size"] is not None:
        kwargs["y_train_size"] = case["y_train_size"]
    lr = nt.predict.max_learning_rate(_in(stem, name, "ntk_train_train"), **kwargs)
    assert np.ndim(lr) == 0
    np.testing.assert_allclose(float(lr), _ref(stem, name, "out"), rtol=RTOL, atol=0)


# --------------------------------------------------------------------------------------------
# nt.empirical_ntk_fn


def _model_inputs(model, n_params):
    stem = "nt_empirical"
    params = [_in(stem, model, f"param_{i}") for i in range(n_params)]
    return params, _in(stem, model, "x1"), _in(stem, model, "x2")


@pytest.mark.parametrize("model", sorted(models.MODELS))
def test_plain_models_reproduce_stax(model):
    """The plain-JAX models used below compute the fixtures' ``stax`` outputs."""
    n_params = next(c["n_params"] for c in _manifest("nt_empirical") if c["model"] == model)
    params, x1, x2 = _model_inputs(model, n_params)
    f = models.MODELS[model]
    assert_matches(f(params, x1), _ref("nt_empirical", model, "fx1"), f"{model}(x1)")
    assert_matches(f(params, x2), _ref("nt_empirical", model, "fx2"), f"{model}(x2)")


@_cases("nt_empirical")
def test_empirical_ntk_fn(case):
    stem, name, model = "nt_empirical", case["name"], case["model"]
    params, x1, x2 = _model_inputs(model, case["n_params"])
    kernel_fn = nt.empirical_ntk_fn(
        models.MODELS[model], trace_axes=tuple(case["trace_axes"]), vmap_axes=None
    )
    assert_matches(kernel_fn(x1, None, params), _ref(stem, name, "ntk_x1_x1"), "ntk(x1, None)")
    assert_matches(kernel_fn(x2, x1, params), _ref(stem, name, "ntk_x2_x1"), "ntk(x2, x1)")
