"""The rule's options on exact problems: the step schedule, a noisy problem,
and the diagnostics that catch a user's mistakes (an ascent direction, a
value_fn of the wrong kind, the fitted optimum)."""


import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hidlr_optax


def _run(tx, loss, params, steps, state=None):
  state = tx.init(params) if state is None else state

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params, value_fn=loss)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


# --------------------------------------------------------------------------
# schedule: scales the applied step, not the fitted rates.


def test_schedule_scales_the_applied_step_and_leaves_the_fitted_rates_alone():
  loss = lambda p: 0.5 * jnp.sum(p**2)
  params = jnp.ones(3)
  schedule = optax.linear_schedule(1.0, 0.0, 10)
  plain = hidlr_optax.gen(optax.identity(), 0.1, estimator="jvp", smoothing=0.0)
  annealed = hidlr_optax.gen(optax.identity(), 0.1, estimator="jvp", smoothing=0.0,
                             schedule=schedule)
  s_plain, s_ann = plain.init(params), annealed.init(params)
  g = jax.grad(loss)(params)
  u_plain, s_plain = plain.update(g, s_plain, params, value_fn=loss)
  u_ann, s_ann = annealed.update(g, s_ann, params, value_fn=loss)
  # Step 0: factor 1; same fit, same rate.
  np.testing.assert_allclose(u_ann, u_plain, rtol=1e-6)
  np.testing.assert_allclose(hidlr_optax.learning_rates(s_ann)["all"],
                             hidlr_optax.learning_rates(s_plain)["all"])
  # Step 3 (no refresh): the applied step is scaled by schedule(3) = 0.7.
  for _ in range(3):
    u_plain, s_plain = plain.update(g, s_plain, params, value_fn=loss)
    u_ann, s_ann = annealed.update(g, s_ann, params, value_fn=loss)
  np.testing.assert_allclose(u_ann, 0.7 * u_plain, rtol=1e-6)
  assert float(hidlr_optax.learning_rates(s_ann)["all"]) == float(
      hidlr_optax.learning_rates(s_plain)["all"])


def test_a_constant_schedule_and_its_validation():
  loss = lambda p: 0.5 * jnp.sum(p**2)
  params = jnp.ones(2)
  tx = hidlr_optax.gen(optax.identity(), 0.1, schedule=0.5, estimator="jvp", smoothing=0.0)
  ref = hidlr_optax.gen(optax.identity(), 0.1, estimator="jvp", smoothing=0.0)
  g = jax.grad(loss)(params)
  u, _ = tx.update(g, tx.init(params), params, value_fn=loss)
  u_ref, _ = ref.update(g, ref.init(params), params, value_fn=loss)
  np.testing.assert_allclose(u, 0.5 * u_ref, rtol=1e-6)
  with pytest.raises(ValueError, match="schedule"):
    hidlr_optax.scale_by_hidlr(schedule=-1.0)
  with pytest.raises(ValueError, match="schedule"):
    hidlr_optax.scale_by_hidlr(schedule="cosine")


def test_schedule_under_inject_hyperparams_does_not_recompile():
  loss = lambda p: 0.5 * jnp.sum(p**2)
  params = jnp.ones(2)
  tx = optax.inject_hyperparams(hidlr_optax.scale_by_hidlr, static_args=hidlr_optax.STATIC_ARGS)(
      0.1, schedule=optax.linear_schedule(1.0, 0.0, 4))
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    updates, state = tx.update(jax.grad(loss)(params), state, params, value_fn=loss)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(4):
    params, state = step(params, state)
  assert len(traces) == 1
  assert float(state.hyperparams["schedule"]) == pytest.approx(0.25)  # at count 3


# --------------------------------------------------------------------------
# The paper's rule on a noisy problem.


def test_noisy_quadratic_with_fresh_probes_stays_stable():
  # Linear regression with mini-batch noise, fresh-batch probes: the paper's
  # rule reaches the noise floor with a stable rate.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4096, 8)), jnp.float32)
  w_true = jnp.asarray(rng.normal(size=8), jnp.float32)
  y = x @ w_true + jnp.asarray(rng.normal(size=4096), jnp.float32)
  loss = lambda w, i: jnp.mean((x[i] @ w - y[i]) ** 2) / 2
  tx = hidlr_optax.gen(optax.identity(), 1e-3, update_every=4)
  state, w = tx.init(jnp.zeros(8)), jnp.zeros(8)

  @jax.jit
  def step(w, state, i, j):
    updates, state = tx.update(jax.grad(loss)(w, i), state, w, value_fn=lambda p: loss(p, j))
    return optax.apply_updates(w, updates), state

  for t in range(400):
    i, j = rng.integers(0, 4096, size=(2, 32))
    w, state = step(w, state, i, j)
  full = float(jnp.mean((x @ w - y) ** 2) / 2)
  assert np.isfinite(full) and full < 0.6  # the noise floor is 0.5
  rate = float(hidlr_optax.learning_rates(state)["all"])
  # Stable for plain GD on this problem: below 2 / lambda_max ~ 2 / 2.
  assert 0 < rate < 1.0


# --------------------------------------------------------------------------
# Diagnostics: the fitted optimum, an ascent direction, value_fn's output.


def test_fit_diagnostics_give_the_fitted_optimum_guarded():
  loss = lambda p: 2.0 * jnp.sum(p["x"] ** 2) - jnp.sum(p["y"] ** 2)
  params = {"x": jnp.ones(2), "y": jnp.ones(2)}
  tx = hidlr_optax.hidlr(optax.identity(), 1e-2, {"x": "x", "y": "y"}, estimator="jvp")
  state = tx.init(params)
  assert all(np.isnan(float(f.optimal_rate)) for f in hidlr_optax.fit_diagnostics(state).values())
  _, state = tx.update(jax.grad(loss)(params), state, params, value_fn=loss)
  fits = hidlr_optax.fit_diagnostics(state)
  # x: b = |g|^2 = 32, A = g^T H g = 4 * 32: eta* = 1/4; y: concave, none.
  assert float(fits["x"].optimal_rate) == pytest.approx(0.25, rel=1e-5)
  assert np.isnan(float(fits["y"].optimal_rate))


def test_a_full_optimizer_as_the_direction_is_detected():
  # The quickstart's mistake: hidlr(optax.sgd(...), ...), a full optimizer
  # (already negated and scaled) as the direction, steps uphill.
  loss = lambda p: jnp.sum((p["w"] - 2.0) ** 2) + jnp.sum((p["b"] + 1.0) ** 2)
  params = {"w": jnp.zeros(3), "b": jnp.zeros(2)}
  tx = hidlr_optax.hidlr(optax.sgd(0.1), 0.1, {"w": "w", "b": "b"}, update_every=8)
  params_after, state = _run(tx, loss, params, 25)
  assert float(loss(params_after)) > float(loss(params))
  fits = hidlr_optax.fit_diagnostics(state)
  assert all(int(f.uphill_refreshes) == 4 for f in fits.values())  # steps 0, 8, 16, 24
  with pytest.raises(ValueError, match="scale_by_adam"):
    hidlr_optax.check_direction(state)
  # The right direction passes the check.
  tx = hidlr_optax.hidlr(optax.scale_by_adam(), 1e-3, {"w": "w", "b": "b"}, update_every=8)
  _, state = _run(tx, loss, params, 25)
  assert all(int(f.uphill_refreshes) == 0 for f in hidlr_optax.fit_diagnostics(state).values())
  hidlr_optax.check_direction(state)


def test_value_fn_of_the_wrong_kind_is_named_at_trace_time():
  params = {"w": jnp.ones(3)}
  tx = hidlr_optax.gen(optax.scale_by_adam())
  state = tx.init(params)
  model_loss = lambda model: model(jnp.ones(3))  # takes a model, not the params
  with pytest.raises(TypeError, match="must take the parameters"):
    tx.update(params, state, params, value_fn=model_loss)
  with pytest.raises(TypeError, match="scalar of a float dtype"):
    tx.update(params, state, params, value_fn=lambda p: (jnp.sum(p["w"]), {}))
  with pytest.raises(TypeError, match="scalar of a float dtype"):
    tx.update(params, state, params, value_fn=lambda p: jnp.outer(p["w"], p["w"]))
  with pytest.raises(TypeError, match="scalar of a float dtype"):  # per-example losses
    tx.update(params, state, params, value_fn=lambda p: p["w"] ** 2)
  # A step compiled without refresh does not call value_fn at all.
  updates, _ = tx.update(params, state, params, value_fn=model_loss, refresh=False)
  assert jax.tree.structure(updates) == jax.tree.structure(params)


def _noisy_regression_run(tx, steps=3000):
  """Adam(W) on noisy linear regression with separate-batch probes, checking
  the direction at every refresh; returns the longest uphill streak seen,
  how often check_direction raised, and the full-data loss at the end."""
  rng = np.random.default_rng(0)
  n, dim = 4096, 16
  x = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)
  y = x @ jnp.asarray(rng.normal(size=dim), jnp.float32) + jnp.asarray(rng.normal(size=n), jnp.float32)
  loss = lambda w, i: jnp.mean((x[i] @ w - y[i]) ** 2) / 2

  @jax.jit
  def step(w, state, i, j):
    updates, state = tx.update(jax.grad(loss)(w, i), state, w, value_fn=lambda p: loss(p, j))
    return optax.apply_updates(w, updates), state

  w = jnp.zeros(dim)
  state, longest, raised = tx.init(w), 0, 0
  for t in range(steps):
    i, j = rng.integers(0, n, size=(2, 32))
    w, state = step(w, state, i, j)
    if t % 8 == 0:
      fit = hidlr_optax.fit_diagnostics(state)["all"]
      longest = max(longest, int(fit.uphill_refreshes))
      try:
        hidlr_optax.check_direction(state)
      except ValueError:
        raised += 1
  return longest, raised, float(jnp.mean((x @ w - y) ** 2) / 2)


def test_check_direction_does_not_stop_a_noisy_run_that_descends():
  # AdamW's direction near the noise floor: momentum carries the step past
  # the minimum, and many refreshes in a row read an uphill slope (the old
  # check raised after 3), while the loss is far below where it started.
  adamw = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-4))
  longest, raised, final = _noisy_regression_run(hidlr_optax.gen(adamw, 1e-3))
  assert longest >= 3
  assert raised == 0
  assert final < 0.6  # the noise floor is 0.5


def test_check_direction_catches_a_full_adam_as_the_base():
  # (With adam(1e-3) at the rate 1e-3 the ascent steps, 1e-6, are below the
  # loss's resolution: nothing moves and nothing can be flagged.)
  longest, raised, final = _noisy_regression_run(hidlr_optax.gen(optax.adam(0.1), 0.1), steps=200)
  assert raised > 0 and longest >= 3


def test_a_schedule_given_as_the_learning_rate_is_refused_naming_schedule():
  schedule = optax.linear_schedule(1e-3, 0.0, 100)
  with pytest.raises(TypeError, match="schedule="):
    hidlr_optax.hidlr(optax.scale_by_adam(), schedule, {"w": "w"})


@pytest.mark.parametrize("peak", [1e-3, 100.0])
def test_a_schedule_that_is_not_a_multiplier_is_refused(peak):
  with pytest.raises(ValueError, match="multiplier"):
    hidlr_optax.gen(optax.scale_by_adam(), 1e-3, schedule=optax.linear_schedule(peak, 0.0, 100))
  # Warm-up from 0 to 1 is a multiplier.
  hidlr_optax.gen(optax.scale_by_adam(), 1e-3, schedule=optax.warmup_cosine_decay_schedule(
      0.0, 1.0, 10, 100))


def test_an_accepted_fit_reports_the_optimum_it_moved_towards():
  # Along x the loss is linear to rounding at this rate: the fit is accepted
  # with a tiny curvature and the rate grows by max_growth; optimal_rate is
  # that (large, finite) target, not NaN. y is uphill: not accepted, NaN.
  loss = lambda p: jnp.sum(p["x"]) + 1e-7 * jnp.sum(p["x"] ** 2) - jnp.sum(p["y"] ** 2)
  params = {"x": jnp.ones(2), "y": jnp.ones(2)}
  tx = hidlr_optax.hidlr(optax.identity(), 1e-2, {"x": "x", "y": "y"}, estimator="jvp",
                         smoothing=0.0, joint_check=False)
  _, state = tx.update(jax.grad(loss)(params), tx.init(params), params, value_fn=loss)
  fits = hidlr_optax.fit_diagnostics(state)
  assert bool(fits["x"].accepted)
  assert float(fits["x"].optimal_rate) > 1e3
  assert float(hidlr_optax.learning_rates(state)["x"]) == pytest.approx(4e-2)
  assert not bool(fits["y"].accepted) and np.isnan(float(fits["y"].optimal_rate))


def test_a_group_started_far_too_small_catches_up_and_is_named_until_then():
  # The hidden layer starts at 1e-10, below what the loss can register: it
  # grows by max_growth per refresh (never past the head's rate) until its
  # probes register, then its fits set it; unresolved_groups names it while
  # it is below resolution at most refreshes.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(256, 4)), jnp.float32)
  y = jnp.sin(x @ jnp.asarray(rng.normal(size=4), jnp.float32))[:, None]
  loss = lambda p: jnp.mean((jnp.tanh(x @ p["hidden"]) @ p["head"] - y) ** 2)
  params = {"hidden": jnp.asarray(rng.normal(size=(4, 16)), jnp.float32) / 2,
            "head": jnp.zeros((16, 1))}
  tx = hidlr_optax.hidlr(optax.scale_by_adam(), {"hidden": 1e-10, "head": 1e-2},
                         {"hidden": "hidden", "head": "head"}, update_every=1)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p, value_fn=loss))
  state, hidden_rates, named = tx.init(params), [], []
  for _ in range(60):
    updates, state = step(params, state)
    params = optax.apply_updates(params, updates)
    hidden_rates.append(float(hidlr_optax.learning_rates(state)["hidden"]))
    named.append("hidden" in hidlr_optax.unresolved_groups(state))
  assert named[0] and not named[-1]
  assert hidden_rates[-1] > 1e-5  # from 1e-10: the hold rule kept it there
  fits = hidlr_optax.find_states(state)[0]
  assert int(fits.num_accepted["hidden"]) > 0 and int(fits.num_unresolved["hidden"]) > 0
  growth = np.asarray(hidden_rates[1:]) / np.asarray(hidden_rates[:-1])
  assert np.all(growth <= 4.0 + 1e-6)  # at most max_growth a refresh
