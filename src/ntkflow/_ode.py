"""Solving the flat ODE at arbitrary (unsorted, repeated, infinite) times.

This is the one place that turns user times into what solvers accept: it
sorts the requested times, splits off ``inf`` (the end point of training),
runs the solver once over the sorted finite times, continues to convergence
if any time is infinite, and puts the results back in the requested order.

The solve is one compiled program. A solver may ask for XLA options for it on a CPU
(``AbstractSolver.cpu_compiler_options``); they are passed to that program's
compilation only (``jax.jit``'s ``compiler_options``), where the installed jaxlib
accepts them and the call is not staged into an enclosing trace.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from ntkflow._dynamics import Dynamics, FlatState
from ntkflow._eigen import Eigen
from ntkflow._solvers import AbstractSolver, SolveInfo

__all__ = ["solve_at"]


def solve_at(
    dynamics: Dynamics, y0: FlatState, taus: Float[Array, " m"], solver: AbstractSolver,
    *args: Any, **kwargs: Any,
) -> tuple[Any, SolveInfo]:
    """:func:`_solve_fn` (arguments and result there) as one compiled program, with
    ``solver.cpu_compiler_options`` where they apply (:func:`compiled_solve`)."""
    traced = _staged(dynamics, y0, taus, args, kwargs)
    options = () if traced else solver.cpu_compiler_options
    return compiled_solve(options)(dynamics, y0, taus, solver, *args, **kwargs)


def _staged(*inputs: Any) -> bool:
    """Whether this call is part of an enclosing transformation, where a nested
    ``jax.jit`` may not carry compiler options: some input is a tracer (``jax.grad``,
    ``jax.vmap``, ...), or, under ``jax.jit`` of a predictor whose arrays are all
    concrete, a new array is one."""
    leaves = jax.tree.leaves(inputs)
    return any(isinstance(x, jax.core.Tracer) for x in leaves) or isinstance(
        jnp.zeros(()), jax.core.Tracer)


@functools.cache
def compiled_solve(options: tuple[tuple[str, str], ...]) -> Callable[..., Any]:
    """The compiled solve with the XLA ``options`` (see :func:`solve_at`), or without them
    where none are asked for, the default backend is not a CPU, or this jaxlib rejects
    them (an unknown or renamed flag: each is tried once, on a trivial program)."""
    if not options or jax.default_backend() != "cpu" or not _accepted(options):
        return _solve
    try:  # equinox passes keyword arguments on to jax.jit (untyped)
        return eqx.filter_jit(_solve_fn, compiler_options=dict(options))  # type: ignore[call-overload]
    except TypeError:  # an equinox that does not
        return _solve


def _accepted(options: tuple[tuple[str, str], ...]) -> bool:
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(0.0).compile()
    except Exception:  # noqa: BLE001 (TypeError, XlaRuntimeError: any refusal)
        return False
    return True


def _solve_fn(
    dynamics: Dynamics,
    y0: FlatState,
    taus: Float[Array, " m"],
    solver: AbstractSolver,
    rtol: float,
    atol: float,
    max_steps: int,
    infinite: bool | None = None,
    readout: Callable[[Dynamics, Float[Array, " m"], FlatState], Any] | None = None,
) -> tuple[Any, SolveInfo]:
    """States at ``taus`` (any order, repeats, ``inf``), in the order given.

    ``infinite`` says whether ``taus`` contains ``inf`` when that is known
    before tracing (then only the needed branch is compiled); ``None``: decide
    at run time. ``readout``: if given, ``readout(dynamics, taus, states)`` is
    returned instead of the states, computed in the same compiled program (a
    pytree, e.g. an ``equinox.Module``, whose arrays are traced).

    No times (``taus`` of size 0, as ``t=[]`` or ``t`` of shape ``(2, 0)``): no solve,
    and states with a time axis of length 0, as the closed forms return.
    """
    if taus.shape[0] == 0:
        ys = jax.tree.map(lambda x: jnp.zeros((0, *x.shape), x.dtype), y0)
        zero = jnp.zeros((), jnp.int32)
        info = SolveInfo(ok=jnp.ones((), bool), tau=jnp.zeros((), taus.dtype),
                         num_steps=zero, num_rhs=zero, code=zero)
        return (ys if readout is None else readout(dynamics, taus, ys)), info
    order = jnp.argsort(taus)
    sorted_taus = taus[order]
    is_inf = jnp.isinf(sorted_taus)
    finite_max = jnp.max(jnp.where(is_inf, 0.0, sorted_taus), initial=0.0)
    finite_taus = jnp.where(is_inf, finite_max, sorted_taus)

    ys, info = solver.integrate(
        dynamics, y0, finite_taus, rtol=rtol, atol=atol, max_steps=max_steps
    )

    def to_end(_: None, active: Array | None = None) -> tuple[FlatState, SolveInfo]:
        y_last = jax.tree.map(lambda x: x[-1], ys)
        eigen = dynamics.eigen if dynamics.eigen is not None else Eigen.of(dynamics.k)
        y_end, info_end = solver.converge(
            dynamics,
            y_last,
            finite_max,
            eigen,
            rtol=rtol,
            atol=atol,
            max_steps=max_steps,
            active=active,
        )
        return _on_range(y_end, eigen), info_end

    def skip(_: None) -> tuple[FlatState, SolveInfo]:
        y_last = jax.tree.map(lambda x: x[-1], ys)
        return y_last, info

    if infinite is None and dynamics.eigen is not None:
        # Not a lax.cond: under jax.vmap over traced times its predicate is batched, and the
        # batched cond broadcasts every operand, the kernel's eigenvectors included, into the
        # batch (for the Rosenbrock method that crashed XLA's CPU compiler). The solve is
        # switched off from the inside instead (no steps when no time is infinite).
        any_inf = jnp.any(is_inf)
        y_inf, info_inf = jax.tree.map(
            lambda a, b: jnp.where(any_inf, a, b), to_end(None, any_inf), skip(None)
        )
    elif infinite is None:  # (the eigendecomposition, if needed, only when used)
        y_inf, info_inf = jax.lax.cond(jnp.any(is_inf), to_end, skip, None)
    else:
        y_inf, info_inf = to_end(None) if infinite else skip(None)
    ys = jax.tree.map(
        lambda a, b: jnp.where(is_inf.reshape((-1,) + (1,) * b.ndim), b[None], a), ys, y_inf
    )
    inverse = jnp.argsort(order)
    ys = jax.tree.map(lambda x: x[inverse], ys)
    merged = SolveInfo(
        ok=info.ok & info_inf.ok,
        tau=jnp.where(info.ok, info_inf.tau, info.tau),
        num_steps=info.num_steps + jnp.where(jnp.any(is_inf), info_inf.num_steps, 0),
        num_rhs=info.num_rhs + jnp.where(jnp.any(is_inf), info_inf.num_rhs, 0),
        code=jnp.where(info.ok, info_inf.code, info.code),
    )
    if readout is not None:
        return readout(dynamics, taus, ys), merged
    return ys, merged


_solve = eqx.filter_jit(_solve_fn)


def _on_range(y: FlatState, eigen: Eigen) -> FlatState:
    """The end point of training with its gradient integrals on the range of ``K``.

    On null modes of ``K`` the loss gradient need not vanish at the end of training
    (the train outputs cannot move there), so the gradient integrals' null-mode
    components grow without bound, and with them the test outputs wherever ``K_test``
    does not vanish on ``K``'s null space. ``t = inf`` reports the pseudo-inverse limit
    instead, as :func:`ntkflow.predict.gradient_descent_mse` does: those components are
    dropped (with no null modes, or a consistent ``K_test = J_test J^T``, nothing
    changes).
    """
    if y.s1 is None:
        return y

    def project(s: Array | None) -> Array | None:
        if s is None:
            return None
        return s - eigen.from_eigenbasis(
            jnp.where(eigen.null[:, None], eigen.to_eigenbasis(s), 0.0))

    lo = None if y.lo is None else FlatState(y.lo.f, y.lo.q, project(y.lo.s1),
                                             project(y.lo.s2))
    return FlatState(y.f, y.q, project(y.s1), project(y.s2), lo)
