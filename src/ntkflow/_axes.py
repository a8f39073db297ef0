"""Kernel and output axes, handled once at the public boundary.

neural-tangents stores a kernel over outputs of shape ``y.shape`` with the
``trace_axes`` pairs removed and the remaining axes *interleaved*: for outputs
of shape ``(n, a, k)`` with ``trace_axes=(-1,)`` the kernel has shape
``(n, n, a, a)`` and is read as ``Theta (x) I_k``.

Inside ntkflow every computation works on flat 2-D arrays instead:

* outputs ``f`` become ``F`` of shape ``(rows, traced)``, where ``rows`` is the
  product of the non-traced sizes and ``traced`` the product of the traced
  sizes;
* a kernel becomes a matrix ``K`` of shape ``(rows_1, rows_2)``.

Then ``Theta (x) I`` acting on ``f`` is simply ``K @ F``. The functions here
convert in both directions and check shapes on the way in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

__all__ = [
    "Layout",
    "canonicalize_trace_axes",
    "make_layout",
    "kernel_to_2d",
    "outputs_to_2d",
    "outputs_from_2d",
]


def canonicalize_trace_axes(trace_axes: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    """Sorted, non-negative ``trace_axes`` for outputs of rank ``ndim``.

    Raises ``ValueError`` for out-of-range or duplicated axes (after wrapping
    negative ones), ``TypeError`` for non-integers.
    """
    axes = (trace_axes,) if isinstance(trace_axes, (int, np.integer)) else tuple(trace_axes)
    out = []
    for a in axes:
        if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
            raise TypeError(
                f"`trace_axes` must be an int or a sequence of ints; got {trace_axes!r}."
            )
        if not -ndim <= a < ndim:
            raise ValueError(
                f"`trace_axes` entry {a} is out of range for `y_train` with {ndim} "
                f"dimension(s); got trace_axes={trace_axes!r}."
            )
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(
            f"`trace_axes` contains the same axis twice (after wrapping negative axes "
            f"for `y_train` with {ndim} dimension(s)); got trace_axes={trace_axes!r}."
        )
    return tuple(sorted(out))


class Layout(NamedTuple):
    """Static description of how outputs map to the flat ``(rows, traced)`` view.

    Attributes:
      trace_axes: canonical (sorted, non-negative) traced axes of the outputs.
      traced_shape: sizes of the outputs along ``trace_axes``.
      ndim: rank of the outputs (without leading time axes).
    """

    trace_axes: tuple[int, ...]
    traced_shape: tuple[int, ...]
    ndim: int

    @property
    def non_trace_axes(self) -> tuple[int, ...]:
        return tuple(a for a in range(self.ndim) if a not in self.trace_axes)

    @property
    def traced(self) -> int:
        return math.prod(self.traced_shape)

    def output_shape(self, rows_shape: Sequence[int]) -> tuple[int, ...]:
        """Full output shape whose non-traced sizes are ``rows_shape``."""
        shape: list[int] = list(rows_shape)
        for axis, size in zip(self.trace_axes, self.traced_shape, strict=True):
            shape.insert(axis, size)
        return tuple(shape)

    def rows_shape(self, output_shape: Sequence[int]) -> tuple[int, ...]:
        """Non-traced sizes of an output of shape ``output_shape``."""
        return tuple(output_shape[a] for a in self.non_trace_axes)


def make_layout(y_shape: Sequence[int], trace_axes: int | Sequence[int]) -> Layout:
    """The :class:`Layout` of outputs shaped like ``y_shape``."""
    ndim = len(y_shape)
    axes = canonicalize_trace_axes(trace_axes, ndim)
    return Layout(axes, tuple(int(y_shape[a]) for a in axes), ndim)


def kernel_rows_shapes(
    kernel_shape: Sequence[int], name: str, expected_first: Sequence[int] | None,
    expected_second: Sequence[int], layout: Layout,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Check an interleaved kernel shape and return its two row shapes.

    ``kernel_shape`` must be ``(a1, b1, a2, b2, ...)`` with ``(a1, a2, ...)``
    equal to ``expected_first`` (if given) and ``(b1, b2, ...)`` equal to
    ``expected_second``.
    """
    n_rows = layout.ndim - len(layout.trace_axes)
    kernel_shape = tuple(int(s) for s in kernel_shape)
    first, second = kernel_shape[0::2], kernel_shape[1::2]
    ok = len(kernel_shape) == 2 * n_rows and tuple(second) == tuple(expected_second)
    if expected_first is not None:
        ok = ok and tuple(first) == tuple(expected_first)
    if not ok:
        want_first = (
            "(..)" if expected_first is None else tuple(int(s) for s in expected_first)
        )
        raise ValueError(
            f"`{name}` must have the interleaved shape zip({want_first}, "
            f"{tuple(expected_second)}) (the non-traced axes of the outputs, with the "
            f"trace_axes={layout.trace_axes} pairs removed), i.e. rank {2 * n_rows}; "
            f"got shape {kernel_shape}."
        )
    return tuple(first), tuple(second)


def kernel_to_2d(kernel: jnp.ndarray) -> jnp.ndarray:
    """Interleaved kernel ``(a1, b1, a2, b2, ...)`` to a matrix ``(a1*a2*.., b1*b2*..)``."""
    kernel = jnp.asarray(kernel)
    nd = kernel.ndim
    perm = tuple(range(0, nd, 2)) + tuple(range(1, nd, 2))
    first = math.prod(kernel.shape[0::2])
    second = math.prod(kernel.shape[1::2])
    return jnp.transpose(kernel, perm).reshape(first, second)


def outputs_to_2d(f: jnp.ndarray, layout: Layout, lead: int = 0) -> jnp.ndarray:
    """Outputs ``(*lead, *output_shape)`` to ``(*lead, rows, traced)``.

    ``lead`` counts leading (e.g. time) axes that are kept in front.
    """
    f = jnp.asarray(f)
    lead_axes = tuple(range(lead))
    perm = (
        lead_axes
        + tuple(lead + a for a in layout.non_trace_axes)
        + tuple(lead + a for a in layout.trace_axes)
    )
    f = jnp.transpose(f, perm)
    return f.reshape(f.shape[:lead] + (-1, layout.traced))


def outputs_from_2d(
    f2d: jnp.ndarray, layout: Layout, rows_shape: Sequence[int]
) -> jnp.ndarray:
    """Inverse of :func:`outputs_to_2d`: ``(*lead, rows, traced)`` to outputs."""
    lead_shape = f2d.shape[:-2]
    lead = len(lead_shape)
    f = f2d.reshape(lead_shape + tuple(rows_shape) + tuple(layout.traced_shape))
    # Axis order now: lead, non-traced, traced. Move back to the original order.
    src_order = layout.non_trace_axes + layout.trace_axes
    inv = [0] * layout.ndim
    for pos, axis in enumerate(src_order):
        inv[axis] = pos
    perm = tuple(range(lead)) + tuple(lead + p for p in inv)
    return jnp.transpose(f, perm)
