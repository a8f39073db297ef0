r"""Predict the outputs of a network during training from its Neural Tangent Kernel.

This module is the public, neural-tangents-compatible surface:
``import ntkflow as nt`` then ``nt.predict.gradient_descent(...)`` runs code
written for ``neural_tangents.predict`` unchanged. The numerics live in private
modules (``ntkflow._mse``, ``_dynamics``, ``_solvers``, ``_ode``, ...) that work
on flat 2-D arrays; kernel axes are handled once, here, at the boundary.

Kernel layout (as in neural-tangents): for outputs of shape ``y_train.shape``,
``k_train_train`` has the shape of ``zip(y_train.shape, y_train.shape)`` with the
``trace_axes`` pairs removed (interleaved axes: ``(n, n)`` for ``(n, k)`` outputs
and ``trace_axes=(-1,)``, ``(n, n, k, k)`` for ``trace_axes=()``), and is read as
:math:`\Theta \otimes I` along the traced axes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike

# _expo and _rosenbrock register the solvers 'expo' and 'rodas5p' in SOLVERS.
from ntkflow import _checks, _explicit, _expo, _rosenbrock  # noqa: F401
from ntkflow._auto import (
    AUTO,
    choose_solver,
    classify,
    end_spectrum_decides,
    largest_eigenvalue,
)
from ntkflow._axes import (
    Layout,
    kernel_rows_shapes,
    kernel_to_2d,
    make_layout,
    outputs_from_2d,
    outputs_to_2d,
)
from ntkflow._compensated import full_precision
from ntkflow._discrete import (
    DiscreteState,
    gradient_descent_discrete,
    gradient_descent_mse_discrete,
)
from ntkflow._dynamics import Dynamics, FlatLoss
from ntkflow._eigen import Eigen, add_diagonal_regularizer
from ntkflow._mse import MSEFlow
from ntkflow._ode import solve_at
from ntkflow._solvers import FAILURE_MESSAGES, SOLVERS, AbstractSolver, SolveInfo
from ntkflow._typing import float_dtype, is_concrete

__all__ = [
    "SOLVERS",
    "DiscreteState",
    "ODEState",
    "gradient_descent",
    "gradient_descent_discrete",
    "gradient_descent_mse",
    "gradient_descent_mse_discrete",
    "max_learning_rate",
]

Axes = int | Sequence[int]


class ODEState(eqx.Module):
    """ODE state: outputs and auxiliary variables (a pytree).

    Attributes:
      fx_train: training set outputs.
      fx_test: test set outputs.
      qx_train: training set auxiliary variable (the velocity, with momentum).
      qx_test: test set auxiliary variable (the velocity, with momentum).

    Construct ``ODEState(fx_train_0, fx_test_0)`` to start from outputs; pass a
    state to a predictor to get states back, and pass a returned state again
    to resume training from it.
    """

    fx_train: Array | None = None
    fx_test: Array | None = None
    qx_train: Array | None = None
    qx_test: Array | None = None


# ---------------------------------------------------------------------------
# The boundary: user arrays <-> flat arrays.


class _Boundary:
    """Shapes and conversions for one ``(k_train_train, y_train, trace_axes)``."""

    def __init__(self, k_train_train: ArrayLike, y_train: ArrayLike, trace_axes: Axes):
        _checks.check_array(k_train_train, "k_train_train")
        _checks.check_array(y_train, "y_train")
        if not hasattr(y_train, "shape"):
            y_train = np.asarray(y_train)
        if not hasattr(k_train_train, "shape"):
            k_train_train = np.asarray(k_train_train)
        self.y_shape = tuple(int(s) for s in y_train.shape)
        _checks.check_nonempty(self.y_shape, "y_train")
        _checks.check_trace_axes(trace_axes)
        self.layout: Layout = make_layout(self.y_shape, trace_axes)
        self.rows_shape = self.layout.rows_shape(self.y_shape)
        kernel_rows_shapes(
            k_train_train.shape, "k_train_train", self.rows_shape, self.rows_shape, self.layout
        )
        self.dtype = float_dtype(k_train_train, y_train)
        #: The kernel's own precision (sets the symmetry / PSD tolerances).
        self.k_dtype = float_dtype(k_train_train, compute=False)
        k = kernel_to_2d(jnp.asarray(k_train_train, self.dtype))
        self.k, self.y = _checks.check_kernel_and_targets(
            k, jnp.asarray(y_train, self.dtype), "k_train_train", "y_train", self.k_dtype
        )

    def test_rows_shape(self, k_test_train: ArrayLike) -> tuple[int, ...]:
        first, _ = kernel_rows_shapes(
            np.shape(k_test_train), "k_test_train", None, self.rows_shape, self.layout
        )
        return first

    def flat_kernel(self, k_test_train: ArrayLike) -> Array:
        return kernel_to_2d(jnp.asarray(k_test_train, self.dtype))

    def to_flat(self, x: ArrayLike, rows_shape: tuple[int, ...], name: str) -> Array:
        """Broadcast ``x`` to the outputs' shape and flatten it."""
        return _flatten(self.input_array(x, rows_shape, name), self.layout, rows_shape, self.dtype)

    def input_array(self, x: ArrayLike, rows_shape: tuple[int, ...], name: str) -> Array:
        """``x`` as an array that broadcasts to the outputs' shape (else an error naming it)."""
        shape = self.layout.output_shape(rows_shape)
        # Python scalars and lists take the kernel's/targets' dtype (weak typing).
        x = jnp.asarray(_checks.check_array(x, name), None if hasattr(x, "dtype") else self.dtype)
        if not _checks.broadcasts_to(x.shape, shape):
            raise ValueError(
                f"`{name}` must be a scalar or broadcastable to shape {shape}; "
                f"got shape {tuple(x.shape)}."
            )
        return x

    def from_flat(self, x: Array, rows_shape: tuple[int, ...], t_shape: tuple) -> Array:
        return _from_flat(x, self.layout, rows_shape, t_shape)

    def flat_loss(self, loss: Callable[[Array, Array], Any]) -> FlatLoss:
        return FlatLoss(loss, self.layout, self.rows_shape)


def _flatten(
    x: Array, layout: Layout, rows_shape: tuple[int, ...], dtype: np.dtype
) -> Array:
    """An output-shaped input (see ``_Boundary.input_array``), broadcast and flattened."""
    x = jnp.broadcast_to(x, layout.output_shape(rows_shape))
    x = x.astype(jnp.result_type(dtype, x.dtype))
    return outputs_to_2d(x, layout)


def _from_flat(
    x: Array, layout: Layout, rows_shape: tuple[int, ...], t_shape: tuple[int, ...]
) -> Array:
    """Flat outputs at flattened times, ``(m, rows, traced)``, to ``t_shape + output shape``."""
    x = outputs_from_2d(x, layout, rows_shape)
    return x.reshape(t_shape + x.shape[1:])


def _check_predict_inputs(fx_train_or_state_0: Any, fx_test_0: Any, k_test_train: Any) -> None:
    if isinstance(fx_train_or_state_0, ODEState):
        if fx_test_0 is not None:
            raise ValueError(
                "`fx_test_0` is included in the `ODEState` passed as "
                "`fx_train_or_state_0` and must be None; got "
                f"{_checks.describe(fx_test_0)}."
            )
        fx_train_0, fx_test_0 = fx_train_or_state_0.fx_train, fx_train_or_state_0.fx_test
    else:
        fx_train_0 = fx_train_or_state_0
    if fx_train_0 is None and fx_test_0 is None:
        raise ValueError(
            "Both `fx_train_0` and `fx_test_0` are None, i.e. no predictions would be computed."
        )
    if fx_test_0 is not None and k_test_train is None:
        raise ValueError(
            "To get predictions on the test set, pass `k_test_train` (the test-train kernel); "
            f"got `fx_test_0` ({_checks.describe(fx_test_0)}) but `k_test_train=None`."
        )
    if fx_test_0 is not None:
        _checks.check_array(k_test_train, "k_test_train")


_PSD_HINT = (
    " Negative eigenvalues make gradient flow diverge. Check how the kernel was computed "
    "(layout, precision); to regularize it, pass `k_train_train + c * I` for a small c > 0."
)
_PSD_HINT_MSE = (
    " (This is the kernel after adding `diag_reg`.) Negative eigenvalues make gradient flow "
    "diverge. Check how the kernel was computed (layout, precision), or pass a `diag_reg` > 0."
)


def _times(t: Any, dtype: np.dtype) -> Any:
    t = np.inf if t is None else t
    t = _checks.check_times(t)
    if not isinstance(t, jax.Array):  # Python or NumPy: jit transfers it with the call
        return np.asarray(t, dtype)
    return jnp.asarray(t, dtype)


@functools.partial(jax.jit, static_argnums=0)
def _loss_value(flat_loss: FlatLoss, f: Array, y: Array) -> Array:
    return flat_loss.value(f, y)


def _loss_shape(flat_loss: FlatLoss, f: Array, y: Array) -> Any:
    """``jax.eval_shape`` of the loss; traced once per loss, layout and shapes."""
    try:
        hash(flat_loss)
    except TypeError:  # e.g. a loss object holding arrays
        return jax.eval_shape(flat_loss.value, f, y)
    return _loss_value.eval_shape(flat_loss, f, y)


def _train_from_gradients(solver: AbstractSolver, dynamics: Dynamics, concrete: bool,
                          infinite: bool | None) -> bool:
    r"""Whether a float32 explicit solve reads its train outputs as
    :math:`F(\tau) = F(0) - K S_1(\tau)` (compensated, as the test outputs) rather than
    from its state :math:`F`.

    A Runge-Kutta method's state and its gradient integral :math:`S_1` (carried for the
    test outputs) take the same weighted sums of the stages, so in exact arithmetic
    :math:`F_n = F(0) - K S_{1,n}` after every step. In float32 the state also sums the
    round-off of every stage's product :math:`K G` (relative to its stiff components),
    which the compensated read-out does not. Measured (cross-entropy, n = 256, 10
    classes, condition number 1e4, six problem seeds, errors against a float64 solve
    from the same float32 inputs): at S = 10 4.2e-7 - 1.0e-6 -> 1.6e-7 - 3.8e-7, at
    S = 1000 4.9e-6 - 1.1e-5 -> 3.1e-6 - 4.6e-6, at S = 1e5 unchanged (3e-5 - 2e-4, the
    saturated softmax's round-off), at the cost of one product with ``K`` per output
    time. Applied where :math:`S_1` is integrated anyway (test points given) and the
    inputs are concrete, without momentum and at finite times (the end-of-training solve
    stops on the state's convergence).
    """
    return (concrete and infinite is not None and not infinite and dynamics.with_test
            and not dynamics.momentum
            and isinstance(solver, _explicit._OwnLoopSolver)
            and jnp.dtype(dynamics.k.dtype) == jnp.dtype(jnp.float32))


class _Readout(eqx.Module):
    """A ``gradient_descent`` predictor's outputs from the solver's states.

    Called by :func:`ntkflow._ode.solve_at` inside its compiled program: the
    test outputs and the reshapes to the caller's layout and times add no
    separate dispatches. Returns ``(fx_train, qx_train, fx_test, qx_test)``
    (``None`` where not computed).

    With ``f_train0`` set (float32 explicit solves with test points, see
    :func:`_train_from_gradients`), the train outputs are read out as the test outputs
    are, :math:`F(0) - K S_1` with the compensated product, instead of from the state.
    """

    f_test0: Array | None
    q_test0: Array | None
    k_test: Array | None
    f_train0: Array | None
    layout: Layout = eqx.field(static=True)
    rows_shape: tuple[int, ...] = eqx.field(static=True)
    test_rows: tuple[int, ...] | None = eqx.field(static=True)
    t_shape: tuple[int, ...] = eqx.field(static=True)

    def __call__(self, dynamics: Dynamics, taus: Array, ys: Any) -> tuple[Any, Any, Any, Any]:
        f = ys.f
        if self.f_train0 is not None:
            f, _ = dynamics.test_outputs(taus, ys, self.f_train0, None, dynamics.k)
        fx = _from_flat(f, self.layout, self.rows_shape, self.t_shape)
        qx = None if ys.q is None else _from_flat(ys.q, self.layout, self.rows_shape, self.t_shape)
        if self.test_rows is None:
            return fx, qx, None, None
        assert self.f_test0 is not None and self.k_test is not None
        ft, qt = dynamics.test_outputs(taus, ys, self.f_test0, self.q_test0, self.k_test)
        fx_test = _from_flat(ft, self.layout, self.test_rows, self.t_shape)
        qx_test = None if qt is None else _from_flat(qt, self.layout, self.test_rows, self.t_shape)
        return fx, qx, fx_test, qx_test


@functools.partial(
    jax.jit, static_argnames=("layout", "rows_shape", "test_rows", "dtype", "flat_loss")
)
def _prepare(
    times: Array,
    scale: Any,
    fx0: Array,
    qx0: Array | None,
    fxt0: Array | None,
    qxt0: Array | None,
    k_test: Array | None,
    k: Array,
    y: Array,
    damping: Array | None,
    lam_max: Array | None,
    *,
    layout: Layout,
    rows_shape: tuple[int, ...],
    test_rows: tuple[int, ...] | None,
    dtype: np.dtype,
    flat_loss: FlatLoss,
) -> tuple[tuple[Any, ...], tuple[Any, ...], Any]:
    """Flat times and inputs, the initial ODE state, what the value checks need and, given
    ``lam_max``, the facts ``solver="auto"`` decides by, in one compiled program."""
    tau = (times * scale).reshape(-1)
    f0 = _flatten(fx0, layout, rows_shape, dtype)
    q0 = None if qx0 is None else _flatten(qx0, layout, rows_shape, dtype)
    ft0 = qt0 = kt = None
    if test_rows is not None:
        assert fxt0 is not None and k_test is not None
        ft0 = _flatten(fxt0, layout, test_rows, dtype)
        qt0 = None if qxt0 is None else _flatten(qxt0, layout, test_rows, dtype)
        kt = kernel_to_2d(k_test)
    bad = lambda x: None if x is None else jnp.sum(~jnp.isfinite(x))
    stats = (
        bad(f0), flat_loss.value(f0, y), bad(q0), bad(ft0), bad(qt0), bad(kt),
        jnp.any(jnp.isinf(tau)),
    )
    dyn = Dynamics(k.astype(f0.dtype), flat_loss, y, damping, test_rows is not None)
    y0 = dyn.initial_state(f0, q0)
    facts = None if lam_max is None else classify(dyn, y0, tau.astype(f0.dtype), lam_max)
    return (tau, f0, q0, ft0, qt0, kt, y0), stats, facts


def _prepare_concrete(
    b: _Boundary,
    flat_loss: FlatLoss,
    times: Array,
    scale: Any,
    fx_train_0: Any,
    qx_train_0: Any,
    fx_test_0: Any,
    qx_test_0: Any,
    k_test_train: Any,
    test_rows: tuple[int, ...] | None,
    damping: Array | None,
    lam_max: Array | None,
) -> tuple[Any, ...] | None:
    """``(tau, f0, q0, ft0, qt0, kt, y0, infinite, facts)`` for a predictor call on concrete
    inputs (``y0``: the initial ODE state; ``facts``: ``auto``'s classification, given
    ``lam_max``; see :func:`ntkflow._auto.classify`).

    The conversions and value checks of the step-by-step path in one compiled
    program and one device-to-host transfer, with the same errors in the same
    order. ``None`` when that path must run instead: traced inputs (the checks
    then go through ``equinox.error_if``), or an input with a wrong type or
    shape (whose error must come after those of the inputs before it).
    """
    with_test = test_rows is not None
    arrays = (times, scale, fx_train_0, qx_train_0, fx_test_0, qx_test_0, k_test_train, b.k, b.y)
    if not is_concrete(*arrays) or np.shape(scale) != ():
        return None
    try:
        hash(flat_loss)
        fx0 = b.input_array(
            0.0 if fx_train_0 is None else fx_train_0, b.rows_shape, "fx_train_0"
        )
        qx0 = None if qx_train_0 is None else b.input_array(qx_train_0, b.rows_shape, "qx_train")
        fxt0 = qxt0 = kt = None
        if with_test:
            assert test_rows is not None
            fxt0 = b.input_array(fx_test_0, test_rows, "fx_test_0")
            qxt0 = None if qx_test_0 is None else b.input_array(qx_test_0, test_rows, "qx_test")
            kt = jnp.asarray(k_test_train, b.dtype)
    except (TypeError, ValueError):
        return None
    flat, stats, facts = _prepare(
        times, scale, fx0, qx0, fxt0, qxt0, kt, b.k, b.y, damping, lam_max, layout=b.layout,
        rows_shape=b.rows_shape, test_rows=test_rows, dtype=b.dtype, flat_loss=flat_loss,
    )
    if not is_concrete(flat, stats):  # called while tracing (e.g. closed-over constants)
        return None
    (bad_f0, loss0, bad_q0, bad_ft0, bad_qt0, bad_kt, infinite), facts = jax.device_get(
        (stats, facts)
    )
    tau, f0, q0, ft0, qt0, kt, y0 = flat
    _checks.raise_if_nonfinite(int(bad_f0), f0, "fx_train_0")
    if not np.isfinite(loss0):
        _checks.raise_nonfinite_initial_loss(loss0)
    for x, count, name in ((q0, bad_q0, "qx_train"), (ft0, bad_ft0, "fx_test_0"),
                           (qt0, bad_qt0, "qx_test"), (kt, bad_kt, "k_test_train")):
        if x is not None:
            _checks.raise_if_nonfinite(int(count), x, name)
    return tau, f0, q0, ft0, qt0, kt, y0, bool(infinite), facts


def _report(info: SolveInfo, scale: Any, out: Any) -> Any:
    """Raise (eagerly) or attach a runtime error (under ``jit``) if a solve failed."""
    if is_concrete(info.ok):
        if not bool(info.ok):
            code = int(info.code)
            reached = float(info.tau) / float(np.asarray(scale))
            raise RuntimeError(
                f"ntkflow: the ODE solve stopped at t = {reached:.6g} "
                f"after {int(info.num_steps)} steps: {FAILURE_MESSAGES.get(code, 'unknown')}"
            )
        return out
    # Traced inputs never get the Chebyshev expansion (code 3): the other two reasons.
    reasons = (FAILURE_MESSAGES[1], FAILURE_MESSAGES[2])
    message = "ntkflow: the ODE solve failed: " + " Or: ".join(reasons)
    return jax.tree.map(lambda x: eqx.error_if(x, ~info.ok, message), out)


# ---------------------------------------------------------------------------
# gradient_descent_mse


@full_precision
def gradient_descent_mse(
    k_train_train: ArrayLike,
    y_train: ArrayLike,
    learning_rate: float = 1.0,
    diag_reg: float = 0.0,
    diag_reg_absolute_scale: bool = False,
    trace_axes: Axes = (-1,),
) -> Callable[..., Any]:
    r"""Predicts the outcome of function-space gradient descent on the MSE loss, in closed form.

    For :math:`L(f) = \frac{1}{2|y|}\|f - y\|^2` (the mean over all entries of
    ``y_train``) and times in units of the learning rate
    (``absolute_time = learning_rate * t``),

    .. math::

        f(t) = y + e^{-\eta t K/|y|}(f_0 - y), \qquad
        f_\text{test}(t) = f_\text{test}(0) - K_\text{test}\,
            \frac{1 - e^{-\eta t K/|y|}}{K}\,(f_0 - y),

    computed in the eigenbasis of ``K`` (plus ``diag_reg``), which is computed
    once, here. Negative eigenvalues (round-off) are clamped to zero; zero
    eigenvalues give the exact limit (linear in ``t``) rather than ``0/0``, and
    at ``t = inf`` / ``t = None`` the pseudo-inverse limit
    :math:`f_\text{test}(0) + K_\text{test} K^{+}(y - f_0)` (the train outputs
    move only within the range of ``K``).

    Args:
      k_train_train: kernel on the training data, shaped like
        ``zip(y_train.shape, y_train.shape)`` with the ``trace_axes`` pairs removed.
      y_train: targets for the training data.
      learning_rate: learning rate, step size.
      diag_reg: diagonal regularization: ``K + diag_reg * I``, relative to
        ``trace(K) / K.shape[0]`` unless ``diag_reg_absolute_scale``.
      diag_reg_absolute_scale: whether ``diag_reg`` is in absolute units.
      trace_axes: output axes along which the kernel is :math:`\Theta \otimes I`.

    Returns:
      ``predict_fn(t=None, fx_train_0=0., fx_test_0=None, k_test_train=None)``
      returning ``fx_train_t``, ``fx_test_t`` (if ``fx_train_0 is None``) or
      ``(fx_train_t, fx_test_t)``, with leading axes ``np.shape(t)``.

    Example:
      >>> import jax.numpy as jnp
      >>> import ntkflow as nt
      >>> k = jnp.array([[2.0, 0.5], [0.5, 1.0]])
      >>> y = jnp.array([[1.0], [-1.0]])
      >>> predict_fn = nt.predict.gradient_descent_mse(k, y)
      >>> predict_fn(t=None).round(3).tolist()
      [[1.0], [-1.0]]
      >>> predict_fn(t=[0.0, 1.0]).shape
      (2, 2, 1)
    """
    learning_rate = _checks.check_learning_rate(learning_rate)
    diag_reg = _checks.check_diag_reg(diag_reg)
    b = _Boundary(k_train_train, y_train, trace_axes)
    k = add_diagonal_regularizer(b.k, diag_reg, diag_reg_absolute_scale)
    eigen = Eigen.of(k)
    _checks.check_psd_eigen(eigen, "k_train_train", b.k_dtype, _PSD_HINT_MSE)
    flow = MSEFlow(eigen, math.prod(b.y_shape))
    y_flat = outputs_to_2d(b.y, b.layout)
    lr = learning_rate

    @full_precision
    def predict_fn(
        t: ArrayLike | None = None,
        fx_train_0: ArrayLike | None = 0.0,
        fx_test_0: ArrayLike | None = None,
        k_test_train: ArrayLike | None = None,
    ) -> Any:
        """Train [and test] outputs at time[s] ``t`` (``None`` means infinity)."""
        _check_predict_inputs(fx_train_0, fx_test_0, k_test_train)
        tau = _times(t, b.dtype) * lr
        t_shape = tuple(tau.shape)
        tau = tau.reshape(-1)
        f0 = b.to_flat(0.0 if fx_train_0 is None else fx_train_0, b.rows_shape, "fx_train_0")
        f0 = _checks.check_finite(f0, "fx_train_0")
        r0 = f0 - y_flat
        out_train = out_test = None
        if fx_train_0 is not None:
            out_train = b.from_flat(f0[None] + flow.train_delta(tau, r0), b.rows_shape, t_shape)
        if fx_test_0 is not None:
            assert k_test_train is not None
            test_rows = b.test_rows_shape(k_test_train)
            ft0 = b.to_flat(fx_test_0, test_rows, "fx_test_0")
            ft0 = _checks.check_finite(ft0, "fx_test_0")
            kt = _checks.check_finite(b.flat_kernel(k_test_train), "k_test_train")
            delta = flow.test_delta(tau, r0, kt)
            out_test = b.from_flat(ft0[None] + delta, test_rows, t_shape)
        if out_test is None:
            return out_train
        if out_train is None:
            return out_test
        return out_train, out_test

    return predict_fn


# ---------------------------------------------------------------------------
# gradient_descent


def _default_tolerances(dtype: np.dtype) -> tuple[float, float]:
    # neural-tangents' odeint defaults (1.4e-8) where float64 allows them.
    return (1.4e-8, 1.4e-8) if np.dtype(dtype).itemsize >= 8 else (1e-6, 1e-6)


def _resolve_solver(solver: str | AbstractSolver) -> AbstractSolver | str:
    if isinstance(solver, AbstractSolver):
        return solver
    if isinstance(solver, str) and solver == AUTO:
        return AUTO
    if isinstance(solver, str) and solver in SOLVERS:
        return SOLVERS[solver]()
    raise ValueError(
        f"`solver` must be 'auto', one of {sorted(SOLVERS)} or an AbstractSolver instance; "
        f"got {solver!r}."
    )


@full_precision
def gradient_descent(
    loss: Callable[[Array, Array], Any],
    k_train_train: ArrayLike,
    y_train: ArrayLike,
    learning_rate: float = 1.0,
    momentum: float | None = None,
    trace_axes: Axes = (-1,),
    *,
    solver: str | AbstractSolver = "auto",
    rtol: float | None = None,
    atol: float | None = None,
    max_steps: int = 100_000,
) -> Callable[..., Any]:
    r"""Predicts the outcome of function-space training with gradient descent, for any loss.

    Solves the function-space ODE of (momentum) gradient descent for
    ``loss(fx_train, y_train)`` given the kernel, as in "Wide Neural Networks of
    Any Depth Evolve as Linear Models Under Gradient Descent" (Lee et al., 2019):

    .. math::

        \dot f = -\eta\, K\, \nabla_f L(f), \qquad
        \dot f_\text{test} = -\eta\, K_\text{test}\, \nabla_f L(f),

    in time units ``absolute_time = learning_rate * t``. With ``momentum = m``
    it solves neural-tangents' continuous heavy-ball ODE in units of
    ``sqrt(learning_rate)``: :math:`\ddot f = -K \nabla_f L(f) +
    \frac{m - 1}{\sqrt{\eta}} \dot f` (standard, not Nesterov, momentum); then
    ``learning_rate`` and ``t`` are not interchangeable.

    Test outputs are not integrated alongside the train outputs: the solver
    carries the train outputs and the (discounted) integrals of the loss
    gradient, and ``k_test_train`` is applied once per output time, so a solver
    step costs the same whatever the number of test points.

    Args:
      loss: ``loss(fx_train, y_train) -> scalar``, any JAX-differentiable function
        (its gradient is taken by autodiff). It should treat the batch and
        output dimensions symmetrically.
      k_train_train: kernel on the training data, shaped like
        ``zip(y_train.shape, y_train.shape)`` with the ``trace_axes`` pairs removed.
      y_train: targets for the training data.
      learning_rate: learning rate, step size.
      momentum: momentum scalar in ``[0, 1)``, or ``None`` for plain gradient descent.
      trace_axes: output axes along which the kernel is :math:`\Theta \otimes I`.
      solver: keyword-only. ``"auto"`` (default), a name from
        ``ntkflow.predict.SOLVERS`` (``"expo"``: exponential integrator in the
        kernel's eigenbasis, stiff, exact for MSE; ``"rodas5p"``: Rosenbrock
        method with the true Jacobian in the eigenbasis, stiff, any loss;
        ``"tsit5"``, ``"dopri5"``, ``"dopri8"``: explicit; ``"kvaerno5"``: implicit,
        small problems) or a solver instance. ``"auto"`` picks a Chebyshev expansion
        of the exact solution for the MSE at short horizons; for stiff requests
        and ``t = inf``, ``"expo"`` (isotropic loss curvature, e.g. MSE) or
        ``"rodas5p"`` (other regression losses), and an explicit method
        otherwise (always under JAX transformations): in float64 ``"dopri8"`` for
        short horizons with few output times, else ``"tsit5"``; ``"dopri5"`` in
        float32; see :mod:`ntkflow._auto`. ``"expo"`` and ``"rodas5p"`` are not
        reverse-mode differentiable (``jax.grad``: use ``"auto"`` or an explicit
        method).
      rtol, atol: keyword-only tolerances of the adaptive solver (default
        ``1.4e-8`` in float64, as neural-tangents; ``1e-6`` in float32). Tsit5
        controls its finite-time steps to a third of them, for about
        neural-tangents' accuracy at the same tolerances (see
        :func:`ntkflow._explicit.step_tolerances`); in float32 Dopri5 and the
        Rosenbrock method to a tenth, not below ``eps``, where the step errors
        fall to the round-off floor
        (:meth:`ntkflow._explicit.Dopri5.step_tolerances`). The Rosenbrock method
        weighs a step's error by the decay the dynamics give it before the next output
        time, by up to 100x, the most at ``t = inf``, whose end point does not depend
        on the path (:meth:`ntkflow._rosenbrock.Rodas5P._decay_weight`); there the
        convergence test sets the accuracy.
      max_steps: keyword-only; the solver gives up (with an error) after this
        many steps.

    Returns:
      ``predict_fn(t=None, fx_train_or_state_0=0., fx_test_0=None, k_test_train=None)``.
      ``t`` is a scalar or an array of any shape and order (``None`` or ``inf``: the
      end point of training, with the test outputs' pseudo-inverse limit where ``K``
      has null modes, as in :func:`gradient_descent_mse`: the part of the gradient
      integral on the null space, which grows without bound when ``k_test_train``
      does not vanish there, is dropped); outputs gain leading axes ``np.shape(t)``.
      It returns ``fx_train_t``, ``fx_test_t`` (if ``fx_train_or_state_0 is None``),
      or ``(fx_train_t, fx_test_t)``; given an :class:`ODEState`, an ``ODEState``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import ntkflow as nt
      >>> k = jnp.array([[2.0, 0.5], [0.5, 1.0]])
      >>> y = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> cross_entropy = lambda fx, y_hat: -jnp.mean(jax.nn.log_softmax(fx) * y_hat)
      >>> predict_fn = nt.predict.gradient_descent(cross_entropy, k, y, learning_rate=1.0)
      >>> fx = predict_fn(t=[0.0, 10.0], fx_train_or_state_0=0.0)
      >>> fx.shape
      (2, 2, 2)
      >>> bool(fx[1, 0, 0] > fx[1, 0, 1])
      True
    """
    _checks.check_loss(loss)
    learning_rate = _checks.check_learning_rate(learning_rate)
    momentum = _checks.check_momentum(momentum)
    b = _Boundary(k_train_train, y_train, trace_axes)
    solver_obj = _resolve_solver(solver)
    # Visible precomputation: the eigendecomposition for the exponential integrator (which
    # also serves the PSD check), and the largest eigenvalue for the `auto` choice (a
    # by-product of the PSD check).
    eigen = (
        Eigen.of(b.k)
        if isinstance(solver_obj, AbstractSolver) and solver_obj.eigenbasis
        else None
    )
    lam_max: Array | None = None
    if eigen is not None:
        _checks.check_psd_eigen(eigen, "k_train_train", b.k_dtype, _PSD_HINT)
    else:
        largest = _checks.check_psd(b.k, "k_train_train", b.k_dtype, _PSD_HINT)
        if solver_obj == AUTO:  # the check's Lanczos estimate, else power iterations
            lam_max = largest_eigenvalue(b.k) if largest is None else jnp.asarray(largest, b.dtype)
    default_rtol, default_atol = _default_tolerances(b.dtype)
    rtol_ = _checks.check_tolerance("rtol", rtol, default_rtol)
    atol_ = _checks.check_tolerance("atol", atol, default_atol)
    max_steps = _checks.check_max_steps(max_steps)

    flat_loss = b.flat_loss(loss)
    y_2d = outputs_to_2d(b.y, b.layout)
    try:
        loss_value = _loss_shape(flat_loss, y_2d, b.y)
    except TypeError as e:
        raise TypeError(
            "`loss` must be a function `loss(fx_train, y_train) -> scalar` of the outputs and "
            f"targets (arrays of shape {tuple(b.y.shape)}); calling it raised TypeError: {e}"
        ) from e
    _checks.check_scalar_loss(loss_value)
    if momentum is None:
        scale: Any = learning_rate
        damping = None
    else:
        scale = jnp.sqrt(jnp.asarray(learning_rate, b.dtype))
        damping = (jnp.asarray(momentum, b.dtype) - 1.0) / scale

    @full_precision
    def predict_fn(
        t: ArrayLike | None = None,
        fx_train_or_state_0: ArrayLike | ODEState | None = 0.0,
        fx_test_0: ArrayLike | None = None,
        k_test_train: ArrayLike | None = None,
    ) -> Any:
        """Train [and test] outputs (or an ``ODEState``) at time[s] ``t``."""
        _check_predict_inputs(fx_train_or_state_0, fx_test_0, k_test_train)
        is_state = isinstance(fx_train_or_state_0, ODEState)
        fx_train_0: Any
        qx_train_0: Any
        qx_test_0: Any
        if isinstance(fx_train_or_state_0, ODEState):
            state = fx_train_or_state_0
            fx_train_0, fx_test_0, qx_train_0, qx_test_0 = (
                state.fx_train, state.fx_test, state.qx_train, state.qx_test
            )
        else:
            fx_train_0, qx_train_0, qx_test_0 = fx_train_or_state_0, None, None
        with_test = fx_test_0 is not None
        test_rows = None
        if with_test:
            assert k_test_train is not None
            test_rows = b.test_rows_shape(k_test_train)
        if isinstance(fx_train_or_state_0, ODEState):
            test_shape = None if test_rows is None else b.layout.output_shape(test_rows)
            _checks.check_ode_state(fx_train_or_state_0, momentum, b.y_shape, test_shape)

        times = _times(t, b.dtype)
        kt = ft0 = qt0 = None
        prepared = _prepare_concrete(
            b, flat_loss, times, scale, fx_train_0, qx_train_0, fx_test_0, qx_test_0,
            k_test_train, test_rows, damping, lam_max,
        )
        facts = y0 = None
        if prepared is not None:
            tau, f0, q0, ft0, qt0, kt, y0, infinite, facts = prepared
            t_shape = tuple(times.shape)
        else:  # traced (under jax.jit etc.), or an input error to report in order
            tau = times * scale
            t_shape = tuple(tau.shape)
            tau = tau.reshape(-1)
            f0 = b.to_flat(
                0.0 if fx_train_0 is None else fx_train_0, b.rows_shape, "fx_train_0"
            )
            f0 = _checks.check_finite(f0, "fx_train_0")
            _checks.check_initial_loss(flat_loss.value, f0, b.y)
            q0 = None if qx_train_0 is None else b.to_flat(qx_train_0, b.rows_shape, "qx_train")
            q0 = _checks.check_finite(q0, "qx_train")
            if with_test:
                assert k_test_train is not None and fx_test_0 is not None and test_rows is not None
                ft0 = b.to_flat(fx_test_0, test_rows, "fx_test_0")
                ft0 = _checks.check_finite(ft0, "fx_test_0")
                qt0 = None if qx_test_0 is None else b.to_flat(qx_test_0, test_rows, "qx_test")
                qt0 = _checks.check_finite(qt0, "qx_test")
                kt = _checks.check_finite(b.flat_kernel(k_test_train), "k_test_train")
            infinite = bool(np.any(np.isinf(np.asarray(tau)))) if is_concrete(tau) else None
        dyn = Dynamics(b.k.astype(f0.dtype), flat_loss, b.y, damping, with_test, eigen)
        if y0 is None:
            y0 = dyn.initial_state(f0, q0)
        chosen = solver_obj
        if isinstance(chosen, str):
            assert lam_max is not None
            if facts is None and is_concrete(tau, y0.f, lam_max):
                facts = jax.device_get(classify(dyn, y0, tau, lam_max))
            if facts is not None and end_spectrum_decides(dyn, facts, f0.dtype):
                dyn = dyn.with_eigen()  # (the end-of-training solve needs it either way)
            chosen = choose_solver(dyn, y0, tau, lam_max, facts)
            if chosen.eigenbasis:
                dyn = dyn.with_eigen()
        if prepared is not None:  # nothing to differentiate: the fastest variant
            chosen = chosen.for_concrete_inputs()
        from_gradients = _train_from_gradients(chosen, dyn, prepared is not None, infinite)
        f_train0 = f0 if from_gradients else None
        readout = _Readout(ft0, qt0, kt, f_train0, b.layout, b.rows_shape, test_rows, t_shape)
        outputs, info = solve_at(
            dyn, y0, tau.astype(f0.dtype), chosen, rtol_, atol_, max_steps, infinite, readout
        )
        fx_train_t, qx_train_t, fx_test_t, qx_test_t = outputs

        if is_state:
            out: Any = ODEState(
                fx_train_t if fx_train_0 is not None else None, fx_test_t, qx_train_t, qx_test_t
            )
            if fx_train_0 is None:
                out = ODEState(None, fx_test_t, None, qx_test_t)
        elif fx_test_0 is None:
            out = fx_train_t
        elif fx_train_0 is None:
            out = fx_test_t
        else:
            out = (fx_train_t, fx_test_t)
        return _report(info, scale, out)

    return predict_fn


# ---------------------------------------------------------------------------
# max_learning_rate


def max_learning_rate(
    ntk_train_train: ArrayLike,
    y_train_size: int | None = None,
    momentum: float = 0.0,
    eps: float = 1e-12,
    *,
    nesterov: bool = False,
) -> float | Array:
    r"""The maximal feasible learning rate for (full-batch) gradient descent on MSE.

    For the loss ``1 / (2 * y_train_size) * ||f - y||^2``, gradient descent is
    stable while :math:`I - \eta K / \text{size}` is a contraction, i.e. for
    :math:`\eta < 2\,\text{size} / \lambda_\max(K)`; with momentum the bound is
    :math:`2 (1 + m)\, \text{size} / \lambda_\max(K)` ("Why Momentum Really
    Works", Goh 2017). With Nesterov momentum (``nesterov=True``, keyword-only,
    an addition to neural-tangents' signature) the bound is
    :math:`\frac{2 (1 + m)}{1 + 2m}\, \text{size} / \lambda_\max(K)`: the plain
    momentum bound would diverge. Works with any kernel layout (it is flattened to 2-D) and on
    any device (``jnp.linalg.eigvalsh``).

    Args:
      ntk_train_train: the NTK on the training data (any interleaved layout).
      y_train_size: ``y_train.size``; default: the flattened kernel's size, i.e.
        ``trace_axes=()``.
      momentum: momentum of the optimizer.
      eps: added to the largest eigenvalue to avoid dividing by zero.

    Returns:
      The maximal learning rate, a Python float; a scalar array when the kernel is
      traced (under ``jax.jit``, ``jax.grad``, ...), where a float cannot be computed.

    Example:
      >>> import jax.numpy as jnp
      >>> import ntkflow as nt
      >>> round(nt.predict.max_learning_rate(jnp.array([[2.0, 0.0], [0.0, 1.0]])), 6)
      2.0
    """
    k = jnp.asarray(_checks.check_array(ntk_train_train, "ntk_train_train"))
    k_dtype = float_dtype(k, compute=False)  # the kernel's own precision: the tolerances
    k = k.astype(float_dtype(k))
    if k.ndim % 2 or k.ndim == 0:
        raise ValueError(
            "`ntk_train_train` must have an even number of (interleaved) dimensions; got "
            f"shape {tuple(k.shape)}."
        )
    k = kernel_to_2d(k)
    if k.shape[0] != k.shape[1]:
        raise ValueError(
            f"`ntk_train_train` must be square once flattened; got shape {tuple(k.shape)}."
        )
    k = _checks.check_finite(k, "ntk_train_train")  # (under jit: checked at run time)
    _checks.check_symmetric(k, "ntk_train_train", k_dtype)
    factor = _checks.check_y_train_size(y_train_size, k.shape[0])
    momentum = 0.0 if momentum is None else _checks.check_momentum(momentum)
    eps = _checks.check_eps(eps)
    evals = jnp.linalg.eigvalsh(0.5 * (k + k.T))
    _checks.check_psd_eigenvalues(evals, "ntk_train_train", k_dtype)
    bound = 2 * (1 + momentum) / (1 + 2 * momentum) if nesterov else 2 * (1 + momentum)
    rate = bound * factor / (evals[-1] + eps)
    return float(rate) if is_concrete(rate) else rate
