"""Tests of `ntkflow.empirical_ntk_fn` against an explicit J(x1) J(x2)^T."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ntkflow import empirical_ntk_fn

X64 = jax.config.jax_enable_x64
# max |K - J J^T| / max |J J^T|: float32 contractions over a few hundred
# parameters lose a few ulps; float64 is exact to round-off.
RTOL = 1e-10 if X64 else 2e-5

N1, N2, D, H = 7, 5, 6, 16


def _params(key: jax.Array) -> dict[str, jax.Array]:
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "w1": jax.random.normal(k1, (D, H)),
        "b1": jax.random.normal(k2, (H,)),
        "w2": jax.random.normal(k3, (H, 12)),
    }


def _mlp(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    h = jnp.tanh(x @ p["w1"] / math.sqrt(D) + p["b1"])
    return h @ p["w2"] / math.sqrt(H)  # (n, 12)


def _mlp3d(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    return _mlp(p, x).reshape(x.shape[0], 3, 4)


@pytest.fixture(scope="module")
def data() -> tuple[dict[str, jax.Array], jax.Array, jax.Array]:
    kp, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 3)
    return _params(kp), jax.random.normal(k1, (N1, D)), jax.random.normal(k2, (N2, D))


_JACOBIANS: dict[tuple[int, int], tuple[np.ndarray, tuple[int, ...]]] = {}


def _jacobian_matrix(f, params, x) -> tuple[np.ndarray, tuple[int, ...]]:
    """Dense ``(outputs, parameters)`` Jacobian from ``jax.jacobian`` (cached)."""
    key = (id(f), id(x))
    if key not in _JACOBIANS:
        out_shape = jax.eval_shape(f, params, x).shape
        leaves = jax.tree.leaves(jax.jit(jax.jacobian(f))(params, x))
        rows = math.prod(out_shape)
        mat = np.concatenate([np.asarray(j, np.float64).reshape(rows, -1) for j in leaves], 1)
        _JACOBIANS[key] = (mat, out_shape)
    return _JACOBIANS[key]


def _reference(f, params, x1, x2, trace_axes, diagonal_axes) -> np.ndarray:
    """neural-tangents' kernel from dense Jacobians, with numpy trace/diagonal."""
    x2 = x1 if x2 is None else x2
    j1, s1 = _jacobian_matrix(f, params, x1)
    j2, s2 = _jacobian_matrix(f, params, x2)
    k = (j1 @ j2.T).reshape(s1 + s2)  # separate layout (out1..., out2...)
    nd = len(s1)
    trace = sorted(a % nd for a in trace_axes)
    diag = sorted(a % nd for a in diagonal_axes)
    # Labels of the remaining axes: ("1", a) / ("2", a) for the pairs.
    labels = [("1", a) for a in range(nd)] + [("2", a) for a in range(nd)]
    for a in trace:
        i, j = labels.index(("1", a)), labels.index(("2", a))
        k = np.trace(k, axis1=i, axis2=j) / s1[a]
        labels = [lab for lab in labels if lab not in (("1", a), ("2", a))]
    for a in diag:
        i, j = labels.index(("1", a)), labels.index(("2", a))
        k = np.diagonal(k, axis1=i, axis2=j)  # diagonal moved to the end
        labels = [lab for lab in labels if lab not in (("1", a), ("2", a))] + [("d", a)]
    order = []
    for a in range(nd):
        if a in trace:
            continue
        order += [("d", a)] if a in diag else [("1", a), ("2", a)]
    return np.transpose(k, [labels.index(lab) for lab in order])


def _assert_close(k, ref):
    k = np.asarray(k, np.float64)
    assert k.shape == ref.shape
    err = np.max(np.abs(k - ref)) / np.max(np.abs(ref))
    assert err < RTOL, err


@pytest.mark.parametrize(
    ("f", "trace_axes", "diagonal_axes"),
    [
        (_mlp, (), ()),
        (_mlp, (-1,), ()),
        (_mlp3d, (1,), ()),
        (_mlp3d, (1, 2), ()),
        (_mlp3d, (-1,), (1,)),
        (_mlp, (-1,), (0,)),
    ],
)
def test_matches_explicit_jacobian_product(data, f, trace_axes, diagonal_axes):
    """Both implementations; with batching too (3 divides neither 7 nor 5) for N-D outputs."""
    params, x1, x2 = data
    batch_sizes = (None, 3) if diagonal_axes else (None,)
    configs = [(impl, bs) for impl in ("jacobian", "ntvp") for bs in batch_sizes]
    with_x2 = 0 not in diagonal_axes  # a diagonal batch axis needs n1 == n2

    # One outer jit for all variants keeps the number of compilations small.
    @jax.jit
    def kernels(params, x1, x2):
        out = {}
        for impl, bs in configs:
            kernel_fn = empirical_ntk_fn(
                f, trace_axes, diagonal_axes, implementation=impl, batch_size=bs
            )
            out[f"{impl}-{bs}-same"] = kernel_fn(x1, None, params)
            if with_x2:
                out[f"{impl}-{bs}-x2"] = kernel_fn(x1, x2, params)
        return out

    got = kernels(params, x1, x2)
    ref_same = _reference(f, params, x1, None, trace_axes, diagonal_axes)
    for impl, bs in configs:
        _assert_close(got[f"{impl}-{bs}-same"], ref_same)
        if with_x2:
            ref = _reference(f, params, x1, x2, trace_axes, diagonal_axes)
            _assert_close(got[f"{impl}-{bs}-x2"], ref)


@pytest.mark.parametrize(("implementation", "batch_size"), [("jacobian", 5), ("ntvp", 100)])
def test_batch_size_eager(data, implementation, batch_size):
    """Outside jit. 5 divides n2 = 5 but not n1 = 7; 100 exceeds both."""
    params, x1, x2 = data
    kernel_fn = empirical_ntk_fn(_mlp3d, implementation=implementation, batch_size=batch_size)
    _assert_close(kernel_fn(x1, x2, params), _reference(_mlp3d, params, x1, x2, (-1,), ()))
    _assert_close(kernel_fn(x1, params=params), _reference(_mlp3d, params, x1, None, (-1,), ()))


def test_normalization_is_jjt_over_k(data):
    params, x1, _ = data
    jmat = _jacobian_matrix(_mlp, params, x1)[0].reshape(N1, 12, -1)
    expected = np.einsum("ick,jck->ij", jmat, jmat) / 12
    _assert_close(empirical_ntk_fn(_mlp)(x1, None, params), expected)


@pytest.mark.parametrize("implementation", ["jacobian", "ntvp", "auto", 0, 1, 2, 3])
def test_vmap_axes_and_codes(data, implementation):
    params, x1, x2 = data
    ref = _reference(_mlp3d, params, x1, x2, (2,), ())
    kernel_fn = empirical_ntk_fn(
        _mlp3d, trace_axes=(2,), vmap_axes=0, implementation=implementation
    )
    _assert_close(kernel_fn(x1, x2, params), ref)


def test_pytree_inputs_kwargs_and_outer_jit(data):
    params, x1, x2 = data

    def f(p, x, scale=1.0):
        return scale * _mlp(p, x["a"] + x["b"])

    x1t = {"a": x1, "b": 0.5 * x1}
    x2t = {"a": x2, "b": -x2}
    ref = _reference(_mlp, params, 1.5 * x1, 0.0 * x2, (-1,), ()) * 2.0 * 3.0
    kernel_fn = empirical_ntk_fn(f)
    # A pair of keyword values: one for f(x1), one for f(x2).
    k = kernel_fn(x1t, x2t, params, scale=(2.0, 3.0))
    _assert_close(k, ref)
    k_jit = jax.jit(lambda a, b, p: kernel_fn(a, b, p, scale=(2.0, 3.0)))(x1t, x2t, params)
    _assert_close(k_jit, ref)


def test_rng_keyword_follows_neural_tangents(data):
    """`rng` is used for f(x1) and `fold_in(rng, 1)` for a different x2."""
    params, x1, x2 = data

    def f(p, x, rng):
        mask = jax.random.bernoulli(rng, 0.5, (x.shape[0], 12))
        return _mlp(p, x) * mask

    key = jax.random.PRNGKey(3)

    def jmat(x, k):
        leaves = jax.tree.leaves(jax.jit(jax.jacobian(f))(params, x, k))
        return np.concatenate([np.asarray(j, np.float64).reshape(-1, 12, j[0, 0].size)
                               for j in leaves], -1)

    j1, j2 = jmat(x1, key), jmat(x2, jax.random.fold_in(key, 1))
    kernel_fn = empirical_ntk_fn(f)
    _assert_close(kernel_fn(x1, x2, params, rng=key), np.einsum("ick,jck->ij", j1, j2) / 12)
    _assert_close(kernel_fn(x1, None, params, rng=key), np.einsum("ick,jck->ij", j1, j1) / 12)


def test_auto_switches_to_ntvp_beyond_the_memory_budget(data, monkeypatch):
    import ntkflow._empirical as emp

    params, x1, x2 = data
    ref = _reference(_mlp, params, x1, x2, (-1,), ())

    def no_jacobian(*args, **kwargs):
        raise AssertionError("the Jacobian path was taken")

    monkeypatch.setattr(emp, "_jacobian", no_jacobian)
    monkeypatch.setattr(emp, "_MEMORY_BUDGET_ELEMENTS", 1000)  # < (7 + 5) * 12 * 304 elements
    _assert_close(empirical_ntk_fn(_mlp, implementation="auto")(x1, x2, params), ref)
    with pytest.raises(AssertionError, match="Jacobian path"):
        empirical_ntk_fn(_mlp, implementation="jacobian")(x1, x2, params)


def test_equinox_adapter():
    import equinox as eqx

    model = eqx.nn.MLP(4, 3, 8, 1, key=jax.random.PRNGKey(1))
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def f(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    x = jax.random.normal(jax.random.PRNGKey(2), (3, 4))
    k = empirical_ntk_fn(f, trace_axes=())(x, None, params)
    _assert_close(k, _reference(f, params, x, None, (), ()))


def test_symmetric_and_positive_semidefinite(data):
    params, x1, _ = data
    k = np.asarray(empirical_ntk_fn(_mlp, batch_size=3)(x1, None, params), np.float64)
    np.testing.assert_allclose(k, k.T, rtol=0, atol=RTOL * np.max(np.abs(k)))
    assert np.min(np.linalg.eigvalsh(k)) > -RTOL * np.max(np.abs(k)) * N1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"trace_axes": "a"}, TypeError, "trace_axes"),
        ({"trace_axes": (0.5,)}, TypeError, "trace_axes"),
        ({"diagonal_axes": [True]}, TypeError, "diagonal_axes"),
        ({"implementation": "fast"}, ValueError, "implementation"),
        ({"implementation": 7}, ValueError, "implementation"),
        ({"implementation": 1.0}, TypeError, "implementation"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 2.0}, TypeError, "batch_size"),
        ({"vmap_axes": "0"}, TypeError, "vmap_axes"),
        ({"vmap_axes": (0, 0)}, TypeError, "vmap_axes"),
    ],
)
def test_bad_factory_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        empirical_ntk_fn(_mlp, **kwargs)


def test_bad_call_arguments(data):
    params, x1, x2 = data
    with pytest.raises(TypeError, match="`f`"):
        empirical_ntk_fn(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="params"):
        empirical_ntk_fn(_mlp)(x1, x2)
    with pytest.raises(ValueError, match="trace_axes.*out of range"):
        empirical_ntk_fn(_mlp, trace_axes=(2,))(x1, x2, params)
    with pytest.raises(ValueError, match="same output axis twice"):
        empirical_ntk_fn(_mlp, trace_axes=(1, -1))(x1, x2, params)
    with pytest.raises(ValueError, match="must not share"):
        empirical_ntk_fn(_mlp, trace_axes=(1,), diagonal_axes=(-1,))(x1, x2, params)
    with pytest.raises(ValueError, match="agree in size"):
        empirical_ntk_fn(_mlp, diagonal_axes=(0,))(x1, x2, params)
    with pytest.raises(ValueError, match="same rank"):
        empirical_ntk_fn(
            lambda p, x: _mlp(p, x.reshape(-1, D)).reshape(x.shape[:-1] + (12,)), trace_axes=()
        )(x1, x2[None], params)
    with pytest.raises(TypeError, match="single array"):
        empirical_ntk_fn(lambda p, x: (_mlp(p, x), _mlp(p, x)))(x1, x2, params)
    with pytest.raises(ValueError, match="vmap_axes"):
        empirical_ntk_fn(_mlp, vmap_axes=(0, 1, {}))(x1, x2, params)
