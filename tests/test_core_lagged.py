"""``probe_direction="previous"``: each refresh fits the previous step.

The slope that a refresh fits, ``b = G_B . d``, is biased upwards when the
probe batch ``B`` is the one that ``d`` was computed from. The previous
step's direction ``d_{t-1}``, fitted at the point ``w_{t-1}`` that step
started from, was shaped by no sample of the batch at step ``t``: its fit is
unbiased whatever batch ``value_fn`` closes over. These tests check the fit
on exact quadratics (one group and coupled groups), the bias and its absence
on noisy least squares, and the state's plumbing.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hidlr_optax

from test_core_battery import BASES, TARGETS, assert_the_rule_converges

A = jnp.array([1.0, 4.0, 9.0])
QUADRATIC = lambda w: 0.5 * jnp.sum(A * w**2)


@pytest.mark.parametrize("estimator", ["probe", "jvp"])
def test_the_fit_is_the_line_search_of_the_previous_step(estimator):
  # On a quadratic the fit is exact. Step 0 has no previous direction and
  # fits along its own. Later refreshes fit along d_{t-1} and report the
  # model seen from w_{t-1}: slope G(w_{t-1}) . d_{t-1} = |g_{t-1}|^2 and
  # optimum |g_{t-1}|^2 / g_{t-1}^T A g_{t-1}, the Cauchy step of the step
  # before (the Barzilai-Borwein step), not that of g_t.
  tx = hidlr_optax.gen(optax.identity(), 0.05, update_every=1, estimator=estimator,
                       probe_direction="previous", smoothing=0.0, max_growth=None)
  state, w, grads, fits = tx.init(jnp.array([1.0, -1.0, 0.5])), jnp.array([1.0, -1.0, 0.5]), [], []
  for _ in range(4):
    g = jax.grad(QUADRATIC)(w)
    updates, state = tx.update(g, state, w, value_fn=QUADRATIC)
    w = optax.apply_updates(w, updates)
    grads.append(g)
    fits.append(hidlr_optax.fit_diagnostics(state)["all"])
  cauchy = lambda g: float(g @ g / (g @ (A * g)))
  assert float(fits[0].slope) == pytest.approx(float(grads[0] @ grads[0]), rel=1e-4)
  assert float(fits[0].optimal_rate) == pytest.approx(cauchy(grads[0]), rel=1e-4)
  for t in range(1, 4):
    before = grads[t - 1]
    assert float(fits[t].slope) == pytest.approx(float(before @ before), rel=1e-4), t
    assert float(fits[t].curvature) == pytest.approx(float(before @ (A * before)), rel=1e-4)
    assert float(fits[t].optimal_rate) == pytest.approx(cauchy(before), rel=1e-4)
    assert abs(cauchy(before) - cauchy(grads[t])) > 1e-2 * cauchy(before)


def test_coupled_groups_are_fitted_at_the_previous_point():
  # Two groups coupled by the Hessian: group k's slope is G_k(w_{t-1}) .
  # d_k(t-1) at the point where the previous step started, whatever the
  # other group's part of that step did to the gradient since.
  q = jnp.array([[3.0, 1.0, 0.5], [1.0, 2.0, 1.5], [0.5, 1.5, 4.0]])
  loss = lambda p: 0.5 * jnp.concatenate([p["a"], p["b"]]) @ q @ jnp.concatenate([p["a"], p["b"]])
  tx = hidlr_optax.hidlr(optax.identity(), 0.05, {"a": "a", "b": "b"}, update_every=1,
                         estimator="jvp", probe_direction="previous")
  w = {"a": jnp.array([1.0, -1.0]), "b": jnp.array([0.5])}
  state, points, grads = tx.init(w), [], []
  for _ in range(3):
    points.append(w)
    grads.append(jax.grad(loss)(w))
    updates, state = tx.update(grads[-1], state, w, value_fn=loss)
    w = optax.apply_updates(w, updates)
  fits = hidlr_optax.fit_diagnostics(state)
  before = grads[-2]  # the gradient at points[-2], the previous step's start and direction
  for k in ("a", "b"):
    assert float(fits[k].slope) == pytest.approx(float(before[k] @ before[k]), rel=1e-4), k
  assert abs(float(fits["a"].slope) - float(grads[-1]["a"] @ before["a"])) > 1e-2


def test_collinear_groups_stay_stable():
  # Eight groups that act alike: each group's own optimum is 8x the
  # combined one. The joint check, run at the previous point too, keeps
  # the combined step stable.
  k = 8
  x = jnp.asarray(np.random.default_rng(0).normal(size=(64, k)), jnp.float32)
  stack = lambda p: jnp.stack([p[str(i)] for i in range(k)])
  loss = lambda p: 0.5 * jnp.mean((x @ stack(p) + stack(p).sum() - 1.0) ** 2)
  labels = {str(i): str(i) for i in range(k)}
  tx = hidlr_optax.hidlr(optax.identity(), 0.01, labels, update_every=1,
                         probe_direction="previous")
  w = {str(i): jnp.array(0.0) for i in range(k)}
  state = tx.init(w)
  step = jax.jit(lambda p, s: tx.update(jax.grad(loss)(p), s, p, value_fn=loss))
  for _ in range(200):
    updates, state = step(w, state)
    w = optax.apply_updates(w, updates)
  best = float(loss({str(i): v for i, v in enumerate(
      jnp.linalg.lstsq(x + 1.0, jnp.ones(64))[0])}))
  assert float(loss(w)) < best + 1e-4


def test_only_the_step_before_a_refresh_matters():
  # update_every=3: the refresh at step 3 fits along d_2 (not d_0 or d_1).
  tx = hidlr_optax.gen(optax.identity(), 0.05, update_every=3, estimator="jvp",
                       probe_direction="previous")
  state, w, grads = tx.init(jnp.array([1.0, -1.0, 0.5])), jnp.array([1.0, -1.0, 0.5]), []
  for _ in range(4):
    grads.append(jax.grad(QUADRATIC)(w))
    updates, state = tx.update(grads[-1], state, w, value_fn=QUADRATIC)
    w = optax.apply_updates(w, updates)
  fit = hidlr_optax.fit_diagnostics(state)["all"]
  assert float(fit.slope) == pytest.approx(float(grads[2] @ grads[2]), rel=1e-5)


def test_the_step_taken_is_counted_with_its_schedule_factor():
  # With a schedule, the step before moved by tau * eta: the model is moved
  # back by that much, so the optimum is still the previous Cauchy step.
  tau = 0.25
  tx = hidlr_optax.gen(optax.identity(), 0.05, update_every=1, estimator="jvp",
                       probe_direction="previous", schedule=tau)
  w = jnp.array([1.0, -1.0, 0.5])
  state = tx.init(w)
  g0 = jax.grad(QUADRATIC)(w)
  updates, state = tx.update(g0, state, w, value_fn=QUADRATIC)
  w = optax.apply_updates(w, updates)
  _, state = tx.update(jax.grad(QUADRATIC)(w), state, w, value_fn=QUADRATIC)
  fit = hidlr_optax.fit_diagnostics(state)["all"]
  assert float(fit.optimal_rate) == pytest.approx(float(g0 @ g0 / (g0 @ (A * g0))), rel=1e-5)


def test_converges_on_an_ill_conditioned_quadratic():
  # Full-batch gradient descent, where d_{t-1} and d_t differ most (they
  # zigzag): the lagged Cauchy step is the Barzilai-Borwein step.
  tx = hidlr_optax.gen(optax.identity(), 1e-3, probe_direction="previous")
  state, w = tx.init(jnp.ones(3)), jnp.ones(3)
  step = jax.jit(lambda w, s: tx.update(jax.grad(QUADRATIC)(w), s, w, value_fn=QUADRATIC))
  for _ in range(300):
    updates, state = step(w, state)
    w = optax.apply_updates(w, updates)
  assert float(QUADRATIC(w)) < 1e-6


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("base", list(BASES))
def test_converges_on_the_battery_targets(base, target):
  # As tests/test_core_battery.py::test_converges, with two groups where
  # the target has two leaves.
  params, _, _ = TARGETS[target](jnp.float32)
  update_every = 2 if (base, target) == ("sgd", "rosenbrock") else 8
  labels = ("a", "b") if isinstance(params, tuple) else None
  assert_the_rule_converges(base, target, labels, update_every=update_every,
                            probe_direction="previous")


def _slopes_on_batches(probe_direction: str, batches: int = 400, estimator: str = "jvp",
                       pass_gradient: bool = False):
  """Slopes fitted on the gradient's own batch, over many batches.

  Noisy least squares in 8 features, batches of 16. One step along a fixed
  batch's gradient ``g_0`` leads from ``w_0`` to ``w_1``; at ``w_1`` the
  refresh sees a new batch ``i`` for both its gradient and its probes.

  With ``pass_gradient`` the update also gets ``value=`` and ``grad=`` (the
  gradient's batch's), as ``make_train_step(probe="same")`` passes them.

  Returns:
    The fitted slopes, and the full-data slope that each design estimates:
    ``G(w_0) . g_0`` along the previous direction (seen from ``w_0``),
    ``|G(w_1)|^2`` along the current one.
  """
  rng = np.random.default_rng(0)
  n, dim, batch = 8192, 8, 16
  x = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)
  y = x @ jnp.asarray(rng.normal(size=dim), jnp.float32) + 2 * jnp.asarray(
      rng.normal(size=n), jnp.float32)
  loss = lambda w, i: jnp.mean((x[i] @ w - y[i]) ** 2) / 2
  full_gradient = jax.grad(lambda p: jnp.mean((x @ p - y) ** 2) / 2)
  tx = hidlr_optax.gen(optax.identity(), 1e-2, update_every=1, estimator=estimator,
                       probe_direction=probe_direction)
  w0 = jnp.zeros(dim)
  first = jnp.asarray(rng.integers(0, n, size=batch))
  g0 = jax.grad(loss)(w0, first)
  updates, after_first = tx.update(g0, tx.init(w0), w0, value_fn=lambda p: loss(p, first))
  w1 = optax.apply_updates(w0, updates)

  @jax.jit
  def slope(i):
    value, g = jax.value_and_grad(loss)(w1, i)
    given = dict(value=value, grad=g) if pass_gradient else {}
    _, state = tx.update(g, after_first, w1, value_fn=lambda p: loss(p, i), **given)
    return hidlr_optax.fit_diagnostics(state)["all"].slope

  index = jnp.asarray(rng.integers(0, n, size=(batches, batch)))
  slopes = np.asarray(jax.vmap(slope)(index))
  if probe_direction == "previous":
    return slopes, float(full_gradient(w0) @ g0)
  return slopes, float(full_gradient(w1) @ full_gradient(w1))


#: The estimators and how the gradient's batch reaches them: jvp probes
#: value_fn; the secant also takes the caller's value= and grad= (as
#: make_train_step(probe="same") passes them).
OWN_BATCH_FEEDS = pytest.mark.parametrize(
    "estimator, pass_gradient", [("jvp", False), ("secant", True)])


@OWN_BATCH_FEEDS
def test_own_batch_slope_is_unbiased_along_the_previous_direction(estimator, pass_gradient):
  slopes, truth = _slopes_on_batches("previous", estimator=estimator, pass_gradient=pass_gradient)
  se = slopes.std() / np.sqrt(len(slopes))
  assert abs(slopes.mean() - truth) < 4 * se, (slopes.mean(), truth, se)


@OWN_BATCH_FEEDS
def test_own_batch_slope_is_biased_along_the_current_direction(estimator, pass_gradient):
  # The paper's rule: b = |g_B|^2, on average |G|^2 + tr(Sigma) / B, well
  # above the full-data slope |G|^2 along the same (noisy) direction.
  slopes, truth = _slopes_on_batches("current", estimator=estimator, pass_gradient=pass_gradient)
  se = slopes.std() / np.sqrt(len(slopes))
  assert slopes.mean() - truth > 10 * se, (slopes.mean(), truth, se)


def test_state_holds_the_previous_direction_in_the_params_structure():
  params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3, jnp.bfloat16)}
  tx = hidlr_optax.scale_by_hidlr(probe_direction="previous")
  state = tx.init(params)
  assert jax.tree.structure(state.previous_direction) == jax.tree.structure(params)
  assert state.previous_direction["b"].dtype == jnp.bfloat16
  assert hidlr_optax.scale_by_hidlr().init(params).previous_direction is None
  grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, jnp.float32), params)
  loss = lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"].astype(jnp.float32) ** 2)
  _, new = tx.update(grads, state, params, value_fn=loss)
  assert jax.tree.map(lambda a: a.dtype, new.previous_direction) == jax.tree.map(
      lambda a: a.dtype, state.previous_direction)
  np.testing.assert_allclose(np.asarray(new.previous_direction["w"]), 0.5)


def test_previous_direction_does_not_recompile_and_checks_its_value():
  # Under inject_hyperparams, with probe_direction static and the direction
  # written on every step, refresh and non-refresh steps share one program.
  inner = optax.inject_hyperparams(hidlr_optax.scale_by_hidlr, static_args=hidlr_optax.STATIC_ARGS)
  tx = optax.chain(optax.scale_by_adam(),
                   inner(1e-2, update_every=2, probe_direction="previous"))
  step = jax.jit(lambda w, s: tx.update(jax.grad(QUADRATIC)(w), s, w, value_fn=QUADRATIC))
  w, state = jnp.ones(3), tx.init(jnp.ones(3))
  for _ in range(5):
    updates, state = step(w, state)
    w = optax.apply_updates(w, updates)
  assert step._cache_size() == 1
  assert float(QUADRATIC(w)) < float(QUADRATIC(jnp.ones(3)))
  with pytest.raises(ValueError, match="probe_direction"):
    hidlr_optax.scale_by_hidlr(probe_direction="next")
  assert "probe_direction" in hidlr_optax.STATIC_ARGS
