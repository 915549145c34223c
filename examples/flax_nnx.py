"""Hi-DLR with Flax NNX: ``nnx.Optimizer`` and a ``value_fn`` on the pure state.

``nnx.Optimizer.update(model, grads, **kwargs)`` forwards its keyword
arguments to ``tx.update``, whose ``params`` is the *pure* parameter state
(an ``nnx.State`` of arrays). So ``value_fn`` takes that state: the model is
split into its graph definition, parameters and everything else with
``nnx.split``, and a model is rebuilt from the probed parameters with
``nnx.merge`` -- all inside the ``nnx.jit``-ed training step that
:func:`hidlr_optax.make_nnx_train_step` builds. The probes use the *next*
mini-batch: on the gradient's own batch the rates overshoot.

An MLP on scikit-learn's digits, two groups: the head and the body
(:func:`hidlr_optax.labels.head_vs_body`), Adam directions.

Run ``python examples/flax_nnx.py`` (``--quick`` for a short run).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import _common as C
import hidlr_optax


class MLP(nnx.Module):
  """``head(relu(norm(body(x))))``."""

  def __init__(self, din: int, dhidden: int, dout: int, *, rngs: nnx.Rngs):
    self.body = nnx.Linear(din, dhidden, rngs=rngs)
    self.norm = nnx.LayerNorm(dhidden, rngs=rngs)
    self.head = nnx.Linear(dhidden, dout, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.head(nnx.relu(self.norm(self.body(x))))


def cross_entropy(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


#: ``train_step(model, optimizer, batch, probe_batch) -> loss``: one step, its
#: ``value_fn`` evaluating ``probe_batch`` at the probed parameters.
train_step = hidlr_optax.make_nnx_train_step(lambda model, batch: cross_entropy(model, *batch))


@nnx.jit
def accuracy(model: nnx.Module, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(model(x), -1) == y)


def make_optimizer(model: nnx.Module, learning_rate: float, update_every: int) -> nnx.Optimizer:
  """Hi-DLR over Adam directions with head / body groups."""
  tx = hidlr_optax.hidlr(
      optax.scale_by_adam(),
      learning_rate,
      hidlr_optax.labels.head_vs_body(),
      update_every=update_every,
  )
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  """Trains and prints the loss, learning rates and test accuracy.

  Returns:
    ``losses`` (per step), ``rates`` (``{label: rate}`` at the end),
    ``num_accepted``, ``test_accuracy`` and the ``optimizer``.
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
  model = MLP(64, 64, 10, rngs=nnx.Rngs(args.seed))
  optimizer = make_optimizer(model, args.learning_rate, args.update_every)
  losses = []
  for step in range(steps):
    batch = C.batch_at(train, step, args.batch_size, args.seed)
    probe = C.batch_at(train, step + 1, args.batch_size, args.seed)
    losses.append(train_step(model, optimizer, batch, probe))
  losses = np.asarray(jax.device_get(losses))

  rates = {k: float(v) for k, v in hidlr_optax.learning_rates(optimizer.opt_state).items()}
  state = hidlr_optax.find_states(optimizer.opt_state)[0]
  accepted = {k: int(nnx.as_pure(v)) for k, v in state.num_accepted.items()}
  test_accuracy = float(accuracy(model, x_test, y_test))
  print(f"steps {steps}: loss {losses[0]:.3f} -> {losses[-5:].mean():.3f} (mean of last 5)")
  print("learning rates:", {k: f"{v:.3g}" for k, v in rates.items()})
  print("accepted refreshes:", accepted)
  print(f"test accuracy: {test_accuracy:.3f}")
  return dict(
      losses=losses, rates=rates, num_accepted=accepted,
      test_accuracy=test_accuracy, optimizer=optimizer,
  )


if __name__ == "__main__":
  main()
