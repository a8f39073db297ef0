"""Empirical (finite-width) Neural Tangent Kernel of any JAX function.

The empirical NTK of a function ``f(params, x)`` at ``params`` is

.. math::

    \\Theta(x_1, x_2) = J(x_1) J(x_2)^T,
    \\qquad J(x) = \\frac{\\partial f(\\theta, x)}{\\partial \\theta},

the Gram matrix of the output-parameter Jacobians. It is the kernel that
governs gradient-descent training of the *linearized* network, and the kernel
consumed by :mod:`ntkflow.predict`.

:func:`empirical_ntk_fn` follows the calling convention and the output layout
of ``neural_tangents.empirical_ntk_fn``, so kernels computed here can be passed
wherever a neural-tangents empirical NTK was used.
"""

from __future__ import annotations

import math
import operator
import string
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["empirical_ntk_fn"]

PyTree = Any
KernelFn = Callable[..., jax.Array]

# Budget (in array elements) used by ``implementation="auto"`` to decide whether
# the two Jacobians may be materialized, and by ``"ntvp"`` to size the chunks of
# basis vectors that are pushed through ``vjp``/``jvp`` at once. 2**26 elements
# are 256 MiB in float32.
_MEMORY_BUDGET_ELEMENTS = 2**26

# neural-tangents' ``NtkImplementation`` integer codes. ``3`` (structured
# derivatives) is a faster algorithm for the same quantity; it is served by
# Jacobian contraction here.
_IMPLEMENTATION_CODES = {0: "auto", 1: "jacobian", 2: "ntvp", 3: "jacobian"}
_IMPLEMENTATIONS = ("auto", "jacobian", "ntvp")


# --------------------------------------------------------------------------- #
# Argument validation.                                                        #
# --------------------------------------------------------------------------- #


def _as_axes(value: Any, name: str) -> tuple[int, ...]:
    """``value`` (an int or a sequence of ints) as a tuple of ints."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return (int(value),)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"`{name}` must be an int or a sequence of ints; got {value!r}.")
    out = []
    for a in value:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
            raise TypeError(f"`{name}` must be an int or a sequence of ints; got {value!r}.")
        out.append(int(a))
    return tuple(out)


def _canonical_axes(axes: tuple[int, ...], ndim: int, name: str) -> tuple[int, ...]:
    """Sorted non-negative ``axes`` for outputs of rank ``ndim``."""
    out = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise ValueError(
                f"`{name}` entry {a} is out of range for outputs `f(params, x)` with "
                f"{ndim} dimension(s); got {name}={axes!r}."
            )
        out.append(a % ndim)
    if len(set(out)) != len(out):
        raise ValueError(
            f"`{name}` contains the same output axis twice (after wrapping negative "
            f"axes for outputs with {ndim} dimension(s)); got {name}={axes!r}."
        )
    return tuple(sorted(out))


def _check_implementation(implementation: Any) -> str:
    if isinstance(implementation, bool):
        raise TypeError(
            f"`implementation` must be one of {_IMPLEMENTATIONS} or a neural-tangents "
            f"integer code 0-3; got {implementation!r}."
        )
    if isinstance(implementation, (int, np.integer)):
        code = int(implementation)
        if code not in _IMPLEMENTATION_CODES:
            raise ValueError(
                f"`implementation` integer codes are 0 (auto), 1 (jacobian "
                f"contraction), 2 (NTK-vector products) or 3 (structured derivatives, "
                f"served by jacobian contraction); got {implementation!r}."
            )
        return _IMPLEMENTATION_CODES[code]
    if isinstance(implementation, str):
        if implementation not in _IMPLEMENTATIONS:
            raise ValueError(
                f"`implementation` must be one of {_IMPLEMENTATIONS}; got {implementation!r}."
            )
        return implementation
    raise TypeError(
        f"`implementation` must be one of {_IMPLEMENTATIONS} or a neural-tangents integer "
        f"code 0-3; got {implementation!r} of type {type(implementation).__name__}."
    )


def _check_batch_size(batch_size: Any) -> int | None:
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(
            f"`batch_size` must be None or a positive int; got {batch_size!r} of type "
            f"{type(batch_size).__name__}."
        )
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be None or a positive int; got {batch_size!r}.")
    return int(batch_size)


def _is_axis(a: Any) -> bool:
    return isinstance(a, (int, np.integer)) and not isinstance(a, bool)


def _check_vmap_axes(vmap_axes: Any) -> tuple[int, int, dict[str, int]] | None:
    """``vmap_axes`` as ``(x_axis, fx_axis, kw_axes)`` or ``None``."""
    if vmap_axes is None:
        return None
    if _is_axis(vmap_axes):
        return int(vmap_axes), int(vmap_axes), {}
    msg = (
        "`vmap_axes` must be None, an int (the batch axis of `x` and of `f(params, x)`), "
        "or a triple (x_axis, fx_axis, kw_axes) of two ints and a dict mapping keyword "
        f"argument names to ints or None; got {vmap_axes!r}."
    )
    if not (isinstance(vmap_axes, (tuple, list)) and len(vmap_axes) == 3):
        raise TypeError(msg)
    x_axis, fx_axis, kw_axes = vmap_axes
    if not (_is_axis(x_axis) and _is_axis(fx_axis)):
        raise TypeError(msg)
    if kw_axes is None:
        kw_axes = {}
    if not isinstance(kw_axes, dict) or not all(
        isinstance(k, str) and (v is None or _is_axis(v)) for k, v in kw_axes.items()
    ):
        raise TypeError(msg)
    return int(x_axis), int(fx_axis), {k: int(v) for k, v in kw_axes.items() if v is not None}


# --------------------------------------------------------------------------- #
# Kernel layout.                                                              #
# --------------------------------------------------------------------------- #


def _einsum_subscripts(
    ndim: int, trace_axes: tuple[int, ...], diagonal_axes: tuple[int, ...]
) -> tuple[str, str, str]:
    """Subscripts for ``f(x1)``-axes, ``f(x2)``-axes and the kernel.

    Traced axes share a letter that is summed over; diagonal axes share a
    letter that appears once in the output; every other axis contributes the
    interleaved pair ``(axis of f(x1), axis of f(x2))``. This is exactly
    neural-tangents' layout.
    """
    letters = string.ascii_letters
    s1, s2, out = [], [], []
    for a in range(ndim):
        l1, l2 = letters[2 * a], letters[2 * a + 1]
        if a in trace_axes:
            s1.append(l1)
            s2.append(l1)
        elif a in diagonal_axes:
            s1.append(l1)
            s2.append(l1)
            out.append(l1)
        else:
            s1.append(l1)
            s2.append(l2)
            out += [l1, l2]
    return "".join(s1), "".join(s2), "".join(out)


def _kernel_position(
    axis: int, ndim: int, trace_axes: tuple[int, ...], diagonal_axes: tuple[int, ...]
) -> int | None:
    """Position of output ``axis`` in the kernel (first of the pair), None if traced."""
    pos = 0
    for a in range(ndim):
        if a == axis:
            return None if a in trace_axes else pos
        if a in diagonal_axes:
            pos += 1
        elif a not in trace_axes:
            pos += 2
    raise AssertionError(axis)


def _swap_pairs(
    kernel: jax.Array, ndim: int, trace_axes: tuple[int, ...], diagonal_axes: tuple[int, ...]
) -> jax.Array:
    """``Theta(x2, x1)`` from ``Theta(x1, x2)``: swap the two axes of every pair."""
    perm: list[int] = []
    pos = 0
    for a in range(ndim):
        if a in trace_axes:
            continue
        if a in diagonal_axes:
            perm.append(pos)
            pos += 1
        else:
            perm += [pos + 1, pos]
            pos += 2
    return jnp.transpose(kernel, perm)


# --------------------------------------------------------------------------- #
# Keyword arguments (neural-tangents' `split_kwargs` convention).             #
# --------------------------------------------------------------------------- #


def _split_kwargs(
    kwargs: dict[str, Any], x1: PyTree, x2: PyTree
) -> tuple[dict[str, Any], dict[str, Any], bool]:
    """Keyword arguments for ``f(x1)`` and ``f(x2)``, and whether they differ.

    * ``rng``: with ``x2`` given (and not ``x1`` itself), ``f(x2)`` gets
      ``jax.random.fold_in(rng, 1)``; a pair ``(rng1, rng2)`` is used as is.
    * any other tuple of length two: first entry for ``x1``, second for ``x2``.
    * everything else: passed unchanged to both.
    """
    kw1: dict[str, Any] = {}
    kw2: dict[str, Any] = {}
    split = False
    for k, v in kwargs.items():
        if isinstance(v, tuple) and len(v) == 2:
            kw1[k], kw2[k] = v
            split = True
        elif k == "rng" and x2 is not None and x2 is not x1 and v is not None:
            kw1[k], kw2[k] = v, jax.random.fold_in(v, 1)
            split = True
        else:
            kw1[k] = kw2[k] = v
    return kw1, kw2, split


# --------------------------------------------------------------------------- #
# The public factory.                                                         #
# --------------------------------------------------------------------------- #


def empirical_ntk_fn(
    f: Callable[..., Any],
    trace_axes: int | Sequence[int] = (-1,),
    diagonal_axes: int | Sequence[int] = (),
    vmap_axes: Any = None,
    implementation: str | int = "auto",
    batch_size: int | None = None,
) -> KernelFn:
    r"""Returns a function computing the empirical NTK of ``f``.

    For a function ``f(params, x)`` with outputs of shape ``(n, ...)`` the
    empirical Neural Tangent Kernel at ``params`` is

    .. math::

        \Theta(x_1, x_2) = J(x_1)\, J(x_2)^T, \qquad
        J(x) = \frac{\partial f(\theta, x)}{\partial \theta}\Big|_{\theta=\text{params}},

    i.e. :math:`\Theta_{ab} = \sum_p \partial_p f_a(x_1) \, \partial_p f_b(x_2)`
    summed over every scalar parameter ``p`` of the ``params`` pytree, for every
    pair of output entries ``a`` of ``f(x1)`` and ``b`` of ``f(x2)``.

    The returned kernel has neural-tangents' layout: the *interleaved* shape
    ``zip(f(x1).shape, f(x2).shape)`` (e.g. ``(n1, n2, a, a)`` for outputs
    ``(n, a, k)``), except that

    * each axis in ``trace_axes`` is contracted and **averaged**: the pair is
      summed over its diagonal and divided by its size, so outputs of shape
      ``(n, k)`` with ``trace_axes=(-1,)`` give the ``(n1, n2)`` kernel
      :math:`\frac{1}{k}\sum_{c=1}^k J_c(x_1) J_c(x_2)^T`. This is the right
      kernel when the full one is (close to) :math:`\Theta \otimes I_k`, as for
      the logits of a wide network;
    * each axis in ``diagonal_axes`` keeps only the diagonal of its pair and
      appears once, in its place (e.g. ``diagonal_axes=(0,)`` and
      ``trace_axes=(-1,)`` give the ``(n,)`` vector of
      :math:`\Theta(x_i, x_i)`).

    Args:
      f: the function, ``f(params, x, **kwargs)``, with ``params`` any pytree of
        arrays; it must return a single array.
      trace_axes: output axes to trace over (averaged, see above). Default
        ``(-1,)``, the logit axis. Use ``()`` for the full kernel.
      diagonal_axes: output axes along which only the diagonal is kept.
        Must not overlap ``trace_axes``.
      vmap_axes: ``None``, an int, or a triple ``(x_axis, fx_axis, kw_axes)``.
        It declares that ``f`` acts independently on the examples along axis
        ``x_axis`` of every leaf of ``x`` (and along axis ``kw_axes[name]`` of
        keyword argument ``name``), producing axis ``fx_axis`` of the output:
        no batch normalization or other cross-example coupling. An int ``a``
        means ``(a, a, {})``. With ``"jacobian"`` the per-example Jacobians are
        then computed with :func:`jax.vmap`, which is much cheaper than
        differentiating the whole batch. ``"ntvp"`` accepts it and ignores
        it. It also sets the axis ``batch_size`` splits along (default ``0``).
      implementation: ``"jacobian"`` materializes both Jacobians (pytrees of
        ``f(x).shape + leaf.shape`` arrays, by reverse mode) and contracts them;
        fastest when they fit in memory. ``"ntvp"`` uses NTK-vector products:
        the kernel is built block of columns by block of columns, each column
        being :math:`J(x_1) \big(J(x_2)^T e\big)` for a basis vector ``e`` of the
        outputs of ``f(x2)`` (one ``vjp`` then one ``jvp``, vectorized over a
        chunk of basis vectors), so no Jacobian is ever held in memory, only a
        chunk of parameter-sized tangents. ``"auto"`` uses ``"jacobian"`` when
        the Jacobians (``(size(f(x1)) + size(f(x2))) * n_params`` elements)
        fit in a 2**26-element budget and ``"ntvp"`` otherwise. The
        neural-tangents integer codes ``0`` (auto), ``1`` (jacobian), ``2``
        (ntvp) and ``3`` (structured derivatives, served by ``"jacobian"``) are
        accepted too.
      batch_size: if given, ``x1`` and ``x2`` are split into blocks of at most
        ``batch_size`` examples along the batch axis (axis 0, or ``x_axis`` of
        ``vmap_axes``) and the kernel is assembled from the block kernels,
        which bounds memory. The last block may be smaller. Appropriate only
        when ``f`` acts independently on examples. Keyword arguments are
        passed whole to every block, except those with an axis in
        ``vmap_axes``, which are split like ``x``.

    Returns:
      ``kernel_fn(x1, x2=None, params=..., **apply_fn_kwargs)``, also callable
      as ``kernel_fn(x1, x2, params)``. ``x2=None`` means ``x2 = x1`` (and only
      half of the blocks are computed). ``apply_fn_kwargs`` are passed to ``f``
      following neural-tangents: a tuple of length two gives separate values
      for ``f(x1)`` and ``f(x2)``; ``rng`` is used for ``f(x1)`` and
      ``jax.random.fold_in(rng, 1)`` for a different ``x2``. ``f(x1)`` and
      ``f(x2)`` must have the same rank and agree in size on ``trace_axes``
      and ``diagonal_axes``. The kernel is jit-compiled (with
      :func:`equinox.filter_jit`: arrays are traced, other arguments static)
      and may itself be used under :func:`jax.jit`.

    Raises:
      TypeError, ValueError: for invalid arguments, naming the argument.

    Adapters for other libraries:

    * flax (linen): ``f = lambda p, x: model.apply(p, x)`` with ``p`` the
      variables from ``model.init``.
    * equinox: split the model into trainable arrays and the rest with
      ``params, static = eqx.partition(model, eqx.is_inexact_array)`` and use
      ``f = lambda p, x: jax.vmap(eqx.combine(p, static))(x)`` (drop the
      ``jax.vmap`` if the model already takes a batch).

    Example:
      A two-layer MLP in plain JAX, ten logits, NTK parameterization:

      >>> import jax, jax.numpy as jnp
      >>> from ntkflow import empirical_ntk_fn
      >>> k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
      >>> params = {"w1": jax.random.normal(k1, (8, 64)),
      ...           "w2": jax.random.normal(k2, (64, 10))}
      >>> def f(p, x):
      ...     h = jax.nn.relu(x @ p["w1"] / jnp.sqrt(8.0))
      ...     return h @ p["w2"] / jnp.sqrt(64.0)
      >>> x_train = jax.random.normal(k3, (5, 8))
      >>> kernel_fn = empirical_ntk_fn(f)            # trace_axes=(-1,)
      >>> kernel_fn(x_train, None, params).shape     # averaged over the 10 logits
      (5, 5)
      >>> empirical_ntk_fn(f, trace_axes=())(x_train[:2], x_train, params).shape
      (2, 5, 10, 10)
      >>> empirical_ntk_fn(f, diagonal_axes=(0,))(x_train, None, params).shape
      (5,)
    """
    if not callable(f):
        raise TypeError(f"`f` must be a callable f(params, x); got {f!r}.")
    trace = _as_axes(trace_axes, "trace_axes")
    diagonal = _as_axes(diagonal_axes, "diagonal_axes")
    impl = _check_implementation(implementation)
    vaxes = _check_vmap_axes(vmap_axes)
    bs = _check_batch_size(batch_size)

    def block_kernel(
        params: PyTree,
        x1: PyTree,
        x2: PyTree,
        kw1: dict[str, Any],
        kw2: dict[str, Any],
        ndim: int,
        trace_c: tuple[int, ...],
        diag_c: tuple[int, ...],
        contract_size: int,
    ) -> jax.Array:
        """Kernel of one block pair (traced axes summed, divided by ``contract_size``)."""
        same = x2 is None
        if same:
            x2, kw2 = x1, kw1
        out1 = jax.eval_shape(lambda p: f(p, x1, **kw1), params)
        out2 = out1 if same else jax.eval_shape(lambda p: f(p, x2, **kw2), params)
        n_params = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(params))
        size1, size2 = math.prod(out1.shape), math.prod(out2.shape)
        s1, s2, so = _einsum_subscripts(ndim, trace_c, diag_c)

        chosen = impl
        if chosen == "auto":
            jac_elements = (size1 + (0 if same else size2)) * n_params
            chosen = "jacobian" if jac_elements <= _MEMORY_BUDGET_ELEMENTS else "ntvp"

        if chosen == "jacobian":
            j1 = _jacobian(f, params, x1, kw1, vaxes)
            j2 = j1 if same else _jacobian(f, params, x2, kw2, vaxes)

            def contract(a: jax.Array, b: jax.Array) -> jax.Array:
                a = a.reshape(out1.shape + (-1,))
                b = b.reshape(out2.shape + (-1,))
                return jnp.einsum(
                    f"{s1}Z,{s2}Z->{so}", a, b, precision=jax.lax.Precision.HIGHEST
                )

            terms = jax.tree.leaves(jax.tree.map(contract, j1, j2))
            if not terms:
                return jnp.zeros(_kernel_shape(out1.shape, out2.shape, trace_c, diag_c))
            total: jax.Array = terms[0]
            for t in terms[1:]:
                total = operator.add(total, t)
            return total / contract_size

        # NTK-vector products: column e of the kernel is J(x1) (J(x2)^T e).
        _, vjp2 = jax.vjp(lambda p: f(p, x2, **kw2), params)
        _, jvp1 = jax.linearize(lambda p: f(p, x1, **kw1), params)
        chunk = max(1, min(size2, _MEMORY_BUDGET_ELEMENTS // max(n_params + size1, 1)))
        dtype = out2.dtype

        def column(i: jax.Array) -> jax.Array:
            e = jax.nn.one_hot(i, size2, dtype=dtype).reshape(out2.shape)
            (tangent,) = vjp2(e)
            return jvp1(tangent)

        cols = jax.lax.map(column, jnp.arange(size2), batch_size=chunk)
        full = cols.reshape(out2.shape + out1.shape)
        full = jnp.moveaxis(full, tuple(range(ndim)), tuple(range(ndim, 2 * ndim)))
        return _reduce_full(full, s1, s2, so) / contract_size

    jitted_block = eqx.filter_jit(block_kernel)

    def kernel_fn(
        x1: PyTree, x2: PyTree = None, params: PyTree = None, **apply_fn_kwargs: Any
    ) -> jax.Array:
        """Empirical NTK ``J(x1) J(x2)^T`` at ``params`` (``x2=None``: ``x2 = x1``).

        The shape is ``zip(f(x1).shape, f(x2).shape)`` with the ``trace_axes``
        pairs removed (averaged over) and ``diagonal_axes`` kept once; see
        :func:`ntkflow.empirical_ntk_fn`.
        """
        if params is None:
            raise TypeError(
                "`params` is required: call kernel_fn(x1, x2, params) or "
                "kernel_fn(x1, x2=None, params=params); got params=None."
            )
        if x1 is None:
            raise TypeError("`x1` must be an array (or a pytree of arrays); got None.")
        kw1, kw2, split = _split_kwargs(apply_fn_kwargs, x1, x2)
        if x2 is None and split:
            x2 = x1
        same = x2 is None

        out1 = jax.eval_shape(lambda p: f(p, x1, **kw1), params)
        out2 = out1 if same else jax.eval_shape(lambda p: f(p, x2, **kw2), params)
        for name, out in (("x1", out1), ("x2", out2)):
            if not isinstance(out, jax.ShapeDtypeStruct):
                raise TypeError(
                    f"`f(params, {name})` must return a single array; got "
                    f"{jax.tree.structure(out)}."
                )
        ndim = len(out1.shape)
        if len(out2.shape) != ndim:
            raise ValueError(
                f"`f(params, x1)` and `f(params, x2)` must have the same rank; got shapes "
                f"{out1.shape} and {out2.shape}."
            )
        trace_c = _canonical_axes(trace, ndim, "trace_axes")
        diag_c = _canonical_axes(diagonal, ndim, "diagonal_axes")
        if set(trace_c) & set(diag_c):
            raise ValueError(
                f"`trace_axes` and `diagonal_axes` must not share an axis; got "
                f"trace_axes={trace!r} and diagonal_axes={diagonal!r} for outputs with "
                f"{ndim} dimension(s)."
            )
        for a in trace_c + diag_c:
            if out1.shape[a] != out2.shape[a]:
                raise ValueError(
                    f"`f(params, x1)` and `f(params, x2)` must agree in size on "
                    f"`trace_axes` and `diagonal_axes`; axis {a} has sizes "
                    f"{out1.shape[a]} and {out2.shape[a]} (shapes {out1.shape} and "
                    f"{out2.shape})."
                )
        contract_size = math.prod(out1.shape[a] for a in trace_c)

        x_axis, fx_axis, kw_axes = vaxes if vaxes is not None else (0, 0, {})
        if vaxes is not None:
            _check_vmapped_sizes(x1, out1, x_axis, fx_axis, "x1")
            if not same:
                _check_vmapped_sizes(x2, out2, x_axis, fx_axis, "x2")
        fx_axis_c = fx_axis % ndim if ndim else 0

        def run(x1b: PyTree, x2b: PyTree, k1: dict[str, Any], k2: dict[str, Any]) -> jax.Array:
            return jitted_block(params, x1b, x2b, k1, k2, ndim, trace_c, diag_c, contract_size)

        if bs is None or ndim == 0:
            return run(x1, None if same else x2, kw1, kw2)

        n1 = _batch_size_of(x1, x_axis, "x1")
        n2 = n1 if same else _batch_size_of(x2, x_axis, "x2")
        if out1.shape[fx_axis_c] != n1 or out2.shape[fx_axis_c] != n2:
            raise ValueError(
                f"With `batch_size`, axis {fx_axis} of `f(params, x)` must be the batch "
                f"axis (size {n1} for x1, {n2} for x2, axis {x_axis} of the inputs); got "
                f"output shapes {out1.shape} and {out2.shape}."
            )
        w1, w2 = min(bs, n1), min(bs, n2)
        starts1 = list(range(0, n1, w1))
        starts2 = starts1 if same else list(range(0, n2, w2))

        def piece(
            tree: PyTree, kw: dict[str, Any], start: int, n: int, width: int
        ) -> tuple[Any, Any]:
            # Examples start .. start + width - 1; past the end the last example is
            # repeated, so that every block has the same shape (one compilation).
            idx = np.minimum(np.arange(start, start + width), n - 1)
            xs = jax.tree.map(lambda a: jnp.take(jnp.asarray(a), idx, axis=x_axis), tree)
            kws = {
                k: (jnp.take(jnp.asarray(v), idx, axis=kw_axes[k]) if k in kw_axes else v)
                for k, v in kw.items()
            }
            return xs, kws

        def crop(k: jax.Array, axis: int, size: int) -> jax.Array:
            return jax.lax.slice_in_dim(k, 0, size, axis=axis)

        pos = _kernel_position(fx_axis_c, ndim, trace_c, diag_c)
        if fx_axis_c in trace_c or fx_axis_c in diag_c:
            if n1 != n2:
                raise ValueError(
                    f"With the batch axis {fx_axis} in `trace_axes` or `diagonal_axes`, x1 "
                    f"and x2 must have the same number of examples; got {n1} and {n2}."
                )
            parts = []
            for start in starts1:
                size = min(w1, n1 - start)
                # A traced batch axis sums over examples: no padding there.
                width = size if pos is None else w1
                a, ka = piece(x1, kw1, start, n1, width)
                if same:
                    block = run(a, None, ka, ka)
                else:
                    b, kb = piece(x2, kw2, start, n2, width)
                    block = run(a, b, ka, kb)
                parts.append(block if pos is None else crop(block, pos, size))
            if pos is None:
                kernel = parts[0]
                for part in parts[1:]:
                    kernel = kernel + part
            else:
                kernel = jnp.concatenate(parts, axis=pos)
            return kernel

        assert pos is not None
        grid: list[list[jax.Array]] = []
        for i, start1 in enumerate(starts1):
            size1 = min(w1, n1 - start1)
            a, ka = piece(x1, kw1, start1, n1, w1)
            row: list[jax.Array] = []
            for j, start2 in enumerate(starts2):
                size2 = min(w2, n2 - start2)
                if same and j < i:
                    block = _swap_pairs(grid[j][i], ndim, trace_c, diag_c)
                elif same and i == j:
                    block = crop(crop(run(a, None, ka, ka), pos, size1), pos + 1, size2)
                else:
                    b, kb = piece(x1 if same else x2, kw2, start2, n2, w2)
                    block = crop(crop(run(a, b, ka, kb), pos, size1), pos + 1, size2)
                row.append(block)
            grid.append(row)
        rows = [jnp.concatenate(r, axis=pos + 1) for r in grid]
        return jnp.concatenate(rows, axis=pos)

    return kernel_fn


def _reduce_full(full: jax.Array, s1: str, s2: str, so: str) -> jax.Array:
    """Trace / diagonalize / interleave a full kernel of shape ``(*out1, *out2)``."""
    return jnp.einsum(f"{s1}{s2}->{so}", full)


def _kernel_shape(
    shape1: tuple[int, ...],
    shape2: tuple[int, ...],
    trace_axes: tuple[int, ...],
    diagonal_axes: tuple[int, ...],
) -> tuple[int, ...]:
    out: list[int] = []
    for a, (d1, d2) in enumerate(zip(shape1, shape2, strict=True)):
        if a in trace_axes:
            continue
        out += [d1] if a in diagonal_axes else [d1, d2]
    return tuple(out)


def _batch_size_of(x: PyTree, axis: int, name: str) -> int:
    sizes = {int(np.shape(leaf)[axis]) for leaf in jax.tree.leaves(x)}
    if len(sizes) != 1:
        raise ValueError(
            f"With `batch_size`, every leaf of `{name}` must have the same size along the "
            f"batch axis {axis}; got sizes {sorted(sizes)}."
        )
    return sizes.pop()


def _check_vmapped_sizes(
    x: PyTree, out: jax.ShapeDtypeStruct, x_axis: int, fx_axis: int, name: str
) -> None:
    sizes = {int(np.shape(leaf)[x_axis]) for leaf in jax.tree.leaves(x)}
    n_out = out.shape[fx_axis] if -len(out.shape) <= fx_axis < len(out.shape) else None
    if len(sizes) != 1 or n_out not in sizes:
        raise ValueError(
            f"`vmap_axes` declares axis {x_axis} of `{name}` and axis {fx_axis} of "
            f"`f(params, {name})` as the batch axis, but their sizes differ: inputs "
            f"{sorted(sizes)}, output shape {out.shape}."
        )


def _jacobian(
    f: Callable[..., Any],
    params: PyTree,
    x: PyTree,
    kw: dict[str, Any],
    vaxes: tuple[int, int, dict[str, int]] | None,
) -> PyTree:
    """Jacobian pytree of ``f(params, x)`` w.r.t. ``params``: leaves ``out + leaf`` shaped."""
    if vaxes is None:
        return jax.jacrev(lambda p: f(p, x, **kw))(params)
    x_axis, fx_axis, kw_axes = vaxes
    mapped = {k: v for k, v in kw.items() if k in kw_axes}
    fixed = {k: v for k, v in kw.items() if k not in kw_axes}

    def single(xi: PyTree, kwi: dict[str, Any]) -> PyTree:
        xe = jax.tree.map(lambda a: jnp.expand_dims(a, x_axis), xi)
        kwe = {k: jnp.expand_dims(v, kw_axes[k]) for k, v in kwi.items()}

        def g(p: PyTree) -> jax.Array:
            return jnp.squeeze(f(p, xe, **kwe, **fixed), axis=fx_axis)

        return jax.jacrev(g)(params)

    out_ndim = jax.eval_shape(lambda: f(params, x, **kw)).ndim
    fx = fx_axis % out_ndim
    return jax.vmap(
        single,
        in_axes=(x_axis, {k: kw_axes[k] for k in mapped}),
        out_axes=fx,
    )(x, mapped)
