r"""ntkflow's own loop for explicit Runge-Kutta 5(4) pairs: Tsitouras' and Dormand-Prince's.

The same methods as diffrax's ``Tsit5`` (Ch. Tsitouras, "Runge-Kutta pairs of
order 5(4) satisfying only the first column simplifying assumption", Comput.
Math. Appl. 62, 2011; coefficients as in diffrax) and ``Dopri5`` (the method of
neural-tangents' ``odeint``), in a loop written for this one problem: one
``lax.while_loop`` over steps of the flat state
(:class:`ntkflow._dynamics.FlatState`), first-same-as-last stages, the
standard step-size controller :math:`h_{n+1} = h_n \min(10, \max(0.2,
0.9\,\text{err}^{-1/5}))` on the root-mean-square error relative to
:math:`\text{atol} + \text{rtol} \max(|y_n|, |y_{n+1}|)`, and output at the
requested times by the methods' continuous extensions (order 4), so the
number of output times does not change the steps taken.

On CPU, for 2-16 outputs per row (e.g. 10 classes), the loop works on transposed
arrays, ``(outputs, rows)`` (:class:`ntkflow._dynamics.TransposedField`): the loss
gradient and the state updates then vectorize along the rows, and for small kernels the
product ``G^T K`` needs no transposes (:func:`ntkflow._eigen.matmul_t`).

In single precision the loop carries the state compensated, as an unevaluated sum
``hi + lo`` (:mod:`ntkflow._compensated`): each step's increment joins ``lo`` and one
error-free addition moves what fits into ``hi``. Float32's round-off then no longer
accumulates in the gradient integral ``S_1`` over hundreds of steps, which the test
read-out ``K_test @ S_1`` would expose (the saved states keep ``lo`` for it).

A solve took 12-38% less time than the same method in ``diffrax.diffeqsolve`` already
before the transposed layout (measured for Tsit5 at n = 256 and 1024 for MSE,
cross-entropy and log-cosh; diffrax's generality: events, checkpointed loops for
reverse-mode differentiation, solver-agnostic bookkeeping, has a price on small, cheap
steps). ``lax.while_loop`` is not
reverse-mode differentiable, so :class:`Tsit5` and :class:`Dopri5` use this loop
for concrete inputs only and diffrax's under JAX transformations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ntkflow._adaptive import next_step_size
from ntkflow._compensated import compensate, two_sum
from ntkflow._dynamics import Dynamics, FlatState, rms
from ntkflow._eigen import Eigen, transposed_layout
from ntkflow._solvers import (
    SOLVERS,
    DiffraxSolver,
    EndMemo,
    SolveInfo,
    end_of_training_test,
    explicit_end_tolerances,
    scaled_tolerances,
    single_precision_tenth,
)

__all__ = ["Dopri5", "Dopri8", "Tsit5", "Tableau", "integrate", "converge", "step_tolerances"]

_T = TypeVar("_T")
_Field = Callable[[Array, FlatState], FlatState]

# Butcher tableau: stage i (1..6) uses _A[i - 1] times the derivatives of stages 0..i-1;
# stage 6 is the solution (first same as last: its derivative starts the next step).
_A: tuple[tuple[float, ...], ...] = (
    (0.161,),
    (-0.008480655492356989, 0.335480655492357),
    (2.8971530571054935, -6.359448489975075, 4.3622954328695815),
    (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
    (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401,
     -0.028269050394068383),
    (0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081,
     2.324710524099774),
)
# Solution minus embedded (order 4) weights, over the 7 stage derivatives.
_E = (0.0017800110522257773, 0.0008164344596567463, -0.007880878010261994,
      0.1447110071732629, -0.5823571654525552, 0.45808210592918686, -0.015151515151515152)


def _tsit5_dense(theta: Array) -> Array:
    """Weights ``b_i(theta)`` of the continuous extension: ``y(t + theta h) = y + h sum b_i k_i``.
    """
    t = theta
    return jnp.stack([
        -1.0530884977290216 * t * (t - 1.3299890189751412)
        * (t**2 - 1.4364028541716351 * t + 0.7139816917074209),
        0.1017 * t**2 * (t**2 - 2.1966568338249754 * t + 1.2949852507374631),
        2.490627285651252793 * t**2 * (t**2 - 2.38535645472061657 * t + 1.57803468208092486),
        -16.54810288924490272 * (t - 1.21712927295533244) * (t - 0.61620406037800089) * t**2,
        47.37952196281928122 * (t - 1.203071208372362603) * (t - 0.658047292653547382) * t**2,
        -34.87065786149660974 * (t - 1.2) * (t - 0.666666666666666667) * t**2,
        2.5 * (t - 1) * (t - 0.6) * t**2,
    ])


# Dormand & Prince, "A family of embedded Runge-Kutta formulae", J. Comput. Appl. Math. 6,
# 1980: the method of neural-tangents' ``odeint`` (and of diffrax's ``Dopri5``).
_DP_A: tuple[tuple[float, ...], ...] = (
    (1 / 5,),
    (3 / 40, 9 / 40),
    (44 / 45, -56 / 15, 32 / 9),
    (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
    (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
    (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84),
)
_DP_B = _DP_A[-1] + (0.0,)
_DP_B_EMBEDDED = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100,
                  1 / 40)
_DP_E = tuple(b - c for b, c in zip(_DP_B, _DP_B_EMBEDDED, strict=True))
# Shampine's order-4 continuous extension (Hairer, Norsett & Wanner, Solving ODEs I, II.6;
# ``CONTD5`` in their ``dopri5``): y(theta) = y0 + theta (u + (1 - theta) (h k_0 - u
# + theta (2u - h k_0 - h k_6 + (1 - theta) h sum d_i k_i))), u = y1 - y0 = h sum b_i k_i.
_DP_D = (-12715105075 / 11282082432, 0.0, 87487479700 / 32700410799,
         -10690763975 / 1880347072, 701980252875 / 199316789632, -1453857185 / 822651844,
         69997945 / 29380423)


def _dopri5_dense(theta: Array) -> Array:
    """Weights ``b_i(theta)`` of Dormand-Prince's continuous extension (see ``_DP_D``)."""
    t = theta
    b = jnp.asarray(_DP_B, t.dtype)
    d = jnp.asarray(_DP_D, t.dtype)
    first = jnp.zeros(7, t.dtype).at[0].set(1.0)
    last = jnp.zeros(7, t.dtype).at[6].set(1.0)
    return (t * b + t * (1 - t) * (first - b) + t**2 * (1 - t) * (2 * b - first - last)
            + t**2 * (1 - t) ** 2 * d)


# Prince & Dormand, "High order embedded Runge-Kutta formulae", J. Comput. Appl. Math. 7,
# 1981: the 8(7) pair of 13 stages, first same as last (14 with the derivative at the
# solution, 13 evaluations per step); coefficients as in diffrax's ``Dopri8``. No
# continuous extension: steps end at the requested times (``Tableau.dense = None``).
_DP8_A: tuple[tuple[float, ...], ...] = (
    (0.05555555555555555,),
    (0.020833333333333332, 0.0625),
    (0.03125, 0.0, 0.09375),
    (0.3125, 0.0, -1.171875, 1.171875),
    (0.0375, 0.0, 0.0, 0.1875, 0.15),
    (0.04791013711111111, 0.0, 0.0, 0.11224871277777777, -0.02550567377777778,
     0.012846823888888888),
    (0.01691798978729228, 0.0, 0.0, 0.3878482784860432, 0.03597736985150033,
     0.19697021421566607, -0.17271385234050185),
    (0.0690957533591923, 0.0, 0.0, -0.6342479767288541, -0.16119757522460407,
     0.13865030945882525, 0.9409286140357562, 0.21163632648194397),
    (0.1835569968390454, 0.0, 0.0, -2.4687680843155926, -0.29128688781630047,
     -0.026473020233117376, 2.8478387641928005, 0.2813873314698498, 0.12374489986331466),
    (-1.2154248173958881, 0.0, 0.0, 16.672608665945774, 0.915741828416818, -6.056605804357471,
     -16.00357359415618, 14.849303086297663, -13.371575735289849, 5.134182648179638),
    (0.25886091643826425, 0.0, 0.0, -4.774485785489205, -0.4350930137770325,
     -3.0494833320722416, 5.5779200399360995, 6.15583158986104, -5.062104586736939,
     2.193926173180679, 0.13462799865933495),
    (0.8224275996265075, 0.0, 0.0, -11.658673257277664, -0.7576221166909362, 0.7139735881595816,
     12.075774986890057, -2.127659113920403, 1.9901662070489554, -0.23428647154404028,
     0.17589857770794226, 0.0),
    (0.041747491141530244, 0.0, 0.0, 0.0, 0.0, -0.05545232861123931, 0.2393128072011801,
     0.703510669403443, -0.7597596138144609, 0.6605630309222863, 0.15818748251012332,
     -0.2381095387528628, 0.25),
)
_DP8_E = (0.012194277465176744, 0.0, 0.0, 0.0, 0.0, 0.7731539478765578, -0.07192809284993823,
         -1.763834521196444, 1.787182038027448, -0.7829855527544889, 0.07877188662899604,
         -0.28255398319730723, 0.25, 0.0)


class Tableau(NamedTuple):
    """An explicit Runge-Kutta pair with first-same-as-last stages.

    Attributes:
      a: stage ``i`` (1..s) uses ``a[i - 1]`` times the derivatives of stages ``0..i-1``;
        stage ``s = len(a)`` is the solution (its derivative starts the next step), so a
        step costs ``s`` evaluations.
      e: solution minus embedded weights, over the ``s + 1`` stage derivatives.
      dense: ``theta -> (s + 1,)`` weights of the continuous extension; ``None``: the
        steps end at every requested time instead.
      exponent: the error estimate's order in ``h`` (the embedded order plus one), which
        the step-size controller inverts.
      stability: where solves to ``t = inf`` switch to :data:`BS3` once stiff (see
        :func:`converge`), the method's stability limit on the negative real axis, the
        largest ``h |lambda|`` it keeps stable; ``None``: no switch.
      rate_start: whether the first step size uses the dynamics' rate (see
        :func:`_initial_h`) rather than Hairer, Norsett & Wanner's unit time scale.
    """

    a: tuple[tuple[float, ...], ...]
    e: tuple[float, ...]
    dense: Callable[[Array], Array] | None
    exponent: float
    stability: float | None = None
    rate_start: bool = False


TSIT5 = Tableau(_A, _E, _tsit5_dense, 5.0, 3.506)
DOPRI5 = Tableau(_DP_A, _DP_E, _dopri5_dense, 5.0, 3.306)
DOPRI8 = Tableau(_DP8_A, _DP8_E, None, 8.0, rate_start=True)
#: Bogacki & Shampine's 3(2) pair ("A 3(2) pair of Runge-Kutta formulas", Appl. Math.
#: Lett. 2, 1989), first same as last: 3 evaluations a step, stable on the negative real
#: axis up to ``h |lambda| = 2.512`` (0.84 per evaluation, against Tsit5's 3.506 / 6 =
#: 0.58 and Dormand-Prince's 3.306 / 6 = 0.55). Where the steps are capped by stability,
#: it covers 1.43x (1.52x) the time per evaluation; solves to ``t = inf`` end with it
#: (:func:`converge`).
BS3 = Tableau(((1 / 2,), (0.0, 3 / 4), (2 / 9, 1 / 3, 4 / 9)),
              (-5 / 72, 1 / 12, 1 / 9, -1 / 8), None, 3.0, 2.512)
#: A step is at the stability limit when ``h`` times the estimated spectral radius
#: (:func:`_stiffness`) is at least this fraction of the method's ``stability`` ...
_STIFF_FRACTION = 0.9
#: ... and solves to ``t = inf`` switch to BS3 after this many such accepted steps in a row.
_STIFF_STEPS = 15
#: BS3's steps are controlled to this fraction of the tolerances (see :func:`converge`).
_BS3_TOLERANCE = 0.1


def _combine(y: FlatState, ks: Sequence[FlatState], coeffs: Sequence[float] | Array,
             h: Array) -> FlatState:
    """``y + h * sum(c_i k_i)`` leaf by leaf (static zero coefficients skipped)."""
    def leaf(y_leaf: Array, *k_leaves: Array) -> Array:
        acc = None
        for c, k in zip(coeffs, k_leaves, strict=False):
            if isinstance(c, float) and c == 0.0:
                continue
            acc = c * k if acc is None else acc + c * k
        return y_leaf if acc is None else y_leaf + h * acc

    return jax.tree.map(leaf, y, *ks)


def _add_compensated(y: FlatState, lo: FlatState | None, ks: Sequence[FlatState],
                     coeffs: Sequence[float] | Array, h: Array
                     ) -> tuple[FlatState, FlatState | None]:
    """``(y + lo) + h * sum(c_i k_i)`` as a double word ``(hi, lo)`` (plain if ``lo`` is
    ``None``): the increment joins the low-order part, then one error-free addition."""
    if lo is None:
        return _combine(y, ks, coeffs, h), None
    increment = _combine(lo, ks, coeffs, h)
    pairs = jax.tree.map(two_sum, y, increment)
    is_pair = lambda x: isinstance(x, tuple)  # noqa: E731
    hi = jax.tree.map(lambda p: p[0], pairs, is_leaf=is_pair)
    return hi, jax.tree.map(lambda p: p[1], pairs, is_leaf=is_pair)


def _error_ratio(err: FlatState, y0: FlatState, y1: FlatState, rtol: float, atol: float,
                 floor: FlatState | None = None) -> Array:
    """RMS over all entries of ``err / (atol + rtol max(|y0|, |y1|) + floor)``."""
    def leaf(e: Array, a: Array, b: Array, fl: Array | float = 0.0) -> Array:
        return jnp.sum(jnp.square(
            e / (atol + rtol * jnp.maximum(jnp.abs(a), jnp.abs(b)) + fl)))

    sq = jax.tree.map(leaf, err, y0, y1) if floor is None else jax.tree.map(
        leaf, err, y0, y1, floor)
    size = sum(x.size for x in jax.tree.leaves(y0))
    return jnp.sqrt(sum(jax.tree.leaves(sq)) / size)


def _roundoff(dyn: Dynamics, y0: FlatState, tableau: Tableau) -> FlatState:
    r"""The derivatives' round-off in the error estimate, per unit step (``converge`` only).

    A loss gradient carries an absolute round-off of about ``eps`` times its largest
    terms, which does not shrink with the gradient: near saturation the cross-entropy
    gradient ``p - y`` is ``eps`` off while both are near 1. The error estimate
    :math:`h \sum_i e_i k_i` then holds a noise of rms about :math:`h \|e\|
    \operatorname{rms}(K \eta)` (:math:`\|e\| = 0.76` for Tsit5, 0.080 for
    Dormand-Prince; the stages' round-off :math:`\eta_i` does not cancel), with
    :math:`\eta` uniform in :math:`\pm\epsilon \max|G(F_0)|`, so :math:`\operatorname{rms}(K\eta) =
    \|K\|_F / \sqrt{n} \cdot \epsilon \max|G(F_0)| / \sqrt 3`. Once the loss
    curvature has collapsed, the steps are no longer capped by stability but by this
    noise, which no step size controls away. The end-of-training solve therefore adds
    ``h`` times it to the tolerance. Measured (float32, cross-entropy, n = 256, ``t =
    inf``): 16,609 steps (25% rejected) -> 2,912, against 1,463 for the converged horizon;
    the end point moves by 0.4% of the outputs' scale (softmax outputs by 6e-7 on the
    train points and 1.2e-2 on the test points, against 0.17 between the float32 and float64
    end points), at the same loss, 5.0e-7; in float64 3,705 -> 3,704 steps. Finite horizons
    keep the plain tolerance: there the floor changed float32 errors erratically, up to
    1.5x worse.
    """
    g0 = dyn.grad_fn(y0.f)
    eps = jnp.finfo(y0.f.dtype).eps
    weight = float(np.sqrt(np.sum(np.square(tableau.e)) / 3))
    gnoise = weight * eps * jnp.max(jnp.abs(g0))
    knoise = gnoise * jnp.sqrt(jnp.sum(jnp.square(dyn.k)) / dyn.k.shape[0])
    zero = jnp.zeros_like(gnoise)
    s1 = None if y0.s1 is None else gnoise
    if y0.q is None:
        return FlatState(knoise, None, s1, None)
    return FlatState(zero, knoise, s1, None if y0.s2 is None else zero)


def _step(field: _Field, tableau: Tableau, y: FlatState, lo: FlatState | None,
          k0: FlatState, h: Array, rtol: float, atol: float, noise: FlatState | None = None
          ) -> tuple[FlatState, FlatState | None, list[FlatState], Array]:
    """One step from the (possibly compensated) state ``y + lo``: the new state and its
    low-order part, the stage derivatives and the scaled error (``noise``: the
    derivatives' round-off per unit step, :func:`_roundoff`)."""
    tau = jnp.zeros((), h.dtype)  # the dynamics are autonomous
    ks = [k0]
    for row in tableau.a[:-1]:
        ks.append(field(tau, _combine(y, ks, row, h)))
    y1, lo1 = _add_compensated(y, lo, ks, tableau.a[-1], h)
    ks.append(field(tau, y1))
    err = _combine(jax.tree.map(jnp.zeros_like, y), ks, tableau.e, h)
    floor = None if noise is None else jax.tree.map(lambda v: h * v, noise)
    return y1, lo1, ks, _error_ratio(err, y, y1, rtol, atol, floor)


def _split_lo(y: FlatState, compensated: bool) -> tuple[FlatState, FlatState | None]:
    """``(y without its low-order part, the low-order part)``: zeros if ``compensated``
    and ``y`` has none, ``None`` if not ``compensated``."""
    hi = FlatState(y.f, y.q, y.s1, y.s2)
    if not compensated:
        return hi, None
    return hi, y.lo if y.lo is not None else jax.tree.map(jnp.zeros_like, hi)


def _with_lo(y: FlatState, lo: FlatState | None) -> FlatState:
    return FlatState(y.f, y.q, y.s1, y.s2, lo)


def _initial_h(field: _Field, y0: FlatState, k0: FlatState, rtol: float, atol: float,
               tableau: Tableau) -> Array:
    r"""The starting step size (one extra vector-field evaluation).

    Hairer, Norsett & Wanner's rule ("Solving ODEs I", II.4): with the scaled norms
    :math:`d_0 = \|y_0\|`, :math:`d_1 = \|f(y_0)\|` and :math:`d_2 = \|f(y_0 + h_0
    f(y_0)) - f(y_0)\| / h_0` (:math:`h_0 = 0.01\, d_0 / d_1`), the step
    :math:`h_1 = (0.01 / \max(d_1, d_2))^{1/p}` for an error estimate of order
    :math:`p`, at most :math:`100 h_0`. It takes the problem's time scale to be 1.

    With ``tableau.rate_start`` the rule uses the dynamics' own rate instead,
    :math:`\rho = d_2 / d_1` (about :math:`\|J f\| / \|f\|`): a local error of about
    :math:`h^p \|y^{(p)}\| / p! \approx h^p \rho^{p-1} d_1 / p!` is 0.01 at

    .. math:: h_1 = \left(\frac{0.01\, p!}{d_1\, \rho^{p-1}}\right)^{1/p},

    again at most :math:`100 h_0`, which is also the step where :math:`\rho` vanishes
    (Hairer's rule where :math:`d_0` or :math:`d_1` is below 1e-5). Gradient flow's time
    scale is :math:`1 / (c \lambda_\max)`, hundreds of time units for a mean loss over
    thousands of outputs, and an 8th-order pair cannot make up the difference: its error
    estimate at tiny steps is round-off, proportional to ``h``, so the steps grow by
    the controller's cap of 10 at most. Measured (float64, Dormand-Prince 8(7), S = 10,
    n = 256): cross-entropy 0.14 -> 61 for the first step (the later ones 116-363),
    13 -> 10 steps, error 4.5e-9 -> 1.8e-9; log-cosh 10 -> 8 steps, 2.0e-9 -> 1.1e-9;
    n = 1024 12 -> 10 and 9 -> 8 steps, errors 8.1e-10 -> 2.7e-9 and 1.4e-9 -> 2.5e-9
    (the predecessor: 1.2e-8 and 2.2e-8). The 5(4) pairs keep Hairer's rule: at 6
    products a step their start costs less, and their float32 errors sit at the
    inputs' rounding floor, which a different first step moved both ways (n = 256,
    cross-entropy 2.2e-7 -> 3.3e-7, log-cosh 9.4e-8 -> 1.1e-7).
    """
    def norm(x: FlatState) -> Array:
        return _error_ratio(x, y0, y0, rtol, atol)

    p = tableau.exponent
    d0, d1 = norm(y0), norm(k0)
    small = (d0 < 1e-5) | (d1 < 1e-5)
    h0 = jnp.where(small, 1e-6, 0.01 * d0 / jnp.where(d1 > 0, d1, 1.0))
    k1 = field(h0, _combine(y0, [k0], (1.0,), h0))
    d2 = norm(jax.tree.map(jnp.subtract, k1, k0)) / h0
    big = jnp.maximum(d1, d2)
    h1 = jnp.where(big <= 1e-15, jnp.maximum(1e-6, h0 * 1e-3),
                   (0.01 / jnp.where(big > 0, big, 1.0)) ** (1.0 / p))
    if tableau.rate_start:
        rho = d2 / jnp.where(d1 > 0, d1, 1.0)
        scaled = (0.01 * math.factorial(int(p)) / (d1 * rho ** (p - 1.0))) ** (1.0 / p)
        h1 = jnp.where(small | jnp.isnan(scaled), h1, scaled)
    return jnp.minimum(100 * h0, h1)


def _next_h(h: Array, err: Array, accepted: Array, exponent: float) -> Array:
    """The shared controller; no growth right after a rejected step."""
    return next_step_size(h, err, exponent, grow=accepted)


def _transpose(y: _T) -> _T:
    """Every array in ``y`` with its last two axes swapped."""
    return jax.tree.map(lambda a: jnp.swapaxes(a, -1, -2), y)


def _field(dyn: Dynamics, y0: FlatState) -> tuple[_Field, Callable[[Any], Any]]:
    """``(vector field, orient)``: the loop's vector field, on transposed arrays
    (:class:`ntkflow._dynamics.TransposedField`) where
    :func:`ntkflow._eigen.transposed_layout` holds, and the map between the loop's layout
    and the flat one (either way: a transpose or the identity)."""
    if transposed_layout(*y0.f.shape):
        return dyn.transposed(), _transpose
    return dyn.vector_field, lambda y: y


def _select(pred: Array, a: _T, b: _T) -> _T:
    """``a`` where ``pred``, else ``b``, leaf by leaf (``None`` stays ``None``)."""
    return jax.tree.map(lambda x, y: jnp.where(pred, x, y), a, b)


def integrate(dyn: Dynamics, y0: FlatState, taus: Float[Array, " m"], *, rtol: float,
              atol: float, max_steps: int, tableau: Tableau = TSIT5
              ) -> tuple[FlatState, SolveInfo]:
    """States at the sorted finite times ``taus >= 0`` (the solver contract's ``integrate``).

    In single precision the state is carried compensated, as ``hi + lo``
    (:mod:`ntkflow._compensated`), and the saved states keep their low-order parts.
    Without a continuous extension (``tableau.dense is None``) a step that would pass
    the next requested time ends there; after it the step size goes on from at least
    the one before.
    """
    m = taus.shape[0]
    dense = tableau.dense
    t_end = taus[-1]
    y0, lo0 = _split_lo(y0, compensate(y0.f.dtype))
    field, orient = _field(dyn, y0)
    y0, lo0 = orient((y0, lo0))
    start_state = _with_lo(y0, lo0)
    saved = jax.tree.map(lambda a: jnp.zeros((m,) + a.shape, a.dtype), start_state)
    # Times at the start are the initial state.
    start = jnp.sum(taus <= 0).astype(jnp.int32)
    saved = jax.tree.map(
        lambda s, v: jnp.where((jnp.arange(m) < start).reshape((-1,) + (1,) * v.ndim), v[None], s),
        saved, start_state,
    )
    k0 = field(jnp.zeros((), taus.dtype), y0)
    h0 = _initial_h(field, y0, k0, rtol, atol, tableau)

    def record(i: Array, saved: FlatState, tau: Array, h: Array, y: FlatState,
               lo: FlatState | None, y1: FlatState, ks: list[FlatState], tau1: Array,
               accept: Array) -> tuple[Array, FlatState]:
        """If the step is accepted, save every requested time in ``(tau, tau1]`` from the
        continuous extension. (A loop that may run no iteration, not a ``lax.cond``,
        whose branches XLA gives copies of all stage derivatives at every step.)"""
        def cond(c: tuple[Array, FlatState]) -> Array:
            i, _ = c
            return accept & (i < m) & (taus[jnp.minimum(i, m - 1)] <= tau1)

        def body(c: tuple[Array, FlatState]) -> tuple[Array, FlatState]:
            i, saved = c
            target = taus[i]
            yi = y1  # (without a continuous extension: a step ends at each target)
            if dense is not None:
                theta = jnp.clip((target - tau) / h, 0.0, 1.0)
                yi = _with_lo(*_add_compensated(y, lo, ks, dense(theta), h))
                yi = _select(target >= tau1, y1, yi)
            return i + 1, jax.tree.map(lambda s, v: s.at[i].set(v), saved, yi)

        return jax.lax.while_loop(cond, body, (i, saved))

    def cond(c: tuple) -> Array:
        tau, _, _, _, _, i, _, n, ok = c
        return (i < m) & (n < max_steps) & ok

    def body(c: tuple) -> tuple:
        tau, y, lo, k, h_free, i, saved, n, ok = c
        target = t_end if dense is not None else taus[jnp.minimum(i, m - 1)]
        h = jnp.minimum(h_free, target - tau)
        y1, lo1, ks, err = _step(field, tableau, y, lo, k, h, rtol, atol)
        accept = err <= 1.0
        tau1 = jnp.where(h >= target - tau, target, tau + h)
        i, saved = record(i, saved, tau, h, y, lo, _with_lo(y1, lo1), ks, tau1, accept)
        h_next = _next_h(h, err, accept, tableau.exponent)
        if dense is None:  # a step cut short at a requested time does not shrink the next
            h_next = jnp.where(accept & (h < h_free), jnp.maximum(h_next, h_free), h_next)
        return (
            jnp.where(accept, tau1, tau), _select(accept, y1, y),
            _select(accept, lo1, lo), _select(accept, ks[-1], k),
            h_next, i, saved, n + 1, ok & jnp.isfinite(err),
        )

    zero = jnp.zeros((), jnp.int32)
    init = (jnp.zeros((), taus.dtype), y0, lo0, k0, h0, start, saved, zero, jnp.ones((), bool))
    tau, _, _, _, _, i, saved, n, ok = jax.lax.while_loop(cond, body, init)
    done = i >= m
    code = jnp.where(done, 0, jnp.where(ok, 1, 2)).astype(jnp.int32)
    return orient(saved), SolveInfo(done, tau, n, len(tableau.a) * n + 2, code)


def converge(dyn: Dynamics, y0: FlatState, tau0: Array, eigen: Eigen, *, rtol: float,
             atol: float, max_steps: int, active: Array | None = None,
             tableau: Tableau = TSIT5) -> tuple[FlatState, SolveInfo]:
    r"""Steps from ``y0`` (at ``tau0``) until ``is_done`` (see ``_solvers.converged``); a
    compensated ``y0`` (one with low-order parts) stays compensated.

    In double precision without momentum the solve goes on with :data:`BS3` once the
    steps sit at the method's stability limit: ``h`` times the estimated spectral radius
    (:func:`_stiffness`) at least ``_STIFF_FRACTION`` of ``tableau.stability`` for
    ``_STIFF_STEPS`` accepted steps in a row. Training ends slowly there: cross-entropy's
    curvature decays about as fast as time grows, so the stiffness ratio stays (about 700
    at n = 256 on the benchmark's problem), and the explicit method spends some 500 steps,
    at its stability limit (7% rejected), on every tenfold of time until the loss has
    converged. The Jacobian's eigenvalues are real there (``K H`` is similar to
    :math:`H^{1/2} K H^{1/2}`), where BS3 covers 1.43x the time per kernel product.
    BS3's steps are controlled to a tenth of the tolerances (``_BS3_TOLERANCE``): at
    the stability limit its error estimate is half the stiff mode's amplitude (Tsit5's
    0.66), so near a finite limit the state stalls at about twice the step tolerance,
    above the convergence test's (at the tolerances themselves a log-cosh solve ran out
    of steps; at half of them it converged); and the steps, capped by stability anyway,
    cost no more: 4,775 steps instead of 4,720.

    Measured (float64, cross-entropy, the benchmark's problem, ``t = inf``): n = 256
    0.73 -> 0.61 s (Tsit5's 3,698 steps, 22,190 kernel products -> 505 Tsit5 and 4,270
    BS3 steps, 15,842), the end point within 6.6e-8 of a tight solve to the same time
    instead of 2.4e-7 (6.0e-7 with BS3 at the tolerances); n = 1024 13.3 -> 9.95 s.
    Log-cosh and MSE to ``t = inf`` with ``solver="tsit5"`` (n = 256, condition number
    1e3): 2.42 -> 1.49 s and 0.71 -> 0.53 s, the limits 7.6e-8 off instead of 1.0e-7 and
    9.0e-8. Single precision keeps the one method: there the switch took 0.37 -> 0.28 s,
    but the end point, which the gradients' round-off moves, moved further (0.26% -> 0.41%
    of the outputs' scale from a float64 solve to the same time). With momentum the modes
    oscillate, off the real axis.
    """
    y0, lo0 = _split_lo(y0, y0.lo is not None)
    test = end_of_training_test(dyn, eigen, y0, rtol, atol, active)
    switch = (dyn.damping is None and tableau.stability is not None
              and jnp.dtype(y0.f.dtype).itemsize > 4)
    noise = _roundoff(dyn, y0, tableau)
    noise_bs3 = _roundoff(dyn, y0, BS3) if switch else None
    field, orient = _field(dyn, y0)
    y0, lo0 = orient((y0, lo0))
    is_done = lambda y, memo: test.step(orient(y), memo)  # noqa: E731
    k0 = field(tau0, y0)
    step_rtol, step_atol = explicit_end_tolerances(dyn, rtol, atol)
    h0 = _initial_h(field, y0, k0, step_rtol, step_atol, tableau)
    done0, memo0 = is_done(y0, test.memo0)
    start = _Loop(tau0, y0, lo0, k0, h0, jnp.zeros((), jnp.int32), done0,
                  jnp.ones((), bool), jnp.zeros((), bool), jnp.zeros((), jnp.int32), memo0)
    first = _converge_loop(field, tableau, start, is_done, step_rtol, step_atol,
                           noise, max_steps, switch)
    rhs = len(tableau.a) * first.n + 2
    end = first
    if switch:
        # BS3 goes on where the first loop stopped for stiffness; elsewhere (done, out of
        # steps, non-finite) its loop stops at once (``stiff`` set).
        assert tableau.stability is not None and BS3.stability is not None
        assert noise_bs3 is not None
        scale = BS3.stability / tableau.stability
        second = first._replace(h=first.h * scale, stiff=~first.stiff)
        end = _converge_loop(field, BS3, second, is_done, _BS3_TOLERANCE * step_rtol,
                             _BS3_TOLERANCE * step_atol, noise_bs3, max_steps, False)
        rhs = rhs + len(BS3.a) * (end.n - first.n)
    code = jnp.where(end.done, 0, jnp.where(end.ok, 1, 2)).astype(jnp.int32)
    return (_with_lo(*orient((end.y, end.lo))),
            SolveInfo(end.done, end.tau, end.n, rhs, code))


class _Loop(NamedTuple):
    """The carry of :func:`_converge_loop`."""

    tau: Array
    y: FlatState
    lo: FlatState | None
    k: FlatState
    h: Array
    n: Array  # steps so far (accepted and rejected)
    done: Array
    ok: Array
    stiff: Array  # the steps are capped by stability: stop, for BS3 to go on
    at_limit: Array  # consecutive accepted steps at the stability limit
    memo: EndMemo  # the end-of-training test's


def _converge_loop(field: _Field, tableau: Tableau, start: _Loop,
                   is_done: Callable[[FlatState, EndMemo], tuple[Array, EndMemo]],
                   rtol: float, atol: float,
                   noise: FlatState, max_steps: int, detect: bool) -> _Loop:
    """Steps of ``tableau`` from ``start`` until done, ``max_steps``, non-finite values
    or, if ``detect``, stiffness (:func:`_stiffness`)."""
    def cond(c: _Loop) -> Array:
        return ~c.done & (c.n < max_steps) & c.ok & ~c.stiff

    def body(c: _Loop) -> _Loop:
        y1, lo1, ks, err = _step(field, tableau, c.y, c.lo, c.k, c.h, rtol, atol, noise)
        accept = err <= 1.0
        y = _select(accept, y1, c.y)
        lo = _select(accept, lo1, c.lo)
        done, memo = jax.lax.cond(accept, lambda: is_done(y, c.memo),
                                  lambda: (jnp.zeros((), bool), c.memo))
        at_limit, stiff = c.at_limit, c.stiff
        if detect:
            assert tableau.stability is not None
            limited = _stiffness(tableau, ks, y1, c.h) >= _STIFF_FRACTION * tableau.stability
            at_limit = jnp.where(accept, jnp.where(limited, at_limit + 1, 0), at_limit)
            stiff = at_limit >= _STIFF_STEPS
        return _Loop(jnp.where(accept, c.tau + c.h, c.tau), y, lo,
                     _select(accept, ks[-1], c.k), _next_h(c.h, err, accept, tableau.exponent),
                     c.n + 1, done, c.ok & jnp.isfinite(err), stiff, at_limit, memo)

    return jax.lax.while_loop(cond, body, start)


def _stiffness(tableau: Tableau, ks: Sequence[FlatState], y1: FlatState, h: Array) -> Array:
    r"""``h`` times Hairer's estimate of the Jacobian's spectral radius along the step,
    :math:`\|k_s - k_{s-1}\| / \|y_1 - Y_{s-1}\|`, from the last two stages, both at the
    step's end (Hairer & Wanner, Solving ODEs II, IV.2; their ``dopri5`` switches after
    15 such steps, as :func:`converge` does): their difference is the Jacobian applied to
    ``y_1 - Y_{s-1} = h \sum_j (b_j - a_{s-1,j}) k_j``, so the estimate is exact for a
    linear field along an eigenvector and at most the spectral radius otherwise. Train
    outputs only."""
    b, a = tableau.a[-1], tableau.a[-2] + (0.0,)
    weights = [bj - aj for bj, aj in zip(b, a, strict=True)]
    diff = _combine(jax.tree.map(jnp.zeros_like, y1), ks, weights, h).f
    dk = ks[-1].f - ks[-2].f
    tiny = jnp.finfo(y1.f.dtype).tiny
    return h * rms(dk) / jnp.maximum(rms(diff), tiny)


#: Finite-time solves keep Tsit5's local error estimate to this fraction of the tolerance.
_LOCAL_FRACTION = 1 / 3
#: ... but not below this many float epsilons, where round-off dominates.
_ROUNDOFF_EPS = 8


def step_tolerances(rtol: float, atol: float, dtype: Any) -> tuple[float, float]:
    r"""The tolerances Tsit5's finite-time steps are controlled to, for user tolerances
    ``(rtol, atol)``: both scaled by :math:`s = \max(1/3, \min(1, 8\epsilon /
    \text{rtol}))`.

    A tolerance bounds each step's *estimated local* error, and what it buys in *global*
    error depends on the method's error estimate. At the same tolerance, Tsit5's global
    error exceeded that of the predecessor's Dormand-Prince solve (``odeint``) in 16 of
    30 float64 problems measured, by 1.01-3.8x (n = 32, 256 and 1024; MSE, cross-entropy,
    log-cosh, with and without momentum; condition numbers 1e3 and 1e4; 14 random
    spectra; errors against a 1e-11 solve). At a third of the tolerance it did so in 1
    of 30, by 1.35x, for 1-19% more steps (the fewest in long solves). So
    ``gradient_descent``'s default tolerances, the predecessor's, give about the
    predecessor's accuracy or better; the global errors of both methods scatter by 2-4x
    between nearby tolerances, so no fraction guarantees it everywhere. The scale
    stops at ``8 eps`` (1e-6 in float32), where round-off dominates the error and more
    steps do not reduce it (float32 at ``rtol`` 1.4e-8 gave the same error as at 1e-6,
    with 4x the steps).

    Solves to ``t = inf`` keep the user's tolerances: the end point of training attracts
    the trajectory, so earlier step errors decay, and the convergence test sets the
    accuracy of the limit.
    """
    return scaled_tolerances(rtol, atol, dtype, _LOCAL_FRACTION, _ROUNDOFF_EPS)


class _OwnLoopSolver(DiffraxSolver):
    """An explicit 5(4) pair that runs in this module's own loop for concrete inputs.

    With ``differentiable=True`` (default) it runs in ``diffrax.diffeqsolve``
    (reverse-mode differentiable, used under JAX transformations); predictors switch to
    the own loop (``differentiable=False``, :meth:`for_concrete_inputs`) when their
    inputs are concrete arrays, where nothing can be differentiated. In single
    precision the own loop carries the state compensated (:func:`integrate`).
    """

    tableau: ClassVar[Tableau]
    #: The same method in diffrax (under transformations).
    diffrax_method: ClassVar[type[dfx.AbstractSolver]]
    #: On a CPU, XLA hands only the kernel products to its YNNPACK library calls.
    #: By default it also hands them the loop's reductions (the error norm, a softmax's
    #: max and sum) and elementwise ops, where a call's overhead (about 0.1 ms, against
    #: microseconds of work on 10,000 entries) outweighed its work. Measured (float64,
    #: cross-entropy, n = 1024, 10 classes, the same steps): 141 -> 126 ms at S = 10,
    #: 1.36 -> 1.22 s at S = 1000; float32 7-8% less; n = 256 unchanged (the same
    #: programs). The other methods gain nothing or lose (Chebyshev up to 11%).
    cpu_compiler_options: ClassVar[tuple[tuple[str, str], ...]] = (
        ("xla_cpu_experimental_ynn_fusion_type", "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"),
    )
    differentiable: bool = eqx.field(default=True, static=True)

    def diffrax_solver(self, rtol: float, atol: float, dtype: Any) -> dfx.AbstractSolver:
        del rtol, atol, dtype
        return self.diffrax_method()

    def for_concrete_inputs(self) -> _OwnLoopSolver:
        return type(self)(differentiable=False)

    def step_tolerances(self, rtol: float, atol: float, dtype: Any) -> tuple[float, float]:
        """The tolerances finite-time steps are controlled to."""
        del dtype
        return rtol, atol

    def integrate(self, dynamics, y0, taus, *, rtol, atol, max_steps):
        rtol, atol = self.step_tolerances(rtol, atol, y0.f.dtype)
        if self.differentiable:
            return super().integrate(dynamics, y0, taus, rtol=rtol, atol=atol,
                                     max_steps=max_steps)
        return integrate(dynamics, y0, taus, rtol=rtol, atol=atol, max_steps=max_steps,
                         tableau=self.tableau)

    def converge(self, dynamics, y0, tau0, eigen, *, rtol, atol, max_steps, active=None):
        if self.differentiable:
            return super().converge(dynamics, y0, tau0, eigen, rtol=rtol, atol=atol,
                                    max_steps=max_steps, active=active)
        return converge(dynamics, y0, tau0, eigen, rtol=rtol, atol=atol, max_steps=max_steps,
                        active=active, tableau=self.tableau)


class Tsit5(_OwnLoopSolver):
    """Tsitouras' explicit 5(4) Runge-Kutta method.

    Cheap steps; efficient while the problem is not stiff (cross-entropy once
    the softmax saturates, short horizons); ``auto``'s explicit method in double
    precision. Finite-time steps are controlled to a third of the tolerances
    (:func:`step_tolerances`).
    """

    name: ClassVar[str] = "tsit5"
    tableau: ClassVar[Tableau] = TSIT5
    diffrax_method: ClassVar[type[dfx.AbstractSolver]] = dfx.Tsit5

    def step_tolerances(self, rtol: float, atol: float, dtype: Any) -> tuple[float, float]:
        return step_tolerances(rtol, atol, dtype)


class Dopri5(_OwnLoopSolver):
    """Dormand-Prince 5(4), the method of neural-tangents' ``odeint``, at the user's
    tolerances; ``auto``'s explicit method in single precision.

    In float32 its steps carry less round-off than Tsit5's: the solution weights sum
    to 1.64 in magnitude, against Tsit5's 7.6, which multiply the stage derivatives'
    round-off. Measured (float32, n = 256, cross-entropy, mid horizon, errors against
    a float64 solve from the same float32 inputs, compensated state and read-out):
    train error 6.3e-6 against Tsit5's 3.3e-5, test 4.6e-6 against 1.3e-5, at 280 steps
    against 269 (the predecessor: 7.2e-6 and 7.9e-6).
    """

    name: ClassVar[str] = "dopri5"
    tableau: ClassVar[Tableau] = DOPRI5
    diffrax_method: ClassVar[type[dfx.AbstractSolver]] = dfx.Dopri5

    def step_tolerances(self, rtol: float, atol: float, dtype: Any) -> tuple[float, float]:
        r"""The user's tolerances in double precision; in single precision both scaled by
        :math:`\max(1/10, \min(1, \epsilon / \text{rtol}))`, a tenth but not below
        ``eps``.

        The predecessor's default tolerance (1.4e-8) lies below float32's epsilon, so
        its float32 solves are limited by round-off, not by their steps; float32's
        default here (1e-6, 8 eps) left a truncation error above theirs at short
        horizons. With the compensated state, steps controlled to ``eps`` reach the
        round-off floor: measured (n = 256, errors against float64 solves from the
        unrounded inputs) cross-entropy at S = 10 1.7e-6 -> 7.5e-7 (the predecessor
        7.5e-7), log-cosh 1.1e-6 -> 1.6e-7 (1.0e-7), cross-entropy mid horizon 2.2e-5 ->
        1.8e-5 (2.2e-5), for 2-20% more time; a third of ``eps`` gave 9e-8 for log-cosh
        but 1.4x the time at S = 10.
        """
        return single_precision_tenth(rtol, atol, dtype)


class Dopri8(_OwnLoopSolver):
    """Dormand-Prince 8(7) (Prince & Dormand's pair), at the user's tolerances: 13 kernel
    products a step against 6, for steps that grow as the tolerance's 8th root rather
    than its 5th; ``auto``'s explicit method for short horizons in double precision.
    Its first step is sized by the dynamics' rate (:func:`_initial_h`).
    """

    name: ClassVar[str] = "dopri8"
    tableau: ClassVar[Tableau] = DOPRI8
    diffrax_method: ClassVar[type[dfx.AbstractSolver]] = dfx.Dopri8
    # diffrax's continuous extension for it is of lower order than its steps (cross-
    # entropy, S = 10, rtol 1.4e-8: 1e-7 errors between steps against 1e-8 at their ends),
    # so steps end at the requested times, in diffrax's loop as in this module's.
    steps_to_outputs: ClassVar[bool] = True


SOLVERS[Tsit5.name] = Tsit5
SOLVERS[Dopri5.name] = Dopri5
SOLVERS[Dopri8.name] = Dopri8
