"""Mixture of experts on noisy sin/cos data (Hi-DLR paper, Appendix B, Figure 8).

1000 train / 200 test points ``x`` in R^2, label ``sin(x1) + cos(x2) > 0`` with
10% of the labels flipped (train and test). The paper does not say how ``x``
is drawn; here ``x ~ Uniform[-5, 5]^2`` (several periods of both waves). The
model: a two-layer gating network (2 -> 64 -> 6, softmax) and six expert MLPs
(2 -> 64 -> 1, ReLU); the logit is the gate-weighted sum of the experts'.
Adam, 100 epochs, batch 128, binary cross-entropy.

Methods: the paper's grid-searched ULR 1e-3 and DLR (gate 1e-3, experts
5e-3), a small grid of our own to check them (picked by the final test loss,
like the paper's baselines), Hi-ULR, Hi-DLR with the groups gate / experts
(probes on a fresh batch; also on the gradient's own batch, to measure the
bias docs/getting_started.md warns of), and the learning-rate-free optimizers.

Run ``python examples/mixture_of_experts.py`` (``--quick`` for a small run).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import _common as C
import _methods as M
import _training as T

NUM_EXPERTS, HIDDEN = 6, 64
LABELS = {"gate": "gate", "experts": "experts"}
INITIAL_RATE = 1e-3


def make_data(seed: int, n_train: int = 1000, n_test: int = 200, noise: float = 0.1):
  """Noisy sin/cos labels; returns ``(train, test)`` as ``(x, y)`` pairs."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(-5, 5, size=(n_train + n_test, 2)).astype(np.float32)
  y = (np.sin(x[:, 0]) + np.cos(x[:, 1]) > 0).astype(np.float32)
  flip = rng.random(len(y)) < noise
  y = np.where(flip, 1 - y, y)
  return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def init_params(key: jax.Array) -> dict:
  k_gate, k_exp = jax.random.split(key)
  experts = jax.vmap(lambda k: C.mlp_init(k, [2, HIDDEN, 1]))(jax.random.split(k_exp, NUM_EXPERTS))
  return {"gate": C.mlp_init(k_gate, [2, HIDDEN, NUM_EXPERTS]), "experts": experts}


def logits(params: dict, x: jax.Array) -> jax.Array:
  gate = jax.nn.softmax(C.mlp_apply(params["gate"], x), axis=-1)  # (n, E)
  experts = jax.vmap(C.mlp_apply, in_axes=(0, None))(params["experts"], x)[..., 0]  # (E, n)
  return jnp.sum(gate * experts.T, axis=-1)


def loss_fn(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits(params, x), y))


def metrics_fn(params: dict, x: jax.Array, y: jax.Array) -> dict:
  z = logits(params, x)
  return {
      "loss": jnp.mean(optax.sigmoid_binary_cross_entropy(z, y)),
      "accuracy": jnp.mean((z > 0) == (y > 0.5)),
  }


def methods(quick: bool = False) -> list[M.Method]:
  """All methods; ``quick`` drops the paper's fixed rates (also in the grids)."""
  paper = [] if quick else [
      M.uniform_grid("adam", [1e-3], name="ULR 1e-3 (paper)"),
      M.differential_grid(
          "adam", LABELS, {"gate": [1e-3], "experts": [5e-3]}, name="DLR 1e-3 / 5e-3 (paper)"
      ),
  ]
  return [
      M.hidlr_method("Hi-DLR (gate, experts)", "adam", INITIAL_RATE, LABELS),
      M.hidlr_method("Hi-DLR secant (gate, experts)", "adam", INITIAL_RATE, LABELS,
                     estimator="secant"),
      M.hidlr_method("Hi-DLR, same-batch probes", "adam", INITIAL_RATE, LABELS),
      M.hidlr_method("Hi-ULR (GeN)", "adam", INITIAL_RATE),
      *paper,
      M.uniform_grid("adam", [3e-4, 1e-3, 3e-3, 1e-2]),
      M.differential_grid(
          "adam", LABELS, M.product_grid(gate=[3e-4, 1e-3, 3e-3], experts=[1e-3, 5e-3, 1e-2])
      ),
      *M.learning_rate_free("adam", names=M.PEERS[:1] if quick else M.PEERS),
  ]


def plot(results: dict, out_dir, name: str):
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
  for ax, key, title in zip(
      axes[:3], ["train_loss", "test_loss", "test_accuracy"], ["train loss", "test loss", "test accuracy"]
  ):
    C.plot_curves(ax, {m: r[key] for m, r in results.items()}, title, "epoch", log=key != "test_accuracy")
  axes[2].legend(fontsize=6)
  rates = {f"{m.split(' (')[0]}: {k}": v for m, r in results.items() for k, v in r["lr"].items()}
  C.plot_rates(axes[3], rates, "Hi-DLR / Hi-ULR learning rates")
  return C.save_figure(fig, out_dir, name)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  args = C.parse_args(__doc__.splitlines()[0], argv)
  epochs = 6 if args.quick else 100
  train, test = make_data(args.seed)
  params = init_params(jax.random.key(args.seed))
  chosen = methods(args.quick)
  same = {m.name: "same" for m in chosen if "same-batch" in m.name}
  with C.Timer() as timer:
    results = T.run_minibatch_methods(
        chosen, loss_fn, metrics_fn, params, train, test,
        epochs=epochs, batch_size=128, seed=args.seed, probes=same,
    )
  header, rows = C.minibatch_rows(results, ["loss", "accuracy"])
  table = C.markdown_table(header, rows)
  grid_table = C.markdown_table(["grid", "setting", "final test loss"], C.grid_rows(results, "test_loss"))
  print(table)
  name = "mixture_of_experts"
  figure = plot(results, args.out, name)
  body = f"""
{len(train[0])} train / {len(test[0])} test points, `x ~ Uniform[-5, 5]^2`,
10% label noise, seed {args.seed}; Adam, {epochs} epochs, batch 128. Hi-DLR /
Hi-ULR start at {INITIAL_RATE:g} with the core's defaults (`{M.hidlr_defaults()}`)
and probe on an independently drawn batch unless marked
"same-batch". Grids are picked by the final test loss (paper protocol for
baselines). Total wall time {timer.seconds:.0f} s.

{table}

Every grid point (final test loss):

{grid_table}
"""
  C.write_results(args.out, name, C.command_line(__file__, argv), "Mixture of experts (Appendix B)", body, figure)
  return results


if __name__ == "__main__":
  main()
