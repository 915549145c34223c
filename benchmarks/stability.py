"""Which growth bound and refresh period keep Hi-DLR stable on optax's targets?

The four targets optax uses to test its own optimizers (parabola, Rosenbrock,
matrix parabola, mixed tensors), 30,000 steps from their starting points, one
group, over plain SGD and over Adam, for a grid of ``max_growth`` and
``update_every``. A run converges when every coordinate is within 3e-2 of the
minimiser (optax's tolerance). Writes ``benchmarks/results/stability.md``::

    python benchmarks/stability.py
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import hidlr_optax


def targets() -> dict:
  par = jnp.array([1.0, -1.0, 1.0])
  mat = jnp.array([[3.0, -2.0], [1.0, 4.0]])
  m1, m2 = jnp.array([1.0, -1.0, 2.0]), jnp.array([[1.0, 0.0], [-1.0, 1.0]])
  return {
      "parabola": (jnp.array([-1.0, 10.0, 1.0]), par, lambda p: jnp.sum((p - par) ** 2)),
      "rosenbrock": (
          jnp.zeros(2), jnp.ones(2),
          lambda p: (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2,
      ),
      "matrix": (jnp.zeros((2, 2)), mat, lambda p: jnp.sum((p - mat) ** 2)),
      "mixed": (
          (jnp.zeros(3), jnp.zeros((2, 2))), (m1, m2),
          lambda p: jnp.sum((p[0] - m1) ** 2) + jnp.sum((p[1] - m2) ** 2),
      ),
  }


def final_error(tx, start, target, loss, steps: int) -> float:
  def body(carry, _):
    params, state = carry
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = tx.update(grads, state, params, value_fn=loss, value=value)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.jit(lambda c: jax.lax.scan(body, c, length=steps))(
      (start, tx.init(start))
  )
  errs = [jnp.max(jnp.abs(a - b)) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(target))]
  return float(max(errs))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=30_000)
  parser.add_argument("--out", default="benchmarks/results/stability.md")
  args = parser.parse_args()
  growths = (None, 2.0, 4.0, 10.0)
  periods = (1, 2, 8)
  bases = {"sgd": optax.identity, "adam": optax.scale_by_adam}
  probs = targets()
  header = "| max_growth | update_every | " + " | ".join(
      f"{b} {t}" for b in bases for t in probs) + " | converged |"
  lines = [header, "|" + "---|" * (3 + len(bases) * len(probs))]
  for growth in growths:
    for period in periods:
      cells, ok = [], 0
      for base in bases.values():
        for start, target, loss in probs.values():
          tx = hidlr_optax.gen(base(), 1e-3, update_every=period, max_growth=growth)
          err = final_error(tx, start, target, loss, args.steps)
          good = np.isfinite(err) and err <= 3e-2
          ok += good
          cells.append(f"{err:.1e}" + ("" if good else " ✗"))
      lines.append(f"| {growth} | {period} | " + " | ".join(cells) + f" | {ok}/{len(cells)} |")
      print(lines[-1], flush=True)
  command = "python " + " ".join(sys.argv)
  text = "\n".join([
      f"Command: `{command}`", "",
      f"Largest coordinate error after {args.steps} steps (✗: not within 3e-2;"
      " nan: diverged). One group, initial rate 1e-3, smoothing 0.9, min_r2 0.95.",
      "", *lines, "",
  ])
  pathlib.Path(args.out).write_text(text)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
