"""Solver strategies for the flat function-space ODE.

A solver is a small final class with one contract (:class:`AbstractSolver`):

* ``integrate(dynamics, y0, taus, ...)``: the states at the sorted, finite
  times ``taus`` (starting at ``tau = 0``);
* ``converge(dynamics, y0, tau0, ...)``: the end point of training, reached
  from ``y0`` at ``tau0`` by integrating until the convergence criterion of
  :func:`converged` holds.

``SOLVERS`` maps the names accepted by ``gradient_descent(..., solver=...)`` to
classes. ``"auto"`` is resolved by :func:`ntkflow._auto.choose_solver`.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ntkflow._compensated import compensate
from ntkflow._dynamics import Dynamics, FlatState, rms
from ntkflow._eigen import Eigen

__all__ = [
    "AbstractSolver",
    "DiffraxSolver",
    "EndMemo",
    "EndTest",
    "Kvaerno5",
    "SolveInfo",
    "SOLVERS",
    "STALL_STEPS",
    "converged",
    "end_of_training_test",
    "explicit_end_tolerances",
    "projected_gradient",
    "scaled_tolerances",
    "single_precision_tenth",
]


def scaled_tolerances(rtol: float, atol: float, dtype: Any, fraction: float,
                      roundoff_eps: float) -> tuple[float, float]:
    """Both tolerances scaled by ``max(fraction, min(1, roundoff_eps * eps / rtol))``: a
    fraction of them, but not below ``roundoff_eps`` float epsilons."""
    floor = roundoff_eps * float(jnp.finfo(dtype).eps)
    scale = max(fraction, min(1.0, floor / rtol))
    return rtol * scale, atol * scale


def single_precision_tenth(rtol: float, atol: float, dtype: Any) -> tuple[float, float]:
    """The user's tolerances in double precision; in single precision a tenth of them, but
    not below ``eps`` (the step tolerances of Dopri5 and the Rosenbrock method)."""
    if not compensate(dtype):
        return rtol, atol
    return scaled_tolerances(rtol, atol, dtype, 0.1, 1.0)


class SolveInfo(NamedTuple):
    """What a solve reports besides its values.

    Attributes:
      ok: whether it succeeded.
      tau: the (scaled) time reached.
      num_steps: accepted plus rejected steps.
      num_rhs: right-hand-side (vector field) evaluations, where known.
      message: code: 0 success, 1 max steps reached, 2 non-finite values, 3 degree
        limit (Chebyshev expansion).
    """

    ok: Array
    tau: Array
    num_steps: Array
    num_rhs: Array
    code: Int[Array, ""]


FAILURE_MESSAGES = {
    1: "the solver reached `max_steps` before the last requested time. Increase "
    "`max_steps`, loosen `rtol`/`atol`, or use a stiff solver (solver='auto', 'expo' for "
    "MSE, 'rodas5p' for any loss). A loss with kinks (hinge, ReLU, absolute value) makes "
    "the steps shrink without end where the outputs reach a kink: use a smooth version "
    "(softplus, Huber).",
    2: "the solution became non-finite (NaN/inf). The kernel may not be positive "
    "semi-definite, the loss may overflow, or, for t = inf, the loss may have no minimum "
    "(e.g. linear in the outputs), so that the outputs grow without bound; check "
    "`k_train_train`, the loss and the initial outputs.",
    3: "the Chebyshev expansion would need a degree above its limit (the horizon is too "
    "stiff for it); use solver='expo' or 'tsit5'.",
}


def projected_gradient(
    dynamics: Dynamics, eigen: Eigen, f: Array
) -> tuple[Array, Array]:
    """``(Pi G, c)``: the loss gradient on non-null modes and the curvature along it.

    Without null modes the projector is the identity, and the two kernel-sized
    products it costs are skipped (it is evaluated after every step of a solve
    to ``t = inf``).
    """
    keep = (~eigen.null)[:, None]
    g = dynamics.grad_fn(f)

    def project(g: Array) -> Array:
        return eigen.from_eigenbasis(jnp.where(keep, eigen.to_eigenbasis(g), 0.0))

    pg = jax.lax.cond(jnp.any(eigen.null), project, lambda g: g, g)
    _, hpg = jax.jvp(dynamics.grad_fn, (f,), (pg,))
    tiny = jnp.finfo(f.dtype).tiny
    curvature = jnp.maximum(jnp.vdot(pg, hpg), tiny) / jnp.maximum(jnp.vdot(pg, pg), tiny)
    return pg, curvature


def explicit_end_tolerances(dynamics: Dynamics, rtol: float, atol: float) -> tuple[float, float]:
    """The step tolerances of an explicit method's end-of-training solve.

    With momentum the outputs oscillate about the limit (``-d`` damps them slowly), and an
    explicit method's steps grow until the oscillation sits at the edge of its stability
    region, where it no longer decays: the state stalls at 4-30 times the step tolerance
    from the limit (measured, Tsit5, MSE, momentum 0.9), above the convergence test's
    tolerance, and the solve ran into ``max_steps``. With momentum the steps are therefore
    taken at a 20th of the tolerances (stall 0.3-0.7 times the test's tolerance); without
    it the outputs decay monotonically and the tolerances are the test's.
    """
    if dynamics.damping is None:
        return rtol, atol
    return rtol / 20, atol / 20


#: Accepted steps without the estimated change still to come halving after which a solve
#: to ``t = inf`` whose estimate is below the loose round-off floor has stalled
#: (:func:`converged`).
STALL_STEPS = 10


class EndMemo(NamedTuple):
    """What :func:`converged` remembers between the accepted steps of one solve."""

    best: Array  # the estimated change still to come, when it last halved
    since: Array  # accepted steps since then

    @staticmethod
    def fresh(dtype: Any) -> EndMemo:
        """No step seen yet."""
        return EndMemo(jnp.asarray(jnp.inf, dtype), jnp.zeros((), jnp.int32))

    @staticmethod
    def stalled(dtype: Any) -> EndMemo:
        """For a solver that cannot carry the memo from step to step: always "stalled",
        so that the test is the loose floor alone."""
        return EndMemo(jnp.asarray(-jnp.inf, dtype), jnp.asarray(STALL_STEPS, jnp.int32))


def converged(
    dynamics: Dynamics,
    eigen: Eigen,
    y: FlatState,
    loss0: Array,
    curvature0: Array,
    rtol: float,
    atol: float,
    memo: EndMemo,
) -> tuple[Array, EndMemo]:
    r"""The end-of-training criterion used for ``t = inf``, after an accepted step.

    With :math:`G = \nabla_F L`, :math:`\Pi` the projector onto the non-null
    eigenvectors of ``K`` (training cannot move the outputs along null modes)
    and :math:`c = \langle \Pi G, H \Pi G\rangle / \|\Pi G\|^2` the loss
    curvature along it (one Hessian-vector product), the change still to come
    is estimated, Newton-like, as :math:`\Delta = \|\Pi G\| / c` (exact for the
    MSE loss), plus :math:`\|Q\| / |d|` with momentum (the distance the
    velocity would coast). Training has converged when either

    * the outputs have converged: :math:`\Delta \le \max(\text{atol} +
      \text{rtol}\, \|F\|, \text{floor})`, or
    * the minimizer is at infinity and the loss has converged: the curvature
      has collapsed, :math:`c \le \sqrt{\text{rtol}}\, c_0` (as for
      cross-entropy on one-hot targets, whose outputs grow without bound but
      ever more slowly), and the loss decrease still to come,
      :math:`\tfrac12 \|\Pi G\|^2 / c`, is at most :math:`\text{rtol}\,
      |L(0)|`. The outputs returned then are finite, with a loss that small;
      only the loss and probabilities are meaningful, not their scale.

    The floor accounts for round-off, which keeps :math:`\Delta` from falling
    below some level however long the solve runs. Where that level lies depends on
    the method and the kernel: the methods that step in the kernel's eigenbasis
    (exponential, Rosenbrock) reach about :math:`\epsilon \sqrt{\kappa} \|F\|`
    (:math:`\kappa = \text{cond}(K)` over its non-null modes), an explicit method whose
    steps are capped by stability accumulates rounding in the slow modes up to about
    :math:`\epsilon \kappa \|F\|`, and on a float32 kernel whose modes are mostly null
    the estimate stalled above the tight level too (cross-entropy, n = 256, cond 1e8, an
    explicit method: out of steps at the tight floor alone). So the floor is the tight
    :math:`10 \epsilon \sqrt{\kappa} \|F\|` until the solve has stalled, and the
    loose :math:`10 \epsilon \kappa \|F\|` after: :math:`\Delta` has not halved in
    ``STALL_STEPS`` accepted steps (``memo``). A solve never stops later than at the
    loose floor plus ``STALL_STEPS`` steps unless it keeps converging, which it may do
    for at most ``STALL_STEPS`` times :math:`\log_2 \sqrt{\kappa}` further steps.

    Measured (float32, the benchmark's problem: n = 256, 256 test points, cond 1e4):
    the limit of MSE (exponential integrator) 7.1e-4 -> 1.7e-5 off the closed form in
    float64, of log-cosh (Rosenbrock) 7.9e-3 -> 1.7e-5, as at the converged horizon.

    Norms are root-mean-square. Outputs whose norm overflows have not converged:
    they diverge (a loss without a minimum, e.g. linear in the outputs), and the
    solve goes on until they are no longer finite, which it reports as an error.
    Returns whether training has converged, and the memo for the next step.
    """
    pg, curvature = projected_gradient(dynamics, eigen, y.f)
    remaining = rms(pg) / curvature
    tiny = jnp.finfo(y.f.dtype).tiny
    if dynamics.damping is not None and y.q is not None:
        coast = rms(y.q) / jnp.maximum(jnp.abs(dynamics.damping), tiny)
    else:
        coast = jnp.zeros((), y.f.dtype)
    change = remaining + coast
    halved = change <= 0.5 * memo.best
    memo = EndMemo(jnp.where(halved, change, memo.best),
                   jnp.where(halved, 0, memo.since + 1).astype(jnp.int32))
    stalled = memo.since >= STALL_STEPS
    eps = jnp.finfo(y.f.dtype).eps
    cond = jnp.minimum(eigen.condition_number(), 1 / eps)
    floor = 10 * eps * jnp.where(stalled, cond, jnp.sqrt(cond)) * rms(y.f)
    tol = jnp.maximum(atol + rtol * rms(y.f), floor)
    outputs_done = change <= tol
    saturated = curvature <= rtol**0.5 * curvature0
    loss_done = saturated & (0.5 * jnp.vdot(pg, pg) / curvature <= rtol * jnp.abs(loss0))
    done = (outputs_done | (loss_done & (coast <= tol))) & jnp.isfinite(tol)
    return done, memo


class EndTest(NamedTuple):
    """The end-of-training test of one solve to ``t = inf`` (:func:`end_of_training_test`):
    ``step(y, memo) -> (done, memo)`` after each accepted step, from ``memo0``."""

    step: Callable[[FlatState, EndMemo], tuple[Array, EndMemo]]
    memo0: EndMemo


def end_of_training_test(
    dynamics: Dynamics,
    eigen: Eigen,
    y0: FlatState,
    rtol: float,
    atol: float,
    active: Array | None = None,
) -> EndTest:
    """The test :func:`converged` for a solve to ``t = inf`` that starts at ``y0`` (its
    loss and curvature are the references); always true where ``active`` is false (the
    solve then stops at once; see :func:`ntkflow._ode.solve_at`)."""
    loss0 = dynamics.loss_fn(y0.f)
    _, curvature0 = projected_gradient(dynamics, eigen, y0.f)
    off = jnp.zeros((), bool) if active is None else ~active

    def step(y: FlatState, memo: EndMemo) -> tuple[Array, EndMemo]:
        done, memo = converged(dynamics, eigen, y, loss0, curvature0, rtol, atol, memo)
        return done | off, memo

    return EndTest(step, EndMemo.fresh(y0.f.dtype))


class AbstractSolver(eqx.Module):
    """A strategy to integrate :class:`ntkflow._dynamics.Dynamics`.

    Subclasses are final and declare ``name``, whether they are ``stiff``
    (able to take steps far beyond the fastest time scale of the kernel) and
    whether they work in the kernel's ``eigenbasis`` (then the predictor computes
    ``Dynamics.eigen`` once, before solving).
    """

    name: ClassVar[str]
    stiff: ClassVar[bool]
    eigenbasis: ClassVar[bool] = False
    #: XLA options for the compiled solve on a CPU, as ``((flag, value), ...)``, applied
    #: where this jaxlib knows them (see :func:`ntkflow._ode.solve_at`).
    cpu_compiler_options: ClassVar[tuple[tuple[str, str], ...]] = ()

    def for_concrete_inputs(self) -> AbstractSolver:
        """The solver to use when the inputs are concrete arrays (not traced by a JAX
        transformation): ``self``, or a faster variant that need not be differentiable."""
        return self

    @abc.abstractmethod
    def integrate(
        self,
        dynamics: Dynamics,
        y0: FlatState,
        taus: Float[Array, " m"],
        *,
        rtol: float,
        atol: float,
        max_steps: int,
    ) -> tuple[FlatState, SolveInfo]:
        """States at the sorted finite times ``taus`` (leading axis ``m``)."""

    @abc.abstractmethod
    def converge(
        self,
        dynamics: Dynamics,
        y0: FlatState,
        tau0: Float[Array, ""],
        eigen: Eigen,
        *,
        rtol: float,
        atol: float,
        max_steps: int,
        active: Array | None = None,
    ) -> tuple[FlatState, SolveInfo]:
        """The converged state (see :func:`converged`), starting at ``tau0``.

        ``eigen`` is the eigendecomposition of ``dynamics.k``, used by the
        convergence criterion. ``active``: a boolean scalar; where false, the solve
        stops at once (its result is then unused; see :func:`ntkflow._ode.solve_at`).
        """


def _info_from_diffrax(sol: dfx.Solution, tau: Array, ok_results: tuple) -> SolveInfo:
    ok = jnp.zeros((), bool)
    for r in ok_results:
        ok = ok | (sol.result == r)
    code = jnp.where(
        ok, 0, jnp.where(sol.result == dfx.RESULTS.max_steps_reached, 1, 2)
    ).astype(jnp.int32)
    steps = sol.stats["num_steps"]
    nrhs = sol.stats.get("num_rhs", jnp.asarray(-1))
    return SolveInfo(ok, tau, steps, jnp.asarray(nrhs), code)


class DiffraxSolver(AbstractSolver):
    """Base for solvers that delegate to a :mod:`diffrax` solver with PID control."""

    stiff: ClassVar[bool] = False
    #: Whether steps land on every output time (for a method whose dense output is of
    #: lower order than its steps); otherwise outputs are interpolated.
    steps_to_outputs: ClassVar[bool] = False

    @abc.abstractmethod
    def diffrax_solver(self, rtol: float, atol: float, dtype: Any) -> dfx.AbstractSolver:
        """The diffrax solver instance for a solve at these tolerances and float type."""

    def _solve(
        self,
        dynamics: Dynamics,
        y0: FlatState,
        t0: Array,
        t1: Array,
        saveat: dfx.SaveAt,
        rtol: float,
        atol: float,
        max_steps: int,
        event: dfx.Event | None = None,
        step_ts: Array | None = None,
    ) -> dfx.Solution:
        controller: dfx.AbstractStepSizeController = dfx.PIDController(rtol=rtol, atol=atol)
        if step_ts is not None:
            controller = dfx.ClipStepSizeController(controller, step_ts=step_ts)
        return dfx.diffeqsolve(
            dfx.ODETerm(dynamics.vector_field),  # type: ignore[arg-type]
            self.diffrax_solver(rtol, atol, y0.f.dtype),
            t0,
            t1,
            None,
            y0,
            saveat=saveat,
            stepsize_controller=controller,
            max_steps=max_steps,
            event=event,
            throw=False,
        )

    def integrate(self, dynamics, y0, taus, *, rtol, atol, max_steps):
        t0 = jnp.zeros((), taus.dtype)
        t1 = jnp.maximum(taus[-1], t0)
        step_ts = taus if self.steps_to_outputs else None
        sol = self._solve(dynamics, y0, t0, t1, dfx.SaveAt(ts=taus), rtol, atol, max_steps,
                          step_ts=step_ts)
        ys = sol.ys
        assert isinstance(ys, FlatState)
        finite = jnp.all(jnp.array([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(ys)]))
        info = _info_from_diffrax(sol, t1, (dfx.RESULTS.successful,))
        info = info._replace(code=jnp.where(finite | ~info.ok, info.code, 2).astype(jnp.int32))
        return ys, info._replace(ok=info.ok & finite)

    def converge(self, dynamics, y0, tau0, eigen, *, rtol, atol, max_steps, active=None):
        # diffrax's event sees one state at a time: the loose floor alone (EndMemo.stalled).
        test = end_of_training_test(dynamics, eigen, y0, rtol, atol, active)
        stalled = EndMemo.stalled(y0.f.dtype)

        def cond_fn(t, y, args, **kwargs):
            del args, kwargs
            return test.step(y, stalled)[0]

        step_rtol, step_atol = explicit_end_tolerances(dynamics, rtol, atol)
        sol = self._solve(
            dynamics,
            y0,
            tau0,
            jnp.asarray(jnp.inf, tau0.dtype),
            dfx.SaveAt(t1=True),
            step_rtol,
            step_atol,
            max_steps,
            event=dfx.Event(cond_fn),
        )
        assert sol.ys is not None and sol.ts is not None
        y = jax.tree.map(lambda x: x[-1], sol.ys)
        info = _info_from_diffrax(sol, sol.ts[-1], (dfx.RESULTS.event_occurred,))
        return y, info


class Kvaerno5(DiffraxSolver):
    """diffrax's implicit ESDIRK 5(4) method with a dense Jacobian (small problems only)."""

    name: ClassVar[str] = "kvaerno5"
    stiff: ClassVar[bool] = True
    # diffrax interpolates its steps with a cubic Hermite polynomial: MSE, t = [0, 2, 50],
    # relative error 1.5e-6 at t = 2 (6.7e-10 when t = 2 ends a solve) at rtol 1.4e-8.
    steps_to_outputs: ClassVar[bool] = True

    def diffrax_solver(self, rtol: float, atol: float, dtype: Any) -> dfx.AbstractSolver:
        """Kvaerno5 whose Newton (chord) iterations can converge in this precision.

        diffrax's chord iteration stops when its update, scaled by the tolerances, is below
        ``kappa = 1e-2``: with float32's default ``rtol = atol = 1e-6`` that asks for
        updates of 1e-8, under float32's round-off, so stages never converged, every step
        was rejected and the solve ran into ``max_steps`` (e.g. log-cosh, one training
        and one test point, t = 1). The chord tolerances are therefore at least ``1000 eps``
        (1.2e-4 in float32, so updates of 1.2e-6; unchanged in float64); the step's own
        error estimate still controls the solution's accuracy.
        """
        floor = 1e3 * float(np.finfo(dtype).eps)
        root = dfx.VeryChord(rtol=max(rtol, floor), atol=max(atol, floor))
        return dfx.Kvaerno5(root_finder=root)


SOLVERS: dict[str, type[AbstractSolver]] = {
    cls.name: cls for cls in (Kvaerno5,)
}
"""Solver names accepted by ``gradient_descent(..., solver=...)`` (``"tsit5"``,
``"dopri5"``, ``"expo"`` and ``"rodas5p"`` are registered by :mod:`ntkflow._explicit`,
:mod:`ntkflow._expo` and :mod:`ntkflow._rosenbrock`)."""
