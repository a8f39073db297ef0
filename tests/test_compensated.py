"""Compensated sums and products (``ntkflow._compensated``) against exact float64 arithmetic."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from ntkflow._compensated import compensate, dot2, dw_add, two_prod, two_sum


def test_two_sum_is_exact():
    rng = np.random.default_rng(0)
    a = (rng.standard_normal(1000) * 10.0 ** rng.uniform(-8, 8, 1000)).astype(np.float32)
    b = (rng.standard_normal(1000) * 10.0 ** rng.uniform(-8, 8, 1000)).astype(np.float32)
    s, e = two_sum(jnp.asarray(a), jnp.asarray(b))
    assert s.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(s), a + b)  # s is the rounded sum
    exact = a.astype(np.float64) + b.astype(np.float64)  # exact: 24 + 24 bits fit in 53
    np.testing.assert_array_equal(np.asarray(s, np.float64) + np.asarray(e, np.float64), exact)


def test_two_prod_and_double_word_sums_are_exact():
    rng = np.random.default_rng(2)
    a = (rng.standard_normal(1000) * 10.0 ** rng.uniform(-6, 6, 1000)).astype(np.float32)
    b = (rng.standard_normal(1000) * 10.0 ** rng.uniform(-6, 6, 1000)).astype(np.float32)
    p, e = two_prod(jnp.asarray(a), jnp.asarray(b))
    np.testing.assert_array_equal(np.asarray(p), a * b)
    exact = a.astype(np.float64) * b.astype(np.float64)  # 48 bits: exact in float64
    np.testing.assert_array_equal(np.asarray(p, np.float64) + np.asarray(e, np.float64), exact)
    # a running sum of exact products in double words keeps ~48 bits; float32 keeps 24
    acc = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    for x, y in zip(a[:200], b[:200], strict=True):
        acc = dw_add(acc, two_prod(jnp.float32(x), jnp.float32(y)))
    total = float(np.sum(exact[:200]))
    scale = float(np.sum(np.abs(exact[:200])))
    assert abs(float(acc[0]) + float(acc[1]) - total) < 1e-12 * scale


@pytest.mark.parametrize("n", [3, 256, 1024, 4096])
def test_dot2_removes_the_products_round_off(n):
    """``K_test @ S`` with cancellation, as in the test read-out: ``S`` large along the
    directions ``K_test`` nearly annihilates. Error relative to ``sum |a| |x|`` (the plain
    product's round-off scale): about ``2^-beta`` of the plain product's, with ``beta =
    (24 - log2 n) / 2`` bits."""
    rng = np.random.default_rng(n)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    lam = np.logspace(0, -4, n)
    a = (rng.standard_normal((40, n)) @ (q * lam) @ q.T).astype(np.float32)
    x = (q @ (rng.standard_normal((n, 2)) / lam[:, None])).astype(np.float32)
    x_lo = (np.asarray(x, np.float64) * 1e-8 * rng.standard_normal(x.shape)).astype(np.float32)
    exact = a.astype(np.float64) @ (x.astype(np.float64) + x_lo.astype(np.float64))
    scale = np.abs(a).astype(np.float64) @ np.abs(x).astype(np.float64)
    hi, lo = dot2(jnp.asarray(a), jnp.asarray(x), jnp.asarray(x_lo))
    assert hi.dtype == lo.dtype == jnp.float32
    got = np.asarray(hi, np.float64) + np.asarray(lo, np.float64)
    plain = np.asarray(jnp.asarray(a) @ jnp.asarray(x), np.float64)
    err, err_plain = (np.max(np.abs(v - exact) / scale) for v in (got, plain))
    eps = float(np.finfo(np.float32).eps)
    bits = (24 - int(np.ceil(np.log2(n)))) // 2
    assert err < 4 * 2.0**-bits * eps, (err, err_plain)
    if n >= 256:  # (the plain product's round-off depends on the CPU's kernel: 1/15 on one)
        assert err < err_plain / 8, (err, err_plain)
    # hi is the rounded value of the double word
    np.testing.assert_array_equal(np.asarray(hi + lo), np.asarray(hi))


def test_dot2_batches_over_leading_axes():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((5, 7)).astype(np.float32)
    x = rng.standard_normal((3, 7, 2)).astype(np.float32)
    hi, lo = dot2(jnp.asarray(a), jnp.asarray(x))
    assert hi.shape == (3, 5, 2)
    exact = np.einsum("pr,mrk->mpk", a.astype(np.float64), x.astype(np.float64))
    np.testing.assert_allclose(np.asarray(hi, np.float64) + np.asarray(lo, np.float64), exact,
                               rtol=1e-9, atol=1e-9)


def test_only_single_precision_is_compensated():
    assert compensate(np.float32) and compensate(jnp.bfloat16)
    assert not compensate(np.float64)


def _dot_precisions(jaxpr) -> list:
    """The ``precision`` of every float32 ``dot_general`` in ``jaxpr`` and the jaxprs it
    calls (compiled calls, loops, branches)."""
    from jax.extend.core import ClosedJaxpr, Jaxpr

    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general" and all(
                v.aval.dtype == jnp.float32 for v in eqn.invars):
            found.append(eqn.params["precision"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                if isinstance(sub, ClosedJaxpr):
                    found += _dot_precisions(sub.jaxpr)
                elif isinstance(sub, Jaxpr):
                    found += _dot_precisions(sub)
    return found


def test_predictors_compute_float32_products_at_full_precision():
    """Accelerators' default float32 products are TF32 (GPU) or bfloat16 passes (TPU);
    the predictors trace theirs at ``"highest"``, whatever the caller's default."""
    import jax

    import ntkflow as nt

    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 6))
    k = jnp.asarray(a @ a.T / 6, jnp.float32)
    y = jnp.asarray(np.eye(3)[rng.integers(0, 3, 6)], jnp.float32)
    kt = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
    f0, ft0 = jnp.zeros((6, 3), jnp.float32), jnp.zeros((4, 3), jnp.float32)

    def ce(f, y):
        return -jnp.mean(jax.nn.log_softmax(f) * y)

    def mse(f, y):
        return 0.5 * jnp.mean((f - y) ** 2)

    highest = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)
    with jax.default_matmul_precision("bfloat16"):  # a caller's (or an accelerator's) default
        calls = {
            "mse": (nt.predict.gradient_descent_mse(k, y), 2.0),
            "tsit5": (nt.predict.gradient_descent(ce, k, y, solver="tsit5"), 2.0),
            "rodas5p": (nt.predict.gradient_descent(ce, k, y, 1.0, 0.9, solver="rodas5p"), 2.0),
            "discrete": (nt.predict.gradient_descent_discrete(mse, k, y, 0.5), 3),
            "mse discrete": (nt.predict.gradient_descent_mse_discrete(k, y, 0.5), 3),
        }
        for name, (predict, t) in calls.items():
            jaxpr = jax.make_jaxpr(lambda f, ft, p=predict, t=t: p(t, f, ft, kt))(f0, ft0)
            precisions = _dot_precisions(jaxpr.jaxpr)
            assert precisions, name
            assert all(p == highest for p in precisions), (name, set(precisions))
