"""``hidlr_optax.set_hyperparams`` / ``find_hyperparams``: injected hyperparameters
found anywhere in a state and set without recompiling the step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import hidlr_optax

# L = 1/2 (2 x^2 + 10 y^2): along the gradient the optimal rates are (0.5, 0.1).
from test_inject_hyperparams import LABELS, OPTIMAL, START, quadratic  # noqa: E402


def injected_hidlr(labels=LABELS, **kwargs):
  factory = optax.inject_hyperparams(hidlr_optax.scale_by_hidlr, static_args=hidlr_optax.STATIC_ARGS)
  return factory(param_labels=labels, update_every=1, **kwargs)


class Stepper:
  """A jitted step of ``tx`` that counts its traces (one per compilation)."""

  def __init__(self, tx):
    self.traces = 0

    def step(params, state):
      self.traces += 1
      grads = jax.grad(quadratic)(params)
      updates, state = tx.update(grads, state, params, value_fn=quadratic)
      return optax.apply_updates(params, updates), state

    self.step = jax.jit(step)


def rates(state):
  return {k: float(v) for k, v in hidlr_optax.learning_rates(state).items()}


def test_the_old_readme_assignment_recompiles_the_step():
  """Why the helper exists: ``jnp.asarray(0.5)`` is weakly typed."""
  tx = injected_hidlr(learning_rate=0.05, smoothing=0.9, max_growth=None)
  stepper = Stepper(tx)
  params, state = stepper.step(START, tx.init(START))
  state.hyperparams["smoothing"] = jnp.asarray(0.5)
  assert state.hyperparams["smoothing"].weak_type
  stepper.step(params, state)
  assert stepper.traces == 2


def test_set_hyperparams_does_not_recompile_and_the_value_is_used():
  tx = optax.chain(optax.identity(), injected_hidlr(learning_rate=0.05, smoothing=0.9, max_growth=None))
  stepper = Stepper(tx)
  state0 = tx.init(START)
  params, state = stepper.step(START, state0)
  new = hidlr_optax.set_hyperparams(state, smoothing=0.0)
  (found,) = hidlr_optax.find_hyperparams(new)
  old = hidlr_optax.find_hyperparams(state)[0]["smoothing"]
  assert found["smoothing"].dtype == old.dtype and not found["smoothing"].weak_type
  assert float(old) == pytest.approx(0.9)  # the old state is unchanged
  params, new = stepper.step(params, new)
  assert stepper.traces == 1
  # smoothing 0: the rates are the fitted optimum at once.
  for k, rate in rates(new).items():
    assert rate == pytest.approx(OPTIMAL[k], rel=1e-4)


def test_weakly_typed_and_python_values_keep_their_type():
  def scaled(factor=2, shift=1.5):  # ints are stored weakly typed by inject_hyperparams
    return optax.chain(optax.scale(factor), optax.scale(shift))

  tx = optax.inject_hyperparams(scaled)()
  state = tx.init(jnp.zeros(2))
  assert state.hyperparams["factor"].weak_type and not state.hyperparams["shift"].weak_type
  traces = []
  step = jax.jit(lambda g, s: (traces.append(1), tx.update(g, s))[1])
  _, state = step(jnp.ones(2), state)
  new = hidlr_optax.set_hyperparams(state, factor=3, shift=np.float64(2.0))
  assert new.hyperparams["factor"].weak_type and new.hyperparams["factor"].dtype == jnp.int32
  assert not new.hyperparams["shift"].weak_type and new.hyperparams["shift"].dtype == jnp.float32
  updates, _ = step(jnp.ones(2), new)
  assert len(traces) == 1
  np.testing.assert_allclose(updates, 6.0)
  # A value put in by hand as a Python scalar stays one.
  state.hyperparams["shift"] = 1.0
  assert hidlr_optax.set_hyperparams(state, shift=4).hyperparams["shift"] == 4.0


def test_found_through_chain_multi_steps_and_partition():
  inner = injected_hidlr(smoothing=0.9)
  txs = {
      "chain": optax.chain(optax.scale_by_adam(), inner),
      "multi_steps": hidlr_optax.multi_steps(optax.chain(optax.scale_by_adam(), inner), 2),
      "optax_multi_steps": optax.MultiSteps(inner, 2).gradient_transformation(),
      "partition": optax.partition(
          {"x": inner, "y": optax.inject_hyperparams(optax.sgd)(0.1)}, {"x": "x", "y": "y"}
      ),
  }
  for name, tx in txs.items():
    state = hidlr_optax.set_hyperparams(tx.init(START), smoothing=0.25)
    values = [h["smoothing"] for h in hidlr_optax.find_hyperparams(state) if "smoothing" in h]
    assert [float(v) for v in values] == [0.25], name
  # partition: each injected state that has a name gets it; Hi-DLR's
  # learning_rate (its initial rate) is left alone, SGD's is set.
  state = hidlr_optax.set_hyperparams(txs["partition"].init(START), learning_rate=0.5, min_r2=0.5)
  hidlr_hyper, sgd_hyper = sorted(hidlr_optax.find_hyperparams(state), key=lambda h: "min_r2" not in h)
  assert float(sgd_hyper["learning_rate"]) == 0.5
  assert float(hidlr_hyper["min_r2"]) == 0.5
  assert float(hidlr_hyper["learning_rate"]) == pytest.approx(1e-3)


def test_nnx_optimizer_state_without_recompiling():
  class Model(nnx.Module):
    def __init__(self):
      self.x = nnx.Param(START["x"])
      self.y = nnx.Param(START["y"])

  loss = lambda model: quadratic({"x": model.x[...], "y": model.y[...]})
  model = Model()
  by_name = hidlr_optax.labels.by_path(lambda path, leaf: path)  # 'x', 'y'
  tx = optax.chain(
      optax.identity(),
      injected_hidlr(by_name, learning_rate=0.05, smoothing=0.9, max_growth=None),
  )
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  traces = []

  @nnx.jit
  def step(model, optimizer):
    traces.append(1)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    value_fn = lambda params: loss(nnx.merge(graphdef, params, rest))
    optimizer.update(model, nnx.grad(loss)(model), value_fn=value_fn)

  step(model, optimizer)
  optimizer.opt_state = hidlr_optax.set_hyperparams(optimizer.opt_state, smoothing=0.0)
  assert float(hidlr_optax.find_hyperparams(optimizer.opt_state)[0]["smoothing"]) == 0.0
  step(model, optimizer)
  assert len(traces) == 1
  for k, rate in rates(optimizer.opt_state).items():
    assert rate == pytest.approx(OPTIMAL[k], rel=1e-4)


def test_a_sweep_axis_is_kept():
  tx = injected_hidlr(smoothing=0.9)
  state = tx.init(START)
  batched = state._replace(hyperparams={k: jnp.stack([v] * 3) for k, v in state.hyperparams.items()})
  new = hidlr_optax.set_hyperparams(batched, smoothing=0.5, min_r2=jnp.array([0.1, 0.2, 0.3]))
  np.testing.assert_allclose(new.hyperparams["smoothing"], [0.5] * 3)
  np.testing.assert_allclose(new.hyperparams["min_r2"], [0.1, 0.2, 0.3], rtol=1e-6)
  with pytest.raises(ValueError, match="'min_r2' has shape"):
    hidlr_optax.set_hyperparams(batched, min_r2=jnp.ones(2))


def test_errors_name_the_hyperparameter_and_what_there_is():
  state = optax.chain(optax.scale_by_adam(), injected_hidlr(smoothing=0.9)).init(START)
  names = r"\['learning_rate', 'max_growth', 'min_learning_rate', 'min_r2', 'smoothing'\]"
  with pytest.raises(ValueError, match=r"'smoothin'.*" + names):
    hidlr_optax.set_hyperparams(state, smoothin=0.5)
  with pytest.raises(ValueError, match="'update_every'.*STATIC_ARGS"):
    hidlr_optax.set_hyperparams(state, update_every=4)
  with pytest.raises(ValueError, match="initial rate"):
    hidlr_optax.set_hyperparams(state, learning_rate=0.1)
  with pytest.raises(ValueError, match="no optax.inject_hyperparams state"):
    hidlr_optax.set_hyperparams(optax.adam(1e-3).init(START), b1=0.5)
  scheduled = optax.inject_hyperparams(optax.adam)(learning_rate=optax.linear_schedule(1.0, 0.0, 10))
  with pytest.raises(ValueError, match="'learning_rate' is given to inject_hyperparams as a schedule"):
    hidlr_optax.set_hyperparams(scheduled.init(START), learning_rate=0.5)
  # optax's own learning_rate (not Hi-DLR's) may be set.
  state = optax.inject_hyperparams(optax.adam)(learning_rate=0.1).init(START)
  assert float(hidlr_optax.set_hyperparams(state, learning_rate=0.5).hyperparams["learning_rate"]) == 0.5
