"""The loss guard (``loss_guard=``) and the recipe (``total_steps=``).

Own-batch fits lift the rates; nothing in a fit says when the lift runs
away, so the guard watches the refresh losses. These tests check its rule on
hand-made loss sequences (a sustained rise trips it, one outlier batch does
not, a non-finite loss halves every rate, a group whose fits already cut its
rate is left alone, a flat loss holds the rates' climb), that it stops a
runaway that the unguarded rule does not, and the recipe's plumbing:
``total_steps=`` sets the decay and the guard, rejects a second schedule, runs
under jit without recompiling and under ``optax.inject_hyperparams``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hidlr_optax
from hidlr_optax import _guard

RATES = jnp.array([0.1, 0.1])


def run(losses, rates_by_refresh=None, tolerance=0.5):
  """The guard over a sequence of refresh losses; its states and outputs."""
  state, states, outputs = _guard.initial(RATES), [], []
  for i, loss in enumerate(losses):
    rates = RATES if rates_by_refresh is None else jnp.asarray(rates_by_refresh[i])
    capped, state = _guard.guard(state, jnp.float32(loss), rates, rates * 2,
                                 tolerance=tolerance)
    states.append(state)
    outputs.append(capped)
  return states, outputs


def test_a_falling_loss_never_trips_and_the_rates_pass():
  states, outputs = run([4.0, 3.0, 2.0, 1.5, 1.0, 0.8])
  assert int(states[-1].num_trips) == 0
  assert np.all(np.isinf(np.asarray(states[-1].ceilings)))
  np.testing.assert_allclose(np.asarray(outputs[-1]), 2 * np.asarray(RATES))
  assert float(states[-1].best_loss) == pytest.approx(float(states[-1].smoothed_loss))


def test_a_sustained_rise_trips_and_caps_the_rates():
  # Rates growing tenfold while the loss climbs: the cap is the rates at the
  # lowest smoothed loss (0.1), not half the current ones (0.5).
  losses = [1.0, 1.0, 1.0, 3.0, 3.0, 3.0, 3.0]
  rates = [[0.1, 0.1]] * 3 + [[1.0, 1.0]] * 4
  states, outputs = run(losses, rates)
  trips = [int(s.num_trips) for s in states]
  assert trips[:3] == [0, 0, 0] and trips[-1] == 1
  first = trips.index(1)
  np.testing.assert_allclose(np.asarray(states[first].ceilings), [0.1, 0.1], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(outputs[first]), [0.1, 0.1], rtol=1e-6)
  # Each refresh without a trip lifts the caps by RELAXATION.
  lifted = 0.1 * _guard.RELAXATION ** (len(losses) - 1 - first)
  np.testing.assert_allclose(np.asarray(outputs[-1]), [lifted, lifted], rtol=1e-5)


def test_one_outlier_batch_does_not_trip():
  states, _ = run([1.0, 1.0, 1.0, 100.0, 1.0, 1.0, 1.0])
  assert int(states[-1].num_trips) == 0
  # It entered the average at most a margin above it: 0.7 + 0.3 * 1.5.
  assert float(states[3].smoothed_loss) == pytest.approx(1.15, rel=1e-5)


def test_a_group_whose_fits_cut_its_rate_is_left_alone():
  # Group 0's rate grew since the best loss, group 1's fell: only group 0 is
  # capped when the loss climbs.
  losses = [1.0, 1.0, 3.0, 3.0, 3.0, 3.0]
  rates = [[0.1, 0.1]] * 2 + [[0.4, 0.01]] * 4
  states, outputs = run(losses, rates)
  assert int(states[-1].num_trips) == 1
  first = [int(s.num_trips) for s in states].index(1)
  ceilings = np.asarray(states[first].ceilings)
  assert ceilings[0] == pytest.approx(0.1) and np.isinf(ceilings[1])
  np.testing.assert_allclose(np.asarray(outputs[first]), [0.1, 0.02], rtol=1e-6)


def test_the_caps_lift_once_the_loss_falls_again():
  # A cut costs some refreshes: on a falling loss the caps rise by
  # RELAXATION per refresh until they no longer bind (2 * 0.1 = 0.2 here).
  losses = [1.0] * 3 + [3.0] * 3 + [0.5] * 20
  states, outputs = run(losses)
  assert int(states[-1].num_trips) == 1
  first = [int(s.num_trips) for s in states].index(1)
  assert float(outputs[first][0]) == pytest.approx(0.05)
  np.testing.assert_allclose(np.asarray(outputs[-1]), [0.2, 0.2], rtol=1e-6)


def test_a_rate_climbs_only_while_the_loss_makes_new_lows():
  # A flat loss never trips the guard, but the rates proposed (twice the
  # current ones) may rise only to PROGRESS_LIFT times the rates at the
  # lowest average (the first refresh's, 0.1), and one above that may fall.
  rates = [[0.1, 0.1], [0.2, 0.2], [0.2, 0.2], [0.5, 0.05]]
  states, outputs = run([1.0] * 4, rates)
  assert int(states[-1].num_trips) == 0
  lift = _guard.PROGRESS_LIFT * 0.1
  np.testing.assert_allclose(np.asarray(outputs[1]), [lift, lift], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(outputs[2]), [lift, lift], rtol=1e-6)
  # 0.5 is above the bound already: it may not rise (to 1.0), and stays.
  np.testing.assert_allclose(np.asarray(outputs[3]), [0.5, 0.1], rtol=1e-6)
  # A new low moves the bound to the rates then in force.
  states, outputs = run([1.0, 1.0, 0.5], rates[:3])
  np.testing.assert_allclose(np.asarray(outputs[2]), [0.4, 0.4], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(states[2].rates_at_best), [0.2, 0.2])


def test_a_second_trip_needs_a_second_rise():
  # After a trip the level is measured from where the loss is: a loss that
  # stays up does not trip again, one that climbs by the margin again does.
  # The average trips near 1.5 and settles at 1.9 < 1.5 ** 2.
  states, _ = run([1.0] * 3 + [1.9] * 12)
  assert int(states[-1].num_trips) == 1
  states, _ = run([1.0] * 3 + [1.9] * 12 + [3.0] * 8)
  assert int(states[-1].num_trips) == 2


def test_a_loss_that_is_not_finite_halves_every_rate():
  states, outputs = run([1.0, 1.0, float("nan")])
  assert int(states[-1].num_trips) == 1
  np.testing.assert_allclose(np.asarray(states[-1].ceilings), np.asarray(RATES) / 2)
  np.testing.assert_allclose(np.asarray(outputs[-1]), np.asarray(RATES) / 2)
  assert np.isfinite(float(states[-1].smoothed_loss))
  assert np.isfinite(float(states[-1].reference_loss))


class LiftedSlopes:
  """An estimator whose slopes are three times the true ones: the own-batch
  lift at its worst. Its rates settle at three times the line's minimiser,
  where every step multiplies the loss by four."""

  sees_coupling = False
  fits_full = False

  def estimate(self, line, *, full, then=None):
    estimate, _ = hidlr_optax.JvpEstimator().estimate(line, full=full)
    estimate = estimate._replace(slope=3.0 * estimate.slope)
    return estimate, None if then is None else line.value_fn(
        jax.tree.map(lambda p, d: p, line.params, line.directions))


CURVATURES = {"x": jnp.array([1.0, 2.0]), "y": jnp.array([5.0, 8.0])}
ELLIPSE = lambda p: 0.5 * sum(jnp.sum(CURVATURES[k] * p[k] ** 2) for k in p)


def train(**kwargs):
  tx = hidlr_optax.hidlr(optax.identity(), 1e-2, {"x": "x", "y": "y"}, update_every=1,
                         estimator=LiftedSlopes(), joint_check=False, **kwargs)
  params = {"x": jnp.ones(2), "y": jnp.ones(2)}
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(ELLIPSE)(params), state, params, value_fn=ELLIPSE)
    return optax.apply_updates(params, updates), state

  states = []
  for _ in range(150):
    params, state = step(params, state)
    states.append(hidlr_optax.find_states(state)[0])
  return float(ELLIPSE(params)), states, step


def test_the_guard_stops_a_runaway_that_the_rule_alone_does_not():
  start = float(ELLIPSE({"x": jnp.ones(2), "y": jnp.ones(2)}))
  unguarded, _, _ = train()
  assert not np.isfinite(unguarded) or unguarded > 1e3 * start
  guarded, states, step = train(loss_guard=0.5)
  state = states[-1]
  assert np.isfinite(guarded) and guarded < 1e-3 * start
  assert int(state.guard.num_trips) >= 1
  assert np.all(np.isfinite(np.asarray(state.guard.ceilings)))
  assert step._cache_size() == 1


def test_total_steps_sets_the_decay_and_the_guard():
  tx = hidlr_optax.scale_by_hidlr(1e-2, total_steps=10)
  state = tx.init(jnp.ones(3))
  assert isinstance(state.guard, hidlr_optax.LossGuard)
  assert hidlr_optax.scale_by_hidlr(1e-2).init(jnp.ones(3)).guard is None
  # The applied step decays linearly to 0 over total_steps: at the last step
  # the update is 1/10 of the first's, after it 0.
  loss = lambda w: 0.5 * jnp.sum(w**2)
  w, sizes = jnp.ones(3), []
  for _ in range(11):
    updates, state = tx.update(jax.grad(loss)(w), state, w, value_fn=loss)
    sizes.append(float(jnp.linalg.norm(updates)) / float(jnp.linalg.norm(jax.grad(loss)(w)))
                 / float(state.learning_rates[hidlr_optax.SINGLE_GROUP_LABEL]))
    w = optax.apply_updates(w, updates)
  np.testing.assert_allclose(sizes[:10], 1 - np.arange(10) / 10, rtol=1e-5, atol=1e-6)
  assert sizes[10] == 0.0


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "100"])
def test_total_steps_must_be_a_positive_integer(bad):
  with pytest.raises(ValueError, match="total_steps must be an integer >= 1"):
    hidlr_optax.scale_by_hidlr(total_steps=bad)


def test_total_steps_and_a_schedule_are_refused_together():
  with pytest.raises(ValueError, match="total_steps or schedule, not both"):
    hidlr_optax.hidlr(optax.scale_by_adam(), 1e-3, schedule=0.5, total_steps=100)


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), jnp.float32(0.5) * jnp.ones(2)])
def test_loss_guard_must_be_a_positive_number(bad):
  with pytest.raises(ValueError, match="loss_guard must be a number > 0"):
    hidlr_optax.scale_by_hidlr(loss_guard=bad)


def test_the_recipe_runs_under_inject_hyperparams_without_recompiling():
  factory = optax.inject_hyperparams(hidlr_optax.scale_by_hidlr,
                                     static_args=hidlr_optax.STATIC_ARGS)
  tx = optax.chain(optax.scale_by_adam(), factory(1e-2, update_every=2, total_steps=100))
  loss = lambda w: 0.5 * jnp.sum(jnp.arange(1.0, 4.0) * w**2)
  step = jax.jit(lambda w, s: tx.update(jax.grad(loss)(w), s, w, value_fn=loss,
                                        value=loss(w)))
  w, state = jnp.ones(3), tx.init(jnp.ones(3))
  for _ in range(100):
    updates, state = step(w, state)
    w = optax.apply_updates(w, updates)
  assert step._cache_size() == 1
  assert float(loss(w)) < 0.2 * float(loss(jnp.ones(3)))
  assert {"loss_guard", "total_steps"} <= set(hidlr_optax.STATIC_ARGS)


def test_a_cap_never_takes_a_rate_below_min_learning_rate():
  # The guard caps y's rate below 0.2 on its trips; min_learning_rate=0.2 is
  # the user's hard bound, so the rate stops there (and the run converges:
  # 0.2 is stable for y's curvatures 5 and 8).
  floor = 0.2
  loss, states, _ = train(loss_guard=0.5, min_learning_rate=floor)
  ceilings = np.stack([np.asarray(s.guard.ceilings) for s in states])
  rates = np.stack([np.asarray(s.learning_rates.stacked) for s in states])
  assert int(states[-1].guard.num_trips) >= 1
  assert ceilings.min() < floor  # a cap below the floor ...
  assert rates.min() >= floor * (1 - 1e-6)  # ... that no rate followed
  assert loss < 1e-3 * float(ELLIPSE({"x": jnp.ones(2), "y": jnp.ones(2)}))


def test_total_steps_smooths_less_unless_smoothing_is_given():
  from hidlr_optax._config import Config, PAPER_SMOOTHING, RECIPE_SMOOTHING

  assert Config().smoothing == PAPER_SMOOTHING == 0.9  # the paper's rule stays the default
  assert Config(total_steps=10).smoothing == RECIPE_SMOOTHING == 0.7
  assert Config(total_steps=10, smoothing=0.9).smoothing == 0.9
  assert Config(total_steps=10, smoothing=0.0).smoothing == 0.0
  # The recipe's rate after one refresh on a quadratic whose fitted optimum is
  # far above the rate: the growth bound's 4x, smoothed by 0.7 (1.9x), not 0.9 (1.3x).
  loss = lambda w: 0.5 * jnp.sum(w**2)
  for kwargs, factor in (({}, 1.3), ({"total_steps": 100}, 1.9),
                         ({"total_steps": 100, "smoothing": 0.9}, 1.3)):
    tx = hidlr_optax.scale_by_hidlr(1e-3, **kwargs)
    w = jnp.ones(3)
    _, state = tx.update(jax.grad(loss)(w), tx.init(w), w, value_fn=loss)
    rate = float(state.learning_rates[hidlr_optax.SINGLE_GROUP_LABEL])
    assert rate == pytest.approx(factor * 1e-3, rel=1e-5), kwargs
