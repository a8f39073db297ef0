r"""The adaptive step loop shared by the solvers that work in the kernel's eigenbasis.

:class:`EigenbasisSolver` implements the solver contract (``integrate`` to
sorted finite times, ``converge`` to the end of training) once, for one-step
methods whose state (the "carry") lives in eigen-coordinates
:math:`z = V^T F`, :math:`q = V^T Q` of the eigendecomposition
:math:`K = V \Lambda V^T` (``Dynamics.eigen``, computed once per predictor).
A method supplies ``_start`` (the carry of an initial state), ``_step`` (one
step and its scaled error estimate) and ``error_exponent``, and may work in its
own view of the eigendecomposition (``_space``, e.g. arrays in another layout,
with ``_flat`` mapping its carries back); step sizes follow
the standard controller :math:`h_{n+1} = h_n \min(10, \max(0.2, 0.95\,
\text{err}^{-1/p}))`, times, after two full accepted steps, Gustafsson's
predictive trend :math:`(h_n / h_{n-1}) (\text{err}_{n-1} /
\text{err}_n)^{1/p}` (at most 1.25; :func:`predictive_step_size`). Over a
long horizon the affordable step grows steadily and the standard controller
alone lags behind it (its error settled near half the tolerance); with the
trend the Rosenbrock method takes 7-8% fewer steps (log-cosh, converged
horizon: 131 -> 121 steps at n = 256, 121 -> 112 at n = 1024). The first
step moves the state by 1% of its size (:meth:`EigenbasisSolver._initial_h`).
Together, the safety factor 0.95 (instead of the usual 0.9: the trend already
anticipates the growth) and that first step took the same problem from 113 to
94 steps at n = 1024 (121 -> 103 at n = 256), with no rejected step and a
smaller error (3.8e-10 against 5.6e-10).

The carry always holds ``z``, ``q`` (momentum, else ``None``) and the gradient
integrals on null modes ``b`` (:math:`S_1`) and ``c`` (:math:`S_2`, momentum).
On non-null modes the gradient integrals that give the test outputs are exact
functions of the train state (e.g. :math:`V^T S_1 = -(z - z_0)/\Lambda`
without momentum, because :math:`F' = -K G`), so only null modes need
quadrature; :meth:`EigenbasisSolver._state` assembles the flat state.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jaxtyping import Array

from ntkflow._compensated import compensate, dot2_split, two_sum
from ntkflow._dynamics import Dynamics, FlatState, rms
from ntkflow._eigen import Eigen, phi1
from ntkflow._solvers import AbstractSolver, SolveInfo, end_of_training_test

__all__ = ["EigenbasisSolver", "next_step_size", "rms"]

_SAFETY, _FAC_MIN, _FAC_MAX = 0.9, 0.2, 10.0
#: The predictive controller's safety factor: its error target is ``0.95^p`` (0.77 for
#: ``p = 5``) rather than the standard controller's ``0.9^p`` (0.59): the trend already
#: anticipates the growth the safety factor guards against (Rosenbrock method, log-cosh,
#: n = 1024, converged horizon: 113 -> 105 steps, the same error, no rejected step).
_PREDICTIVE_SAFETY = 0.95


def next_step_size(h: Array, err: Array, exponent: float, grow: Array | bool = True,
                   safety: float = _SAFETY) -> Array:
    """The standard controller: ``h min(10, max(0.2, safety err^(-1/exponent)))``
    (``safety = 0.9``), capped at ``h`` where ``grow`` is false (e.g. right after a
    rejected step)."""
    fac = safety * jnp.where(err > 0, err, 1e-10) ** (-1.0 / exponent)
    return h * jnp.clip(fac, _FAC_MIN, jnp.where(grow, _FAC_MAX, 1.0))


def predictive_step_size(
    h: Array, err: Array, h_prev: Array, err_prev: Array, exponent: float
) -> Array:
    """Gustafsson's predictive controller after two full accepted steps (``h_prev > 0``).

    The standard factor times the trend ``(h / h_prev) (err_prev / err)^(1/p)``, which
    keeps the error at its target while the step sizes grow steadily (the standard
    controller alone lags: for a step size that grows by ``g`` per step its error settles
    at ``(safety / g)^p`` of the tolerance); the trend may raise the step by 25% at most.
    The safety factor is ``0.95`` (``_PREDICTIVE_SAFETY``).
    """
    tiny = 1e-10
    standard = next_step_size(h, err, exponent, safety=_PREDICTIVE_SAFETY)
    e, ep = jnp.maximum(err, tiny), jnp.maximum(err_prev, tiny)
    trend = h / jnp.where(h_prev > 0, h_prev, 1.0) * (ep / e) ** (1.0 / exponent)
    predicted = jnp.clip(standard * jnp.minimum(trend, 1.25), _FAC_MIN * h, _FAC_MAX * h)
    return jnp.where(h_prev > 0, predicted, standard)


class EigenbasisSolver(AbstractSolver):
    """Base of adaptive one-step methods on eigen-coordinates (see the module docstring)."""

    stiff: ClassVar[bool] = True
    eigenbasis: ClassVar[bool] = True
    #: ``p`` in the step-size controller: the order of the error estimate plus one.
    error_exponent: ClassVar[float]

    # -- what a method supplies -----------------------------------------------------------------

    @abc.abstractmethod
    def _start(self, dyn: Dynamics, eig: Any, y0: FlatState) -> Any:
        """The carry at ``y0`` (gradient integrals on null modes start at zero)."""

    @abc.abstractmethod
    def _step(
        self, dyn: Dynamics, eig: Any, x: Any, h: Array, rtol: float, atol: float,
        left: Array,
    ) -> tuple[Any, Array]:
        """One step of size ``h``: the new carry and the error relative to the tolerance.

        The step is accepted if ``err <= 1``; a large finite ``err`` rejects it (the
        next try is 5x shorter); a non-finite ``err`` ends the solve as failed
        (non-finite values). ``left``: the time from the step's end to the next output
        time (``inf`` in solves to ``t = inf``), which a method may use to weigh its
        error (:class:`ntkflow._rosenbrock.Rodas5P`).
        """

    # -- shared machinery -----------------------------------------------------------------------

    def _next_h(self, h: Array, err: Array, history: tuple[Array, Array]) -> Array:
        """The next step size after a step ``h`` with error ``err``; ``history``: the
        previous full accepted step and its error (``h = 0``: none).

        Errors are not differentiated (as in diffrax): forward-mode derivatives are those
        of the scheme with its steps fixed, and an error norm's derivative at 0 (``sqrt``
        at 0) does not leak NaN into them.
        """
        h_prev, err_prev = history
        err, err_prev = jax.lax.stop_gradient((err, err_prev))
        ok = err <= 1.0
        return predictive_step_size(
            h, err, jnp.where(ok, h_prev, 0.0), err_prev, self.error_exponent
        )

    @staticmethod
    def _initial_h(dyn: Dynamics, y0: FlatState, rtol: float, atol: float) -> Array:
        """The first step: one that moves the state by 1% of its size at its initial rate.

        The size is the largest rms of the outputs, the targets (outputs often start at
        zero) and the velocities. The eigenbasis methods treat the stiff linear part
        exactly (exponential integrator) or L-stably (Rosenbrock), so such a step is
        affordable at any stiffness (and a rejected one is retried 5x shorter). A start
        sized by the tolerance instead (1% of ``atol + rtol |F|``) spent 14 of 113 steps
        ramping up from 1e-6 of the fastest time scale (log-cosh, n = 1024, converged
        horizon); the first step is now 0.3 of that time scale, and accepted. ``rtol`` is
        unused (kept for the signature); ``atol`` bounds the size from below.
        """
        kg = dyn.k @ dyn.grad_fn(y0.f)
        size = jnp.maximum(rms(y0.f), rms(jnp.asarray(dyn.y, y0.f.dtype)))
        if y0.q is None:
            d1 = rms(kg)
        else:
            assert dyn.damping is not None
            d1 = rms(jnp.stack([y0.q, -kg + dyn.damping * y0.q]))
            size = jnp.maximum(size, rms(y0.q))
        scale = jnp.maximum(size, atol)
        # Not differentiated (see _next_h).
        return jax.lax.stop_gradient(
            jnp.where(d1 > 0, 0.01 * scale / jnp.where(d1 > 0, d1, 1), 1.0))

    @staticmethod
    def _eigen(dyn: Dynamics) -> Eigen:
        return dyn.eigen if dyn.eigen is not None else Eigen.of(dyn.k)

    def _space(self, dyn: Dynamics, eig: Eigen) -> Any:
        """What ``_start``, ``_step`` and ``_outputs`` receive as ``eig``: the
        eigendecomposition itself, or a method's own view of it (e.g. with its arrays in
        another layout), made once per solve, outside the step loop."""
        del dyn
        return eig

    def step_tolerances(self, rtol: float, atol: float, dtype: Any) -> tuple[float, float]:
        """The tolerances finite-time steps are controlled to (the user's unless a method
        says otherwise); solves to ``t = inf`` keep the user's."""
        del dtype
        return rtol, atol

    def _flat(self, space: Any, x: Any) -> Any:
        """The carry ``x`` of ``space`` in the flat layout ``(rows, traced)``."""
        del space
        return x

    @staticmethod
    def _outputs(eig: Any, x: Any) -> FlatState:
        """Train outputs (and velocities) of a carry, without the gradient integrals."""
        q = None if x.q is None else eig.from_eigenbasis(x.q)
        return FlatState(eig.from_eigenbasis(x.z), q, None, None)

    @staticmethod
    def _state(dyn: Dynamics, eig: Eigen, x0: Any, x: Any, tau: Array,
               on_range: bool = False) -> FlatState:
        """The flat state at time ``tau`` (since the start ``x0`` of this solve).

        In single precision the gradient integrals come back from the eigenbasis
        compensated (:func:`ntkflow._compensated.dot2`), their low-order parts in ``lo``.
        ``on_range``: the integrals' null-mode coordinates are left out (the end point
        of training reports the pseudo-inverse limit, :func:`ntkflow._ode._on_range`):
        there they grow with the time the solve covered, and dropping them from the flat
        integrals afterwards, in single precision, left their rounding error behind
        (float32, n = 256, condition number 1e8, 234 null modes, MSE: test outputs 3.5e-3
        off the float64 limit, 2.8e-2 once the end-of-training test let the solve run to
        its tight floor; now 7.2e-6).
        """
        v = eig.evecs
        null = eig.null[:, None]
        lam = jnp.where(null, 1.0, eig.evals[:, None])
        if on_range:
            x = x._replace(b=jnp.zeros_like(x.b), c=None if x.c is None else jnp.zeros_like(x.c))
        q = None if x.q is None else v @ x.q
        if not dyn.with_test:
            return FlatState(v @ x.z, q, None, None)
        if x.q is None:
            s1 = jnp.where(null, x.b, -(x.z - x0.z) / lam)
            return _with_integrals(v @ x.z, q, v, eig.evecs_lo, s1, None)
        assert dyn.damping is not None and x0.q is not None and x.c is not None
        d = jnp.asarray(dyn.damping, x.z.dtype)
        decay = jnp.exp(d * tau)
        phi = phi1(-d[None], tau[None])[0, 0]  # (e^{d tau} - 1) / d
        s1 = jnp.where(null, x.b, (decay * x0.q - x.q) / lam)
        s2 = jnp.where(null, x.c, (x0.z + phi * x0.q - x.z) / lam)
        return _with_integrals(v @ x.z, q, v, eig.evecs_lo, s1, s2)

    @staticmethod
    def _add_integrals(dyn: Dynamics, y0: FlatState, y: FlatState, tau: Array) -> FlatState:
        """Compose gradient integrals: those up to ``y0`` followed by those since ``y0``
        (compensated if ``y`` is)."""
        assert y.s1 is not None and y0.s1 is not None
        if dyn.damping is None:
            return _sum_integrals(y, (y0.s1, y.s1), None, y0.lo, 1.0, 0.0)
        assert y.s2 is not None and y0.s2 is not None
        d = jnp.asarray(dyn.damping, y.f.dtype)
        decay = jnp.exp(d * tau)
        phi = phi1(-d[None], tau[None])[0, 0]
        # s1(T + tau) = e^{d tau} s1(T) + s1_new; s2(T + tau) = s2(T) + phi * s1(T) + s2_new.
        return _sum_integrals(y, (decay * y0.s1, y.s1), (y0.s2 + phi * y0.s1, y.s2), y0.lo,
                              decay, phi)

    # -- the contract ---------------------------------------------------------------------------

    def integrate(self, dynamics, y0, taus, *, rtol, atol, max_steps):
        rtol, atol = self.step_tolerances(rtol, atol, y0.f.dtype)
        eig = self._eigen(dynamics)
        space = self._space(dynamics, eig)
        x0 = self._start(dynamics, space, y0)
        m = taus.shape[0]
        saved = jax.tree.map(lambda a: jnp.zeros((m,) + a.shape, a.dtype), x0)
        h0 = self._initial_h(dynamics, y0, rtol, atol)
        tau0 = jnp.zeros((), taus.dtype)

        def cond(c):
            tau, x, h, i, saved, n, ok, _ = c
            return (i < m) & (n < max_steps) & ok

        def body(c):
            tau, x, h, i, saved, n, ok, hist = c
            target = taus[jnp.minimum(i, m - 1)]
            at_target = tau >= target
            # Record (repeated targets take one iteration each, without stepping).
            saved = jax.tree.map(
                lambda s, v: jnp.where(at_target, s.at[i].set(v), s), saved, x
            )
            h_try = jnp.minimum(h, target - tau)
            # No step (h_try = 0) on a recording iteration: skipping it saves a whole step's
            # products (and, for the Rosenbrock method, linear solves that cannot converge).
            x1, err = jax.lax.cond(
                at_target,
                lambda: (x, jnp.zeros((), h.dtype)),
                lambda: self._step(dynamics, space, x, h_try, rtol, atol,
                                   left=target - tau - h_try),
            )
            accept = (err <= 1.0) & ~at_target
            hit = h_try >= target - tau
            new_tau = jnp.where(accept, jnp.where(hit, target, tau + h_try), tau)
            x = jax.tree.map(lambda a, b: jnp.where(accept, a, b), x1, x)
            h_next = jnp.where(at_target, h, self._next_h(h_try, err, hist))
            h_next = jnp.where(accept & hit, jnp.maximum(h_next, h), h_next)
            # The predictive controller's history: full accepted steps only.
            full = accept & (h_try >= h)
            hist = jax.tree.map(
                lambda old, new: jnp.where(at_target, old, jnp.where(full, new, 0 * new)),
                hist, (h_try, err),
            )
            ok = ok & (jnp.isfinite(err) | at_target)
            return (new_tau, x, h_next, i + at_target, saved, n + ~at_target, ok, hist)

        no_history = (jnp.zeros_like(h0), jnp.zeros_like(h0))
        init = (tau0, x0, h0, jnp.zeros((), jnp.int32), saved, jnp.zeros((), jnp.int32),
                jnp.ones((), bool), no_history)
        tau, _, _, i, saved, n, ok, _ = jax.lax.while_loop(cond, body, init)
        flat0 = self._flat(space, x0)
        ys = jax.vmap(
            lambda x, t: self._state(dynamics, eig, flat0, self._flat(space, x), t))(saved, taus)
        done = i >= m
        code = jnp.where(done, 0, jnp.where(ok, 1, 2)).astype(jnp.int32)
        return ys, SolveInfo(done, tau, n, jnp.asarray(-1), code)

    def converge(self, dynamics, y0, tau0, eigen, *, rtol, atol, max_steps, active=None):
        eig = self._eigen(dynamics)
        space = self._space(dynamics, eig)
        # Continue from y0 at tau0; the gradient integrals restart from y0's.
        x0 = self._start(dynamics, space, y0)
        h0 = self._initial_h(dynamics, y0, rtol, atol)
        test = end_of_training_test(dynamics, eigen, y0, rtol, atol, active)

        # No output time ahead: the end point is the attracting fixed point, whatever the
        # path (a method may weigh its step errors by that).
        no_output = jnp.asarray(jnp.inf, h0.dtype)

        def is_done(x, memo):
            return test.step(self._outputs(space, x), memo)

        def cond(c):
            tau, x, h, n, done, ok, _, _ = c
            return ~done & (n < max_steps) & ok

        def body(c):
            tau, x, h, n, done, ok, hist, memo = c
            x1, err = self._step(dynamics, space, x, h, rtol, atol, left=no_output)
            accept = err <= 1.0
            tau = jnp.where(accept, tau + h, tau)
            x = jax.tree.map(lambda a, b: jnp.where(accept, a, b), x1, x)
            done, memo1 = is_done(x, memo)
            done = accept & done
            memo = jax.tree.map(lambda a, b: jnp.where(accept, a, b), memo1, memo)
            h_next = self._next_h(h, err, hist)
            hist = jax.tree.map(lambda v: jnp.where(accept, v, 0 * v), (h, err))
            return (tau, x, h_next, n + 1, done, ok & jnp.isfinite(err), hist, memo)

        no_history = (jnp.zeros_like(h0), jnp.zeros_like(h0))
        done0, memo0 = is_done(x0, test.memo0)
        init = (jnp.zeros_like(tau0), x0, h0, jnp.zeros((), jnp.int32), done0,
                jnp.ones((), bool), no_history, memo0)
        tau, x, _, n, done, ok, _, _ = jax.lax.while_loop(cond, body, init)
        code = jnp.where(done, 0, jnp.where(ok, 1, 2)).astype(jnp.int32)
        y = self._state(dynamics, eig, self._flat(space, x0), self._flat(space, x), tau,
                        on_range=True)
        # Gradient integrals are relative to y0: add y0's own.
        if dynamics.with_test:
            assert y.s1 is not None and y0.s1 is not None
            y = self._add_integrals(dynamics, y0, y, tau)
        return y, SolveInfo(done, tau0 + tau, n, jnp.asarray(-1), code)


def _with_integrals(f: Array, q: Array | None, v: Array, v_lo: Array | None, s1: Array,
                    s2: Array | None) -> FlatState:
    r"""The flat state with gradient integrals ``v @ s1``, ``v @ s2``: compensated in single
    precision (see :mod:`ntkflow._compensated`), with ``v``'s rounding error ``v_lo``
    when known (``Eigen.evecs_lo``).

    The integrals' eigen-coordinates on slow modes are large (:math:`V^T S_1 = -(z -
    z_0) / \Lambda`), and the test outputs take them back through ``K_test``, whose
    components on those modes are small: rounding ``V`` to single precision mixes in
    components of the fast modes that ``K_test`` amplifies. (Float32 MSE at the
    mid horizon, n = 256: test error 2.3e-6 with ``v`` alone, 2.2e-7 with ``v_lo``.)
    """
    if not compensate(f.dtype):
        return FlatState(f, q, v @ s1, None if s2 is None else v @ s2)
    s1, s1_lo = dot2_split(v, v_lo, s1)
    s2, s2_lo = (None, None) if s2 is None else dot2_split(v, v_lo, s2)
    zq = None if q is None else jnp.zeros_like(q)
    return FlatState(f, q, s1, s2, FlatState(jnp.zeros_like(f), zq, s1_lo, s2_lo))


def _sum_integrals(y: FlatState, s1: tuple[Array, Array], s2: tuple[Array, Array] | None,
                   lo0: FlatState | None, decay: Any, phi: Any) -> FlatState:
    """``y`` with the integrals ``s1[0] + s1[1]`` (and ``s2``'s), adding the low-order
    parts of ``y`` and of the earlier state (``lo0``, scaled as its integrals) when kept."""
    if y.lo is None:
        return FlatState(y.f, y.q, s1[0] + s1[1], None if s2 is None else s2[0] + s2[1])
    lo = y.lo
    if lo0 is None:
        lo0 = jax.tree.map(jnp.zeros_like, lo)
    assert lo.s1 is not None and lo0.s1 is not None
    hi1, e1 = two_sum(*s1)
    lo1 = e1 + lo.s1 + decay * lo0.s1
    if s2 is None:
        return FlatState(y.f, y.q, hi1, None, FlatState(lo.f, lo.q, lo1, None))
    assert lo.s2 is not None and lo0.s2 is not None
    hi2, e2 = two_sum(*s2)
    lo2 = e2 + lo.s2 + lo0.s2 + phi * lo0.s1
    return FlatState(y.f, y.q, hi1, hi2, FlatState(lo.f, lo.q, lo1, lo2))
