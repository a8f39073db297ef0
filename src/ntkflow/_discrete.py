r"""Exact discrete-time predictions of full-batch (momentum) gradient descent.

The continuous-time predictors follow gradient *flow*; a network trained with a
finite learning rate takes discrete steps instead. For a linearized network
:math:`f_{\mathrm{lin}}(\theta) = f(\theta_0) + J (\theta - \theta_0)` trained with
full-batch gradient descent on a loss :math:`L(f)`, the parameter update
:math:`\theta_{s+1} = \theta_s - \eta J^\top \nabla_f L(f_s)` is, in function space,

.. math::

    f_{s+1} = f_s - \eta\, K \nabla_f L(f_s), \qquad
    f^{\mathrm{test}}_{s+1} = f^{\mathrm{test}}_s - \eta\, K_{\mathrm{test,train}}
    \nabla_f L(f_s),

with the empirical NTK :math:`K = J J^\top`. These are exact: no ODE and no
discretization error, for any learning rate :math:`\eta`.

Momentum follows ``optax.sgd(learning_rate, momentum=m, nesterov=...)`` (and
PyTorch): :math:`v \leftarrow m v + g`, :math:`\theta \leftarrow \theta - \eta v`
(Nesterov: :math:`\theta \leftarrow \theta - \eta (m v + g)` with the new
:math:`v`). With the function-space velocity :math:`u = J v` this is

.. math::

    u_{s+1} = m u_s + K g_s, \qquad
    f_{s+1} = f_s - \eta\, u_{s+1}
    \quad\text{(Nesterov: } f_{s+1} = f_s - \eta (m u_{s+1} + K g_s)\text{)},

with :math:`g_s = \nabla_f L(f_s)`, and the same with :math:`K_{\mathrm{test,train}}`
and :math:`u^{\mathrm{test}} = J_{\mathrm{test}} v` on the test set.

Two predictors are provided:

* :func:`gradient_descent_discrete` for any loss: a compiled loop over the
  training steps that keeps only the current state (memory independent of the
  number of steps) and records the requested steps;
* :func:`gradient_descent_mse_discrete` for the mean squared error: a closed form
  in the eigenbasis of the kernel, at a cost logarithmic in the step count.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntkflow._axes import (
    Layout,
    kernel_rows_shapes,
    kernel_to_2d,
    make_layout,
    outputs_from_2d,
    outputs_to_2d,
)
from ntkflow._checks import (
    broadcasts_to,
    check_array,
    check_finite,
    check_learning_rate,
    check_loss,
    check_momentum,
    check_psd,
    check_psd_eigenvalues,
    check_symmetric,
    describe,
)
from ntkflow._compensated import full_precision
from ntkflow._eigen import add_diagonal_regularizer
from ntkflow._typing import float_dtype, is_concrete

__all__ = [
    "DiscreteState",
    "gradient_descent_discrete",
    "gradient_descent_mse_discrete",
]

OnNonFinite = Literal["raise", "warn", "ignore"]
_ON_NONFINITE = ("raise", "warn", "ignore")


class DiscreteState(eqx.Module):
    """State of discrete-time (momentum) gradient descent in function space.

    Pass a ``DiscreteState`` as ``fx_train_or_state_0`` to a predictor from
    :func:`gradient_descent_discrete` or :func:`gradient_descent_mse_discrete`
    to get a ``DiscreteState`` back at every requested step; passing a returned
    state (at one step) back in continues the same trajectory.

    Attributes:
      fx_train: outputs on the training set, or ``None`` (treated as zeros).
      fx_test: outputs on the test set, or ``None`` for no test predictions.
      vx_train: function-space velocity :math:`u = J v` on the training set,
        where :math:`v` is the optimizer's momentum buffer (``optax``'s trace);
        only with ``momentum``; ``None`` means zeros (a fresh optimizer).
      vx_test: function-space velocity :math:`J_{test} v` on the test set.

    Example:
      >>> import jax.numpy as jnp
      >>> state = DiscreteState(fx_train=jnp.zeros((3, 2)))
      >>> state.fx_test is None and state.vx_train is None
      True
    """

    fx_train: Any = None
    fx_test: Any = None
    vx_train: Any = None
    vx_test: Any = None


# ----------------------------------------------------------------------------
# Validation.


def _check_learning_rate(learning_rate: Any) -> Any:
    """The shared ``learning_rate`` check, stating the bound as ``> 0``."""
    try:
        return check_learning_rate(learning_rate)
    except ValueError:
        value = float(np.asarray(learning_rate))
        raise ValueError(f"`learning_rate` must be a finite scalar > 0; got {value!r}.") from None


def _check_momentum(momentum: Any, nesterov: bool) -> Any:
    """The shared ``momentum`` check, after the rules for ``nesterov``."""
    if not isinstance(nesterov, (bool, np.bool_)):
        raise TypeError(f"`nesterov` must be a bool; got {nesterov!r}.")
    if nesterov and momentum is None:
        raise ValueError(
            "`nesterov=True` needs a momentum: pass `momentum` in [0, 1); got momentum=None."
        )
    return check_momentum(momentum)


def _check_on_nonfinite(on_nonfinite: str) -> None:
    if on_nonfinite not in _ON_NONFINITE:
        raise ValueError(
            f"`on_nonfinite` must be one of {_ON_NONFINITE}; got {on_nonfinite!r}."
        )


def _int_dtype() -> Any:
    return jnp.asarray(0).dtype  # int32, or int64 with JAX_ENABLE_X64=1


def _check_steps(steps: Any) -> jax.Array:
    """Validated ``steps`` as an integer array (any shape)."""
    if steps is None:
        raise TypeError(
            "`steps` must be non-negative integers (a scalar or an array of any shape); "
            "got None."
        )
    int_dtype = _int_dtype()
    if not is_concrete(steps):
        if not jnp.issubdtype(jnp.result_type(steps), jnp.integer):
            raise TypeError(
                "`steps` traced under a JAX transformation must have an integer dtype; "
                f"got {describe(steps)}."
            )
        steps = jnp.asarray(steps, int_dtype)
        return eqx.error_if(
            steps, steps < 0, "`steps` must be non-negative integers; got a negative entry."
        )
    arr = np.asarray(steps)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise TypeError(
            f"`steps` must be non-negative integers; got {describe(steps)}."
        )
    if arr.size:
        if np.issubdtype(arr.dtype, np.floating):
            bad = ~np.isfinite(arr) | (arr != np.round(arr))
            if bad.any():
                raise ValueError(
                    "`steps` must be non-negative integers (training step counts); got the "
                    f"non-integer value {arr[bad].flat[0]!r}."
                )
        if (arr < 0).any():
            raise ValueError(
                "`steps` must be non-negative integers (training step counts); got the "
                f"negative value {arr[arr < 0].flat[0]!r}."
            )
        top = np.iinfo(int_dtype).max
        if arr.max() >= top:
            raise ValueError(
                f"`steps` must be below {top} (the largest {np.dtype(int_dtype).name}); got "
                f"{arr.max()!r}. Enable 64-bit JAX (JAX_ENABLE_X64=1) for more steps."
            )
    return jnp.asarray(arr.astype(int_dtype))


@partial(jax.jit, static_argnames=("absolute",))
def _eigh(k2d: jax.Array, diag_reg: Any, *, absolute: bool) -> tuple[jax.Array, jax.Array]:
    """Eigendecomposition of ``K + diag_reg * I`` (``diag_reg`` scaled by
    ``trace(K) / K.shape[0]`` unless ``absolute``, as in neural-tangents); the
    eigenvalues are not clamped yet."""
    evals, evecs = jnp.linalg.eigh(add_diagonal_regularizer(k2d, diag_reg, absolute))
    return evals, evecs


def _stable_factor(momentum: float | None, nesterov: bool) -> float:
    r"""Largest stable :math:`h = \eta \lambda / n` of the per-eigenvalue MSE iteration.

    Plain GD: :math:`2`; heavy ball: :math:`2 (1 + m)`; Nesterov:
    :math:`2 (1 + m) / (1 + 2 m)` (Jury's conditions on the 2x2 companion matrix).
    """
    if momentum is None:
        return 2.0
    m = float(momentum)
    return 2.0 * (1.0 + m) / (1.0 + 2.0 * m) if nesterov else 2.0 * (1.0 + m)


def _nonfinite_message(step: int, learning_rate: Any) -> str:
    try:
        lr = f"{float(learning_rate):.6g}"
    except (TypeError, jax.errors.ConcretizationTypeError):
        lr = "the given value"
    return (
        f"Discrete gradient descent diverged: non-finite values appeared in the training-set "
        f"outputs at step {step} (counted from the initial state), with learning_rate={lr}. "
        "The learning rate is probably above the maximal stable one (for MSE: "
        "2 * (1 + momentum) * y_train.size / lambda_max(k_train_train), less with Nesterov); "
        "use a smaller learning_rate, or pass on_nonfinite='ignore' (or 'warn') to get the "
        "non-finite values instead of this error."
    )


class _NonFiniteReporter:
    """Callback reporting divergence from inside a compiled program."""

    def __init__(self, mode: str, learning_rate: Any) -> None:
        self.mode = mode
        self.lr = learning_rate if is_concrete(learning_rate) else None

    def __call__(self, step: Any) -> None:
        # Under vmap both branches of the cond run, possibly on a batch: report the
        # first diverging step, if any.
        bad = np.asarray(step)
        bad = bad[bad >= 0]
        if bad.size == 0:
            return
        msg = _nonfinite_message(int(bad.min()), self.lr)
        if self.mode == "raise":
            raise FloatingPointError(msg)
        warnings.warn(msg, RuntimeWarning, stacklevel=2)


def _report_nonfinite(out: Any, bad_step: jax.Array, mode: str, learning_rate: Any) -> Any:
    """Raise or warn (``mode``) if ``bad_step >= 0``; returns ``out`` (ordered after the check)."""
    if mode == "ignore":
        return out
    if is_concrete(bad_step):
        step = int(bad_step)
        if step >= 0:
            msg = _nonfinite_message(step, learning_rate)
            if mode == "raise":
                raise FloatingPointError(msg)
            warnings.warn(msg, RuntimeWarning, stacklevel=3)
        return out
    # Traced (under jax.jit): report from the running program, naming the step.
    reporter = _NonFiniteReporter(mode, learning_rate)

    def report(o: Any) -> Any:
        jax.debug.callback(reporter, bad_step)
        return o

    return lax.cond(bad_step >= 0, report, lambda o: o, out)


# ----------------------------------------------------------------------------
# Shared predictor machinery.


class _Call(NamedTuple):
    """Static description of one predictor call."""

    is_state: bool
    want_train: bool
    want_test: bool
    test_rows_shape: tuple[int, ...] | None
    n_bits: int | None = None


class _Flat(NamedTuple):
    """Initial values as flat ``(rows, traced)`` arrays, and the flat test-train kernel.

    ``u0``/``ut0`` (velocities) are set iff the predictor has a momentum;
    ``ft0``, ``ut0`` and ``kt`` are ``None`` without test predictions.
    """

    f0: jax.Array
    u0: jax.Array | None
    ft0: jax.Array | None
    ut0: jax.Array | None
    kt: jax.Array | None


#: Flat ``(f, u, f_test, u_test, bad_step)``; ``None`` where not computed.
_FlatResult = tuple[jax.Array, jax.Array | None, jax.Array | None, jax.Array | None, jax.Array]


def _kdot(k: jax.Array, x: jax.Array) -> jax.Array:
    """``k @ x[t]`` for every leading index ``t`` of ``x`` (``(T, rows, traced)``)."""
    return jnp.einsum("ij,tjc->tic", k, x)


def _test_outputs(
    x: _Flat,
    lr: jax.Array,
    kt: jax.Array,
    w: jax.Array,
    momentum_sums: tuple[jax.Array, jax.Array, jax.Array] | None,
) -> tuple[jax.Array, jax.Array | None]:
    r"""Test outputs :math:`f^{test}_s = f^{test}_0 - \eta (c_s u^{test}_0 + K_{test,train}
    W_s)` and :math:`u^{test}_s = p_s u^{test}_0 + K_{test,train} A_s` from the gradient
    sums ``w`` and ``momentum_sums = (a, p, c)`` (``None`` without momentum), all with a
    leading step axis; ``kt`` is the flat test-train kernel in the basis of the sums."""
    assert x.ft0 is not None
    kw = _kdot(kt, w)
    if momentum_sums is None:
        return x.ft0 - lr * kw, None
    assert x.ut0 is not None
    a, p, c = momentum_sums
    ft = x.ft0 - lr * (c[:, None, None] * x.ut0 + kw)
    ut = p[:, None, None] * x.ut0 + _kdot(kt, a)
    return ft, ut


def _check_shape(x: Any, name: str, shape: tuple[int, ...]) -> None:
    """``x`` (a real array or scalar) must broadcast to ``shape``."""
    check_array(x, name)
    x_shape = tuple(np.shape(x))
    if not broadcasts_to(x_shape, shape):
        raise ValueError(
            f"`{name}` must be a scalar or an array broadcastable to shape {tuple(shape)}; "
            f"got shape {x_shape}."
        )


class _PredictorBase(eqx.Module):
    """Common argument handling.

    A predictor is a pytree holding everything computed when it was built (no
    hidden caches). It hashes by identity, so ``jax.jit(predict_fn)`` works.
    """

    y_train: jax.Array
    learning_rate: Any
    momentum: Any
    nesterov: bool = eqx.field(static=True)
    layout: Layout = eqx.field(static=True)
    rows_shape: tuple[int, ...] = eqx.field(static=True)

    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return self is other

    def _on_nonfinite(self) -> str:
        return "ignore"

    def _n_bits(self, steps: jax.Array) -> int | None:
        """Static loop length needed for ``steps`` (closed form only)."""
        return None

    @property
    def _has_momentum(self) -> bool:
        return self.momentum is not None

    def _rates(self, dtype: Any) -> tuple[jax.Array, jax.Array]:
        """``(learning_rate, momentum)`` as arrays of ``dtype`` (momentum 0 without one)."""
        lr = jnp.asarray(self.learning_rate).astype(dtype)
        m = jnp.asarray(0.0 if self.momentum is None else self.momentum).astype(dtype)
        return lr, m

    @abc.abstractmethod
    def _flat(
        self, steps: jax.Array, x: _Flat, n_bits: int | None
    ) -> _FlatResult:
        """Flat ``(T, rows, traced)`` outputs ``(f, u, f_test, u_test, bad_step)`` at the
        flat ``steps`` (``T`` entries); ``bad_step`` is the first step with non-finite
        training outputs, or ``-1``."""

    @full_precision
    def __call__(
        self,
        steps: Any,
        fx_train_or_state_0: Any = 0.0,
        fx_test_0: Any = None,
        k_test_train: Any = None,
    ) -> Any:
        """Outputs after ``steps`` discrete optimizer steps.

        Args:
          steps: non-negative integer step counts, any shape and order (repeats allowed).
          fx_train_or_state_0: training-set outputs at step 0 (array or scalar,
            broadcast to ``y_train.shape``; ``None`` to not return them, training
            then starts from zeros), or a :class:`DiscreteState`.
          fx_test_0: test-set outputs at step 0 (array or scalar), or ``None``.
          k_test_train: test-train kernel, needed when ``fx_test_0`` is given.

        Returns:
          ``fx_train``, ``fx_test`` or ``(fx_train, fx_test)`` with leading
          ``steps.shape`` axes; a :class:`DiscreteState` if a state was passed.
        """
        steps = _check_steps(steps)
        call, inputs = self._validate(fx_train_or_state_0, fx_test_0, k_test_train)
        call = call._replace(n_bits=self._n_bits(steps))
        out, bad = _predict(self, steps, inputs, call=call)
        return _report_nonfinite(out, bad, self._on_nonfinite(), self.learning_rate)

    def _validate(
        self, fx_train_or_state_0: Any, fx_test_0: Any, k_test_train: Any
    ) -> tuple[_Call, tuple[Any, ...]]:
        """Check the call's arguments; returns the static call description and the
        initial ``(fx_train, vx_train, fx_test, vx_test, k_test_train)`` (maybe None)."""
        is_state = isinstance(fx_train_or_state_0, DiscreteState)
        if is_state:
            state = fx_train_or_state_0
            if fx_test_0 is not None:
                raise ValueError(
                    "`fx_test_0` must be None when a DiscreteState is passed as "
                    "`fx_train_or_state_0` (the state holds `fx_test`); got "
                    f"{describe(fx_test_0)}."
                )
            fx_train_0, fx_test_0 = state.fx_train, state.fx_test
            vx_train_0, vx_test_0 = state.vx_train, state.vx_test
        else:
            fx_train_0, vx_train_0, vx_test_0 = fx_train_or_state_0, None, None

        if fx_train_0 is None and fx_test_0 is None:
            raise ValueError(
                "Both the training outputs (`fx_train_or_state_0`) and the test outputs "
                "(`fx_test_0`) are None, so there is nothing to predict; pass initial outputs "
                "for the training and/or the test set."
            )
        if fx_test_0 is not None and k_test_train is None:
            raise ValueError(
                "`k_test_train` is needed for test-set predictions (`fx_test_0` is "
                f"{describe(fx_test_0)}); got k_test_train=None."
            )
        if not self._has_momentum and (vx_train_0 is not None or vx_test_0 is not None):
            name = "vx_train" if vx_train_0 is not None else "vx_test"
            raise ValueError(
                f"`DiscreteState.{name}` holds a momentum velocity, but this predictor has "
                f"momentum=None; pass `{name}=None` or build the predictor with a momentum."
            )
        if vx_test_0 is not None and fx_test_0 is None:
            raise ValueError(
                "`DiscreteState.vx_test` is set but `DiscreteState.fx_test` is None; pass "
                "both for test-set predictions."
            )

        y_shape = tuple(self.y_train.shape)
        if fx_train_0 is not None:
            _check_shape(fx_train_0, "fx_train_0", y_shape)
        if vx_train_0 is not None:
            _check_shape(vx_train_0, "vx_train", y_shape)
        test_rows: tuple[int, ...] | None = None
        if fx_test_0 is not None:
            check_array(k_test_train, "k_test_train")
            test_rows, _ = kernel_rows_shapes(
                np.shape(k_test_train), "k_test_train", None, self.rows_shape, self.layout
            )
            test_shape = self.layout.output_shape(test_rows)
            _check_shape(fx_test_0, "fx_test_0", test_shape)
            if vx_test_0 is not None:
                _check_shape(vx_test_0, "vx_test", test_shape)
        else:
            k_test_train = None

        call = _Call(
            is_state=is_state,
            want_train=fx_train_0 is not None or is_state,
            want_test=fx_test_0 is not None,
            test_rows_shape=test_rows,
        )
        arrays = tuple(
            None if x is None else jnp.asarray(x)
            for x in (fx_train_0, vx_train_0, fx_test_0, vx_test_0, k_test_train)
        )
        return call, arrays


@partial(jax.jit, static_argnames=("call",))
def _predict(
    pred: _PredictorBase, steps: jax.Array, inputs: tuple[Any, ...], *, call: _Call
) -> tuple[Any, jax.Array]:
    """One compiled program per predictor structure, call layout and shapes."""
    fx_train_0, vx_train_0, fx_test_0, vx_test_0, k_test_train = inputs
    layout = pred.layout
    # Initial outputs of a higher precision than the kernel promote the computation, as in
    # the continuous-time predictors (Python scalars are weakly typed and do not).
    dtype = jnp.result_type(pred.y_train.dtype, *(x for x in inputs[:4] if x is not None))
    has_momentum = pred._has_momentum
    y_shape = tuple(pred.y_train.shape)

    def flat(x: Any, shape: tuple[int, ...]) -> jax.Array:
        full = jnp.zeros(shape, dtype) if x is None else jnp.broadcast_to(x.astype(dtype), shape)
        return outputs_to_2d(full, layout)

    f0 = flat(fx_train_0, y_shape)
    u0 = flat(vx_train_0, y_shape) if has_momentum else None
    ft0 = ut0 = kt = None
    if call.want_test:
        assert call.test_rows_shape is not None
        test_shape = layout.output_shape(call.test_rows_shape)
        ft0 = flat(fx_test_0, test_shape)
        ut0 = flat(vx_test_0, test_shape) if has_momentum else None
        kt = kernel_to_2d(k_test_train).astype(dtype)

    f, u, ft, ut, bad = pred._flat(steps.reshape(-1), _Flat(f0, u0, ft0, ut0, kt), call.n_bits)

    def back(x: jax.Array | None, rows: tuple[int, ...] | None) -> jax.Array | None:
        if x is None or rows is None:
            return None
        out = outputs_from_2d(x, layout, rows)
        return out.reshape(steps.shape + out.shape[1:])

    fx_train = back(f, pred.rows_shape)
    fx_test = back(ft, call.test_rows_shape)
    result: Any
    if call.is_state:
        result = DiscreteState(
            fx_train=fx_train,
            fx_test=fx_test,
            vx_train=back(u, pred.rows_shape),
            vx_test=back(ut, call.test_rows_shape),
        )
    elif call.want_train and call.want_test:
        result = (fx_train, fx_test)
    else:
        result = fx_test if call.want_test else fx_train
    return result, bad


class _Setup(NamedTuple):
    """Validated inputs of a predictor."""

    k2d: jax.Array  # flat kernel, in the common floating dtype
    k_dtype: np.dtype  # the kernel's own precision (sets the symmetry / PSD tolerances)
    fields: dict[str, Any]  # the fields of _PredictorBase


def _setup(
    k_train_train: Any,
    y_train: Any,
    trace_axes: int | Sequence[int],
    learning_rate: Any,
    momentum: Any,
    nesterov: bool,
) -> _Setup:
    """Check the kernel and targets and flatten the kernel, in a common floating dtype.

    Value checks (finite entries, symmetric kernel) run only on concrete values.
    """
    check_array(k_train_train, "k_train_train")
    check_array(y_train, "y_train")
    k_train_train = jnp.asarray(k_train_train)
    y_train = jnp.asarray(y_train)
    layout = make_layout(y_train.shape, trace_axes)
    rows_shape = layout.rows_shape(y_train.shape)
    kernel_rows_shapes(k_train_train.shape, "k_train_train", rows_shape, rows_shape, layout)
    dtype = float_dtype(k_train_train, y_train)
    k_dtype = float_dtype(k_train_train, compute=False)
    k2d = kernel_to_2d(k_train_train.astype(dtype))
    y = y_train.astype(dtype)
    # The returned (traced-checking) values are not used: these checks are eager-only.
    check_finite(k2d, "k_train_train")
    check_finite(y, "y_train")
    check_symmetric(k2d, "k_train_train", k_dtype)
    fields = dict(
        y_train=y,
        learning_rate=learning_rate,
        momentum=momentum,
        nesterov=bool(nesterov),
        layout=layout,
        rows_shape=rows_shape,
    )
    return _Setup(k2d, k_dtype, fields)


_PSD_HINT = (
    " Negative eigenvalues make gradient descent diverge. Check how the kernel was computed "
    "(layout, precision); to regularize it, pass `k_train_train + c * I` for a small c > 0."
)
_PSD_HINT_MSE = (
    " (This is the kernel after adding `diag_reg`.) Negative eigenvalues make gradient "
    "descent diverge. Check how the kernel was computed (layout, precision), or pass a "
    "`diag_reg` > 0."
)


# ----------------------------------------------------------------------------
# General loss: a loop over steps.


def _scan_core(
    k2d: jax.Array,
    y_train: jax.Array,
    x: _Flat,
    lr: jax.Array,
    m: jax.Array,
    steps: jax.Array,
    *,
    loss: Callable[[jax.Array, jax.Array], jax.Array],
    layout: Layout,
    rows_shape: tuple[int, ...],
    has_momentum: bool,
    nesterov: bool,
) -> _FlatResult:
    """Step the training set from step 0 to every entry of ``steps`` (flat).

    Returns ``(f, u, f_test, u_test, bad_step)`` with leading axis ``steps.size``;
    ``bad_step`` is the first step with non-finite training outputs, or ``-1``.
    """
    f0, dtype, with_test = x.f0, x.f0.dtype, x.ft0 is not None
    order = jnp.argsort(steps, stable=True)
    sorted_steps = steps[order]
    zero = jnp.zeros_like(f0)
    grad_loss = jax.grad(lambda fx: loss(fx, y_train))

    def grad2d(f2d: jax.Array) -> jax.Array:
        g = grad_loss(outputs_from_2d(f2d, layout, rows_shape))
        return outputs_to_2d(jnp.asarray(g, dtype), layout)

    # carry: (s, f, u, a, w, p, c, bad). ``a``/``w`` are the discounted/summed gradients
    # that give the test outputs; ``p = m**s`` and ``c`` their scalar companions.
    def one_step(carry: tuple[Any, ...]) -> tuple[Any, ...]:
        s, f, u, a, w, p, c, bad = carry
        g = grad2d(f)
        kg = k2d @ g
        if has_momentum:
            u = m * u + kg
            f = f - lr * (m * u + kg if nesterov else u)
            finite = jnp.isfinite(f).all() & jnp.isfinite(u).all()
        else:
            f = f - lr * kg
            finite = jnp.isfinite(f).all()
        if with_test:
            if has_momentum:
                a = m * a + g
                w = w + (m * a + g if nesterov else a)
                p = m * p
                c = c + (m * p if nesterov else p)
            else:
                w = w + g
        bad = jnp.where((bad < 0) & ~finite, s + 1, bad)
        return s + 1, f, u, a, w, p, c, bad

    def record(carry: tuple[Any, ...], target: jax.Array) -> tuple[tuple[Any, ...], Any]:
        carry = lax.while_loop(lambda cr: cr[0] < target, one_step, carry)
        _, f, u, a, w, p, c, _ = carry
        return carry, (f, u, a, w, p, c)

    one = jnp.ones((), dtype)
    init = (
        jnp.zeros((), steps.dtype),
        f0,
        x.u0 if has_momentum else zero,
        zero,
        zero,
        one,
        jnp.zeros((), dtype),
        jnp.full((), -1, steps.dtype),
    )
    final, (f, u, a, w, p, c) = lax.scan(record, init, sorted_steps)
    bad = final[-1]

    def unsort(x: jax.Array) -> jax.Array:
        return jnp.zeros_like(x).at[order].set(x)

    f = unsort(f)
    u_out = unsort(u) if has_momentum else None
    ft = ut = None
    if with_test:
        assert x.kt is not None
        sums = (unsort(a), unsort(p), unsort(c)) if has_momentum else None
        ft, ut = _test_outputs(x, lr, x.kt, unsort(w), sums)
    return f, u_out, ft, ut, bad


class _DiscretePredictor(_PredictorBase):
    """Predictor returned by :func:`gradient_descent_discrete`."""

    k2d: jax.Array
    loss: Callable[[jax.Array, jax.Array], jax.Array] = eqx.field(static=True)
    on_nonfinite: str = eqx.field(static=True)

    def _on_nonfinite(self) -> str:
        return self.on_nonfinite

    def _flat(
        self, steps: jax.Array, x: _Flat, n_bits: int | None
    ) -> _FlatResult:
        lr, m = self._rates(x.f0.dtype)
        return _scan_core(
            self.k2d,
            self.y_train,
            x,
            lr,
            m,
            steps,
            loss=self.loss,
            layout=self.layout,
            rows_shape=self.rows_shape,
            has_momentum=self._has_momentum,
            nesterov=self.nesterov,
        )


@full_precision
def gradient_descent_discrete(
    loss: Callable[[jax.Array, jax.Array], jax.Array],
    k_train_train: Any,
    y_train: Any,
    learning_rate: float = 1.0,
    momentum: float | None = None,
    nesterov: bool = False,
    trace_axes: int | Sequence[int] = (-1,),
    on_nonfinite: OnNonFinite = "raise",
) -> _DiscretePredictor:
    r"""Exact predictions of discrete full-batch (momentum) gradient descent, any loss.

    For a linearized network with kernel :math:`K` (``k_train_train``) and a loss
    :math:`L(f) =` ``loss(f, y_train)``, with :math:`g_s = \nabla_f L(f_s)`:

    .. math::

        f_{s+1} = f_s - \eta K g_s, \qquad
        f^{test}_{s+1} = f^{test}_s - \eta K_{test,train}\, g_s .

    With ``momentum`` :math:`m` (``optax.sgd(learning_rate, momentum=m,
    nesterov=...)``: :math:`v \leftarrow m v + \nabla_\theta L`,
    :math:`\theta \leftarrow \theta - \eta v`, Nesterov
    :math:`\theta \leftarrow \theta - \eta (m v + \nabla_\theta L)`), in function
    space with the velocity :math:`u = J v`:

    .. math::

        u_{s+1} = m u_s + K g_s, \qquad
        f_{s+1} = f_s - \eta u_{s+1}
        \quad (\text{Nesterov: } f_{s+1} = f_s - \eta (m u_{s+1} + K g_s)).

    The training set is stepped in a compiled loop that only keeps the current
    state (memory independent of the number of steps) and records the
    requested steps. The test set is not stepped: its outputs are linear in the
    gradients, so the loop accumulates
    :math:`W_s = \sum_{r<s} g_r` (with momentum the discounted sums
    :math:`A_{s+1} = m A_s + g_s` and :math:`W_{s+1} = W_s + A_{s+1}`, Nesterov
    :math:`W_{s+1} = W_s + m A_{s+1} + g_s`), and
    :math:`f^{test}_s = f^{test}_0 - \eta (c_s u^{test}_0 + K_{test,train} W_s)`,
    :math:`u^{test}_s = m^s u^{test}_0 + K_{test,train} A_s` with
    :math:`c_s = \sum_{j=1}^s m^j` (times :math:`m` for Nesterov), applying
    ``k_test_train`` once per requested step.

    Divergence: the loop records the first step at which the training outputs
    (or velocities) become non-finite. With ``on_nonfinite="raise"`` (default) a
    ``FloatingPointError`` naming that step and suggesting a smaller
    ``learning_rate`` is raised; under ``jax.jit`` the error is raised from the
    running program (a ``JaxRuntimeError`` carrying the same message).
    ``"warn"`` emits a ``RuntimeWarning`` instead and ``"ignore"`` returns the
    non-finite values silently. A learning rate above the stable one whose
    outputs grow but stay finite is not detected here (the loss is arbitrary);
    :func:`gradient_descent_mse_discrete` warns about it from the spectrum.

    The loop's length depends on the requested steps, so it supports
    forward-mode differentiation (``jax.jvp``) but not ``jax.grad``; for MSE use
    :func:`gradient_descent_mse_discrete`, which supports both.

    Precision: the loop performs the same floating-point updates as training
    would, so in float32 a run far past convergence keeps adding the stalled
    round-off residual of the training outputs to the test-set sums (relative
    drift ~1e-2 after 1e5 steps in our tests); use float64 for such runs.

    Args:
      loss: ``loss(fx_train, y_train)`` returning a scalar, e.g.
        ``lambda f, y: 0.5 * jnp.mean((f - y) ** 2)``. Reusing the same function
        object across predictors reuses the compiled loop.
      k_train_train: kernel on the training data, of shape
        ``zip(y_train.shape, y_train.shape)`` with the ``trace_axes`` pairs
        removed (neural-tangents' layout, read as :math:`\Theta \otimes I`).
      y_train: training targets.
      learning_rate: step size :math:`\eta > 0`.
      momentum: ``None`` for plain gradient descent, else :math:`m \in [0, 1)`.
      nesterov: Nesterov momentum (needs ``momentum``).
      trace_axes: output axes along which the kernel is :math:`\Theta \otimes I`;
        ``()`` for an exact empirical kernel of a finite network.
      on_nonfinite: ``"raise"``, ``"warn"`` or ``"ignore"``, see above.

    Returns:
      ``predict_fn(steps, fx_train_or_state_0=0., fx_test_0=None,
      k_test_train=None)`` (neural-tangents' conventions, with integer steps): it
      returns ``fx_train`` if ``fx_test_0`` is None, ``fx_test`` if
      ``fx_train_or_state_0`` is None, else ``(fx_train, fx_test)``, each with
      leading ``steps.shape`` axes; given a :class:`DiscreteState` it returns one
      at each step, and resuming from a returned state continues the trajectory.
      It works under ``jax.jit``, with concrete or traced ``steps``.

    Example:
      >>> import jax.numpy as jnp
      >>> k = jnp.array([[2.0, 1.0], [1.0, 2.0]])
      >>> y = jnp.array([[1.0], [-1.0]])
      >>> mse = lambda f, y: 0.5 * jnp.mean((f - y) ** 2)
      >>> predict_fn = gradient_descent_discrete(mse, k, y, learning_rate=0.5)
      >>> fx = predict_fn(jnp.array([0, 1, 10]), 0.0)
      >>> fx.shape
      (3, 2, 1)
      >>> [round(float(v), 4) for v in fx[:, 0, 0]]
      [0.0, 0.25, 0.9437]
    """
    learning_rate = _check_learning_rate(learning_rate)
    momentum = _check_momentum(momentum, nesterov)
    _check_on_nonfinite(on_nonfinite)
    check_loss(loss)
    setup = _setup(k_train_train, y_train, trace_axes, learning_rate, momentum, nesterov)
    check_psd(setup.k2d, "k_train_train", setup.k_dtype, _PSD_HINT)
    return _DiscretePredictor(
        **setup.fields, k2d=setup.k2d, loss=loss, on_nonfinite=on_nonfinite
    )


# ----------------------------------------------------------------------------
# MSE: closed form in the eigenbasis.


def _mse_transition(
    b: jax.Array, n: float, lr: jax.Array, m: jax.Array, has_momentum: bool, nesterov: bool
) -> jax.Array:
    r"""Per-eigenvalue transition matrices ``(R, d, d)`` with ``b = lambda / n``.

    States: plain ``(e, w)``; momentum ``(e, u, a, w)`` with the residual ``e``,
    velocity ``u``, discounted gradient sum ``a`` and test-weight ``w``.
    """
    zeros, ones = jnp.zeros_like(b), jnp.ones_like(b)
    inv_n = ones / n
    if not has_momentum:
        rows = [[1 - lr * b, zeros], [inv_n, ones]]
    elif nesterov:
        rows = [
            [1 - lr * b * (1 + m), -lr * m * m * ones, zeros, zeros],
            [b, m * ones, zeros, zeros],
            [inv_n, zeros, m * ones, zeros],
            [(1 + m) * inv_n, zeros, m * m * ones, ones],
        ]
    else:
        rows = [
            [1 - lr * b, -lr * m * ones, zeros, zeros],
            [b, m * ones, zeros, zeros],
            [inv_n, zeros, m * ones, zeros],
            [inv_n, zeros, m * ones, ones],
        ]
    return jnp.stack([jnp.stack(r, axis=-1) for r in rows], axis=-2)


def _matrix_powers(mats: jax.Array, steps: jax.Array, n_bits: int) -> jax.Array:
    """``mats ** steps`` of shape ``(T, R, d, d)`` by binary exponentiation.

    ``n_bits`` (static) bounds the bit length of ``steps``. No division, so it
    is exact in structure for repeated or zero eigenvalues of the transition
    matrices; a loop of static length, so it can be differentiated.
    """
    d = mats.shape[-1]
    eye = jnp.broadcast_to(jnp.eye(d, dtype=mats.dtype), (steps.shape[0],) + mats.shape)

    def body(
        i: int | jax.Array, carry: tuple[jax.Array, jax.Array]
    ) -> tuple[jax.Array, jax.Array]:
        acc, base = carry
        bit = ((steps >> i) & 1) == 1
        acc = jnp.where(bit[:, None, None, None], acc @ base, acc)
        return acc, base @ base

    acc, _ = lax.fori_loop(0, n_bits, body, (eye, mats))
    return acc


def _full_bits(steps: jax.Array) -> int:
    """Bit length of the largest non-negative value of ``steps``' integer dtype."""
    return int(np.iinfo(steps.dtype).bits) - 1


def _mse_core(
    evals: jax.Array,
    evecs: jax.Array,
    y2d: jax.Array,
    n: float,
    x: _Flat,
    lr: jax.Array,
    m: jax.Array,
    steps: jax.Array,
    *,
    has_momentum: bool,
    nesterov: bool,
    n_bits: int,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None, jax.Array | None]:
    f0, u0 = x.f0, x.u0
    mats = _mse_transition(evals / n, n, lr, m, has_momentum, nesterov)
    powers = _matrix_powers(mats, steps, n_bits)  # (T, R, d, d)
    e0 = evecs.T @ (f0 - y2d)
    zero = jnp.zeros_like(e0)
    if has_momentum:
        assert u0 is not None
        z0 = jnp.stack([e0, evecs.T @ u0, zero, zero], axis=1)  # (R, 4, C)
    else:
        z0 = jnp.stack([e0, zero], axis=1)
    z = jnp.einsum("trij,rjc->tric", powers, z0)
    # Differences from the initial state (exact at step 0, like neural-tangents).
    dz = z - z0
    f = f0 + _kdot(evecs, dz[:, :, 0])
    u = None
    if has_momentum:
        assert u0 is not None
        u = u0 + _kdot(evecs, dz[:, :, 1])
    ft = ut = None
    if x.ft0 is not None:
        assert x.kt is not None
        sums = None
        if has_momentum:
            p = m ** steps.astype(f0.dtype)
            c = m * (1 - p) / (1 - m)  # sum_{j=1}^s m^j, 1 - m > 0
            sums = (z[:, :, 2], p, m * c if nesterov else c)
        # The sums are in the eigenbasis: apply k_test_train V.
        ft, ut = _test_outputs(x, lr, x.kt @ evecs, z[:, :, -1], sums)
    return f, u, ft, ut


class _MSEDiscretePredictor(_PredictorBase):
    """Predictor returned by :func:`gradient_descent_mse_discrete`.

    Holds the eigendecomposition of the (regularized) kernel, computed once.
    """

    evals: jax.Array
    evecs: jax.Array

    def _flat(
        self, steps: jax.Array, x: _Flat, n_bits: int | None
    ) -> _FlatResult:
        lr, m = self._rates(x.f0.dtype)
        f, u, ft, ut = _mse_core(
            self.evals,
            self.evecs,
            outputs_to_2d(self.y_train, self.layout),
            float(self.y_train.size),
            x,
            lr,
            m,
            steps,
            has_momentum=self._has_momentum,
            nesterov=self.nesterov,
            n_bits=_full_bits(steps) if n_bits is None else n_bits,
        )
        return f, u, ft, ut, jnp.full((), -1, steps.dtype)

    def _n_bits(self, steps: jax.Array) -> int | None:
        if not is_concrete(steps):
            return _full_bits(steps)
        top = int(np.max(np.asarray(steps))) if steps.size else 0
        # Rounded up to a multiple of 8 so that nearby step counts share one program.
        return max(8, 8 * -(-top.bit_length() // 8))


@full_precision
def gradient_descent_mse_discrete(
    k_train_train: Any,
    y_train: Any,
    learning_rate: float = 1.0,
    momentum: float | None = None,
    nesterov: bool = False,
    diag_reg: float = 0.0,
    diag_reg_absolute_scale: bool = False,
    trace_axes: int | Sequence[int] = (-1,),
) -> _MSEDiscretePredictor:
    r"""Exact discrete (momentum) gradient descent on MSE, in closed form.

    The loss is :math:`L(f) = \frac{1}{2} \operatorname{mean}((f - y)^2)` over all
    of ``y_train`` (:math:`n` = ``y_train.size``), so :math:`\nabla_f L = (f - y)/n`
    and the steps of :func:`gradient_descent_discrete` are linear. With
    :math:`K = V \Lambda V^\top` (one ``eigh`` when the predictor is built; the
    eigenvalues are clamped at 0, as in neural-tangents, since a kernel is
    positive semi-definite and negative values are round-off) and
    :math:`h_i = \eta \lambda_i / n`, plain gradient descent is

    .. math::

        f_s - y = V \operatorname{diag}\big((1 - h_i)^s\big) V^\top (f_0 - y),

    and the test outputs are a geometric series per eigenvalue,

    .. math::

        f^{test}_s = f^{test}_0 - \frac{\eta}{n} K_{test,train} V
        \operatorname{diag}\Big(\sum_{r<s} (1 - h_i)^r\Big) V^\top (f_0 - y).

    With momentum :math:`m` each eigen-direction follows a linear recurrence in
    the residual :math:`e` and velocity :math:`u` (heavy ball:
    :math:`u' = m u + \lambda e / n`, :math:`e' = e - \eta u'`; Nesterov:
    :math:`e' = e - \eta (m u' + \lambda e / n)`), extended by the discounted
    gradient sums that give the test outputs. Each recurrence is a small
    matrix :math:`M_i` raised to the power :math:`s` by binary exponentiation:
    no division, so it is finite for repeated roots of the companion matrix and
    for :math:`\lambda \to 0` (no 0/0), and costs :math:`O(\log_2 s)` small
    matrix products (at most 63), independent of the step count otherwise. The
    loop has a static length, so predictions can be differentiated (``jax.grad``)
    with respect to the initial outputs, the test kernel and the learning rate.

    The iteration is stable iff :math:`h_{max} < 2` (plain), :math:`2 (1 + m)`
    (heavy ball) or :math:`2 (1 + m) / (1 + 2 m)` (Nesterov), i.e.
    ``learning_rate < 2 * (1 + m) * y_train.size / lambda_max`` without
    Nesterov. Above it a ``RuntimeWarning`` is emitted when the predictor is
    built (the predictions are still exact, and grow geometrically).

    ``diag_reg`` adds ``diag_reg * trace(K) / K.shape[0]`` (or ``diag_reg`` if
    ``diag_reg_absolute_scale``) to the diagonal of the flattened kernel used for
    the training dynamics, as in neural-tangents; ``k_test_train`` is used as
    given.

    Args:
      k_train_train: kernel on the training data, of shape
        ``zip(y_train.shape, y_train.shape)`` with the ``trace_axes`` pairs removed.
      y_train: training targets.
      learning_rate: step size :math:`\eta > 0`.
      momentum: ``None`` for plain gradient descent, else :math:`m \in [0, 1)`.
      nesterov: Nesterov momentum (needs ``momentum``).
      diag_reg: diagonal regularization strength.
      diag_reg_absolute_scale: ``True`` for ``diag_reg`` in absolute units.
      trace_axes: output axes along which the kernel is :math:`\Theta \otimes I`.

    Returns:
      ``predict_fn(steps, fx_train_or_state_0=0., fx_test_0=None,
      k_test_train=None)`` with the conventions of
      :func:`gradient_descent_discrete`.

    Example:
      >>> import jax.numpy as jnp
      >>> k = jnp.array([[2.0, 1.0], [1.0, 2.0]])
      >>> y = jnp.array([[1.0], [-1.0]])
      >>> predict_fn = gradient_descent_mse_discrete(k, y, learning_rate=0.5)
      >>> fx = predict_fn(jnp.array([0, 1, 10]), 0.0)
      >>> [round(float(v), 4) for v in fx[:, 0, 0]]
      [0.0, 0.25, 0.9437]
      >>> # Long training: test outputs approach K_test,train K^{-1} y.
      >>> fx_test = predict_fn(1000, None, 0.0, k_test_train=jnp.array([[1.0, 0.5]]))
      >>> round(float(fx_test[0, 0]), 4)
      0.5
    """
    learning_rate = _check_learning_rate(learning_rate)
    momentum = _check_momentum(momentum, nesterov)
    setup = _setup(k_train_train, y_train, trace_axes, learning_rate, momentum, nesterov)
    y = setup.fields["y_train"]
    evals, evecs = _eigh(setup.k2d, diag_reg, absolute=bool(diag_reg_absolute_scale))
    check_psd_eigenvalues(evals, "k_train_train", setup.k_dtype, _PSD_HINT_MSE)
    evals = jnp.maximum(evals, 0.0)  # round-off: a kernel is positive semi-definite
    if is_concrete(evals, learning_rate, momentum) and evals.size:
        h_max = float(learning_rate) * float(evals[-1]) / y.size
        limit = _stable_factor(momentum, bool(nesterov))
        # At the bound itself (e.g. a learning rate computed as max_learning_rate, which
        # may exceed it by a rounding) the fastest mode neither grows nor decays.
        if h_max > limit * (1 + 8 * float(jnp.finfo(evals.dtype).eps)):
            warnings.warn(
                f"learning_rate={float(learning_rate):.8g} is above the maximal stable "
                f"learning rate {limit * y.size / float(evals[-1]):.8g} of discrete gradient "
                f"descent on MSE with this kernel (momentum={momentum}, nesterov={nesterov}): "
                "the predicted outputs diverge geometrically with the step count. Use a "
                "smaller learning_rate.",
                RuntimeWarning,
                stacklevel=2,
            )
    return _MSEDiscretePredictor(**setup.fields, evals=evals, evecs=evecs)
