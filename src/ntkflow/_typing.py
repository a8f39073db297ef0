"""Shape-annotated array aliases used across ntkflow.

Conventions (jaxtyping dimension names):

* ``rows``: non-traced output entries of the training set, flattened;
* ``test_rows``: the same for the test set;
* ``traced``: entries along ``trace_axes``, flattened (1 when ``trace_axes=()``).
"""

from __future__ import annotations

from typing import Any, TypeAlias

import jax
import numpy as np
from jaxtyping import Array, ArrayLike, Float

#: An array or a Python/NumPy scalar, as accepted at the public boundary.
ArrayOrScalar: TypeAlias = ArrayLike
#: Flat train-train kernel ``K``.
FlatKernel: TypeAlias = Float[Array, "rows rows"]
#: Flat test-train kernel.
FlatTestKernel: TypeAlias = Float[Array, "test_rows rows"]
#: Flat outputs ``F`` (train).
FlatOutputs: TypeAlias = Float[Array, "rows traced"]
#: Flat outputs (test).
FlatTestOutputs: TypeAlias = Float[Array, "test_rows traced"]
#: Sorted, flattened times.
Times: TypeAlias = Float[Array, " times"]
PyTree: TypeAlias = Any


def is_concrete(*xs: Any) -> bool:
    """True if no argument is a JAX tracer (values can be inspected eagerly)."""
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(xs))


def float_dtype(*xs: Any, compute: bool = True) -> np.dtype:
    """The floating dtype JAX promotes ``xs`` to; for ``compute`` (the dtype a predictor
    computes in) at least single precision: half precisions (bfloat16, float16) compute
    in float32 (their ``eigh``, Cholesky factorization and solves do not exist, and their
    3 significant digits could not carry a solve). ``compute=False``: the inputs' own
    precision, which sets the tolerances of the checks on them."""
    dtype = np.dtype(jax.numpy.result_type(float, *[x for x in xs if x is not None]))
    return dtype if dtype.itemsize >= 4 or not compute else np.dtype(np.float32)
