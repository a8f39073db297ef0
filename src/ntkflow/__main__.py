"""Command line: ``ntkflow demo`` (or ``python -m ntkflow demo``).

Example:
  >>> from ntkflow.__main__ import build_parser
  >>> args = build_parser().parse_args(["demo", "--width", "256", "--loss", "mse"])
  >>> args.command, args.width, args.loss, args.steps
  ('demo', 256, 'mse', 500)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from ntkflow._demo import LOSSES, DemoConfig, MissingDependencyError

_DEFAULTS = DemoConfig()

DEMO_DESCRIPTION = f"""\
Train a wide one-hidden-layer MLP on the 8x8 handwritten digits bundled with
ntkflow (full-batch gradient descent with optax), compute its empirical Neural
Tangent Kernel at initialization, and predict the whole training run from the
kernel alone with ntkflow.predict.gradient_descent (gradient flow) and, where
available, gradient_descent_discrete (exact discrete steps of the linearized
network). Prints a table of actual vs predicted train/test loss and test
accuracy at log-spaced steps, the largest gaps, and writes a PNG of the curves.

The defaults take about a minute or two on two CPU cores. The demo needs the
'demo' extra: pip install 'ntkflow[demo]' (optax, matplotlib, tqdm).
Set JAX_ENABLE_X64=1 to run in float64. Defaults: width {_DEFAULTS.width},
{_DEFAULTS.steps} steps, {_DEFAULTS.n_train} train / {_DEFAULTS.n_test} test digits.
"""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _momentum(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``ntkflow`` argument parser (subcommand ``demo``)."""
    parser = argparse.ArgumentParser(
        prog="ntkflow",
        description="ntkflow: predict the training dynamics of neural networks from their "
        "Neural Tangent Kernel.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    demo = sub.add_parser(
        "demo",
        help="train an MLP on digits and compare it with NTK predictions",
        description=DEMO_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = _DEFAULTS
    demo.add_argument("--width", type=_positive_int, default=d.width,
                      help=f"hidden-layer width of the MLP; wider networks follow their NTK "
                      f"more closely but take longer (default: {d.width})")
    demo.add_argument("--steps", type=_positive_int, default=d.steps,
                      help=f"number of full-batch gradient-descent steps (default: {d.steps})")
    lr = demo.add_mutually_exclusive_group()
    lr.add_argument("--lr-fraction", type=_positive_float, default=d.lr_fraction,
                    help="learning rate as a fraction of ntkflow.predict.max_learning_rate "
                    "of the kernel (the MSE stability bound, also used as a guide for "
                    f"cross-entropy) (default: {d.lr_fraction})")
    lr.add_argument("--lr", type=_positive_float, default=None,
                    help="absolute learning rate; overrides --lr-fraction")
    demo.add_argument("--loss", choices=LOSSES, default=d.loss,
                      help="training loss, averaged over examples and classes as in "
                      f"neural-tangents (default: {d.loss})")
    demo.add_argument("--momentum", type=_momentum, default=d.momentum,
                      help="heavy-ball momentum of optax.sgd in [0, 1); 0 is plain gradient "
                      f"descent (default: {d.momentum:g})")
    demo.add_argument("--n-train", type=_positive_int, default=d.n_train,
                      help=f"number of training digits (default: {d.n_train})")
    demo.add_argument("--n-test", type=_positive_int, default=d.n_test,
                      help=f"number of test digits, disjoint from the training ones "
                      f"(default: {d.n_test})")
    demo.add_argument("--seed", type=int, default=d.seed,
                      help=f"seed of the train/test split and the initialization "
                      f"(default: {d.seed})")
    demo.add_argument("--output", default=d.output, metavar="PNG",
                      help=f"where to write the plot (default: {d.output} in the current "
                      "directory)")
    demo.add_argument("--no-progress", action="store_true",
                      help="do not show progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ntkflow`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command != "demo":  # pragma: no cover - argparse enforces the choices
        return 2
    from ntkflow._demo import report, run_demo

    try:
        config = DemoConfig(
            width=args.width,
            steps=args.steps,
            lr_fraction=args.lr_fraction,
            learning_rate=args.lr,
            loss=args.loss,
            momentum=args.momentum,
            n_train=args.n_train,
            n_test=args.n_test,
            seed=args.seed,
            output=args.output,
            progress=not args.no_progress,
        )
    except ValueError as e:
        print(f"ntkflow demo: error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        result = run_demo(config)
    except MissingDependencyError as e:
        print(f"ntkflow demo: error: {e}", file=sys.stderr)
        return 1
    print()
    print(report(result))
    timings = ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items())
    print(f"\ntime: {time.perf_counter() - start:.1f} s ({timings})")
    if result.figure is not None:
        print(f"plot written to {result.figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
