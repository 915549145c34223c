"""Hi-DLR on the paper's two toy functions (Figure 2), as a printed table.

Runs in seconds on a CPU::

    python examples/demo.py

Both problems are minimised by gradient descent for 100 iterations from the
paper's starting points, with one learning-rate group per coordinate
(Hi-DLR), one group for both (Hi-ULR, i.e. GeN), and the best fixed uniform
rate of the paper's grid ``{1e-5 * 10^(k/2), k = 0..11}``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hidlr_optax

Params = dict[str, jax.Array]


def ellipse(p: Params) -> jax.Array:
  """``x^2 + 100 y^2``; minimum 0 at (0, 0)."""
  return p["x"] ** 2 + 100 * p["y"] ** 2


def beale(x: jax.Array, y: jax.Array) -> jax.Array:
  return (
      (1.5 - x + x * y) ** 2
      + (2.25 - x + x * y**2) ** 2
      + (2.625 - x + x * y**3) ** 2
  )


def rosenbrock(x: jax.Array, y: jax.Array) -> jax.Array:
  return 100 * (y - x**2) ** 2 + (1 - x) ** 2


def beale_rosenbrock(p: Params) -> jax.Array:
  """``Beale(x, 0.5) + Rosenbrock(1, y)``; minimum at (3, 1)."""
  return beale(p["x"], 0.5) + rosenbrock(1.0, p["y"])


PROBLEMS: dict[str, tuple[Callable[[Params], jax.Array], Params]] = {
    "ellipse": (ellipse, {"x": 50.0, "y": 1.0}),
    "beale+rosenbrock": (beale_rosenbrock, {"x": 4.0, "y": 3.0}),
}
UNIFORM_GRID = tuple(1e-5 * 10 ** (k / 2) for k in range(12))
PER_COORDINATE = {"x": "x", "y": "y"}


def run(tx: optax.GradientTransformation, loss: Callable, start: Params, steps: int):
  """Gradient descent with ``tx``; returns the loss after every step and the state.

  Full batch: the probes see the gradient's batch (``probe="same"``), here
  the whole function, an empty batch ``()``.
  """
  params = {k: jnp.asarray(v, jnp.float32) for k, v in start.items()}
  train_step = hidlr_optax.make_train_step(lambda p, _: loss(p), tx, probe="same")

  def step(carry, _):
    params, state, _ = train_step(*carry, ())
    return (params, state), loss(params)

  (_, state), losses = jax.jit(
      lambda c: jax.lax.scan(step, c, length=steps)
  )((params, tx.init(params)))
  return np.asarray(losses), state


def best_uniform(loss: Callable, start: Params, steps: int) -> tuple[float, float]:
  """Best final loss over the grid of fixed rates, and the rate that gave it."""
  finals = []
  for lr in UNIFORM_GRID:
    losses, _ = run(optax.sgd(lr), loss, start, steps)
    finals.append(losses[-1] if np.isfinite(losses[-1]) else np.inf)
  best = int(np.argmin(finals))
  return float(finals[best]), UNIFORM_GRID[best]


def results(steps: int = 100, initial_rate: float = 1e-3) -> list[tuple[str, str, float, str]]:
  """Rows ``(problem, method, final loss, learning rates)``."""
  rows = []
  for name, (loss, start) in PROBLEMS.items():
    hi = dict(update_every=1, smoothing=0.0, max_growth=None)
    for method, labels in (("Hi-DLR", PER_COORDINATE), ("Hi-ULR (GeN)", None)):
      tx = hidlr_optax.hidlr(optax.identity(), initial_rate, labels, **hi)
      losses, state = run(tx, loss, start, steps)
      rates = hidlr_optax.learning_rates(state)
      shown = ", ".join(f"{k}={float(v):.3g}" for k, v in rates.items())
      rows.append((name, method, float(losses[-1]), shown))
    final, lr = best_uniform(loss, start, steps)
    rows.append((name, "best uniform (grid)", final, f"{lr:.3g}"))
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--initial-rate", type=float, default=1e-3)
  args = parser.parse_args()
  print(f"{args.steps} gradient-descent iterations; Hi-DLR/Hi-ULR refresh every step"
        f" (Phi=1, smoothing 0) from eta={args.initial_rate:g}\n")
  print(f"| {'problem':<17} | {'method':<20} | {'final loss':>10} | learning rate(s) at the end |")
  print(f"|{'-' * 19}|{'-' * 22}|{'-' * 12}|{'-' * 29}|")
  for problem, method, final, rates in results(args.steps, args.initial_rate):
    print(f"| {problem:<17} | {method:<20} | {final:>10.3e} | {rates} |")


if __name__ == "__main__":
  main()
