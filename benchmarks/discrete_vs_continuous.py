"""How far is continuous-time (gradient-flow) prediction from the real discrete steps?

For the exact empirical NTK of a small MLP (MSE loss, full batch, 50 steps), this
compares the continuous-time prediction with the exact discrete-time one from
``ntkflow`` at learning rates that are fractions of the maximal stable learning rate
``2 * (1 + m) * y.size / lambda_max(K)``, for plain gradient descent and for momentum
``m = 0.9``. The continuous predictions are computed here in closed form from
``numpy.linalg.eigh``, so the script stands alone:

* gradient flow: ``f(t) = y + V exp(-lr * t * Lambda / n) V^T (f_0 - y)`` with ``t`` the
  step count and ``n = y.size``;
* momentum: neural-tangents' continuous heavy-ball ODE in units of ``sqrt(lr)``,
  ``f'' = -K (f - y) / n + ((m - 1) / sqrt(lr)) f'`` with ``f'(0) = 0`` and
  ``tau = sqrt(lr) * steps``, solved per eigenvalue (a damped oscillator).

The discrete predictions come from ``ntkflow._discrete.gradient_descent_mse_discrete``
(cross-checked against the step-by-step ``gradient_descent_discrete``). Reported, for
the training-set outputs: the largest error over steps 0..50 relative to the largest
change ``|f_s - f_0|`` made by training, and the same ratio at step 50.

Run: ``python benchmarks/discrete_vs_continuous.py`` (prints a markdown table).
"""

from __future__ import annotations

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from ntkflow._discrete import (  # noqa: E402
    gradient_descent_discrete,
    gradient_descent_mse_discrete,
)

N_TRAIN, D_IN, HIDDEN, N_OUT = 16, 8, 128, 4
STEPS = 50
FRACTIONS = (1e-3, 1e-2, 0.1, 0.5, 0.95)
MOMENTA = (None, 0.9)


def mlp_ntk() -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Exact NTK (trace_axes=()) of a 2-hidden-layer tanh MLP at initialization."""
    key = jax.random.PRNGKey(0)
    kx, ky, kp = jax.random.split(key, 3)
    x = jax.random.normal(kx, (N_TRAIN, D_IN))
    y = jax.nn.one_hot(jax.random.randint(ky, (N_TRAIN,), 0, N_OUT), N_OUT)
    sizes = [D_IN, HIDDEN, HIDDEN, N_OUT]
    params = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        kw, kb = jax.random.split(jax.random.fold_in(kp, i))
        params.append((jax.random.normal(kw, (a, b)), jax.random.normal(kb, (b,))))
    p0, unravel = ravel_pytree(params)

    def apply(p: jax.Array) -> jax.Array:
        h = x
        layers = unravel(p)
        for i, (w, b) in enumerate(layers):
            h = h @ w / np.sqrt(w.shape[0]) + 0.1 * b
            if i < len(layers) - 1:
                h = jnp.tanh(h)
        return h

    jac = jax.jacobian(apply)(p0).reshape(N_TRAIN * N_OUT, -1)
    k2d = np.asarray(jac @ jac.T)  # rows ordered (sample, output)
    return k2d, np.asarray(y), np.asarray(apply(p0)), int(p0.size)


def gradient_flow(k2d: np.ndarray, y: np.ndarray, f0: np.ndarray, lr: float,
                  steps: np.ndarray) -> np.ndarray:
    lam, v = np.linalg.eigh(k2d)
    lam = np.maximum(lam, 0.0)
    e0 = v.T @ (f0 - y).reshape(-1)
    decay = np.exp(-lr * steps[:, None] * lam[None] / y.size)
    return y.reshape(-1) + (decay * e0) @ v.T


def heavy_ball_ode(k2d: np.ndarray, y: np.ndarray, f0: np.ndarray, lr: float,
                   momentum: float, steps: np.ndarray) -> np.ndarray:
    """neural-tangents' momentum ODE, per eigenvalue: e'' = -a e + c e', e'(0) = 0.

    With mu = c / 2 and d = sqrt(mu^2 - a) (complex when under-damped):
    e(tau) = exp(mu tau) [cosh(d tau) - mu sinh(d tau) / d] e(0).
    """
    lam, v = np.linalg.eigh(k2d)
    a = np.maximum(lam, 0.0) / y.size
    c = (momentum - 1.0) / np.sqrt(lr)
    tau = np.sqrt(lr) * steps[:, None].astype(np.float64)
    mu = c / 2
    d = np.sqrt(mu**2 - a + 0j)[None]
    x = d * tau
    small = np.abs(x) < 1e-8
    sinh_over_d = np.where(small, tau, np.sinh(x) / np.where(small, 1.0, d))
    factor = np.exp(mu * tau) * (np.cosh(x) - mu * sinh_over_d)
    e0 = v.T @ (f0 - y).reshape(-1)
    return y.reshape(-1) + (factor.real * e0) @ v.T


def main() -> None:
    k2d, y, f0, n_params = mlp_ntk()
    k = k2d.reshape(N_TRAIN, N_OUT, N_TRAIN, N_OUT).transpose(0, 2, 1, 3)  # interleaved
    lam_max = float(np.linalg.eigvalsh(k2d)[-1])
    steps = np.arange(STEPS + 1)
    mse = lambda f, t: 0.5 * jnp.mean((f - t) ** 2)  # noqa: E731

    rows = []
    for momentum in MOMENTA:
        m = 0.0 if momentum is None else momentum
        lr_max = 2 * (1 + m) * y.size / lam_max
        for frac in FRACTIONS:
            lr = frac * lr_max
            discrete = gradient_descent_mse_discrete(k, y, lr, momentum, trace_axes=())
            f_disc = np.asarray(discrete(steps, f0)).reshape(len(steps), -1)
            loop = gradient_descent_discrete(mse, k, y, lr, momentum, trace_axes=())
            f_loop = np.asarray(loop(steps, f0)).reshape(len(steps), -1)
            closed_vs_loop = np.abs(f_disc - f_loop).max() / np.abs(f_loop).max()
            assert closed_vs_loop < 1e-9, closed_vs_loop
            if momentum is None:
                f_cont = gradient_flow(k2d, y, f0, lr, steps)
            else:
                f_cont = heavy_ball_ode(k2d, y, f0, lr, momentum, steps)
            err = np.linalg.norm(f_cont - f_disc, axis=1)  # per step
            change = np.linalg.norm(f_disc - f_disc[0], axis=1)
            rows.append(
                (
                    "none" if momentum is None else f"{momentum}",
                    frac,
                    lr,
                    err.max() / change.max(),
                    err[-1] / change[-1],
                )
            )

    print(
        f"Continuous-time vs exact discrete predictions: MLP {D_IN}-{HIDDEN}-{HIDDEN}-{N_OUT} "
        f"({n_params} parameters), exact NTK on {N_TRAIN} samples (trace_axes=()), MSE, "
        f"training-set outputs over {STEPS} steps; lambda_max = {lam_max:.4g}, "
        f"y.size = {y.size}. err(s) = |f_cont(s) - f_disc(s)|, change(s) = "
        "|f_disc(s) - f_0| (Euclidean norms over all outputs).\n"
    )
    print("| momentum | lr / max_lr | learning rate | max_s err(s) / max_s change(s) "
          "| err(50) / change(50) |")
    print("|---|---|---|---|---|")
    for momentum, frac, lr, rel_change, rel_out in rows:
        print(f"| {momentum} | {frac:g} | {lr:.4g} | {rel_change:.2e} | {rel_out:.2e} |")


if __name__ == "__main__":
    main()
