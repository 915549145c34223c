"""The rule's options on exact problems: the step schedule, the period
(longer-horizon) fit, the cross-group joint check, and the diagnostics that
catch a user's mistakes (an ascent direction, a value_fn of the wrong kind,
the fitted optimum)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hidlr_optax
from hidlr_optax import _rule


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
# horizon="period": the rate those Phi steps should have had.


def test_period_fit_gives_the_rate_that_reaches_the_minimum_along_the_period():
  # L = a w^2 / 2 with plain gradient steps: after Phi steps at rate eta,
  # w_Phi = (1 - eta a)^Phi w_0 and the line through w_0 and w_Phi has its
  # minimum at 0, at u* = w_Phi / (w_0 - w_Phi) past w_Phi: the period fit
  # multiplies the rate by 1 + u* = 1 / (1 - (1 - eta a)^Phi).
  a, phi = 1.0, 4
  loss = lambda p: 0.5 * a * jnp.sum(p**2)
  tx = hidlr_optax.gen(optax.identity(), 0.1, horizon="period", update_every=phi,
                       smoothing=0.0, max_growth=4.0)
  params, state = _run(tx, loss, jnp.array([1.0, -2.0]), phi)
  # Step 0: no displacement yet, the one-step fit: eta* = 1 / a, clipped 4x.
  eta = float(hidlr_optax.learning_rates(state)["all"])
  assert eta == pytest.approx(0.4, rel=1e-5)
  _, state = _run(tx, loss, params, 1, state)
  expected = eta / (1 - (1 - eta * a) ** phi)
  assert float(hidlr_optax.learning_rates(state)["all"]) == pytest.approx(expected, rel=1e-4)
  assert bool(hidlr_optax.fit_diagnostics(state)["all"].accepted)


def test_period_fit_keeps_the_one_step_stability_cut():
  # A rate far above 2 / a: the one-step fit predicts an increase and cuts
  # it, whatever the period fit proposes.
  a = 10.0
  loss = lambda p: 0.5 * a * jnp.sum(p**2)
  tx = hidlr_optax.gen(optax.identity(), 0.5, horizon="period", update_every=1,
                       smoothing=0.9, max_growth=4.0)
  params, state = _run(tx, loss, jnp.ones(2), 1)
  assert float(hidlr_optax.learning_rates(state)["all"]) == pytest.approx(0.5 / 4, rel=1e-5)
  params, state = _run(tx, loss, params, 40, state)
  assert float(loss(params)) < 1e-6


def test_period_fit_state_holds_the_anchor_and_validates():
  params = {"w": jnp.ones(3)}
  state = hidlr_optax.scale_by_hidlr(horizon="period").init(params)
  assert jax.tree.structure(state.anchor) == jax.tree.structure(params)
  assert hidlr_optax.scale_by_hidlr().init(params).anchor is None
  with pytest.raises(ValueError, match="horizon"):
    hidlr_optax.scale_by_hidlr(horizon="epoch")
  with pytest.raises(ValueError, match="estimator='probe'"):
    hidlr_optax.scale_by_hidlr(horizon="period", estimator="jvp")


@pytest.mark.parametrize("horizon", ["step", "period"])
def test_noisy_quadratic_long_horizon(horizon):
  # Linear regression with mini-batch noise, fresh-batch probes: the period
  # fit's rate ends closer to the rate that serves a run than the greedy one.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4096, 8)), jnp.float32)
  w_true = jnp.asarray(rng.normal(size=8), jnp.float32)
  y = x @ w_true + jnp.asarray(rng.normal(size=4096), jnp.float32)
  loss = lambda w, i: jnp.mean((x[i] @ w - y[i]) ** 2) / 2
  tx = hidlr_optax.gen(optax.identity(), 1e-3, horizon=horizon, update_every=4)
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
# joint_check="cross": only the curvature between groups.


def test_cross_joint_factor_on_collinear_and_separable_groups():
  k = 4
  rates = jnp.full((k,), 0.5)
  slopes = jnp.ones(k)
  # Separable: measured curvature term equals the separable one: factor 1.
  origin, sep = 10.0, 0.5 * k * 0.25 * 1.0
  joint = origin - float(jnp.sum(rates * slopes)) + sep
  assert float(_rule.joint_factor(slopes, rates, origin, joint, separable=sep)) == 1.0
  # Collinear: the curvature term is K times the separable one: 1 / K.
  joint = origin - float(jnp.sum(rates * slopes)) + k * sep
  assert float(_rule.joint_factor(slopes, rates, origin, joint, separable=sep)) == pytest.approx(1 / k)
  # Just below twice the separable term: no correction.
  joint = origin - float(jnp.sum(rates * slopes)) + 1.9 * sep
  assert float(_rule.joint_factor(slopes, rates, origin, joint, separable=sep)) == 1.0


def test_cross_check_lands_collinear_groups_on_the_minimum():
  # L = (sum of the four coordinates - 4)^2 / 2: four groups along one
  # direction, each group's own optimum is the whole step.
  loss = lambda p: 0.5 * (p["a"] + p["b"] + p["c"] + p["d"] - 4.0) ** 2
  params = {n: jnp.zeros(()) for n in "abcd"}
  tx = hidlr_optax.hidlr(optax.identity(), 0.1, {n: n for n in "abcd"}, smoothing=0.0,
                         max_growth=None, joint_check="cross", estimator="jvp")
  state = tx.init(params)
  updates, state = tx.update(jax.grad(loss)(params), state, params, value_fn=loss)
  assert float(hidlr_optax.find_states(state)[0].joint_factor) == pytest.approx(0.25, rel=1e-5)
  assert float(loss(optax.apply_updates(params, updates))) == pytest.approx(0.0, abs=1e-6)


def test_cross_check_leaves_rates_above_the_combined_optimum_alone():
  # A separable loss where every rate sits between its optimum and twice it:
  # the combined check pulls the step back, the cross-group check does not.
  loss = lambda p: 0.5 * jnp.sum(p["a"] ** 2) + 0.5 * jnp.sum(p["b"] ** 2)
  params = {"a": jnp.ones(2), "b": jnp.ones(2)}
  labels = {"a": "a", "b": "b"}
  factors = {}
  for check in ("combined", "cross"):
    tx = hidlr_optax.hidlr(optax.identity(), 1.8, labels, smoothing=0.9, estimator="jvp",
                           joint_check=check)
    state = tx.init(params)
    _, state = tx.update(jax.grad(loss)(params), state, params, value_fn=loss)
    factors[check] = float(hidlr_optax.find_states(state)[0].joint_factor)
  assert factors["combined"] < 0.9
  assert factors["cross"] == 1.0
  with pytest.raises(ValueError, match="joint_check"):
    hidlr_optax.scale_by_hidlr(joint_check="both")


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
  with pytest.raises(TypeError, match="scalar of a float dtype"):  # (B,) would be per-example
    tx.update(params, state, params, value_fn=lambda p: jnp.outer(p["w"], p["w"]))
  # A step compiled without refresh does not call value_fn at all.
  updates, _ = tx.update(params, state, params, value_fn=model_loss, refresh=False)
  assert jax.tree.structure(updates) == jax.tree.structure(params)


# --------------------------------------------------------------------------
# ratios_only: the fits set the ratios, the direction keeps the scale.


def test_keep_mean_scale_keeps_the_size_weighted_geometric_mean():
  rates = jnp.array([4.0, 0.25, 1.0])
  sizes = np.array([1.0, 1.0, 2.0])
  out = _rule.keep_mean_scale(rates, jnp.full(3, 0.5), sizes)
  weights = sizes / sizes.sum()
  assert float(jnp.exp(jnp.sum(weights * jnp.log(out)))) == pytest.approx(0.5, rel=1e-6)
  np.testing.assert_allclose(out / out[2], rates / rates[2], rtol=1e-6)


def test_ratios_only_over_an_exact_quadratic():
  # Curvatures 1 and 100 on groups of 3 and 1 entries: the fitted optima are
  # 1 and 1/100, so the ratio is 100; the scale stays at the initial rate.
  loss = lambda p: 0.5 * jnp.sum(p["a"] ** 2) + 50.0 * jnp.sum(p["b"] ** 2)
  params = {"a": jnp.ones(3), "b": jnp.ones(1)}
  tx = hidlr_optax.hidlr(optax.identity(), 0.02, {"a": "a", "b": "b"}, estimator="jvp",
                         smoothing=0.0, max_growth=None, joint_check=False, ratios_only=True)
  state = tx.init(params)
  _, state = tx.update(jax.grad(loss)(params), state, params, value_fn=loss)
  rates = hidlr_optax.learning_rates(state)
  assert float(rates["a"] / rates["b"]) == pytest.approx(100.0, rel=1e-4)
  mean = (3 * np.log(float(rates["a"])) + np.log(float(rates["b"]))) / 4
  assert np.exp(mean) == pytest.approx(0.02, rel=1e-5)
