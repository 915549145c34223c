"""Hi-DLR with Flax NNX (``nnx.Optimizer``) and Linen (``hidlr_optax.linen``)."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT
from flax.training import train_state as flax_train_state

import _ecosystem
import hidlr_optax
from hidlr_optax.linen import TrainState

flax_nnx = _ecosystem.import_example("flax_nnx")
flax_linen = _ecosystem.import_example("flax_linen")


def _data(seed: int = 0, n: int = 32):
  kx, ky = jax.random.split(jax.random.key(seed))
  return jax.random.normal(kx, (n, 64)), jax.random.randint(ky, (n,), 0, 10)


def _tree_close(a, b, **kw):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


# ----------------------------------------------------------------------------
# NNX
# ----------------------------------------------------------------------------


def test_nnx_example_trains():
  out = flax_nnx.main(["--quick"])
  losses = out["losses"]
  assert np.all(np.isfinite(losses))
  assert losses[-5:].mean() < 0.3 * losses[0]
  assert set(out["rates"]) == {"body", "head"}
  # Every group's rate was refreshed and moved away from the initial 1e-3.
  assert all(n > 0 for n in out["num_accepted"].values())
  assert all(np.isfinite(r) and r != pytest.approx(1e-3) for r in out["rates"].values())
  assert out["test_accuracy"] > 0.85


# The joint check compares two nearly equal losses (L(w - s) - L(w) + S against
# S / 2), so the float32 rounding that differs between the two compiled
# programs reaches the rates at ~1e-4 relative after a few refreshes; without
# it the two paths agree to 1e-5.
@pytest.mark.parametrize("joint_check, rtol", [(False, 1e-5), (True, 1e-3)])
def test_nnx_optimizer_matches_plain_optax_on_the_pure_state(joint_check, rtol):
  """nnx.Optimizer + value_fn on the pure state == tx.update on the same arrays."""
  (x, y), (xp, yp) = _data(0), _data(1)
  model = flax_nnx.MLP(64, 16, 10, rngs=nnx.Rngs(0))
  graphdef, params0, rest = nnx.split(model, nnx.Param, ...)
  params0 = nnx.as_pure(params0)
  tx = hidlr_optax.hidlr(
      optax.scale_by_adam(), 1e-2, hidlr_optax.labels.head_vs_body(), update_every=2,
      joint_check=joint_check,
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def loss_of(params, xb, yb):
    return flax_nnx.cross_entropy(nnx.merge(graphdef, params, rest), xb, yb)

  @jax.jit
  def plain_step(params, state):
    grads = jax.grad(loss_of)(params, x, y)
    updates, state = tx.update(grads, state, params, value_fn=lambda p: loss_of(p, xp, yp))
    return optax.apply_updates(params, updates), state

  params, state = params0, tx.init(params0)
  for _ in range(5):
    flax_nnx.train_step(model, optimizer, (x, y), (xp, yp))
    params, state = plain_step(params, state)

  _tree_close(nnx.as_pure(nnx.state(model, nnx.Param)), params, rtol=rtol, atol=rtol / 10)
  nnx_rates = hidlr_optax.learning_rates(optimizer.opt_state)
  _tree_close(nnx_rates, hidlr_optax.learning_rates(state), rtol=rtol)
  # Refreshes at steps 0, 2, 4 moved the rates.
  assert all(float(r) != pytest.approx(1e-2) for r in nnx_rates.values())


def test_accessors_unwrap_nnx_variables_without_warnings():
  model = flax_nnx.MLP(64, 8, 10, rngs=nnx.Rngs(0))
  optimizer = flax_nnx.make_optimizer(model, 1e-3, update_every=1)
  flax_nnx.train_step(model, optimizer, _data(0), _data(1))
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # flax deprecates Variable.value
    rates = hidlr_optax.learning_rates(optimizer.opt_state)
    fits = hidlr_optax.fit_diagnostics(optimizer.opt_state)
  assert set(rates) == set(fits) == {"body", "head"}
  for label in rates:
    assert isinstance(rates[label], jax.Array)
    assert all(isinstance(x, jax.Array) for x in fits[label])
    assert bool(fits[label].accepted)
    assert float(fits[label].slope) > 0 and float(fits[label].curvature) > 0


class _TwoLayers(nnx.Module):
  """Submodules ``layer0`` and ``layer1``: the targets of a prefix dict of labels."""

  def __init__(self, rngs: nnx.Rngs):
    self.layer0 = nnx.Linear(64, 16, rngs=rngs)
    self.layer1 = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.layer1(jax.nn.relu(self.layer0(x)))


def test_nnx_takes_a_prefix_dict_of_labels():
  """``{"layer0": "a", "layer1": "b"}`` over the ``nnx.State`` of the params
  groups as the callable that labels every leaf by its first key."""
  by_submodule = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, _: {"layer0": "a", "layer1": "b"}[path[0].key], params)
  step = hidlr_optax.make_nnx_train_step(lambda model, batch: flax_nnx.cross_entropy(model, *batch))
  runs = []
  for labels in ({"layer0": "a", "layer1": "b"}, by_submodule):
    model = _TwoLayers(nnx.Rngs(0))
    tx = hidlr_optax.hidlr(optax.scale_by_adam(), 1e-3, labels, update_every=2)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    losses = [float(step(model, optimizer, _data(0), _data(1))) for _ in range(5)]
    runs.append((model, optimizer, losses))
  (model, optimizer, losses), (reference, reference_optimizer, reference_losses) = runs
  rates = hidlr_optax.learning_rates(optimizer.opt_state)
  assert set(rates) == {"a", "b"}
  assert int(hidlr_optax.find_states(optimizer.opt_state)[0].num_refreshes) == 3
  _tree_close(rates, hidlr_optax.learning_rates(reference_optimizer.opt_state), rtol=1e-6)
  assert all(float(r) != pytest.approx(1e-3) for r in rates.values())
  np.testing.assert_allclose(losses, reference_losses, rtol=1e-6)
  assert losses[-1] < losses[0]
  _tree_close(nnx.as_pure(nnx.state(model, nnx.Param)),
              nnx.as_pure(nnx.state(reference, nnx.Param)), rtol=1e-6)


# ----------------------------------------------------------------------------
# Linen
# ----------------------------------------------------------------------------


def _linen_state(tx, seed: int = 0) -> TrainState:
  model = flax_linen.MLP(hidden=16)
  params = model.init(jax.random.key(seed), jnp.zeros((1, 64)))["params"]
  return TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def _loss(state, params, batch):
  return flax_linen.cross_entropy(state, params, *batch)


def test_linen_train_state_forwards_value_fn():
  batch, probe = _data(0), _data(1)
  tx = hidlr_optax.hidlr(
      optax.scale_by_adam(), 1e-2, hidlr_optax.labels.bias_vs_weight(), update_every=1
  )
  state = _linen_state(tx)

  @jax.jit
  def plain_step(params, opt_state):
    grads = jax.grad(_loss, argnums=1)(state, params, batch)
    value_fn = lambda p: _loss(state, p, probe)
    updates, opt_state = tx.update(grads, opt_state, params, value_fn=value_fn)
    return optax.apply_updates(params, updates), opt_state

  expected_params, expected_opt = state.params, state.opt_state
  for _ in range(3):
    state, _ = flax_linen.train_step(state, batch, probe)
    expected_params, expected_opt = plain_step(expected_params, expected_opt)
  assert int(state.step) == 3
  _tree_close(state.params, expected_params, rtol=1e-5, atol=1e-6)
  rates = hidlr_optax.learning_rates(state.opt_state)
  _tree_close(rates, hidlr_optax.learning_rates(expected_opt), rtol=1e-5)
  assert all(float(r) != pytest.approx(1e-2) for r in rates.values())


def test_linen_train_state_forwards_refresh():
  state = _linen_state(hidlr_optax.gen(optax.scale_by_adam(), 1e-3, update_every=1))
  grads = jax.tree.map(jnp.ones_like, state.params)
  value_fn = lambda p: _loss(state, p, _data(1))
  for refresh in (False, True, False):
    state = state.apply_gradients(grads=grads, value_fn=value_fn, refresh=refresh)
  assert int(hidlr_optax.find_states(state.opt_state)[0].num_refreshes) == 1


def test_linen_train_state_without_value_fn_raises_for_hidlr():
  state = _linen_state(hidlr_optax.gen(optax.scale_by_adam(), 1e-3))
  grads = jax.tree.map(jnp.ones_like, state.params)
  with pytest.raises(ValueError, match="value_fn"):
    state.apply_gradients(grads=grads)


def test_linen_train_state_is_flax_train_state_for_plain_optax():
  tx = optax.adam(1e-2)
  ours = _linen_state(tx)
  theirs = flax_train_state.TrainState.create(
      apply_fn=ours.apply_fn, params=ours.params, tx=tx
  )
  grads = jax.grad(_loss, argnums=1)(ours, ours.params, _data(0))
  apply = jax.jit(lambda state, grads: state.apply_gradients(grads=grads))
  ours, theirs = apply(ours, grads), apply(theirs, grads)
  _tree_close(ours.params, theirs.params, rtol=0, atol=0)
  assert int(ours.step) == int(theirs.step) == 1


def test_linen_train_state_fp8_overwrite_with_gradient():
  """Flax's fp8 layout: tx sees params['params']; value_fn sees the full dict."""
  params = {"w": jnp.arange(3.0)}
  extra = {"amax": jnp.zeros(2)}
  seen = []

  def value_fn(full):
    seen.append(sorted(full))
    return jnp.sum((full["params"]["w"] - 1.0) ** 2)

  tx = hidlr_optax.gen(optax.identity(), 0.1, smoothing=0.0, max_growth=None)
  state = TrainState.create(
      apply_fn=None, params={"params": params, OVERWRITE_WITH_GRADIENT: extra}, tx=tx
  )
  new_amax = jnp.array([3.0, 4.0])
  grads = {
      "params": jax.grad(lambda p: jnp.sum((p["w"] - 1.0) ** 2))(params),
      OVERWRITE_WITH_GRADIENT: {"amax": new_amax},
  }
  state = state.apply_gradients(grads=grads, value_fn=value_fn)
  assert seen and seen[0] == sorted(["params", OVERWRITE_WITH_GRADIENT])
  np.testing.assert_array_equal(state.params[OVERWRITE_WITH_GRADIENT]["amax"], new_amax)
  # A quadratic with smoothing 0: the refreshed rate is exact, one step to w = 1.
  np.testing.assert_allclose(state.params["params"]["w"], jnp.ones(3), atol=1e-5)


def test_linen_example_trains():
  out = flax_linen.main(["--quick"])
  losses = out["losses"]
  assert np.all(np.isfinite(losses))
  assert losses[-5:].mean() < 0.3 * losses[0]
  assert set(out["rates"]) == {"bias", "weight"}
  assert all(r != pytest.approx(1e-3) for r in out["rates"].values())
  assert out["test_accuracy"] > 0.85

