"""``hidlr_optax.multi_steps``: gradient accumulation that probes once per real step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hidlr_optax

K, REAL_STEPS, UPDATE_EVERY = 4, 6, 2
LABELS = {"hidden": "hidden", "head": "head"}


def loss_fn(params, batch):
  x, y = batch
  return jnp.mean((jnp.tanh(x @ params["hidden"]) @ params["head"] - y) ** 2)


def batch(i, size=16):
  x = jax.random.normal(jax.random.key(i), (size, 4))
  return x, jnp.sin(x.sum(1, keepdims=True))


PARAMS = {
    "hidden": 0.5 * jax.random.normal(jax.random.key(100), (4, 8)),
    "head": 0.5 * jax.random.normal(jax.random.key(101), (8, 1)),
}


def make_tx(estimator=None):
  # estimator=hidlr_optax.ProbeEstimator(batch_size=1): the probes run in a loop, one value_fn call each, on
  # every backend (a vmapped callback would count per element).
  return hidlr_optax.hidlr(
      optax.scale_by_adam(), 1e-2, LABELS, update_every=UPDATE_EVERY,
      estimator=estimator or hidlr_optax.ProbeEstimator(batch_size=1)
  )


class Counter:
  """Counts the ``value_fn`` evaluations that really run (not traces)."""

  def __init__(self):
    self.calls = 0

  def value_fn(self, probe_batch):
    def value(params):
      jax.debug.callback(self._count)
      return loss_fn(params, probe_batch)

    return value

  def _count(self):
    self.calls += 1

  def read(self) -> int:
    jax.effects_barrier()
    return self.calls


def train(tx, micro_batches, probe_batches):
  """Runs ``tx`` over the batches; returns params, state and value_fn calls."""
  counter = Counter()

  @jax.jit
  def step(params, state, batch, probe_batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, state = tx.update(grads, state, params, value_fn=counter.value_fn(probe_batch))
    return optax.apply_updates(params, updates), state

  params, state = PARAMS, tx.init(PARAMS)
  for b, pb in zip(micro_batches, probe_batches):
    params, state = step(params, state, b, pb)
  return params, state, counter.read()


def micro_data():
  micro = [batch(i) for i in range(K * REAL_STEPS)]
  probes = [batch(1000 + i) for i in range(K * REAL_STEPS)]
  return micro, probes


GRAD = jax.jit(jax.grad(loss_fn))


def welford_mean(grads):
  """The mean as ``optax.MultiSteps`` accumulates it."""
  acc = jax.tree.map(jnp.zeros_like, grads[0])
  for n, g in enumerate(grads):
    acc = jax.tree.map(lambda a, x: a + (x - a) / (n + 1), acc, g)
  return acc


@functools.lru_cache(maxsize=None)
def reference_run():
  return reference(*micro_data())


def reference(micro, probes, estimator=None):
  """The plain optimizer on each real step's mean gradient, probing on its
  last micro-step's probe batch; returns params, state and value_fn calls."""
  tx, counter = make_tx(estimator), Counter()
  update = jax.jit(
      lambda g, s, p, pb: tx.update(g, s, p, value_fn=counter.value_fn(pb))
  )
  params, state = PARAMS, tx.init(PARAMS)
  for r in range(REAL_STEPS):
    chunk = range(r * K, (r + 1) * K)
    grads = welford_mean([GRAD(params, micro[i]) for i in chunk])
    updates, state = update(grads, state, params, probes[chunk[-1]])
    params = optax.apply_updates(params, updates)
  return params, state, counter.read()


def test_optax_multi_steps_probes_on_every_micro_step():
  """What the wrapper fixes: each refresh's probes run K times."""
  micro, probes = micro_data()
  *_, plain_calls = reference_run()
  refreshes = REAL_STEPS // UPDATE_EVERY
  assert plain_calls == refreshes * (4 * len(LABELS) + 2)  # probes, L(w), joint check
  *_, calls = train(optax.MultiSteps(make_tx(), K).gradient_transformation(), micro, probes)
  assert calls == K * plain_calls


def test_multi_steps_probes_once_per_real_step_and_matches_the_reference():
  micro, probes = micro_data()
  ref_params, ref_state, ref_calls = reference_run()
  params, state, calls = train(hidlr_optax.multi_steps(make_tx(), K), micro, probes)
  assert calls == ref_calls == (REAL_STEPS // UPDATE_EVERY) * (4 * len(LABELS) + 2)
  assert int(state.gradient_step) == REAL_STEPS and int(state.mini_step) == 0
  hidlr_state, ref_hidlr_state = hidlr_optax.find_states(state)[0], hidlr_optax.find_states(ref_state)[0]
  assert int(hidlr_state.count) == REAL_STEPS
  assert int(hidlr_state.num_refreshes) == int(ref_hidlr_state.num_refreshes) == 3
  for label in LABELS:
    np.testing.assert_allclose(
        hidlr_state.learning_rates[label], ref_hidlr_state.learning_rates[label], rtol=1e-5
    )
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), params, ref_params)
  # And it trained: the rates moved off their initial value.
  assert all(abs(float(r) - 1e-2) > 1e-4 for r in hidlr_optax.learning_rates(state).values())


def test_micro_steps_return_zero_updates_and_keep_the_inner_state():
  tx = hidlr_optax.multi_steps(make_tx(), K)
  state = tx.init(PARAMS)
  counter = Counter()
  grads = jax.grad(loss_fn)(PARAMS, batch(0))
  update = jax.jit(lambda g, s, p, pb: tx.update(g, s, p, value_fn=counter.value_fn(pb)))
  for _ in range(K - 1):
    updates, state = update(grads, state, PARAMS, batch(1))
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
    assert int(hidlr_optax.find_states(state)[0].count) == 0
  assert counter.read() == 0
  updates, state = update(grads, state, PARAMS, batch(1))
  assert counter.read() == 4 * len(LABELS) + 2
  assert all(float(jnp.abs(u).max()) > 0.0 for u in jax.tree.leaves(updates))
  assert int(hidlr_optax.find_states(state)[0].count) == 1


def test_a_schedule_of_k_and_the_callers_refresh_are_followed():
  # k = 1 for the first real step, then 3: 1 + 3 + 3 micro-steps make 3 real steps.
  tx = hidlr_optax.multi_steps(make_tx(), lambda step: jnp.where(step == 0, 1, 3))
  counter = Counter()

  @jax.jit
  def step(params, state, b, pb):
    grads = jax.grad(loss_fn)(params, b)
    # The caller's schedule: never refresh, so no probe runs at all.
    updates, state = tx.update(grads, state, params, value_fn=counter.value_fn(pb), refresh=False)
    return optax.apply_updates(params, updates), state

  params, state = PARAMS, tx.init(PARAMS)
  for i in range(7):
    params, state = step(params, state, batch(i), batch(100 + i))
  assert int(state.gradient_step) == 3 and int(hidlr_optax.find_states(state)[0].count) == 3
  assert counter.read() == 0


@pytest.mark.parametrize("use_grad_mean", [True, False])
def test_without_hidlr_it_is_optax_multi_steps(use_grad_mean):
  tx = optax.adam(1e-2)
  ours = hidlr_optax.multi_steps(tx, 3, use_grad_mean=use_grad_mean)
  theirs = optax.MultiSteps(tx, 3, use_grad_mean=use_grad_mean)
  s1, s2, params = ours.init(PARAMS), theirs.init(PARAMS), PARAMS
  ours_update, theirs_update = jax.jit(ours.update), jax.jit(theirs.update)
  for i in range(7):
    grads = jax.grad(loss_fn)(params, batch(i))
    u1, s1 = ours_update(grads, s1, params)
    u2, s2 = theirs_update(grads, s2, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u1, u2)
    params = optax.apply_updates(params, u1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), s1, s2)


def test_multi_steps_runs_the_secant_once_per_real_step():
  # Two gradients of value_fn per refresh, once per real step, as the plain
  # optimizer on the mean gradient does.
  micro, probes = micro_data()
  ref_params, ref_state, ref_calls = reference(micro, probes, "secant")
  params, state, calls = train(hidlr_optax.multi_steps(make_tx("secant"), K), micro, probes)
  assert calls == ref_calls == (REAL_STEPS // UPDATE_EVERY) * 2
  rates = hidlr_optax.learning_rates(state)
  ref_rates = hidlr_optax.learning_rates(ref_state)
  for label in LABELS:
    np.testing.assert_allclose(rates[label], ref_rates[label], rtol=1e-5)
    assert float(rates[label]) != 1e-2  # the refreshes moved it
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               params, ref_params)
