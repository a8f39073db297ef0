r"""A Rosenbrock method in the kernel's eigenbasis, for stiff dynamics whose curvature varies.

The exponential integrator (:mod:`ntkflow._expo`) is exact when the loss
Hessian is a multiple of the identity (MSE). When it varies across outputs
(log-cosh, Huber, cross-entropy, ...), the Jacobian of gradient flow,
:math:`J = -K H` with :math:`H = \nabla^2_F L`, is stiff *and* not diagonal in
the kernel's eigenbasis, and a scalar-curvature linearization leaves a stiff
remainder. This module uses the true Jacobian instead, through a linearly
implicit (Rosenbrock) method whose linear systems are solved matrix-free.

**The method.** Rodas5P (Steinebach 2023): 8 stages, order 5 with an embedded
order-4 estimate, L-stable and stiffly accurate. Each stage solves

.. math::

    (I - h\gamma J) K_i = h\gamma \Big( f\big(y + \textstyle\sum_j a_{ij} K_j\big)
        + \textstyle\sum_j \tfrac{c_{ij}}{h} K_j \Big),

with :math:`J` the Jacobian at the start of the step, :math:`y_{n+1} = y_n +
\sum_j m_j K_j` and the error estimate :math:`K_8`.

**The linear systems.** In scaled eigen-coordinates :math:`u = \Lambda^{-1/2}
V^T F` (null modes, :math:`\lambda = 0`, are fixed points of the train
dynamics), :math:`J` becomes :math:`-B` with :math:`B = \Lambda^{1/2} V^T H V
\Lambda^{1/2}` symmetric positive semi-definite, so each stage system is
:math:`(\sigma I + \beta B) X = r` (:math:`\sigma = 1,\ \beta = h\gamma` for
gradient descent; for momentum, eliminating the velocity stage gives
:math:`\sigma = 1 - h\gamma d,\ \beta = (h\gamma)^2`). It is solved by
preconditioned conjugate gradients with the preconditioner :math:`(\sigma I +
\beta c \Lambda)^{-1}`, diagonal in the eigenbasis, where :math:`c` is the
mean loss curvature (the Hessian's Rayleigh quotient along a fixed random sign
vector, about :math:`\operatorname{tr} H / \dim H`). The preconditioned matrix has its
eigenvalues between :math:`\min(1, h_\min / c)` and :math:`\max(1, h_\max /
c)` (:math:`h` the extreme eigenvalues of :math:`H`), whatever the stiffness:
a few iterations, each one Hessian-vector product and two products with the
eigenvector matrix, reach the tolerance
:math:`3 \cdot 10^{-2}(\text{atol} + \text{rtol}\,\|z\|)` (so the solve errors of
the eight stages together stay below about a quarter of the step's error
tolerance; measured at n = 1024, log-cosh: 15% faster than :math:`10^{-2}`, error
2.5e-10 against 1.8e-10, while :math:`10^{-1}` raised the error 100-fold; with momentum
it stays :math:`10^{-2}`: at :math:`3 \cdot 10^{-2}` a resumed solve on a
singular kernel went from below 1e-7 relative error to 2e-7). With momentum the
tolerance is also divided by the step's error weight (below), down to :math:`3 \cdot
10^{-2}`: the solves are then at most a third of the unweighted step tolerance, still a
hundredth of the weighted one (log-cosh, momentum 0.9, n = 1024, converged horizon: 0.96
s instead of 1.33 s, the same 47 steps, error 3.1e-10 against 2.6e-10). Without momentum,
divided down to 0.1 or 0.3, it bought no time that the machine's noise did not hide and
raised that error from 6.5e-10 to 2.3e-9; divided without bound (a tolerance above the
step's), it let a solve to ``t = inf`` accept steps whose stage systems were left
unsolved, until it diverged. The eight stage systems of
a step share their matrix, so each solve starts from the Galerkin
approximation in the span of the previous stages' solutions (whose products
with the matrix are known), which halves the iterations. A solve that does
not converge in 25 iterations rejects the step (the next try is shorter, so
the system is better conditioned).

**Error weight.** A step's error estimate is weighed by the decay the dynamics give it
before the next output time, :math:`\min(1, \max(10^{-2}, e^{-\rho L / 2}))` with
:math:`\rho` the slowest mode's decay rate, with or without momentum
(:meth:`Rodas5P._decay_weight`): over a long horizon the early steps, whose errors the
slowest mode damps by that factor, may be up to 100x less accurate (log-cosh, n = 1024,
converged horizon: 37 steps instead of 94, error 6.5e-10 instead of 3.9e-10; with
momentum 0.9, 1.1 s instead of 2.2 s, error 2.6e-10 instead of 7.0e-10). Solves to
``t = inf`` have no output time ahead (:math:`L = \infty`): their steps are controlled at
the floor, since the end point, where the convergence test stops, does not depend on the
path (n = 1024: 1.0 s instead of 2.2 s).

**Layout.** On CPU, with 2-16 outputs per row, the steps work on transposed arrays,
``(traced, rows)`` (:class:`_Space`), as the explicit loop does: the same steps, less
time per step where the products do not dominate it (on the machine of the earlier
runs; log-cosh, same solve, transposed against flat: 17% less time at n = 256 in
float32, mid horizon; 15% in float64, converged horizon; at n = 1024 in float64 the
same time, 1.50 s. With momentum, float64, converged horizon: log-cosh 22% less at n =
256, 9% at n = 1024; cross-entropy 23% less at n = 256, the same at n = 1024).

**Stages in a loop.** For kernels below 256 rows a step's stages run in a
``fori_loop`` over zero-padded stage buffers, which halves a first call's compilation;
larger kernels unroll them, which keeps their solves as fast (:func:`_stages`).

**Test outputs and null modes.** The gradient integrals on null modes
(:math:`S_1`, and :math:`S_2` with momentum; see :mod:`ntkflow._dynamics`)
are extra components of the Rosenbrock system, with their exact Jacobian rows
(the products they need come out of the conjugate-gradient iterations). On
non-null modes they follow from the train state (:mod:`ntkflow._adaptive`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array

from ntkflow._adaptive import EigenbasisSolver
from ntkflow._dynamics import Dynamics, FlatState, TransposedField, rayleigh_curvature, rms
from ntkflow._eigen import Eigen, matmul_t, transposed_layout
from ntkflow._solvers import SOLVERS, single_precision_tenth

__all__ = ["Rodas5P"]


def _rodas5p() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float]:
    """Rodas5P in the transformed form (``a``, ``c``, ``m``, ``e``, ``gamma``).

    Coefficients from G. Steinebach, "Construction of Rosenbrock-Wanner method
    Rodas5P and numerical benchmarks within the Julia Differential Equations
    package", BIT Numer. Math. 63 (2023). Stages 7 and 8 continue from stage 6
    (stiff accuracy): ``y7 = y6 + K6``, ``y8 = y7 + K7``, ``y1 = y8 + K8``.
    """
    a = np.zeros((8, 8))
    c = np.zeros((8, 8))
    a[1, :1] = [3.0]
    a[2, :2] = [2.849394379747939, 0.45842242204463923]
    a[3, :3] = [-6.954028509809101, 2.489845061869568, -10.358996098473584]
    a[4, :4] = [2.8029986275628964, 0.5072464736228206, -0.3988312541770524,
                -0.04721187230404641]
    a[5, :5] = [-7.502846399306121, 2.561846144803919, -11.627539656261098,
                -0.18268767659942256, 0.030198172008377946]
    a[6, :6] = a[5, :6]
    a[6, 5] = 1.0
    a[7, :7] = a[6, :7]
    a[7, 6] = 1.0
    c[1, :1] = [-14.155112264123755]
    c[2, :2] = [-17.97296035885952, -2.859693295451294]
    c[3, :3] = [147.12150275711716, -1.41221402718213, 71.68940251302358]
    c[4, :4] = [165.43517024871676, -0.4592823456491126, 42.90938336958603,
                -5.961986721573306]
    c[5, :5] = [24.854864614690072, -3.0009227002832186, 47.4931110020768,
                5.5814197821558125, -0.6610691825249471]
    c[6, :6] = [30.91273214028599, -3.1208243349937974, 77.79954646070892,
                34.28646028294783, -19.097331116725623, -28.087943162872662]
    c[7, :7] = [37.80277123390563, -3.2571969029072276, 112.26918849496327,
                66.9347231244047, -40.06618937091002, -54.66780262877968,
                -9.48861652309627]
    m = a[7].copy()
    m[7] = 1.0
    e = np.zeros(8)
    e[7] = 1.0
    return a, c, m, e, 0.21193756319429014


_A, _C, _M, _E, _GAMMA = _rodas5p()
_STAGES = len(_M)
_CG_FORCING = 3e-2  # plain gradient descent
_CG_FORCING_MOMENTUM = 1e-2  # the velocity stages feed the positions (see _step_momentum)
_CG_MAX_ITER = 25
_REJECT = 1e6  # error reported for a step whose linear solve did not converge
#: The step error weight ``clip(exp(-_DECAY_RATE rho L), _DECAY_FLOOR, 1)``, ``rho`` the
#: slowest mode's decay rate (see :meth:`Rodas5P._decay_weight`).
_DECAY_FLOOR = 1e-2
_DECAY_RATE = 0.5
#: With momentum the conjugate-gradient tolerance is divided by ``max(weight, this)``: at
#: most ``_CG_FORCING_MOMENTUM / this`` (a third) of the unweighted step tolerance.
_CG_WEIGHT_FLOOR = 3e-2


#: Kernels with fewer rows run the stages in a loop (:func:`_stages`); larger ones unroll it.
_ROLL_BELOW_ROWS = 256

Stage = int | Array  # a stage's index: a Python int when unrolled, traced in the loop
#: A step's stage vectors, ``kinds`` of them per stage: in the loop a buffer ``(stages,
#: kinds, *shape)``, zeros for the stages not yet computed; unrolled a list, per stage
#: computed, of tuples of ``kinds`` arrays.
Stored = Array | list[tuple[Array, ...]]


def _stages(stage: Callable[[Stage, Any], Any], carry: Any, rolled: bool) -> Any:
    """Run ``carry = stage(i, carry)`` for the method's stages, in a loop or unrolled.

    In the loop (``rolled``) one copy of a stage is in the program, its
    conjugate-gradient loop included: a first call compiles in about half the time
    (float64, n = 64, log-cosh, with test outputs: 7.3 s instead of 14.5 s; with
    momentum 6.5 s instead of 15.0 s; cross-entropy, n = 200: 6.5 s instead of 9.6
    s). But each stage then sums over all eight slots of the stage buffers, zero or
    not, and writes into them: at n = 1024 (log-cosh, momentum 0.9, converged
    horizon) the solve took 12-18% more time. Unrolled, a stage sums over the earlier
    stages only, kept as separate arrays (that solve as before the loop existed, within
    the machine's noise). So small kernels, whose compilation outweighs their solve,
    loop; the others unroll.
    """
    if rolled:
        return jax.lax.fori_loop(0, _STAGES, stage, carry)
    for i in range(_STAGES):
        carry = stage(i, carry)
    return carry


def _empty(rolled: bool, kinds: int, like: Array) -> Stored:
    """Storage for a step's stage vectors (see :data:`Stored`)."""
    return jnp.zeros((_STAGES, kinds) + like.shape, like.dtype) if rolled else []


def _put(stored: Stored, i: Stage, new: list[Array]) -> Stored:
    """The storage with stage ``i``'s vectors added."""
    if isinstance(stored, list):
        return [*stored, tuple(new)]
    return stored.at[i].set(jnp.stack(new))


def _combs(weights: Array, stored: Stored) -> Any:
    """Rows of stage coefficients, ``(r, stages)`` in the working precision, applied to
    stored stage vectors: ``out[r][k] = sum_j weights[r, j] stored[j][k]``.

    The rows of the method's tables are zero from the current stage on, so the sums
    are over the earlier stages: in the loop one pass over the whole buffer (its
    zeros included), unrolled over the stages computed.
    """
    if not isinstance(stored, list):
        return jnp.tensordot(weights, stored, axes=1, precision=jax.lax.Precision.HIGHEST)
    kinds = len(stored[0]) if stored else 0
    return [[sum(w[j] * v[k] for j, v in enumerate(stored)) for k in range(kinds)]
            for w in weights]


def _prior(i: Stage, h: Array, dtype: Any) -> Array:
    """Stage ``i``'s rows of the method's tables, ``a_i`` and ``c_i / h``, as ``(2,
    stages)`` weights in the working precision."""
    table = jnp.asarray(np.stack([_A, _C]), dtype)[:, i]
    return table * jnp.stack([jnp.ones((), dtype), 1.0 / h.astype(dtype)])[:, None]


def _prior_sums(i: Stage, h: Array, stored: Stored, dtype: Any) -> Any:
    """``sum_j a_ij K_j`` and ``sum_j c_ij K_j / h`` over the earlier stages, for each kind
    of stored stage vector ``K`` (zeros at stage 0)."""
    if isinstance(stored, list) and not stored:
        # The Python zero adds nothing and keeps the precision (a float64 zero array
        # would promote float32 stages with 64-bit types enabled); 8 kinds at most.
        return [[0.0] * 8] * 2
    return _combs(_prior(i, h, dtype), stored)


def _final(dtype: Any) -> Array:
    """The step's end (``m``) and error estimate (``e``) weights, ``(2, stages)``."""
    return jnp.asarray(np.stack([_M, _E]), dtype)


def _stage_gradient(i: Stage, gz0: Array, at: Callable[[], Array]) -> Array:
    """``V^T G`` at a stage's outputs: the step's start's ``gz0`` at stage 0, else ``at()``."""
    if isinstance(i, int):
        return gz0 if i == 0 else at()
    return jax.lax.cond(i == 0, lambda: gz0, at)


class _Carry(NamedTuple):
    """``z = V^T F``, ``q = V^T Q`` (momentum); ``b``, ``c``: gradient integrals on null
    modes; ``f = F``, ``gz = V^T G(F)`` and ``fq = Q`` (momentum), carried to save
    products."""

    z: Array
    q: Array | None
    b: Array
    c: Array | None
    f: Array
    gz: Array
    fq: Array | None = None


def _column(v: Array, field: TransposedField | None) -> Array:
    """A per-eigenvalue vector, broadcast along the outputs of the flat layout (``field``
    ``None``) or of the transposed one."""
    return v[:, None] if field is None else v[None, :]


class _Space(NamedTuple):
    """The arrays of a solve: outputs ``F`` and eigen-coordinates ``z = V^T F``, in the
    flat layout ``(rows, traced)``, or transposed, ``(traced, rows)``, where ``field``
    is given: where :func:`ntkflow._eigen.transposed_layout` holds (on CPU, 2-16
    outputs per row, at most 2048 rows), as in the explicit loop.

    Transposed, the loss gradients and Hessian-vector products vectorize along the rows
    (:class:`ntkflow._dynamics.TransposedField`), and the products ``x^T V`` and ``x^T
    V^T`` take the form :func:`ntkflow._eigen.matmul_t` finds faster (as such, with no
    transposes to make, for small kernels).
    """

    eig: Eigen
    dyn: Dynamics
    field: TransposedField | None
    # Loop invariants, computed once per solve (:meth:`build`), not in every step (XLA
    # left them in the step, inside its conditional: log-cosh, n = 1024, converged
    # horizon, 1.15-1.22 s -> 1.10-1.12 s, with momentum 1.42 s -> 1.24 s).
    null: Array  # the null-mode mask, as a column
    sq: Array  # sqrt(lambda), 0 on null modes, as a column
    lam_min: Array  # the smallest non-null eigenvalue (inf if every mode is null)

    @classmethod
    def of(cls, dyn: Dynamics, eig: Eigen) -> _Space:
        """Transposed where :func:`ntkflow._eigen.transposed_layout` holds, with or
        without momentum (see the module docstring)."""
        transposed = transposed_layout(dyn.k.shape[0], dyn.loss.layout.traced)
        return cls.build(eig, dyn, dyn.transposed() if transposed else None)

    @classmethod
    def build(cls, eig: Eigen, dyn: Dynamics, field: TransposedField | None) -> _Space:
        """The space of this layout (``field``: transposed, ``None``: flat), with its
        loop invariants."""
        null = _column(eig.null, field)
        sq = jnp.sqrt(jnp.where(null, 0.0, _column(eig.evals, field)))
        return cls(eig, dyn, field, null, sq, eig.smallest_nonnull())

    @property
    def rolled(self) -> bool:
        """Whether a step's stages run in a loop (see :func:`_stages`)."""
        return self.dyn.k.shape[0] < _ROLL_BELOW_ROWS

    def to_eigenbasis(self, fx: Array) -> Array:
        """``V^T x``."""
        if self.field is None:
            return self.eig.to_eigenbasis(fx)
        return matmul_t(fx, self.eig.evecs_t, self.eig.evecs)

    def from_eigenbasis(self, x: Array) -> Array:
        """``V x``."""
        if self.field is None:
            return self.eig.from_eigenbasis(x)
        return matmul_t(x, self.eig.evecs, self.eig.evecs_t)

    def grad(self, f: Array) -> Array:
        """The loss gradient ``G(F)``."""
        return self.dyn.grad_fn(f) if self.field is None else self.field.gradient(f)

    def flat(self, a: Array) -> Array:
        """An array of this space in the flat layout, or the converse (a transpose or
        the identity)."""
        return a if self.field is None else a.T


class _Operator(NamedTuple):
    """``Sq M Sq`` and its pieces, with ``M = V^T H V`` at the start of a step."""

    space: _Space
    sq: Array  # sqrt(lambda), 0 on null modes
    hvp: Callable[[Array], Array]

    def to_eigenbasis(self, fx: Array) -> Array:
        return self.space.to_eigenbasis(fx)

    def from_eigenbasis(self, x: Array) -> Array:
        return self.space.from_eigenbasis(x)

    def image(self, x: Array) -> Array:
        """``V (sqrt(Lambda) x)``: a scaled eigen-vector as flat outputs."""
        return self.from_eigenbasis(self.sq * x)

    def m_of_image(self, fx: Array) -> Array:
        """``M`` applied to the eigen-vector whose flat image is ``fx``: ``V^T H fx``."""
        return self.to_eigenbasis(self.hvp(fx))


class _Solution(NamedTuple):
    """A stage solution ``x`` with its image ``V Sq x`` and ``M Sq x`` (all rows)."""

    x: Array
    img: Array
    mx: Array


def _galerkin(
    op: _Operator, rhs: Array, sigma: Array, beta: Array, previous: Stored, count: Stage
) -> tuple[Array, Array, Array, Array]:
    """The Galerkin approximation in the span of the first ``count`` stage solutions
    of ``previous`` (see :func:`_pcg`): ``x``, its image, ``M Sq x`` and the residual."""
    # The Gram system of the known stages (in the loop, the others get a unit diagonal
    # and a zero right-hand side: coefficient 0). Tikhonov-regularized (100 eps) rather
    # than an eigenvalue cut-off: nearly the same guess, and derivatives (jax.jvp) stay
    # finite when earlier stage solutions are linearly dependent (an eigh's derivative
    # divides by eigenvalue gaps).
    if isinstance(previous, list):
        # Entry by entry (no batched dot products: under jax.vmap those once crashed
        # XLA's CPU compiler).
        xs = [p[0] for p in previous]
        axs = [sigma * p[0] + beta * op.sq * p[2] for p in previous]
        m = len(previous)
        known = jnp.ones(m, bool)
        gram = jnp.stack([jnp.stack([jnp.vdot(xs[i], axs[j]) for j in range(m)])
                          for i in range(m)])
        proj = jnp.stack([jnp.vdot(xi, rhs) for xi in xs])
    else:
        slots = previous.shape[0]
        known = jnp.arange(slots) < count
        flat = previous[:, 0].reshape(slots, -1)
        aflat = sigma * flat + beta * (op.sq * previous[:, 2]).reshape(slots, -1)
        hi = jax.lax.Precision.HIGHEST
        gram = jnp.matmul(flat, aflat.T, precision=hi)
        proj = jnp.where(known, jnp.matmul(flat, rhs.reshape(-1), precision=hi), 0.0)
    gram = jnp.where(known[:, None] & known[None, :], 0.5 * (gram + gram.T), 0.0)
    reg = 100 * jnp.finfo(rhs.dtype).eps * jnp.max(jnp.abs(jnp.diagonal(gram)))
    reg = reg + jnp.finfo(rhs.dtype).tiny
    gram = gram + jnp.diag(jnp.where(known, reg, 1.0))
    coef = jnp.linalg.solve(gram, proj)
    x, img, mx = _combs(coef[None], previous)[0][:3]
    return x, img, mx, rhs - sigma * x - beta * op.sq * mx


def _pcg(
    op: _Operator,
    rhs: Array,
    sigma: Array,
    beta: Array,
    pinv: Array,
    tol: Array,
    previous: Stored,
    count: Stage,
) -> tuple[_Solution, Array]:
    """Solve ``(sigma I + beta Sq M Sq) x = rhs`` on non-null modes (``rhs`` is 0 on null modes).

    The stage systems of a step share their matrix and have similar solutions, so the
    iteration starts from the Galerkin approximation in the span of the previous
    stage solutions: the ``count`` stages of ``previous`` computed so far, whose first
    three kinds of stored vectors are the solutions ``x``, their images and ``M Sq
    x`` (products with the matrix known: no kernel products). Returns the solution
    (with its image and ``M Sq x``, accumulated from the iterations) and whether the
    preconditioned residual, in unscaled units, reached ``tol``.
    """
    if isinstance(previous, list) and not previous:
        x, img, mx, r = jnp.zeros_like(rhs), jnp.zeros_like(rhs), jnp.zeros_like(rhs), rhs
    else:
        x, img, mx, r = _galerkin(op, rhs, sigma, beta, previous, count)
    pr = pinv * r
    rz = jnp.vdot(r, pr)
    # Round-off floor: the residual cannot drop much below eps times the right-hand side.
    tol = jnp.maximum(tol, 100 * jnp.finfo(rhs.dtype).eps * rms(op.sq * pinv * rhs))

    def small(pr: Array) -> Array:
        return rms(op.sq * pr) <= tol

    def cond(c: tuple) -> Array:
        *_, pr, _, i = c
        return ~small(pr) & (i < _CG_MAX_ITER)

    def body(c: tuple) -> tuple:
        x, img, mx, r, p, pr, rz, i = c
        fp = op.image(p)
        mp = op.m_of_image(fp)
        ap = sigma * p + beta * op.sq * mp
        pap = jnp.vdot(p, ap)
        alpha = jnp.where(pap > 0, rz / jnp.where(pap > 0, pap, 1.0), 0.0)
        x, img, mx, r = x + alpha * p, img + alpha * fp, mx + alpha * mp, r - alpha * ap
        pr = pinv * r
        rz_new = jnp.vdot(r, pr)
        p = pr + jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1.0), 0.0) * p
        return x, img, mx, r, p, pr, rz_new, i + 1

    init = (x, img, mx, r, pr, pr, rz, jnp.zeros((), jnp.int32))
    x, img, mx, _, _, pr, _, _ = jax.lax.while_loop(cond, body, init)
    return _Solution(x, img, mx), small(pr)


class Rodas5P(EigenbasisSolver):
    """Rodas5P with eigenbasis-preconditioned conjugate gradients (stiff, any loss curvature)."""

    name: ClassVar[str] = "rodas5p"
    error_exponent: ClassVar[float] = 5.0  # embedded order 4: error ~ h^5

    def _space(self, dyn: Dynamics, eig: Eigen) -> _Space:
        return _Space.of(dyn, eig)

    def step_tolerances(self, rtol: float, atol: float, dtype: Any) -> tuple[float, float]:
        r"""The tolerances finite-time steps are controlled to: the user's in double
        precision; in single precision both scaled by :math:`\max(1/10, \min(1, \epsilon
        / \text{rtol}))`, a tenth but not below ``eps``, as Dopri5's
        (:meth:`ntkflow._explicit.Dopri5.step_tolerances`).

        The predecessor's default tolerance (1.4e-8) lies below float32's epsilon, and
        float32's default here (1e-6, 8 eps) left the step errors above its errors.
        Measured (n = 256, log-cosh, mid horizon, max errors of train / test outputs
        against a float64 solve from the unrounded inputs): 2.3e-6 / 2.0e-6 -> 1.8e-6 /
        1.9e-6 (the predecessor 2.2e-6 / 2.0e-6), with 1024 test points 2.3e-6 / 3.3e-6 ->
        1.8e-6 / 2.96e-6 (2.1e-6 / 2.96e-6); the solver's own train error, against a
        tight solve from the float32 inputs, 2.7e-6 -> 1.1e-6; 31 steps instead of 21.
        Solves to ``t = inf`` keep the user's tolerances (the convergence test sets the
        limit's accuracy).
        """
        return single_precision_tenth(rtol, atol, dtype)

    def _flat(self, space: _Space, x: _Carry) -> _Carry:
        return jax.tree.map(space.flat, x)

    def _start(self, dyn: Dynamics, space: _Space, y0: FlatState) -> _Carry:
        f = space.flat(y0.f)
        z = space.to_eigenbasis(f)
        q = None if y0.q is None else space.to_eigenbasis(space.flat(y0.q))
        zeros = jnp.zeros_like(z)
        gz = space.to_eigenbasis(space.grad(f))
        fq = None if y0.q is None else space.flat(y0.q)
        return _Carry(z, q, zeros, None if q is None else zeros, f, gz, fq)

    @staticmethod
    def _outputs(space: _Space, x: _Carry) -> FlatState:
        q = None if x.fq is None else space.flat(x.fq)
        return FlatState(space.flat(x.f), q, None, None)

    def _step(
        self, dyn: Dynamics, space: _Space, x: _Carry, h: Array, rtol: float, atol: float,
        left: Array,
    ) -> tuple[_Carry, Array]:
        if x.q is None:
            return self._step_gd(space, x, h, rtol, atol, left)
        return self._step_momentum(space, x, h, rtol, atol, left)

    @staticmethod
    def _decay_weight(
        lam_min: Array, curv: Array, left: Array, damping: Array | None = None
    ) -> Array:
        r"""The weight of a step's error: :math:`w = \min(1, \max(10^{-2}, e^{-\rho L / 2}))`,
        with :math:`L` the time from the step's end to the next output time (:math:`\infty`
        in solves to ``t = inf``) and :math:`\rho` the decay rate of the slowest mode.

        An error made now reaches the output damped as the dynamics contract. Linearized
        with the step's mean loss curvature :math:`c` (the preconditioner's), a mode of
        eigenvalue :math:`\lambda` decays at the rate :math:`c \lambda` without momentum;
        with damping :math:`d` (:math:`\ddot z = d \dot z - c \lambda z`) at
        :math:`(|d| - \sqrt{d^2 - 4 c \lambda}) / 2 = 2 c \lambda / (|d| + \sqrt{d^2 - 4
        c \lambda})` when overdamped and :math:`|d| / 2` when not, so every non-null mode
        decays at least at :math:`\rho`, that rate at :math:`\lambda_\min`, the smallest
        non-null eigenvalue. Half that rate allows for curvature below the mean (and for
        the coupling of modes through a curvature that varies); the floor keeps the
        step's error within 100 times the tolerance; the cap at 1 leaves the control as
        it was where the loss is not convex along the step (:math:`c \le 0`). Near the
        output time, and for horizons short against :math:`1 / \rho`, :math:`w \approx
        1`: the steps are controlled as without the weight.

        In solves to ``t = inf`` (:math:`L = \infty`, :math:`w = 10^{-2}` where
        :math:`\rho > 0`) the step errors do not reach the result at all: the end point
        is the attracting fixed point, reached when the convergence test on the state
        passes, whatever the path; the loosened steps only shorten the way there.

        Measured (log-cosh, float64, n = 1024): at the converged horizon (:math:`S =
        10^5`) 37 steps instead of 94 (0.74 s instead of 1.58 s), error 6.5e-10 against
        3.9e-10 (the predecessor's 1.6e-7); at the mid horizon 40 steps either way; with
        momentum 0.9 at the converged horizon 1.11 s instead of 2.16 s, error 2.6e-10
        against 7.0e-10; to ``t = inf`` 1.03 s instead of 2.18 s, the limit within 2.7e-8
        of a tight solve's (1.4e-9 unweighted; the convergence test's tolerance, rms,
        1.8e-8 at n = 256, where the error is 2.7e-9 rms). On the
        small problems of ``benchmarks/rosenbrock_tolerances.py`` the errors at finite
        horizons stay as often above the predecessor's as without the weight (0 of 12
        with one-hot targets, 6 of 12 with Gaussian ones, against 1 and 6).
        """
        lam_min = jnp.where(jnp.isfinite(lam_min), lam_min, 0.0)  # inf: every mode null
        rate = jnp.maximum(curv * lam_min, 0.0)
        if damping is not None:
            ad = jnp.abs(damping)
            root = jnp.sqrt(jnp.maximum(ad * ad - 4.0 * rate, 0.0))
            den = ad + root
            rate = jnp.minimum(ad / 2, 2.0 * rate / jnp.where(den > 0, den, 1.0))
        # rate * L, with 0 * inf taken as 0 (no decay: weight 1).
        exponent = jnp.where(rate > 0, rate * jnp.maximum(left, 0.0), 0.0)
        decay = jnp.exp(-_DECAY_RATE * exponent)
        return jax.lax.stop_gradient(jnp.clip(decay, _DECAY_FLOOR, 1.0))

    @staticmethod
    def _setup(space: _Space, x: _Carry) -> tuple[_Operator, Array, Array]:
        """The operator at ``x``, the preconditioner's curvature, and the null mask.

        The curvature is the Hessian's Rayleigh quotient along a fixed random sign
        vector: about its mean diagonal, ``tr(H) / dim``, the best single number for all
        eigen-directions at once. (Along the gradient it is biased towards the outputs
        with the largest gradients, whose curvature is often the smallest, e.g. log-cosh
        far from the targets: measured at n = 1024, log-cosh, converged horizon, 1,968
        conjugate-gradient iterations with it against 1,357 with the random direction and
        1,325 with the exact diagonal of ``V^T H V``.)
        """
        null, sq = space.null, space.sq
        _, hvp = jax.linearize(space.grad, x.f)
        flat_shape = x.f.shape if space.field is None else x.f.shape[::-1]
        # A constant of the program, drawn by NumPy at trace time (no per-step work, and
        # no program of its own to compile, as jax.random's had: 1.2 s per shape).
        signs = np.random.default_rng(0).integers(0, 2, flat_shape) * 2.0 - 1.0
        probe = space.flat(jnp.asarray(signs, x.f.dtype))
        return _Operator(space, sq, hvp), rayleigh_curvature(probe, hvp(probe)), null

    def _step_gd(
        self, space: _Space, x: _Carry, h: Array, rtol: float, atol: float, left: Array
    ) -> tuple[_Carry, Array]:
        op, curv, null = self._setup(space, x)
        dyn = space.dyn
        hg = h * _GAMMA
        one = jnp.ones((), x.z.dtype)
        pinv = jnp.broadcast_to(1.0 / (1.0 + hg * curv * op.sq**2), x.z.shape)
        weight = self._decay_weight(space.lam_min, curv, left)
        tol = _CG_FORCING * (atol + rtol * rms(x.z))
        dtype = x.z.dtype
        assert x.f.shape == x.z.shape

        def stage(i: Stage, carry: tuple[Stored, Array]) -> tuple[Stored, Array]:
            # The buffer's kinds: the stage solutions x, their images V Sq x and M Sq x,
            # and (with test outputs) the null-mode gradient integrals' stages.
            buf, ok = carry
            prior_a, prior_c = _prior_sums(i, h, buf, dtype)
            gz = _stage_gradient(
                i, x.gz, lambda: op.to_eigenbasis(space.grad(x.f + prior_a[1])))
            rhs = hg * (-op.sq * gz + prior_c[0])
            sol, conv = _pcg(op, rhs, one, hg, pinv, tol, buf, i)
            new = [sol.x, sol.img, sol.mx]
            if dyn.with_test:
                # b' = V_null^T G: exact Jacobian row [M Sq]_null.
                new.append(jnp.where(null, hg * (gz + prior_c[3] + sol.mx), 0.0))
            return _put(buf, i, new), ok & conv

        # The stage vectors go into one buffer, zeros until computed: the sums over
        # earlier stages are one pass over it, in a loop over the stages or unrolled.
        kinds = 4 if dyn.with_test else 3
        buf = _empty(space.rolled, kinds, x.z)
        buf, ok = _stages(stage, (buf, jnp.ones((), bool)), space.rolled)
        end, est = _combs(_final(dtype), buf)
        z = x.z + op.sq * end[0]
        f = x.f + end[1]
        b = x.b + end[3] if dyn.with_test else x.b
        new = _Carry(z, None, b, None, f, op.to_eigenbasis(space.grad(f)))
        scale = atol + rtol * jnp.maximum(rms(x.z), rms(z))
        err = rms(op.sq * est[0]) / scale * weight
        return new, jnp.where(ok | ~jnp.isfinite(err), err, jnp.maximum(err, _REJECT))

    def _step_momentum(
        self, space: _Space, x: _Carry, h: Array, rtol: float, atol: float, left: Array
    ) -> tuple[_Carry, Array]:
        """One step with momentum.

        Every vector of a stage is a combination of the step's start (``q``) and of the
        earlier stages' solutions, so its image ``V Sc p`` and its product ``M Sc p``
        follow from theirs (the conjugate-gradient iterations accumulate them for the
        solutions): outside those iterations a stage costs one product with the
        eigenvectors (``V^T G`` at the stage's outputs) and a step four more (``M q``;
        ``V z``, ``V q`` and ``V^T G`` at its end), 11 in all, where multiplying each
        stage's own vectors cost 32 (log-cosh, n = 1024, converged horizon: the same 121
        steps and outputs, 29% less time). The step's end is multiplied afresh rather
        than assembled: assembled over many steps, the outputs drifted from ``V z``
        where steps are long (relative error 7e-5 at ``t = 1e12``, 1e-13 multiplied).
        """
        dyn = space.dyn
        assert dyn.damping is not None and x.q is not None and x.c is not None
        assert x.fq is not None
        op, curv, null = self._setup(space, x)
        d = jnp.asarray(dyn.damping, x.z.dtype)
        hg = h * _GAMMA
        sigma, beta = 1.0 - hg * d, hg * hg
        pinv = jnp.broadcast_to(1.0 / (sigma + beta * curv * op.sq**2), x.z.shape)
        # Scaled coordinates: s = z / sc, t = q / sc with sc = sqrt(lambda) (1 on null modes).
        sc = jnp.where(null, 1.0, op.sq)
        inv_sc = 1.0 / sc
        size = jnp.stack([x.z, x.q])
        # The position stage is h*gamma times the velocity stage (Ks = hg (ra + Kt)): solve
        # for the velocity that much more accurately.
        weight = self._decay_weight(space.lam_min, curv, left, d)
        # ... and, as the step error, less accurately where the decay weighs it down.
        tol = (_CG_FORCING_MOMENTUM * (atol + rtol * rms(size)) / jnp.maximum(1.0, hg)
               / jnp.maximum(weight, _CG_WEIGHT_FLOOR))

        def full_m(p: Array) -> tuple[Array, Array]:
            """``V Sc p`` and ``M Sc p`` for a scaled vector with null-mode entries."""
            img = op.from_eigenbasis(sc * p)
            return img, op.m_of_image(img)

        xq, xfq = x.q, x.fq
        mq = op.m_of_image(xfq)  # M Sc (q / sc)
        dtype = x.z.dtype
        assert x.f.shape == x.z.shape
        # The stage buffer's kinds (scaled): the velocity and position stages Kt and Ks,
        # their images V Sc K and products M Sc K; with test outputs the null-mode
        # gradient integrals' stages.
        kt_, ks_, img_kt_, img_ks_, m_kt_, m_ks_, kb_, kc_ = range(8)

        def stage(
            i: Stage, carry: tuple[Stored, Stored, Array]
        ) -> tuple[Stored, Stored, Array]:
            buf, sols, ok = carry
            prior_a, prior_c = _prior_sums(i, h, buf, dtype)
            q = xq + sc * prior_a[kt_]
            gz = _stage_gradient(
                i, x.gz, lambda: op.to_eigenbasis(space.grad(x.f + prior_a[img_ks_])))
            t = q * inv_sc
            ra = t + prior_c[ks_]
            rb = -op.sq * gz + d * t + prior_c[kt_]
            # ra = q / sc + sum_j (a_ij Kt_j + c_ij / h Ks_j): its image and M-product
            # from those of q and the earlier stages.
            img_ra = xfq + prior_a[img_kt_] + prior_c[img_ks_]
            m_ra = mq + prior_a[m_kt_] + prior_c[m_ks_]
            # (sigma I + beta Sq M Sc) Kt = hg rb - beta Sq M Sc ra; then Ks = hg (ra + Kt).
            rhs = hg * rb - beta * op.sq * m_ra
            kt_null = jnp.where(null, rhs / sigma, 0.0)
            img_null, m_null = jax.lax.cond(
                jnp.any(kt_null != 0), full_m,
                lambda p: (jnp.zeros_like(x.f), jnp.zeros_like(p)), kt_null
            )
            rhs = jnp.where(null, 0.0, rhs - beta * op.sq * m_null)
            sol, conv = _pcg(op, rhs, sigma, beta, pinv, tol, sols, i)
            kt = sol.x + kt_null
            img_kt = sol.img + img_null
            m_kt = sol.mx + m_null
            m_ks = hg * (m_ra + m_kt)
            new = [kt, hg * (ra + kt), img_kt, hg * (img_ra + img_kt), m_kt, m_ks]
            if dyn.with_test:
                # b' = V_null^T G + d b, c' = b: exact Jacobian rows.
                bi = x.b + prior_a[kb_]
                rbq = gz + d * bi + prior_c[kb_]
                rcq = bi + prior_c[kc_]
                kb = jnp.where(null, hg * (rbq + m_ks) / sigma, 0.0)
                new += [kb, jnp.where(null, hg * (rcq + kb), 0.0)]
            sols = _put(sols, i, [sol.x, sol.img, sol.mx])
            return _put(buf, i, new), sols, ok & conv

        # One buffer for the stage vectors (see _step_gd); the conjugate-gradient
        # solutions, without their null-mode parts, in a buffer of their own.
        kinds = 8 if dyn.with_test else 6
        buf = _empty(space.rolled, kinds, x.z)
        sols = _empty(space.rolled, 3, x.z)
        buf, _, ok = _stages(stage, (buf, sols, jnp.ones((), bool)), space.rolled)
        end, est = _combs(_final(dtype), buf)
        z = x.z + sc * end[ks_]
        q = x.q + sc * end[kt_]
        f = op.from_eigenbasis(z)
        fq = op.from_eigenbasis(q)
        if dyn.with_test:
            b = x.b + end[kb_]
            c = x.c + end[kc_]
        else:
            b, c = x.b, x.c
        new = _Carry(z, q, b, c, f, op.to_eigenbasis(space.grad(f)), fq)
        scale = atol + rtol * jnp.maximum(rms(size), rms(jnp.stack([z, q])))
        err = rms(jnp.stack([sc * est[ks_], sc * est[kt_]])) / scale
        err = err * weight
        return new, jnp.where(ok | ~jnp.isfinite(err), err, jnp.maximum(err, _REJECT))


SOLVERS["rodas5p"] = Rodas5P
