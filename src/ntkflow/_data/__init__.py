"""Data bundled with ntkflow (see ``README.md`` in this folder for provenance)."""

from __future__ import annotations

import io
from importlib import resources

import numpy as np
from numpy.typing import DTypeLike

__all__ = ["load_digits"]


def load_digits(dtype: DTypeLike = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The 1797 8x8 handwritten digits bundled with ntkflow (UCI, via scikit-learn).

    Pixel intensities, integers in ``0..16`` on disk, are divided by 16, so
    the images lie in ``[0, 1]``. Nothing is downloaded.

    Args:
      dtype: floating dtype of the images.

    Returns:
      ``(x, y)``: images ``x`` of shape ``(1797, 64)`` (row-major 8x8) and
      ``dtype``, and integer labels ``y`` of shape ``(1797,)`` in ``0..9``.

    Example:
      >>> from ntkflow._data import load_digits
      >>> x, y = load_digits()
      >>> x.shape, x.dtype, float(x.min()), float(x.max()), y.shape, sorted(set(y.tolist()))
      ((1797, 64), dtype('float32'), 0.0, 1.0, (1797,), [0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    """
    if not np.issubdtype(np.dtype(dtype), np.floating):
        raise TypeError(f"`dtype` must be a floating dtype; got {dtype!r}.")
    raw = resources.files(__name__).joinpath("digits.npz").read_bytes()
    with np.load(io.BytesIO(raw)) as data:
        x = data["x"].astype(dtype) / np.asarray(16, dtype)
        y = data["y"].astype(np.int64)
    return x, y
