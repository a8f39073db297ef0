"""Write ``src/ntkflow/_data/digits.npz`` from scikit-learn's bundled digits.

The optical-recognition handwritten digits (UCI, 1797 images of 8x8 pixels with
integer intensities 0-16, ten classes) ship inside scikit-learn, so this script
needs no network. scikit-learn is a development-only tool here: the package
itself only reads the ``.npz`` written below.

Run from the repository root::

    python scripts/make_digits_data.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / "src" / "ntkflow" / "_data" / "digits.npz"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the .npz to write")
    args = parser.parse_args(argv)

    from sklearn.datasets import load_digits  # development-only dependency

    digits = load_digits()
    x = np.asarray(digits.data)
    y = np.asarray(digits.target)
    if x.shape != (1797, 64) or y.shape != (1797,):
        raise ValueError(f"unexpected digits shapes: data {x.shape}, target {y.shape}")
    if x.min() < 0 or x.max() > 16 or not np.array_equal(x, np.round(x)):
        raise ValueError("digits pixels must be integers in [0, 16]")
    np.savez_compressed(args.output, x=x.astype(np.uint8), y=y.astype(np.int64))
    print(f"wrote {args.output}: x {x.shape} uint8 in [0, 16], y {y.shape} with classes "
          f"{sorted(set(y.tolist()))}")


if __name__ == "__main__":
    main()
