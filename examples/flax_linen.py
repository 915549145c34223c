"""Hi-DLR with Flax Linen: ``hidlr_optax.linen.TrainState``.

Flax's ``TrainState.apply_gradients`` does not pass extra arguments to
``tx.update``; :class:`hidlr_optax.linen.TrainState` is a drop-in subclass
whose ``apply_gradients`` takes ``value_fn`` (a function of the parameters,
built inside the jitted training step, here on the *next* mini-batch) and
forwards it.

An MLP on scikit-learn's digits, two groups: biases and weights
(:func:`hidlr_optax.labels.bias_vs_weight`, the paper's "Hi-DLR (bias)"),
Adam directions.

Run ``python examples/flax_linen.py`` (``--quick`` for a short run).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import _common as C
import hidlr_optax
from hidlr_optax.linen import TrainState


class MLP(nn.Module):
  """``head(relu(norm(body(x))))``."""

  hidden: int = 64
  classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Dense(self.hidden, name="body")(x)
    x = nn.relu(nn.LayerNorm(name="norm")(x))
    return nn.Dense(self.classes, name="head")(x)


def cross_entropy(state: TrainState, params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
  logits = state.apply_fn({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@jax.jit
def train_step(
    state: TrainState,
    batch: tuple[jax.Array, jax.Array],
    probe_batch: tuple[jax.Array, jax.Array],
) -> tuple[TrainState, jax.Array]:
  """One step; Hi-DLR probes the loss on ``probe_batch``."""
  loss, grads = jax.value_and_grad(cross_entropy, argnums=1)(state, state.params, *batch)
  value_fn = lambda params: cross_entropy(state, params, *probe_batch)
  return state.apply_gradients(grads=grads, value_fn=value_fn), loss


@jax.jit
def accuracy(state: TrainState, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(state.apply_fn({"params": state.params}, x), -1) == y)


def create_state(seed: int, learning_rate: float, update_every: int) -> TrainState:
  """The model's initial train state with Hi-DLR over Adam, bias / weight groups."""
  model = MLP()
  params = model.init(jax.random.key(seed), jnp.zeros((1, 64)))["params"]
  tx = hidlr_optax.hidlr(
      optax.scale_by_adam(),
      learning_rate,
      hidlr_optax.labels.bias_vs_weight(),
      update_every=update_every,
  )
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Trains and prints the loss, learning rates and test accuracy.

  Returns:
    ``losses`` (per step), ``rates`` (``{label: rate}`` at the end),
    ``test_accuracy`` and the final ``state``.
  """
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="40 steps instead of 300")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--learning-rate", type=float, default=1e-3)
  parser.add_argument("--update-every", type=int, default=4)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  steps = args.steps or (40 if args.quick else 300)

  train, (x_test, y_test) = C.load_digits(args.seed)
  state = create_state(args.seed, args.learning_rate, args.update_every)
  losses = []
  for step in range(steps):
    batch = C.batch_at(train, step, args.batch_size, args.seed)
    probe = C.batch_at(train, step + 1, args.batch_size, args.seed)
    state, loss = train_step(state, batch, probe)
    losses.append(loss)
  losses = np.asarray(jax.device_get(losses))

  rates = {k: float(v) for k, v in hidlr_optax.learning_rates(state.opt_state).items()}
  test_accuracy = float(accuracy(state, x_test, y_test))
  print(f"steps {steps}: loss {losses[0]:.3f} -> {losses[-5:].mean():.3f} (mean of last 5)")
  print("learning rates:", {k: f"{v:.3g}" for k, v in rates.items()})
  print(f"test accuracy: {test_accuracy:.3f}")
  return dict(losses=losses, rates=rates, test_accuracy=test_accuracy, state=state)


if __name__ == "__main__":
  main()
