"""``hidlr_optax.make_train_step`` / ``make_nnx_train_step``: the jitted step with
the probe batch kept apart from the gradient's."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import hidlr_optax

LABELS = {"hidden": "body", "head": "head"}
STEPS, UPDATE_EVERY = 12, 4
# Loss values per refresh: 4 probes per group, L(w) and the joint check.
PER_REFRESH = 4 * len(LABELS) + 2
REFRESHES = STEPS // UPDATE_EVERY


def predict(params, x):
  return jnp.tanh(x @ params["hidden"]) @ params["head"]


def loss_fn(params, batch):
  return jnp.mean((predict(params, batch["x"]) - batch["y"]) ** 2)


def data(i, size=32):
  x = jax.random.normal(jax.random.key(i), (size, 4))
  return {"x": x, "y": jnp.sin(x.sum(1, keepdims=True))}


PARAMS = {
    "hidden": 0.5 * jax.random.normal(jax.random.key(100), (4, 16)),
    "head": 0.5 * jax.random.normal(jax.random.key(101), (16, 1)),
}


def make_tx():
  return hidlr_optax.hidlr(
      optax.scale_by_adam(), 1e-2, LABELS, update_every=UPDATE_EVERY, estimator=hidlr_optax.ProbeEstimator(batch_size=1)
  )


def by_hand(tx):
  """The README's step, written out."""

  @jax.jit
  def step(params, opt_state, batch, probe_batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(
        grads, opt_state, params, value_fn=lambda p: loss_fn(p, probe_batch)
    )
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def run(step, tx, batches):
  params, opt_state, losses = PARAMS, tx.init(PARAMS), []
  for args in batches:
    params, opt_state, loss = step(params, opt_state, *args)
    losses.append(float(loss))
  return params, opt_state, losses


def close(a, b, rtol=1e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-7), a, b)


def test_the_default_probes_on_the_probe_batch_and_trains():
  tx = make_tx()
  batches = [(data(i), data(1000 + i)) for i in range(STEPS)]
  params, state, losses = run(hidlr_optax.make_train_step(loss_fn, tx), tx, batches)
  ref_params, ref_state, ref_losses = run(by_hand(tx), tx, batches)
  close(params, ref_params)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert losses[-1] < 0.5 * losses[0]
  assert int(hidlr_optax.find_states(state)[0].num_refreshes) == REFRESHES


class Tagged:
  """A loss that records, for every evaluation that runs, which rows it saw."""

  def __init__(self):
    self.seen: list[float] = []

  def loss_fn(self, params, batch):
    jax.debug.callback(lambda tag: self.seen.append(float(tag)), batch["tag"][0])
    return loss_fn(params, batch)

  def counts(self) -> dict[float, int]:
    jax.effects_barrier()
    tags, counts = np.unique(self.seen, return_counts=True)
    return dict(zip(tags.tolist(), counts.tolist()))


def tagged(i):
  """A batch whose first half has tag 0 and second half tag 1."""
  batch = data(i)
  n = batch["x"].shape[0]
  return {**batch, "tag": jnp.where(jnp.arange(n) < n // 2, 0.0, 1.0)}


def test_split_takes_the_gradient_from_the_first_half_and_probes_the_second():
  tx, tags = make_tx(), Tagged()
  step = hidlr_optax.make_train_step(tags.loss_fn, tx, probe="split")
  params, state, losses = run(step, tx, [(tagged(i),) for i in range(STEPS)])
  # The gradient's forward saw only the first half, once per step; every
  # loss value of the probes (value_fn) only the second half.
  assert tags.counts() == {0.0: STEPS, 1.0: REFRESHES * PER_REFRESH}
  assert losses[-1] < 0.5 * losses[0]
  # The same as passing the halves as batch and probe batch.
  halves = [
      (jax.tree.map(lambda x: x[:16], b), jax.tree.map(lambda x: x[16:], b))
      for b in (tagged(i) for i in range(STEPS))
  ]
  ref_params, _, _ = run(hidlr_optax.make_train_step(loss_fn, tx), tx, halves)
  close(params, ref_params)


def test_same_probes_on_the_gradient_batch_with_value_given():
  tx, tags = make_tx(), Tagged()
  step = hidlr_optax.make_train_step(tags.loss_fn, tx, probe="same")
  run(step, tx, [(tagged(i),) for i in range(STEPS)])
  # value= saves L(w): one loss value fewer per refresh, all on the full batch.
  assert tags.counts() == {0.0: STEPS + REFRESHES * (PER_REFRESH - 1)}


def test_the_callers_refresh_is_static():
  tx, tags = make_tx(), Tagged()
  step = hidlr_optax.make_train_step(tags.loss_fn, tx)
  params, state = PARAMS, tx.init(PARAMS)
  for i in range(6):
    params, state, _ = step(params, state, tagged(i), tagged(100 + i), refresh=i == 2)
  assert int(hidlr_optax.find_states(state)[0].num_refreshes) == 1
  assert tags.counts() == {0.0: 6 + PER_REFRESH}
  assert step._cache_size() == 2  # one program with the probes, one without


def test_readout_returns_what_it_reads_from_the_new_state():
  tx = make_tx()
  readout = lambda loss, state: {"loss": loss, "rates": hidlr_optax.learning_rates(state)}
  step = hidlr_optax.make_train_step(loss_fn, tx, readout=readout)
  plain = hidlr_optax.make_train_step(loss_fn, tx)
  state = plain_state = tx.init(PARAMS)
  params = plain_params = PARAMS
  for i in range(UPDATE_EVERY + 1):
    params, state, out = step(params, state, data(i), data(1000 + i))
    plain_params, plain_state, loss = plain(plain_params, plain_state, data(i), data(1000 + i))
    assert float(out["loss"]) == pytest.approx(float(loss), rel=1e-6)
    close(out["rates"], hidlr_optax.learning_rates(state))  # the state after the update
  close(params, plain_params)
  assert any(float(r) != 1e-2 for r in out["rates"].values())  # the refreshes moved them


def test_bad_probe_arguments_raise():
  tx = make_tx()
  with pytest.raises(ValueError, match="probe must be one of"):
    hidlr_optax.make_train_step(loss_fn, tx, probe="half")
  with pytest.raises(ValueError, match="probe must be one of"):
    hidlr_optax.make_nnx_train_step(loss_fn, probe="half")
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match="pass the probe batch"):
    hidlr_optax.make_train_step(loss_fn, tx)(PARAMS, state, data(0))
  with pytest.raises(ValueError, match="takes no probe batch"):
    hidlr_optax.make_train_step(loss_fn, tx, probe="split")(PARAMS, state, data(0), data(1))
  uneven = {"x": jnp.ones((8, 4)), "y": jnp.ones((6, 1))}
  with pytest.raises(ValueError, match="share a leading axis"):
    hidlr_optax.make_train_step(loss_fn, tx, probe="split")(PARAMS, state, uneven)


# ----------------------------------------------------------------------------
# NNX
# ----------------------------------------------------------------------------


class MLP(nnx.Module):
  def __init__(self):
    self.hidden = nnx.Linear(4, 16, rngs=nnx.Rngs(0))
    self.norm = nnx.BatchNorm(16, rngs=nnx.Rngs(1))  # state beyond nnx.Param
    self.head = nnx.Linear(16, 1, rngs=nnx.Rngs(2))

  def __call__(self, x):
    return self.head(jnp.tanh(self.norm(self.hidden(x))))


def nnx_loss(model, batch):
  return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def nnx_tx():
  return hidlr_optax.hidlr(
      optax.scale_by_adam(), 1e-2, hidlr_optax.labels.head_vs_body(),
      update_every=UPDATE_EVERY, estimator=hidlr_optax.ProbeEstimator(batch_size=1),
  )


def nnx_by_hand():
  """The README's NNX step, written out (the rest merged as arrays: with
  variables, BatchNorm's update inside the probes raises TraceContextError)."""

  @nnx.jit
  def step(model, optimizer, batch, probe_batch):
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    rest = nnx.as_pure(rest)
    value_fn = lambda params: nnx_loss(nnx.merge(graphdef, params, rest), probe_batch)
    loss, grads = nnx.value_and_grad(nnx_loss)(model, batch)
    optimizer.update(model, grads, value_fn=value_fn)
    return loss

  return step


def heldout(model) -> float:
  """The loss on a large fixed batch (on a copy: BatchNorm updates its stats)."""
  return float(nnx_loss(nnx.clone(model), data(999, 512)))


def nnx_run(step, batches):
  model = MLP()
  optimizer = nnx.Optimizer(model, nnx_tx(), wrt=nnx.Param)
  losses = [float(step(model, optimizer, *args)) for args in batches]
  return model, optimizer, losses


def test_nnx_step_is_the_readme_step_and_trains():
  batches = [(data(i), data(1000 + i)) for i in range(STEPS)]
  model, optimizer, losses = nnx_run(hidlr_optax.make_nnx_train_step(nnx_loss), batches)
  ref_model, ref_optimizer, ref_losses = nnx_run(nnx_by_hand(), batches)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  close(nnx.state(model), nnx.state(ref_model))
  assert heldout(model) < 0.8 * heldout(MLP())
  assert set(hidlr_optax.learning_rates(optimizer.opt_state)) == {"body", "head"}
  assert int(hidlr_optax.find_states(optimizer.opt_state)[0].num_refreshes) == REFRESHES


def test_nnx_split_probes_the_second_half():
  tags = Tagged()

  def loss(model, batch):
    jax.debug.callback(lambda tag: tags.seen.append(float(tag)), batch["tag"][0])
    return nnx_loss(model, batch)

  batches = [(tagged(i),) for i in range(STEPS)]
  model, _, losses = nnx_run(hidlr_optax.make_nnx_train_step(loss, probe="split"), batches)
  assert tags.counts() == {0.0: STEPS, 1.0: REFRESHES * PER_REFRESH}
  assert heldout(model) < 0.8 * heldout(MLP())


def test_the_package_imports_without_flax():
  code = (
      "import sys; sys.modules['flax'] = None\n"
      "import hidlr_optax\n"
      "assert callable(hidlr_optax.make_train_step)\n"
      "try:\n"
      "  hidlr_optax.make_nnx_train_step(lambda m, b: 0.0)\n"
      "except ImportError:\n"
      "  print('no flax')\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "no flax"


def test_same_batch_step_hands_the_gradient_to_the_secant_estimator():
  # probe="same" passes value= and grad=: the secant refresh then takes one
  # gradient more than the step's own, not two.
  traces = []

  def loss_fn(params, batch):
    traces.append(1)
    return jnp.mean((batch @ params["w"] - 1.0) ** 2)

  params = {"w": jnp.zeros(3)}
  for probe, expected in (("same", 1 + 1 + 1), ("batch", 1 + 1 + 2)):
    traces.clear()
    tx = hidlr_optax.gen(optax.scale_by_adam(), 1e-2, estimator="secant")
    step = hidlr_optax.make_train_step(loss_fn, tx, probe=probe)
    batches = (jnp.ones((4, 3)),) if probe == "same" else (jnp.ones((4, 3)), jnp.ones((4, 3)))
    step(params, tx.init(params), *batches, refresh=True)
    # the step's gradient, value_fn's output check, and the secant's gradients
    assert len(traces) == expected, (probe, len(traces))
