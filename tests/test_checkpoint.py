"""Orbax checkpoints of Hi-DLR states: resumed training is bit-identical."""

from __future__ import annotations

import jax
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import _ecosystem
import hidlr_optax

C = _ecosystem.import_example("_common")
flax_linen = _ecosystem.import_example("flax_linen")
flax_nnx = _ecosystem.import_example("flax_nnx")

BATCH, UPDATE_EVERY, STEPS, SAVE_AT = 64, 3, 10, 5


def _data():
  return C.load_digits(0)[0]


def _save_and_restore(path, tree, like):
  """Saves ``tree`` and restores it against the abstract structure of ``like``."""
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, tree)
  checkpointer.wait_until_finished()
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
  restored = checkpointer.restore(path, abstract)
  checkpointer.close()
  return restored


def _assert_identical(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def _linen_run(state, data, start, stop):
  for step in range(start, stop):
    batch, probe = C.batch_at(data, step, BATCH), C.batch_at(data, step + 1, BATCH)
    state, _ = flax_linen.train_step(state, batch, probe)
  return state


def test_linen_resume_from_checkpoint_is_bit_identical(tmp_path):
  data = _data()
  full = _linen_run(flax_linen.create_state(0, 1e-3, UPDATE_EVERY), data, 0, STEPS)

  first = _linen_run(flax_linen.create_state(0, 1e-3, UPDATE_EVERY), data, 0, SAVE_AT)
  saved = {"step": first.step, "params": first.params, "opt_state": first.opt_state}
  # A fresh state (another seed) only provides the structure to restore into.
  fresh = flax_linen.create_state(1, 1e-3, UPDATE_EVERY)
  like = {"step": fresh.step, "params": fresh.params, "opt_state": fresh.opt_state}
  restored = _save_and_restore(tmp_path / "linen", saved, like)
  _assert_identical(restored, saved)
  [hidlr_state] = hidlr_optax.find_states(restored["opt_state"])
  assert isinstance(hidlr_state, hidlr_optax.ScaleByHiDLRState)

  resumed = fresh.replace(**restored)
  resumed = _linen_run(resumed, data, SAVE_AT, STEPS)
  _assert_identical(resumed.params, full.params)
  _assert_identical(resumed.opt_state, full.opt_state)
  # The run refreshed (and moved) the rates after the checkpoint, too.
  state = hidlr_optax.find_states(full.opt_state)[0]
  assert int(state.num_refreshes) == len(range(0, STEPS, UPDATE_EVERY))
  assert not np.allclose(
      list(hidlr_optax.learning_rates(full.opt_state).values()),
      list(hidlr_optax.learning_rates(first.opt_state).values()),
  )


def _nnx_run(model, optimizer, data, start, stop):
  for step in range(start, stop):
    batch, probe = C.batch_at(data, step, BATCH), C.batch_at(data, step + 1, BATCH)
    flax_nnx.train_step(model, optimizer, batch, probe)


def _nnx_pair(seed):
  model = flax_nnx.MLP(64, 32, 10, rngs=nnx.Rngs(seed))
  return model, flax_nnx.make_optimizer(model, 1e-3, UPDATE_EVERY)


def test_nnx_resume_from_checkpoint_is_bit_identical(tmp_path):
  data = _data()
  model, optimizer = _nnx_pair(0)
  _nnx_run(model, optimizer, data, 0, STEPS)

  model1, optimizer1 = _nnx_pair(0)
  _nnx_run(model1, optimizer1, data, 0, SAVE_AT)
  saved = {"model": nnx.state(model1), "optimizer": nnx.state(optimizer1)}
  model2, optimizer2 = _nnx_pair(1)
  like = {"model": nnx.state(model2), "optimizer": nnx.state(optimizer2)}
  restored = _save_and_restore(tmp_path / "nnx", saved, like)
  nnx.update(model2, restored["model"])
  nnx.update(optimizer2, restored["optimizer"])
  assert int(optimizer2.step[...]) == SAVE_AT

  _nnx_run(model2, optimizer2, data, SAVE_AT, STEPS)
  _assert_identical(nnx.state(model2), nnx.state(model))
  _assert_identical(nnx.state(optimizer2), nnx.state(optimizer))
  assert int(hidlr_optax.find_states(optimizer2.opt_state)[0].num_refreshes[...]) == 4


def _mlp(seed):
  keys = jax.random.split(jax.random.key(seed), 2)
  return {
      "hidden": {"kernel": jax.random.normal(keys[0], (64, 32)) / 8.0, "bias": np.zeros(32, np.float32)},
      "head": {"kernel": jax.random.normal(keys[1], (32, 10)) / 6.0, "bias": np.zeros(10, np.float32)},
  }


def _mlp_loss(params, batch):
  x, y = batch
  h = jax.nn.relu(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  logits = h @ params["head"]["kernel"] + params["head"]["bias"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@pytest.mark.parametrize("estimator, probe", [("secant", "batch"), ("probe", "same"),
                                              ("secant", "same")])
def test_the_recipe_and_the_secant_resume_bit_identically(tmp_path, estimator, probe):
  # The recipe's state carries the loss guard (LossGuard) and the decay's
  # count; the secant's its own fits: all of it must survive a checkpoint.
  data = _data()
  tx = hidlr_optax.hidlr(optax.scale_by_adam(), 1e-3, hidlr_optax.labels.head_vs_body(),
                         update_every=UPDATE_EVERY, estimator=estimator, total_steps=STEPS)
  step = hidlr_optax.make_train_step(_mlp_loss, tx, probe=probe)

  def run(params, opt_state, start, stop):
    for i in range(start, stop):
      probe_batch = (C.batch_at(data, i + 1, BATCH),) if probe == "batch" else ()
      params, opt_state, _ = step(params, opt_state, C.batch_at(data, i, BATCH), *probe_batch)
    return params, opt_state

  params = _mlp(0)
  full = run(params, tx.init(params), 0, STEPS)
  first = run(params, tx.init(params), 0, SAVE_AT)
  like = (_mlp(1), tx.init(_mlp(1)))
  restored = _save_and_restore(tmp_path / "recipe", first, like)
  _assert_identical(restored, first)
  [state] = hidlr_optax.find_states(restored[1])
  assert isinstance(state.guard, hidlr_optax.LossGuard)
  assert int(state.num_refreshes) == len(range(0, SAVE_AT, UPDATE_EVERY))

  resumed = run(*restored, SAVE_AT, STEPS)
  _assert_identical(resumed, full)
  assert not np.allclose(
      list(hidlr_optax.learning_rates(full[1]).values()),
      list(hidlr_optax.learning_rates(first[1]).values()),
  )
