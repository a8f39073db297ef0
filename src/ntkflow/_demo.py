r"""The ``ntkflow demo``: train a wide MLP on digits and compare with NTK predictions.

A wide network trained by gradient descent stays close to its linearization
around the initial parameters, whose training dynamics are fully determined by
the empirical Neural Tangent Kernel at initialization (Lee et al., 2019, "Wide
Neural Networks of Any Depth Evolve as Linear Models Under Gradient Descent").
The demo checks this on the 8x8 handwritten digits bundled with ntkflow:

1. a one-hidden-layer ReLU MLP in NTK parameterization,
   :math:`f(x) = \frac{1}{\sqrt{w}} W_2\, \mathrm{relu}\big(\frac{\sigma_w}{\sqrt{d}} W_1 x
   + \sigma_b b_1\big) + \sigma_b b_2` with standard normal weights, is trained
   with full-batch gradient descent (``optax.sgd``) for real;
2. its empirical NTK at initialization is computed with
   :func:`ntkflow.empirical_ntk_fn`;
3. :func:`ntkflow.predict.gradient_descent` (gradient flow, continuous time) and,
   where available, ``ntkflow.predict.gradient_descent_discrete`` (the exact
   discrete steps of the linearized network) predict the train and test
   outputs along training from the kernel alone;
4. losses and accuracies of the network and of the predictions are tabulated
   and plotted.

Losses follow neural-tangents' conventions, averaged over every output entry
(examples and classes): mean squared error ``0.5 * mean((f - y) ** 2)`` and
cross-entropy ``-mean(log_softmax(f) * y)`` (the usual per-example
cross-entropy divided by the number of classes).

Example:
  Run it from Python (``ntkflow demo`` does this and prints :func:`report`):

  >>> from ntkflow._demo import DemoConfig, record_steps, run_demo
  >>> config = DemoConfig(width=512, steps=100, output=None, progress=False)
  >>> result = run_demo(config, log=None)  # doctest: +SKIP
  >>> record_steps(100, 8).tolist()  # the steps at which the curves are recorded
  [0, 1, 2, 4, 7, 14, 27, 52, 100]
"""

from __future__ import annotations

import importlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

import ntkflow.predict
from ntkflow._data import load_digits
from ntkflow._empirical import empirical_ntk_fn

__all__ = ["DemoConfig", "DemoResult", "Curves", "MissingDependencyError", "run_demo", "report"]

LossName = Literal["cross_entropy", "mse"]
LOSSES: tuple[str, ...] = ("cross_entropy", "mse")
N_CLASSES = 10
N_DIGITS = 1797


class MissingDependencyError(ImportError):
    """A package of the ``demo`` extra is not installed."""


def _require(module: str, purpose: str) -> ModuleType:
    """Import ``module`` or explain how to install the ``demo`` extra."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(
            f"the ntkflow demo needs `{module}` for {purpose}, which is not installed. "
            "Install the demo extra: pip install 'ntkflow[demo]'"
        ) from e


@dataclass(frozen=True)
class DemoConfig:
    """Settings of :func:`run_demo` (the command-line flags of ``ntkflow demo``).

    Attributes:
      width: hidden-layer width of the MLP.
      steps: number of full-batch gradient-descent steps.
      lr_fraction: learning rate as a fraction of
        :func:`ntkflow.predict.max_learning_rate` (the MSE stability bound
        :math:`2 (1 + m)\\,\\text{size} / \\lambda_{\\max}(K)`, also used as a
        guide for cross-entropy, whose curvature is at most half that of MSE).
      learning_rate: absolute learning rate; overrides ``lr_fraction``.
      loss: ``"cross_entropy"`` or ``"mse"``.
      momentum: heavy-ball momentum of ``optax.sgd`` (``0``: plain GD).
      n_train: number of training digits.
      n_test: number of test digits (disjoint from the training ones).
      seed: seed of the split and of the initialization.
      n_records: about this many log-spaced steps are recorded.
      output: path of the PNG to write, or ``None`` for no plot.
      progress: show progress bars.
      ntk_batch_size: examples per block when computing the kernel.
    """

    width: int = 1024
    steps: int = 1000
    lr_fraction: float = 0.5
    learning_rate: float | None = None
    loss: LossName = "cross_entropy"
    momentum: float = 0.0
    n_train: int = 256
    n_test: int = 512
    seed: int = 0
    n_records: int = 30
    output: str | None = "ntkflow-demo.png"
    progress: bool = True
    ntk_batch_size: int = 128

    def __post_init__(self) -> None:
        def positive_int(name: str) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {v!r}.")

        for name in ("width", "steps", "n_train", "n_test", "n_records", "ntk_batch_size"):
            positive_int(name)
        if self.n_train + self.n_test > N_DIGITS:
            raise ValueError(
                f"`n_train + n_test` must be at most {N_DIGITS} (the number of digits); got "
                f"n_train={self.n_train} and n_test={self.n_test}."
            )
        if self.loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {LOSSES}; got {self.loss!r}.")
        if not (isinstance(self.lr_fraction, (int, float)) and self.lr_fraction > 0):
            raise ValueError(f"`lr_fraction` must be a positive number; got {self.lr_fraction!r}.")
        if self.learning_rate is not None and not (
            isinstance(self.learning_rate, (int, float)) and self.learning_rate > 0
        ):
            raise ValueError(
                f"`learning_rate` must be None or a positive number; got {self.learning_rate!r}."
            )
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            raise ValueError(f"`momentum` must be a number in [0, 1); got {self.momentum!r}.")


@dataclass
class Curves:
    """Loss and accuracy on the train and test sets at the recorded steps."""

    train_loss: np.ndarray
    test_loss: np.ndarray
    train_accuracy: np.ndarray
    test_accuracy: np.ndarray

    FIELDS = ("train_loss", "test_loss", "train_accuracy", "test_accuracy")


@dataclass
class DemoResult:
    """What :func:`run_demo` measured.

    Attributes:
      config: the settings used.
      steps: the recorded steps (integers, from 0 to ``config.steps``).
      learning_rate: the learning rate used.
      max_learning_rate: :func:`ntkflow.predict.max_learning_rate` of the kernel.
      network: curves of the trained network.
      predictions: curves predicted from the NTK, by predictor name
        (``"gradient_descent"``, and ``"gradient_descent_discrete"`` when
        available).
      timings: wall-clock seconds of each phase.
      figure: path of the PNG written, or ``None``.
    """

    config: DemoConfig
    steps: np.ndarray
    learning_rate: float
    max_learning_rate: float
    network: Curves
    predictions: dict[str, Curves]
    timings: dict[str, float] = field(default_factory=dict)
    figure: str | None = None


# --------------------------------------------------------------------------- #
# Model, data, losses.                                                        #
# --------------------------------------------------------------------------- #

W_STD = math.sqrt(2.0)  # He-like scale for the ReLU layer
B_STD = 0.1


def init_params(
    key: jax.Array, d_in: int, width: int, d_out: int, dtype: Any = jnp.float32
) -> dict[str, jax.Array]:
    """Standard normal weights and biases (the scales live in :func:`apply`).

    Drawn in float32 and cast to ``dtype``, so that float32 and float64 runs
    start from the same network.
    """
    k1, k2, k3, k4 = jax.random.split(key, 4)
    params = {
        "w1": jax.random.normal(k1, (d_in, width), jnp.float32),
        "b1": jax.random.normal(k2, (width,), jnp.float32),
        "w2": jax.random.normal(k3, (width, d_out), jnp.float32),
        "b2": jax.random.normal(k4, (d_out,), jnp.float32),
    }
    return jax.tree.map(lambda a: a.astype(dtype), params)


def apply(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    r"""The MLP in NTK parameterization: logits of shape ``(n, d_out)``."""
    d_in, width = params["w1"].shape
    h = jax.nn.relu(W_STD * x @ params["w1"] / math.sqrt(d_in) + B_STD * params["b1"])
    return h @ params["w2"] / math.sqrt(width) + B_STD * params["b2"]


def mse(fx: jax.Array, y: jax.Array) -> jax.Array:
    """``0.5 * mean((fx - y) ** 2)`` over all entries (neural-tangents' convention)."""
    return 0.5 * jnp.mean((fx - y) ** 2)


def cross_entropy(fx: jax.Array, y: jax.Array) -> jax.Array:
    """``-mean(log_softmax(fx) * y)`` over all entries (neural-tangents' convention)."""
    return -jnp.mean(jax.nn.log_softmax(fx, axis=-1) * y)


LOSS_FNS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "cross_entropy": cross_entropy,
    "mse": mse,
}


def accuracy(fx: Any, y: Any) -> Any:
    """Fraction of rows whose largest output is the labelled class."""
    return jnp.mean(jnp.argmax(fx, axis=-1) == jnp.argmax(y, axis=-1))


def load_split(
    n_train: int, n_test: int, seed: int, dtype: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Disjoint random train / test digits, standardized with train statistics.

    Targets are one-hot; for MSE they are centred (``one_hot - 1/10``) so that
    the zero function is the natural starting point, as in neural-tangents'
    examples. Returned as ``x_train, y_train, x_test, y_test``.
    """
    x, labels = load_digits(np.float64)
    perm = np.random.default_rng(seed).permutation(len(x))
    train, test = perm[:n_train], perm[n_train : n_train + n_test]
    mean, std = x[train].mean(0), x[train].std(0)
    std = np.where(std > 0, std, 1.0)
    x = (x - mean) / std
    y = np.eye(N_CLASSES)[labels]
    return (
        x[train].astype(dtype),
        y[train].astype(dtype),
        x[test].astype(dtype),
        y[test].astype(dtype),
    )


def record_steps(steps: int, n_records: int) -> np.ndarray:
    """0 and about ``n_records`` log-spaced integer steps up to ``steps``."""
    grid = np.unique(np.round(np.logspace(0, np.log10(steps), n_records)).astype(np.int64))
    return np.concatenate([[0], grid[grid >= 1]]).astype(np.int64)


# --------------------------------------------------------------------------- #
# The run.                                                                    #
# --------------------------------------------------------------------------- #


def _curves(
    loss: Callable[[Any, Any], Any],
    fx_train: Any,
    fx_test: Any,
    y_train: Any,
    y_test: Any,
) -> Curves:
    """Curves from outputs with a leading time axis."""
    per_t = jax.vmap(lambda ftr, fte: (loss(ftr, y_train), loss(fte, y_test),
                                       accuracy(ftr, y_train), accuracy(fte, y_test)))
    values = [np.asarray(v, np.float64) for v in per_t(jnp.asarray(fx_train),
                                                       jnp.asarray(fx_test))]
    return Curves(*values)


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    tqdm = _require("tqdm", "progress bars (or pass --no-progress)")
    return tqdm.tqdm(total=total, desc=desc, unit="step" if desc == "training" else "chunk",
                     leave=True, dynamic_ncols=True)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def run_demo(config: DemoConfig, log: Callable[[str], None] | None = print) -> DemoResult:
    """Train the MLP, compute its NTK, predict training from it, plot.

    Args:
      config: the settings (see :class:`DemoConfig`).
      log: called with progress messages; ``None`` for silence.

    Returns:
      A :class:`DemoResult` with the curves of the network and of the predictions.

    Raises:
      MissingDependencyError: if optax (always), tqdm (with progress bars) or
        matplotlib (with an ``output``) is missing.
    """
    if not isinstance(config, DemoConfig):
        raise TypeError(f"`config` must be a DemoConfig; got {type(config).__name__}.")
    say: Callable[[str], None] = log if log is not None else (lambda _: None)
    optax = _require("optax", "training the network")
    # Fail before the long computations if the plot or the bars cannot be made.
    if config.output is not None:
        _require("matplotlib", "the plot (or pass an output of None)")
    if config.progress:
        _require("tqdm", "progress bars (or pass --no-progress)")
    cfg = config
    timings: dict[str, float] = {}
    dtype = jnp.zeros(()).dtype  # float32, or float64 with JAX_ENABLE_X64
    loss = LOSS_FNS[cfg.loss]
    momentum = cfg.momentum if cfg.momentum > 0 else None

    x_train, y_train, x_test, y_test = (
        jnp.asarray(a) for a in load_split(cfg.n_train, cfg.n_test, cfg.seed, dtype)
    )
    params0 = init_params(
        jax.random.PRNGKey(cfg.seed), x_train.shape[1], cfg.width, N_CLASSES, dtype
    )
    n_params = sum(a.size for a in jax.tree.leaves(params0))
    say(
        f"digits: {cfg.n_train} train / {cfg.n_test} test, 10 classes; MLP 64-{cfg.width}-10 "
        f"(ReLU, NTK parameterization, {n_params:,} parameters), loss {cfg.loss}, {dtype.name}"
    )

    # 1. Empirical NTK at initialization. trace_axes=(-1,): for a wide network
    # the kernel between logits c and c' is close to delta_{cc'} Theta (the
    # off-diagonal blocks vanish and the diagonal ones agree as width -> inf),
    # so the traced (n, n) kernel, read as Theta (x) I_10, captures the
    # dynamics while costing 10x less memory than the full (n, n, 10, 10) one.
    t0 = time.perf_counter()
    kernel_fn = empirical_ntk_fn(
        apply, trace_axes=(-1,), vmap_axes=0, implementation="jacobian",
        batch_size=cfg.ntk_batch_size,
    )
    k_train_train = kernel_fn(x_train, None, params0)
    k_test_train = kernel_fn(x_test, x_train, params0)
    k_train_train.block_until_ready()
    k_test_train.block_until_ready()
    timings["ntk"] = time.perf_counter() - t0
    say(f"empirical NTK: train-train {tuple(k_train_train.shape)}, test-train "
        f"{tuple(k_test_train.shape)} in {timings['ntk']:.1f} s")

    # 2. Learning rate from the kernel's stability bound.
    max_lr = float(ntkflow.predict.max_learning_rate(
        k_train_train, y_train_size=y_train.size, momentum=cfg.momentum
    ))
    lr = float(cfg.learning_rate) if cfg.learning_rate is not None else cfg.lr_fraction * max_lr
    bound = "MSE bound" + (", a conservative guide for cross-entropy" if cfg.loss ==
                           "cross_entropy" else "")
    say(f"learning rate {lr:.4g} = {lr / max_lr:.3g} x max_learning_rate {max_lr:.4g} ({bound})"
        + (f", momentum {cfg.momentum}" if momentum else ""))

    # 3. Train the network for real.
    steps = record_steps(cfg.steps, cfg.n_records)
    t0 = time.perf_counter()
    optimizer = optax.sgd(lr, momentum=momentum)

    @jax.jit
    def train_step(params: Any, opt_state: Any) -> tuple[Any, Any]:
        grads = jax.grad(lambda p: loss(apply(p, x_train), y_train))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def outputs(params: Any) -> tuple[jax.Array, jax.Array]:
        return apply(params, x_train), apply(params, x_test)

    params, opt_state = params0, optimizer.init(params0)
    fx_train_0, fx_test_0 = outputs(params0)
    net_train, net_test = [fx_train_0], [fx_test_0]
    bar = _progress(cfg.steps, "training", cfg.progress)
    for step in range(1, cfg.steps + 1):
        params, opt_state = train_step(params, opt_state)
        bar.update()
        if step in steps:
            ftr, fte = outputs(params)
            net_train.append(ftr)
            net_test.append(fte)
    bar.close()
    network = _curves(loss, jnp.stack(net_train), jnp.stack(net_test), y_train, y_test)
    timings["training"] = time.perf_counter() - t0

    # 4. Predict from the kernel. gradient_descent is gradient *flow*; its time
    # is measured in steps (absolute time = learning_rate * t), so t = step.
    t0 = time.perf_counter()
    predictions: dict[str, Curves] = {}
    discrete = getattr(ntkflow.predict, "gradient_descent_discrete", None)
    chunk = 5
    n_chunks = math.ceil((len(steps) - 1) / chunk)
    bar = _progress(n_chunks + (discrete is not None), "NTK prediction", cfg.progress)
    predict_fn = ntkflow.predict.gradient_descent(
        loss, k_train_train, y_train, lr, momentum=momentum, trace_axes=(-1,)
    )
    # Integrate chunk by chunk, resuming from the state at the end of the
    # previous chunk (equal-length chunks reuse one compiled solve).
    state = ntkflow.predict.ODEState(fx_train_0, fx_test_0)
    pred_train, pred_test = [fx_train_0], [fx_test_0]
    start = 0
    for c in range(n_chunks):
        times = steps[1 + c * chunk : 1 + (c + 1) * chunk]
        times = np.concatenate([times, np.full(chunk - len(times), times[-1])])
        out = predict_fn(times - start, state, None, k_test_train)
        keep = min(chunk, len(steps) - 1 - c * chunk)
        pred_train += list(out.fx_train[:keep])
        pred_test += list(out.fx_test[:keep])
        state = jax.tree.map(lambda a: a[-1], out)
        start = int(times[-1])
        bar.update()
    predictions["gradient_descent"] = _curves(
        loss, jnp.stack(pred_train), jnp.stack(pred_test), y_train, y_test
    )
    if discrete is not None:
        predict_discrete = discrete(
            loss, k_train_train, y_train, learning_rate=lr, momentum=momentum,
            trace_axes=(-1,),
        )
        ftr, fte = predict_discrete(jnp.asarray(steps), fx_train_0, fx_test_0, k_test_train)
        predictions["gradient_descent_discrete"] = _curves(loss, ftr, fte, y_train, y_test)
        bar.update()
    bar.close()
    timings["prediction"] = time.perf_counter() - t0

    result = DemoResult(
        config=cfg,
        steps=steps,
        learning_rate=lr,
        max_learning_rate=max_lr,
        network=network,
        predictions=predictions,
        timings=timings,
    )
    if cfg.output is not None:
        t0 = time.perf_counter()
        result.figure = str(plot(result, cfg.output))
        timings["plot"] = time.perf_counter() - t0
    return result


# --------------------------------------------------------------------------- #
# Report and plot.                                                            #
# --------------------------------------------------------------------------- #

_SHORT = {"gradient_descent": "flow", "gradient_descent_discrete": "discrete"}


def max_gaps(result: DemoResult) -> dict[str, dict[str, tuple[float, int]]]:
    """Largest ``|network - prediction|`` and its step, per predictor and curve."""
    gaps: dict[str, dict[str, tuple[float, int]]] = {}
    for name, curves in result.predictions.items():
        gaps[name] = {}
        for fld in Curves.FIELDS:
            diff = np.abs(getattr(result.network, fld) - getattr(curves, fld))
            i = int(np.argmax(diff))
            gaps[name][fld] = (float(diff[i]), int(result.steps[i]))
    return gaps


def report(result: DemoResult) -> str:
    """The table of the curves and the largest gaps, as text."""
    names = list(result.predictions)
    heads = ["net"] + [_SHORT.get(n, n) for n in names]
    sources = [result.network] + [result.predictions[n] for n in names]
    groups = [("train loss", "train_loss", "{:.4f}"), ("test loss", "test_loss", "{:.4f}"),
              ("test accuracy", "test_accuracy", "{:.3f}")]
    col = 9
    group_w = len(heads) * (col + 1) - 1
    line1 = f"{'step':>6} | " + " | ".join(f"{g[0]:^{group_w}}" for g in groups)
    line2 = f"{'':>6} | " + " | ".join(" ".join(f"{h:>{col}}" for h in heads) for _ in groups)
    rows = [line1, line2, "-" * len(line2)]
    for i, step in enumerate(result.steps):
        cells = []
        for _, fld, fmt in groups:
            cells.append(" ".join(f"{fmt.format(getattr(s, fld)[i]):>{col}}" for s in sources))
        rows.append(f"{int(step):>6} | " + " | ".join(cells))
    rows.append("")
    rows.append("largest |network - prediction| over the recorded steps:")
    for name, per in max_gaps(result).items():
        parts = [f"{fld.replace('_', ' ')} {gap:.4f} (step {step})"
                 for fld, (gap, step) in per.items()]
        rows.append(f"  {name}: " + "; ".join(parts))
    return "\n".join(rows)


def plot(result: DemoResult, path: str | Path) -> Path:
    """Write the curves (network vs predictions, log-scaled steps) to a PNG."""
    _require("matplotlib", "the plot (or pass an output of None)")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    fig = Figure(figsize=(11, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    styles = {"gradient_descent": "--", "gradient_descent_discrete": ":"}
    labels = {"gradient_descent": "NTK prediction, gradient flow",
              "gradient_descent_discrete": "NTK prediction, discrete steps"}
    panels = [("train_loss", "train loss"), ("test_loss", "test loss"),
              ("train_accuracy", "train accuracy"), ("test_accuracy", "test accuracy")]
    x = result.steps
    for ax, (fld, title) in zip(axes.flat, panels, strict=True):
        ax.plot(x, getattr(result.network, fld), "-", color="black", lw=2.2,
                label="trained network")
        for i, (name, curves) in enumerate(result.predictions.items()):
            ax.plot(x, getattr(curves, fld), styles.get(name, "-."), color=f"C{i}", lw=1.8,
                    label=labels.get(name, name))
        ax.set_xscale("symlog", linthresh=1.0)
        ax.set_xlim(0, max(1, int(x[-1])))
        ax.set_xlabel("gradient-descent step")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        if fld.endswith("loss"):
            ax.set_ylabel(_loss_label(result.config.loss))
        else:
            ax.set_ylabel("accuracy")
    axes[0, 0].legend()
    cfg = result.config
    fig.suptitle(
        f"Digits, MLP width {cfg.width}, {cfg.loss.replace('_', '-')}, "
        f"lr {result.learning_rate:.3g} "
        f"({result.learning_rate / result.max_learning_rate:.2g} x max), "
        f"momentum {cfg.momentum:g}, {cfg.n_train} train / {cfg.n_test} test"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _loss_label(loss: str) -> str:
    return "cross-entropy / 10" if loss == "cross_entropy" else "0.5 * mean squared error"
