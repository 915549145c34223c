"""Sweepable hyperparameters under ``optax.inject_hyperparams``.

The initial learning rate, ``smoothing``, ``min_r2`` and ``max_growth`` become
arrays in the state: one compiled step serves every value, values can change
between steps, and sweeps can be ``jax.vmap``-ed. ``param_labels``,
``update_every``, ``joint_check``, ``probe_direction`` and ``estimator`` are
static (``hidlr_optax.STATIC_ARGS``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hidlr_optax

# L = 1/2 (2 x^2 + 10 y^2): along the gradient, each coordinate's optimal
# rate is 1 / curvature, eta* = (0.5, 0.1), whatever the point.
CURVATURE = {"x": 2.0, "y": 10.0}
OPTIMAL = {"x": 0.5, "y": 0.1}
LABELS = {"x": "x", "y": "y"}
START = {"x": jnp.array([3.0, -1.0]), "y": jnp.array([1.0, 2.0])}


def quadratic(p):
  return sum(0.5 * CURVATURE[k] * jnp.sum(p[k] ** 2) for k in p)


def quartic(p):
  return sum(jnp.sum(p[k] ** 2 + p[k] ** 4) for k in p)


def injected(**kwargs) -> optax.GradientTransformationExtraArgs:
  """Hi-DLR (SGD direction: the gradient is ``d``) with injected hyperparameters."""
  factory = optax.inject_hyperparams(
      hidlr_optax.scale_by_hidlr, static_args=hidlr_optax.STATIC_ARGS
  )
  return factory(param_labels=LABELS, update_every=1, **kwargs)


class Stepper:
  """A jitted step of ``tx`` on ``loss`` that counts its traces."""

  def __init__(self, tx, loss):
    self.traces = 0

    def step(params, state):
      self.traces += 1
      updates, state = tx.update(jax.grad(loss)(params), state, params, value_fn=loss)
      return optax.apply_updates(params, updates), state

    self.step = jax.jit(step)


def set_hyperparam(state, name, value):
  state.hyperparams[name] = jnp.asarray(value, state.hyperparams[name].dtype)
  return state


def rates(state):
  return {k: float(v) for k, v in hidlr_optax.learning_rates(state).items()}


def test_sweepable_hyperparameters_are_arrays_static_ones_are_not():
  tx = injected(learning_rate=0.05, smoothing=0.9, min_r2=0.9, max_growth=2.0)
  hyperparams = tx.init(START).hyperparams
  for name in ("learning_rate", "smoothing", "min_r2", "max_growth"):
    assert isinstance(hyperparams[name], jax.Array), name
  for name in hidlr_optax.STATIC_ARGS:
    assert name not in hyperparams


def test_smoothing_changed_between_steps_without_retracing():
  tx = injected(learning_rate=0.05, smoothing=0.9, max_growth=None)
  stepper = Stepper(tx, quadratic)
  params, state = stepper.step(START, tx.init(START))
  for k in LABELS:  # eta <- 0.9 eta + 0.1 eta*
    assert rates(state)[k] == pytest.approx(0.9 * 0.05 + 0.1 * OPTIMAL[k], rel=1e-4)
  state = set_hyperparam(state, "smoothing", 0.0)
  params, state = stepper.step(params, state)
  assert rates(state) == pytest.approx(OPTIMAL, rel=1e-4)  # no smoothing: eta = eta*
  assert stepper.traces == 1


def test_max_growth_changed_between_steps():
  tx = injected(learning_rate=0.01, smoothing=0.0, max_growth=1.5)
  stepper = Stepper(tx, quadratic)
  params, state = stepper.step(START, tx.init(START))
  assert rates(state) == pytest.approx({"x": 0.015, "y": 0.015}, rel=1e-4)
  state = set_hyperparam(state, "max_growth", 4.0)
  params, state = stepper.step(params, state)
  assert rates(state) == pytest.approx({"x": 0.06, "y": 0.06}, rel=1e-4)
  state = set_hyperparam(state, "max_growth", 100.0)
  params, state = stepper.step(params, state)
  assert rates(state) == pytest.approx(OPTIMAL, rel=1e-4)
  assert stepper.traces == 1


def test_max_growth_none_stays_static_and_unbounded():
  tx = injected(learning_rate=0.01, smoothing=0.0, max_growth=None)
  state = tx.init(START)
  assert "max_growth" not in state.hyperparams
  _, state = Stepper(tx, quadratic).step(START, state)
  assert rates(state) == pytest.approx(OPTIMAL, rel=1e-4)  # a 50x jump at once


def test_min_r2_changed_between_steps():
  # A quartic loss is not quadratic along the step: R^2 < 1 but close to it.
  tx = injected(
      learning_rate=0.05, smoothing=0.0, min_r2=0.9999, max_growth=None, joint_check=False
  )
  stepper = Stepper(tx, quartic)
  params, state = stepper.step(START, tx.init(START))
  fits = hidlr_optax.fit_diagnostics(state)
  r2 = {k: float(f.r_squared) for k, f in fits.items()}
  assert all(0.9 < v < 0.9999 for v in r2.values()), r2
  assert not any(bool(f.accepted) for f in fits.values())
  assert rates(state) == pytest.approx({"x": 0.05, "y": 0.05})
  state = set_hyperparam(state, "min_r2", 0.9)
  params, state = stepper.step(params, state)
  assert all(bool(f.accepted) for f in hidlr_optax.fit_diagnostics(state).values())
  assert all(v != pytest.approx(0.05) for v in rates(state).values())
  assert stepper.traces == 1


def test_vmapped_sweep_equals_separate_runs():
  """A grid over the initial rate and smoothing, trained at once with vmap."""
  grid_lr = jnp.array([0.01, 0.05, 0.01, 0.05])
  grid_smoothing = jnp.array([0.0, 0.0, 0.9, 0.9])
  factory = optax.inject_hyperparams(
      hidlr_optax.scale_by_hidlr, static_args=hidlr_optax.STATIC_ARGS
  )

  def run(lr, smoothing, make=factory):
    tx = make(lr, LABELS, update_every=2, smoothing=smoothing, max_growth=3.0)
    params, state = START, tx.init(START)
    for _ in range(5):
      updates, state = tx.update(jax.grad(quartic)(params), state, params, value_fn=quartic)
      params = optax.apply_updates(params, updates)
    return params, hidlr_optax.learning_rates(state)

  swept = jax.jit(jax.vmap(run))(grid_lr, grid_smoothing)
  for i in range(grid_lr.shape[0]):
    single = jax.jit(run, static_argnums=(0, 1, 2))(
        float(grid_lr[i]), float(grid_smoothing[i]), hidlr_optax.scale_by_hidlr
    )
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a[i], b, rtol=2e-5, atol=1e-7), swept, single
    )
  final_rates = np.stack([swept[1][k] for k in LABELS], axis=1)
  assert len({tuple(np.round(r, 6)) for r in final_rates}) == grid_lr.shape[0]


@pytest.mark.parametrize("static", [False, True])
def test_hidlr_itself_under_inject_hyperparams(static):
  # The optax way, on the chained factory: every argument is listed, so the
  # wrapper binds them (base and the label dict stay static as non-numbers).
  kwargs = {"static_args": hidlr_optax.STATIC_ARGS} if static else {}
  tx = optax.inject_hyperparams(hidlr_optax.hidlr, **kwargs)(
      base=optax.scale_by_adam(), learning_rate=1e-2, param_labels={"w": "w", "b": "b"},
      smoothing=0.5)
  params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  loss = lambda p: jnp.sum((p["w"] - 2.0) ** 2) + jnp.sum((p["b"] + 1.0) ** 2)
  state = tx.init(params)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p, value_fn=loss))
  for _ in range(9):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
  assert float(state.hyperparams["smoothing"]) == 0.5
  assert set(hidlr_optax.learning_rates(state)) == {"w", "b"}
  assert int(hidlr_optax.find_states(state)[0].num_refreshes) == 2
  assert float(loss(params)) < 14.0  # from 14 at the start
