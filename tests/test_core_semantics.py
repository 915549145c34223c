"""Semantics of scale_by_hidlr: the fit, the update rule, labels, errors."""

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hidlr_optax
from hidlr_optax import _evaluation, _fit, _probe, _resolution

import _jaxprs


def ellipse(p):
  return p["x"] ** 2 + 100 * p["y"] ** 2


def sgd_step(tx, params, state, loss, **kwargs):
  grads = jax.grad(loss)(params)
  updates, state = tx.update(grads, state, params, value_fn=loss, **kwargs)
  return optax.apply_updates(params, updates), state, updates


# --------------------------------------------------------------------------
# Newton's method on the ellipse (paper Figure 2).


@pytest.mark.parametrize("estimator", ["probe", "jvp"])
def test_ellipse_one_refresh_is_newton_step(estimator):
  with jax.enable_x64(True):
    params = {"x": jnp.array(50.0), "y": jnp.array(1.0)}
    tx = hidlr_optax.hidlr(
        optax.identity(), 1e-3, {"x": "x", "y": "y"},
        smoothing=0.0, max_growth=None, estimator=estimator,
    )
    state = tx.init(params)
    step = jax.jit(functools.partial(sgd_step, tx, loss=ellipse))
    params, state, _ = step(params, state)
    rates = hidlr_optax.learning_rates(state)
    assert rates["x"].dtype == jnp.float64
    np.testing.assert_allclose(float(rates["x"]), 0.5, rtol=1e-6)
    np.testing.assert_allclose(float(rates["y"]), 1 / 200, rtol=1e-6)
    np.testing.assert_allclose(float(params["x"]), 0.0, atol=1e-6)
    np.testing.assert_allclose(float(params["y"]), 0.0, atol=1e-6)


def test_float32_probes_lose_digits_where_jvp_does_not():
  """L_j - L0 cancels in float32; jvp is exact (docs/method.md, "In words")."""
  params = {"x": jnp.array(50.0), "y": jnp.array(1.0)}
  got = {}
  for estimator in ("probe", "jvp"):
    tx = hidlr_optax.hidlr(
        optax.identity(), 1e-3, {"x": "x", "y": "y"},
        smoothing=0.0, max_growth=None, estimator=estimator, min_r2=0.0,
    )
    _, state, _ = sgd_step(tx, params, tx.init(params), ellipse)
    got[estimator] = float(hidlr_optax.learning_rates(state)["x"])
  assert abs(got["jvp"] - 0.5) < 1e-5
  assert abs(got["probe"] - 0.5) < 5e-3  # close, but not float32-exact


# --------------------------------------------------------------------------
# The closed-form fit.


def test_fit_recovers_exact_quadratic_and_r2():
  scales = _fit.check_probe_scales((-2.0, -1.0, 1.0, 2.0))
  beta, curv = np.array([3.0, -1.0]), np.array([5.0, 2.0])
  deltas = -beta[:, None] * scales + 0.5 * curv[:, None] * scales**2
  fit = _fit.fit_quadratics(jnp.asarray(deltas), scales)
  np.testing.assert_allclose(fit.slope, beta, rtol=1e-5)
  np.testing.assert_allclose(fit.curvature, curv, rtol=1e-5)
  np.testing.assert_allclose(fit.r_squared, 1.0, atol=1e-6)


def test_fit_r2_matches_independent_least_squares():
  rng = np.random.default_rng(0)
  scales = _fit.check_probe_scales((-2.0, -1.0, 1.0, 2.0))
  deltas = rng.normal(size=(3, 4))
  fit = _fit.fit_quadratics(jnp.asarray(deltas), scales)
  x = np.stack([-scales, 0.5 * scales**2], 1)
  for row, slope, curv, r2 in zip(deltas, fit.slope, fit.curvature, fit.r_squared):
    coef, *_ = np.linalg.lstsq(x, row, rcond=None)
    resid = row - x @ coef
    want_r2 = 1 - np.sum(resid**2) / np.sum((row - row.mean()) ** 2)
    np.testing.assert_allclose([slope, curv, r2], [*coef, want_r2], rtol=1e-4, atol=1e-5)


def test_folds_round_exactly_as_the_reductions_they_replace():
  # The fit folds its few probe values elementwise where a reduction would
  # be one more kernel to compile; that must not change a single bit of what
  # the core computes (its committed results stay valid).
  rng = np.random.default_rng(0)
  fold = jax.jit(_fit.fold_last_axis, static_argnums=0)
  for rows in (1, 2, 3, 4, 8, 9, 16):
    deltas = jnp.asarray(rng.normal(size=(rows, 4)) * np.exp(3 * rng.normal(size=(rows, 1))),
                         jnp.float32)
    mean = jax.jit(lambda d: jnp.mean(d, -1))(deltas)
    np.testing.assert_array_equal(fold(jnp.add, deltas) / 4, mean)
    np.testing.assert_array_equal(
        fold(jnp.maximum, jnp.abs(deltas)), jax.jit(lambda d: jnp.max(jnp.abs(d), -1))(deltas)
    )


def test_fit_traces_no_reduction_over_the_probes_it_can_fold():
  # Two reductions remain in the estimate from a refresh's probes (the fit's
  # sums of squares), whatever K; the largest change and the mean over the
  # probes are folds, and the diagonal fit builds no K x K matrix.
  scales = _fit.check_probe_scales((-2.0, -1.0, 1.0, 2.0))

  def traced(num_groups):
    fitted = lambda losses: _probe.fitted(losses, jnp.array(2.0), scales, num_groups, False)
    closed = jax.make_jaxpr(fitted)(jnp.ones((num_groups, 4)))
    est = jax.eval_shape(fitted, jnp.ones((num_groups, 4)))
    assert est.curvature.shape == (num_groups,) and est.curvature_matrix is None
    names = _jaxprs.primitives(closed.jaxpr)
    return {name: _count(closed.jaxpr, name) for name in names if name.startswith("reduce_")}

  assert traced(2) == traced(8) == {"reduce_sum": 2}


@pytest.mark.parametrize(
    "scales", [(1.0,), (0.0, 1.0, 2.0), (1.0, 1.0), (float("nan"), 1.0)]
)
def test_bad_probe_scales_rejected(scales):
  with pytest.raises(ValueError, match="probe_scales"):
    hidlr_optax.ProbeEstimator(scales=scales)


# --------------------------------------------------------------------------
# The update rule.


def run_rule(rates, optimal, accepted, below=None, **kw):
  defaults = dict(smoothing=0.9, max_growth=None, min_learning_rate=0.0, max_learning_rate=None)
  defaults.update(kw)
  from hidlr_optax import _rule
  below = np.zeros(len(rates), bool) if below is None else below
  prop = _rule.Proposal(jnp.asarray(optimal), jnp.asarray(accepted), jnp.asarray(below))
  return np.asarray(_rule.next_rates(jnp.asarray(rates), prop, **defaults))


def test_rule_smoothing_clip_bounds_and_rejection():
  # smoothing towards eta*, with and without the growth clip
  np.testing.assert_allclose(run_rule([1.0], [1.5], [True]), [0.9 + 0.15])
  np.testing.assert_allclose(run_rule([1.0], [10.0], [True], max_growth=2.0), [0.9 + 0.2])
  # rejected groups keep their rate
  np.testing.assert_allclose(run_rule([1.0, 1.0], [1.5, 3.0], [True, False]), [1.05, 1.0])
  # user bounds
  np.testing.assert_allclose(run_rule([1.0], [100.0], [True], max_learning_rate=2.0), [2.0])
  np.testing.assert_allclose(run_rule([1.0], [0.6], [True], min_learning_rate=0.99), [0.99])


def test_rule_predicted_increase_cuts_at_once_by_at_most_max_growth():
  # eta = 1 > 2 * eta* = 0.2: the fit predicts a loss increase -> no smoothing,
  # the cut is bounded by max_growth (1 / 2 here), or goes to eta* unbounded.
  np.testing.assert_allclose(run_rule([1.0], [0.1], [True], max_growth=2.0), [0.5])
  np.testing.assert_allclose(run_rule([1.0], [0.1], [True], max_growth=20.0), [0.1])
  np.testing.assert_allclose(run_rule([1.0], [1e-6], [True], max_growth=None), [1e-6])
  # eta = 1 < 2 * eta* = 1.2: ordinary smoothed, clipped move.
  np.testing.assert_allclose(run_rule([1.0], [0.6], [True], max_growth=2.0), [0.96])


def test_propose_never_accepts_a_group_below_resolution():
  # A fit that looks perfect (b > 0, A > 0, R^2 = 1) is still rounding when
  # the group's probes moved the loss by no more than the resolution; under
  # accept="all" such a group neither passes nor blocks the others.
  from hidlr_optax import _rule

  def propose(below, accept):
    est = hidlr_optax.Estimate(
        slope=jnp.array([1.0, 1.0, -1.0]), curvature=jnp.array([2.0, 2.0, 2.0]),
        r_squared=jnp.ones(3), origin=jnp.array(1.0), below_resolution=jnp.asarray(below),
        curvature_matrix=None,
    )
    return _rule.propose(est, jnp.ones(3), min_r2=0.95, accept=accept, full=False)

  prop = propose([False, True, False], "group")
  assert prop.accepted.tolist() == [True, False, False]
  assert prop.below_resolution.tolist() == [False, True, False]
  assert propose([False, True, True], "all").accepted.tolist() == [True, False, False]
  assert propose([False, True, False], "all").accepted.tolist() == [False, False, False]
  # next_rates never moves a group towards an optimum it did not accept; a
  # group below resolution catches up by max_growth towards the others.
  np.testing.assert_allclose(
      run_rule([1e-6, 1.0], [1.0, 1.5], [False, True], [True, False], max_growth=4.0),
      [4e-6, 1.05],
  )
  np.testing.assert_allclose(
      run_rule([1e-6, 1.0], [1.0, 1.5], [False, True], [False, False], max_growth=4.0),
      [1e-6, 1.05],
  )


def test_loss_rounding_is_well_below_the_resolution():
  # Two float32 forwards at nearby points differ from the smooth curve through
  # them by a few ulp: a ReLU MLP's MSE on 256 rows, along a random sign
  # direction, at steps from 1e-7 to 1e-5 (max |change| 2 to 200 ulp). The
  # residual of a float64 quadratic fit is the rounding; the resolution
  # that separates measurements from it sits 8x above its largest value.
  x = jax.random.normal(jax.random.key(0), (256, 8))
  y = jnp.sin(x[:, 0]) + x[:, 1]
  keys = jax.random.split(jax.random.key(1), 3)
  params = [
      {"w": jax.random.normal(k, (m, n)) / np.sqrt(m), "b": jnp.zeros(n)}
      for k, (m, n) in zip(keys, [(8, 64), (64, 64), (64, 1)])
  ]

  def loss(p):
    h = x
    for layer in p[:-1]:
      h = jax.nn.relu(h @ layer["w"] + layer["b"])
    return jnp.mean((h @ p[-1]["w"] + p[-1]["b"] - y[:, None]) ** 2)

  direction = jax.tree.map(lambda a: jnp.sign(jax.random.normal(jax.random.key(2), a.shape)), params)
  along = jax.jit(jax.vmap(lambda s: loss(jax.tree.map(lambda a, d: a + s * d, params, direction))))
  origin = loss(params)
  ulp = float(jnp.finfo(jnp.float32).eps * jnp.abs(origin))
  worst = 0.0
  for scale in (1e-7, 1e-6, 1e-5):
    steps = np.linspace(-2, 2, 41) * scale
    change = np.asarray(along(jnp.asarray(steps, jnp.float32)), np.float64) - float(origin)
    features = np.stack([steps, steps**2, np.ones_like(steps)], axis=1)
    coeffs, *_ = np.linalg.lstsq(features, change, rcond=None)
    worst = max(worst, float(np.max(np.abs(change - features @ coeffs))) / ulp)
  assert 0 < worst < _resolution.RESOLUTION_ULPS / 8
  assert float(_resolution.loss_resolution(origin)) == pytest.approx(
      _resolution.RESOLUTION_ULPS * ulp, rel=1e-6
  )


@pytest.mark.parametrize("estimator", ["probe", "jvp"])
def test_a_rate_too_small_to_measure_is_held_not_fitted(estimator):
  # A rate of 1e-12 moves a float32 loss by less than rounding: its probes'
  # fit is noise, so the rate is held (and reported), not cut or grown by it.
  # A rate whose probes register is fitted as usual.
  params = jnp.array([3.0, -2.0])
  loss = lambda p: jnp.sum(p**2)
  for rate, below in ((1e-12, True), (1e-3, False)):
    tx = hidlr_optax.gen(optax.identity(), rate, smoothing=0.0, estimator=estimator)
    _, state, _ = sgd_step(tx, params, tx.init(params), loss)
    fit = hidlr_optax.fit_diagnostics(state)["all"]
    assert bool(fit.below_resolution) == below
    assert bool(fit.accepted) == (not below)
    new_rate = float(hidlr_optax.learning_rates(state)["all"])
    assert new_rate == pytest.approx(rate if below else 4 * rate, rel=1e-5)


def test_groups_below_resolution_neither_block_nor_enter_the_joint_check():
  # 'a' and 'b' are collinear (the joint check halves them); 'z' has a rate
  # too small to register. It is left out of S and of the scaling, is not
  # fitted (it grows, see catch_up), and does not stop 'a' and 'b' from
  # updating under accept="all".
  params = {"a": jnp.zeros(()), "b": jnp.zeros(()), "z": jnp.ones(())}
  loss = lambda p: (p["a"] + p["b"] - 3.0) ** 2 + p["z"] ** 2
  labels = {k: k for k in params}
  tx = hidlr_optax.hidlr(
      optax.identity(), {"a": 1e-2, "b": 1e-2, "z": 1e-12}, labels,
      smoothing=0.0, max_growth=None, accept="all",
  )
  _, state, _ = sgd_step(tx, params, tx.init(params), loss)
  rates = hidlr_optax.learning_rates(state)
  fits = hidlr_optax.fit_diagnostics(state)
  assert bool(fits["z"].below_resolution) and not bool(fits["z"].accepted)
  assert bool(fits["a"].accepted) and bool(fits["b"].accepted)
  assert float(hidlr_optax.find_states(state)[0].joint_factor) == pytest.approx(0.5, rel=1e-4)
  assert float(rates["a"]) == pytest.approx(0.25, rel=1e-4)
  assert float(rates["b"]) == pytest.approx(0.25, rel=1e-4)
  assert float(rates["z"]) == pytest.approx(2e-12)  # catching up: x2 without a growth bound


def test_accept_all_versus_group():
  # Group 'b' sees a concave direction (negative curvature): never passes.
  def loss(p):
    return jnp.sum(p["a"] ** 2) - 0.1 * jnp.sum(p["b"] ** 2) + jnp.sum(p["b"]) * 0.0

  params = {"a": jnp.ones(3), "b": jnp.ones(2)}
  labels = {"a": "a", "b": "b"}
  for accept, want_a_changed in (("group", True), ("all", False)):
    tx = hidlr_optax.hidlr(optax.identity(), 1e-2, labels, accept=accept, smoothing=0.0)
    _, state, _ = sgd_step(tx, params, tx.init(params), loss)
    fits = hidlr_optax.fit_diagnostics(state)
    rates = hidlr_optax.learning_rates(state)
    assert not bool(fits["b"].accepted)
    assert bool(fits["a"].accepted) == want_a_changed
    assert (abs(float(rates["a"]) - 1e-2) > 1e-6) == want_a_changed
    assert float(rates["b"]) == pytest.approx(1e-2)


# --------------------------------------------------------------------------
# K = 1 is GeN; an independent numpy implementation of its rule.


def logistic_problem():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(64, 5))
  y = (x @ rng.normal(size=5) + 0.3 * rng.normal(size=64) > 0).astype(np.float64)
  return x, y


def test_single_group_matches_independent_gen_rule():
  x, y = logistic_problem()
  with jax.enable_x64(True):

    def loss(w):
      z = jnp.asarray(x) @ w
      return jnp.mean(jnp.logaddexp(0.0, z) - jnp.asarray(y) * z)

    tx = hidlr_optax.gen(
        optax.identity(), 0.05, update_every=2, smoothing=0.9, max_growth=2.0, min_r2=0.99
    )
    w = jnp.zeros(5)
    state = tx.init(w)
    step = jax.jit(functools.partial(sgd_step, tx, loss=loss))
    ours = []
    for _ in range(12):
      w, state, _ = step(w, state)
      ours.append(float(hidlr_optax.learning_rates(state)["all"]))

    # Reference: GeN in plain numpy.
    def np_loss(w):
      z = x @ w
      return np.mean(np.logaddexp(0.0, z) - y * z)

    def np_grad(w):
      z = x @ w
      return x.T @ (1 / (1 + np.exp(-z)) - y) / len(y)

    v = np.array([-2.0, -1.0, 1.0, 2.0])
    w_ref, lr, ref = np.zeros(5), 0.05, []
    for t in range(12):
      g = np_grad(w_ref)
      if t % 2 == 0:
        xi = lr * v
        dl = np.array([np_loss(w_ref - s * g) for s in xi]) - np_loss(w_ref)
        feats = np.stack([-xi, 0.5 * xi**2], 1)
        (b, a), *_ = np.linalg.lstsq(feats, dl, rcond=None)
        r2 = 1 - np.sum((dl - feats @ [b, a]) ** 2) / np.sum((dl - dl.mean()) ** 2)
        if a > 0 and b > 0 and r2 >= 0.99:
          star = b / a
          assert lr <= 2 * star  # the safeguard never fires on this problem
          lr = 0.9 * lr + 0.1 * np.clip(star, lr / 2, 2 * lr)
      w_ref = w_ref - lr * g
      ref.append(lr)
    np.testing.assert_allclose(ours, ref, rtol=1e-8)
    np.testing.assert_allclose(np.asarray(w), w_ref, rtol=1e-8, atol=1e-12)
    assert ref[-1] > 0.05 * 1.1  # the rate did move


# --------------------------------------------------------------------------
# Robustness.


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_non_finite_probe_losses_leave_rate_unchanged(bad):
  params = {"a": jnp.ones(3), "b": jnp.ones(2)}
  origin = params

  def loss(p):
    moved = jnp.any(p["a"] != origin["a"])
    return jnp.sum(p["a"] ** 2) + jnp.sum(p["b"] ** 2) + jnp.where(moved, bad, 0.0)

  labels = {"a": "a", "b": "b"}
  out = {}
  for joint_check in (False, True):
    tx = hidlr_optax.hidlr(
        optax.identity(), 1e-2, labels, smoothing=0.0, joint_check=joint_check
    )
    _, state, updates = jax.jit(functools.partial(sgd_step, tx, loss=loss))(
        params, tx.init(params)
    )
    out[joint_check] = {k: float(v) for k, v in hidlr_optax.learning_rates(state).items()}
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    inner = hidlr_optax.find_states(state)[0]
    assert int(inner.num_refreshes) == 1
    assert int(inner.num_accepted["a"]) == 0 and int(inner.num_accepted["b"]) == 1
  assert out[False]["a"] == pytest.approx(1e-2)  # rejected, unchanged
  assert out[False]["b"] != pytest.approx(1e-2)  # the healthy group moved
  # The combined step moves 'a' too, so its loss is not finite: the joint check
  # falls back to the average of the K = 2 single steps.
  for k in labels:
    assert out[True][k] == pytest.approx(out[False][k] / 2, rel=1e-6)


def test_joint_check_falls_back_to_the_average_step_when_the_combined_loss_blows_up():
  params = {"a": jnp.ones(3), "b": jnp.ones(2), "c": jnp.ones(2)}
  origin = params

  def loss(p):
    both = jnp.any(p["a"] != origin["a"]) & jnp.any(p["b"] != origin["b"])
    return sum(jnp.sum(x**2) for x in jax.tree.leaves(p)) + jnp.where(both, jnp.inf, 0.0)

  labels = {k: k for k in params}
  out = {}
  for joint_check in (False, True):
    tx = hidlr_optax.hidlr(
        optax.identity(), 1e-2, labels, smoothing=0.0, joint_check=joint_check
    )
    _, state, _ = sgd_step(tx, params, tx.init(params), loss)
    out[joint_check] = {k: float(v) for k, v in hidlr_optax.learning_rates(state).items()}
  # Each group alone is fine, so all three are accepted; together they are not:
  # every rate drops to 1/3 of its fitted value.
  for k in labels:
    assert out[True][k] == pytest.approx(out[False][k] / 3, rel=1e-6)


# --------------------------------------------------------------------------
# The joint check.


def collinear_loss(p):
  """(sum_k w_k - 3)^2: every group moves the same output."""
  return (sum(jnp.sum(x) for x in jax.tree.leaves(p)) - 3.0) ** 2


@pytest.mark.parametrize("num_groups", [2, 4])
def test_joint_check_shrinks_collinear_groups_to_the_joint_minimum(num_groups):
  # Alone, each group's fitted rate is 1/2 and solves the problem; together the
  # K steps overshoot K-fold (residual r -> (1 - K) r). The joint quadratic
  # through L(w - sum eta_k d_k) gives t* = 1/K, which lands on the minimum.
  with jax.enable_x64(True):
    params = {f"w{k}": jnp.zeros((), jnp.float64) for k in range(num_groups)}
    labels = {k: k for k in params}
    final = {}
    for joint_check in (False, True):
      tx = hidlr_optax.hidlr(
          optax.identity(), 1e-2, labels, smoothing=0.0, max_growth=None,
          joint_check=joint_check,
      )
      new, state, _ = sgd_step(tx, params, tx.init(params), collinear_loss)
      rates = hidlr_optax.learning_rates(state)
      inner = hidlr_optax.find_states(state)[0]
      expected = 0.5 / num_groups if joint_check else 0.5
      for k in labels:
        np.testing.assert_allclose(float(rates[k]), expected, rtol=1e-8)
      np.testing.assert_allclose(
          float(inner.joint_factor), 1 / num_groups if joint_check else 1.0, rtol=1e-8
      )
      final[joint_check] = float(collinear_loss(new))
    assert final[True] < 1e-20
    np.testing.assert_allclose(final[False], (num_groups - 1) ** 2 * 9.0, rtol=1e-8)


def test_joint_check_leaves_separable_groups_alone():
  # On the ellipse the groups do not interact: the combined step is exactly
  # what the per-group fits predict, so no rate shrinks.
  with jax.enable_x64(True):
    params = {"x": jnp.array(50.0), "y": jnp.array(1.0)}
    loss = lambda p: p["x"] ** 2 + 100 * p["y"] ** 2
    tx = hidlr_optax.hidlr(
        optax.identity(), 1e-3, {"x": "x", "y": "y"}, smoothing=0.9
    )
    _, state, _ = sgd_step(tx, params, tx.init(params), loss)
    assert float(hidlr_optax.find_states(state)[0].joint_factor) == 1.0


def test_joint_factor_rule():
  from hidlr_optax import _rule

  def f(slopes, origin, joint):
    return float(_rule.joint_factor(
        jnp.asarray(slopes), jnp.ones(len(slopes)), jnp.asarray(origin), jnp.asarray(joint)
    ))

  # S = 1 * 2 + 1 * 2 = 4. Landing at or before the quadratic's minimum
  # (Delta L <= -S / 2) keeps the rates; past it, t* = S / (2 (Delta L + S)).
  assert f([2.0, 2.0], 10.0, 7.0) == 1.0
  assert f([2.0, 2.0], 10.0, 8.0) == 1.0
  assert f([2.0, 2.0], 10.0, 10.0) == pytest.approx(0.5)
  assert f([2.0, 2.0], 10.0, 14.0) == pytest.approx(0.25)
  # A non-finite slope is left out of S; no predicted decrease, no information.
  assert f([jnp.nan, 2.0], 10.0, 11.0) == pytest.approx(2 / 6)
  assert f([-2.0, 1.0], 10.0, 14.0) == 1.0
  # Never below 1 / (2K), the convex quadratic's bound: S = 4, t* = 1 / 20.
  assert f([2.0, 2.0], 10.0, 46.0) == pytest.approx(1 / 4)
  assert f([2.0, 2.0, 2.0], 10.0, 46.0) == pytest.approx(1 / 6)
  # A predicted decrease below JOINT_CHECK_ULPS (S = 2e-6 or 1e-4 against
  # L = 10 in float32, 256 ulp = 3e-4) tells nothing: the rates stay.
  assert _rule.JOINT_CHECK_ULPS == 256
  assert f([1e-6, 1e-6], 10.0, 10.001) == 1.0
  assert f([5e-5, 5e-5], 10.0, 10.0001) == 1.0
  assert f([1e-3, 1e-3], 10.0, 10.001) == pytest.approx(1 / 3, rel=1e-3)
  # A non-finite combined loss: the average of the single steps (1/K).
  assert f([2.0, 2.0, 2.0], 10.0, jnp.inf) == pytest.approx(1 / 3)
  assert f([2.0, 2.0], 10.0, jnp.nan) == pytest.approx(1 / 2)
  # A non-finite origin: nothing to compare with.
  assert f([2.0, 2.0], jnp.nan, jnp.nan) == 1.0


def test_zero_direction_is_rejected_not_nan():
  params = jnp.ones(3)
  tx = hidlr_optax.gen(optax.identity(), 1e-2)
  state = tx.init(params)
  updates, state = tx.update(jnp.zeros(3), state, params, value_fn=lambda p: jnp.sum(p**2))
  assert float(hidlr_optax.learning_rates(state)["all"]) == pytest.approx(1e-2)
  fit = hidlr_optax.fit_diagnostics(state)["all"]
  assert bool(fit.below_resolution) and not bool(fit.accepted)
  assert bool(jnp.all(updates == 0))


def test_rosenbrock_sgd_gen_rule_converges_with_safeguard():
  """GeN's rule over SGD on Rosenbrock, refreshed every step, converges with
  the immediate cut when eta > 2 eta* (docs/method.md, "The rate rule")."""
  def rosen(p):
    return (1 - p[0]) ** 2 + 100 * (p[1] - p[0] ** 2) ** 2

  tx = hidlr_optax.gen(optax.identity(), 1e-3, update_every=1, smoothing=0.9, max_growth=2.0)

  def body(carry, _):
    p, s = carry
    p, s, _ = sgd_step(tx, p, s, rosen)
    return (p, s), rosen(p)

  (p, _), losses = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), length=5000))(
      jnp.zeros(2), tx.init(jnp.zeros(2))
  )
  assert bool(jnp.all(jnp.isfinite(losses)))
  assert float(losses[-1]) < 1e-4


def test_refresh_schedule_and_laziness():
  calls = []
  update_every = 4

  def loss(p):
    jax.debug.callback(lambda: calls.append(1))
    return jnp.sum(p**2)

  tx = hidlr_optax.gen(optax.identity(), 1e-2, update_every=update_every)

  @jax.jit
  def step(p, s):
    updates, s = tx.update(2 * p, s, p, value_fn=loss)
    return optax.apply_updates(p, updates), s

  p, s = jnp.ones(3), tx.init(jnp.ones(3))
  per_step = []
  for _ in range(9):
    before = len(calls)
    p, s = step(p, s)
    jax.effects_barrier()
    per_step.append(len(calls) - before)
  refresh_steps = [i for i, n in enumerate(per_step) if n]
  assert refresh_steps == [0, 4, 8]
  assert int(hidlr_optax.find_states(s)[0].num_refreshes) == 3


def test_static_refresh_false_traces_no_conditional_and_no_probe():
  traced = []

  def loss(p):
    traced.append(1)
    return jnp.sum(p["a"] ** 2) + jnp.sum(p["b"] ** 2)

  tx = hidlr_optax.hidlr(optax.identity(), 1e-2, {"a": "a", "b": "b"})
  p = {"a": jnp.ones(3), "b": jnp.ones(2)}
  s = tx.init(p)
  update = lambda refresh: jax.make_jaxpr(
      lambda p, s: tx.update(p, s, p, value_fn=loss, refresh=refresh)
  )(p, s)
  top_level = lambda closed: {eqn.primitive.name for eqn in closed.jaxpr.eqns}
  skipped = update(False)
  assert not traced
  assert "cond" not in _jaxprs.primitives(skipped.jaxpr)
  assert "cond" not in top_level(update(True)) and traced
  assert "cond" in top_level(update(None))


def test_caller_scheduled_refresh_matches_the_count_schedule():
  rng = np.random.default_rng(0)
  target = {"a": jnp.asarray(rng.normal(size=3)), "b": jnp.asarray(rng.normal(size=2))}
  loss = lambda p: sum(jnp.sum(jnp.cosh(p[k] - target[k])) for k in p)
  tx = hidlr_optax.hidlr(optax.scale_by_adam(), 1e-2, {"a": "a", "b": "b"}, update_every=3)

  @functools.partial(jax.jit, static_argnames="refresh")
  def step(p, s, refresh=None):
    updates, s = tx.update(jax.grad(loss)(p), s, p, value_fn=loss, refresh=refresh)
    return optax.apply_updates(p, updates), s

  start = {"a": jnp.zeros(3), "b": jnp.zeros(2)}
  by_count = by_caller = (start, tx.init(start))
  for i in range(10):
    by_count = step(*by_count)
    by_caller = step(*by_caller, refresh=i % 3 == 0)
  assert_close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-7)
  jax.tree.map(assert_close, by_caller, by_count)
  assert int(hidlr_optax.find_states(by_caller[1])[0].num_refreshes) == 4


def test_traced_refresh_decides_at_run_time():
  tx = hidlr_optax.gen(optax.identity(), 1e-2, update_every=100)
  p = jnp.ones(3)

  @jax.jit
  def step(p, s, refresh):
    updates, s = tx.update(2 * p, s, p, value_fn=lambda q: jnp.sum(q**2), refresh=refresh)
    return optax.apply_updates(p, updates), s

  s = tx.init(p)
  for flag in (False, True, False, True):
    p, s = step(p, s, jnp.asarray(flag))
  state = hidlr_optax.find_states(s)[0]
  assert int(state.num_refreshes) == 2 and int(state.count) == 4


def test_value_argument_saves_the_origin_forward():
  calls = []

  def loss(p):
    jax.debug.callback(lambda: calls.append(1))
    return jnp.sum(p**2)

  p = jnp.ones(3)
  counts = []
  for value in (None, loss(p)):
    jax.effects_barrier()
    calls.clear()
    tx = hidlr_optax.gen(optax.identity(), 1e-2, estimator=hidlr_optax.ProbeEstimator(batch_size=1))
    tx.update(2 * p, tx.init(p), p, value_fn=loss, value=value)
    jax.effects_barrier()
    counts.append(len(calls))
  assert counts == [5, 4]


def test_joint_check_costs_one_forward_per_refresh_and_only_for_several_groups():
  calls = []

  def loss(p):
    jax.debug.callback(lambda: calls.append(1))
    return jnp.sum(p["a"] ** 2) + jnp.sum(p["b"] ** 2)

  p = {"a": jnp.ones(3), "b": jnp.ones(2)}
  counts = {}
  for labels, joint_check in [({"a": "a", "b": "b"}, True), ({"a": "a", "b": "b"}, False),
                              (None, True)]:
    jax.effects_barrier()
    calls.clear()
    tx = hidlr_optax.hidlr(
        optax.identity(), 1e-2, labels, estimator=hidlr_optax.ProbeEstimator(batch_size=1), joint_check=joint_check
    )
    tx.update(p, tx.init(p), p, value_fn=loss)
    jax.effects_barrier()
    counts[labels is not None, joint_check] = len(calls)
  # 4 probes per group + the origin (+ the combined step for K > 1)
  assert counts == {(True, True): 10, (True, False): 9, (False, True): 5}


def _count(jaxpr, primitive: str) -> int:
  """How many equations of ``primitive`` a jaxpr holds, sub-jaxprs included."""
  return sum(
      (eqn.primitive.name == primitive)
      + sum(_count(sub, primitive) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
      for eqn in jaxpr.eqns
  )


def test_joint_check_forward_is_the_probe_loops_last_iteration():
  x = jnp.arange(12.0).reshape(4, 3)
  loss = lambda p: jnp.sum(jnp.cosh(x @ p["w"] + p["b"]))  # cosh: in the loss only
  p = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
  forwards = {}
  for batch_size in (1, None):
    for joint_check in (True, False):
      tx = hidlr_optax.hidlr(
          optax.identity(), 1e-2, {"w": "w", "b": "b"},
          estimator=hidlr_optax.ProbeEstimator(batch_size=batch_size), joint_check=joint_check,
      )
      s = tx.init(p)
      jaxpr = jax.make_jaxpr(lambda p, s: tx.update(p, s, p, value_fn=loss, refresh=True))(p, s)
      forwards[batch_size, joint_check] = _count(jaxpr.jaxpr, "cosh")
  # One probe at a time: one forward in the program, the joint check included.
  assert forwards[1, True] == forwards[1, False] == 1
  # One vmap per group's probes: a forward per group, and one more for the check.
  assert forwards[None, True] == forwards[None, False] + 1 == 3


def _size(jaxpr) -> int:
  """How many equations a jaxpr holds, sub-jaxprs included."""
  return sum(
      1 + sum(_size(sub) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
      for eqn in jaxpr.eqns
  )


def test_step_does_not_grow_with_the_number_of_groups():
  # The state holds each field stacked over the groups, so the step reads and
  # writes every group at once: with the leaves fixed, the program is the
  # same size for 2 groups as for 4 (a per-group scalar state added slices,
  # each a kernel of its own for XLA to compile).
  p = {f"l{i}": jnp.full((3, 3), i + 1.0) for i in range(4)}
  loss = lambda p: sum(jnp.sum(jnp.tanh(v) ** 2) for v in p.values())
  sizes = {}
  for k in (2, 4):
    tx = hidlr_optax.scale_by_hidlr(1e-2, {f"l{i}": f"g{i * k // 4}" for i in range(4)})
    s = tx.init(p)
    assert s.learning_rates.stacked.shape == (k,)
    jaxpr = jax.make_jaxpr(lambda g, s: tx.update(g, s, p, value_fn=loss))(p, s)
    sizes[k] = _size(jaxpr.jaxpr)
  assert sizes[2] == sizes[4], sizes


def test_per_group_fields_read_as_mappings_and_flatten_stacked():
  p = {"a": jnp.ones(2), "b": jnp.ones(3)}
  tx = hidlr_optax.scale_by_hidlr(1e-2, {"a": "a", "b": "b"}, update_every=1)
  s = tx.init(p)
  updates, s = tx.update(p, s, p, value_fn=lambda q: jnp.sum(q["a"] ** 2) + jnp.sum(q["b"] ** 2))
  rates = s.learning_rates
  assert isinstance(rates, hidlr_optax.PerGroup)
  assert list(rates) == ["a", "b"] and len(rates) == 2 and "b" in rates
  assert [float(r) for r in rates.values()] == [float(x) for x in rates.stacked]
  assert dict(rates.items()) == hidlr_optax.learning_rates(s)
  with pytest.raises(KeyError):
    rates["c"]
  fit_b = s.fits["b"]
  assert isinstance(fit_b, hidlr_optax.GroupFit) and fit_b.slope.shape == ()
  assert float(fit_b.slope) == float(s.fits.stacked.slope[1])
  assert int(s.num_accepted["a"]) == int(s.num_accepted.stacked[0]) == 1
  # One leaf per field, whatever the number of groups, named in key paths.
  paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(s)]
  assert paths == [
      ".count", ".learning_rates.stacked", ".fits.stacked.slope",
      ".fits.stacked.curvature", ".fits.stacked.r_squared", ".fits.stacked.accepted",
      ".fits.stacked.below_resolution", ".fits.stacked.optimal_rate",
      ".fits.stacked.uphill_refreshes", ".num_refreshes", ".num_accepted.stacked",
      ".num_unresolved.stacked", ".joint_factor", ".loss", ".first_loss",
  ]
  # Maps over the state keep the labels.
  doubled = jax.tree.map(lambda x: 2 * x, s)
  assert list(doubled.learning_rates) == ["a", "b"]
  assert float(doubled.learning_rates["b"]) == 2 * float(rates["b"])


# --------------------------------------------------------------------------
# Probe batching.


def test_auto_probe_batching_is_chunked_on_cpu_and_vmapped_elsewhere(monkeypatch):
  
  loss = lambda p: jnp.sum(p["a"] ** 2) + jnp.sum(p["b"] ** 4)
  p = {"a": jnp.ones(3), "b": jnp.ones(2)}

  def primitives(batch_size):
    tx = hidlr_optax.hidlr(
        optax.identity(), 1e-2, {"a": "a", "b": "b"}, estimator=hidlr_optax.ProbeEstimator(batch_size=batch_size)
    )
    s = tx.init(p)
    return _jaxprs.primitives(jax.make_jaxpr(
        lambda p, s: tx.update(p, s, p, value_fn=loss, refresh=True)
    )(p, s).jaxpr)

  # lax.map is a scan; per-group vmaps are not.
  assert "scan" in primitives(1) and "scan" not in primitives(None)
  for backend, chunked in (("cpu", True), ("gpu", False), ("tpu", False)):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert _probe.resolve_batch_size("auto") == (1 if chunked else None)
    assert ("scan" in primitives("auto")) == chunked
  assert _probe.resolve_batch_size(None) is None
  assert _probe.resolve_batch_size(3) == 3


@pytest.mark.parametrize("batch_size", [None, 1, 3, 100])
def test_probe_batch_sizes_agree(batch_size):
  params = {"a": jnp.arange(4.0), "b": jnp.ones((2, 2))}

  def loss(p):
    return jnp.sum(jnp.cosh(p["a"])) + jnp.sum(p["b"] ** 4) + jnp.sum(p["a"][:2]) * jnp.sum(p["b"])

  labels = {"a": "a", "b": "b"}
  out = []
  for bs in (None, batch_size):
    tx = hidlr_optax.hidlr(optax.identity(), 1e-2, labels, estimator=hidlr_optax.ProbeEstimator(batch_size=bs), fit="full")
    _, state, _ = sgd_step(tx, params, tx.init(params), loss)
    out.append(hidlr_optax.fit_diagnostics(state))
  for label in ("a", "b"):
    np.testing.assert_allclose(out[0][label].slope, out[1][label].slope, rtol=1e-5)
    np.testing.assert_allclose(out[0][label].curvature, out[1][label].curvature, rtol=1e-4)


@pytest.mark.parametrize(
    "estimator, batch_size", [("probe", None), ("probe", 1), ("probe", 3), ("jvp", None)]
)
def test_estimates_carry_the_loss_at_the_parameters(estimator, batch_size):
  from hidlr_optax._grouping import build_layout

  params = {"a": jnp.arange(4.0), "b": jnp.ones((2, 2))}
  loss = lambda p: jnp.sum(jnp.cosh(p["a"])) + jnp.sum(p["b"] ** 4)
  layout = build_layout({"a": "a", "b": "b"}, params)
  rates = jnp.asarray([1e-2, 2e-2])
  line = hidlr_optax.Line(loss, params, params, layout, rates)
  if estimator == "jvp":
    est, _ = hidlr_optax.JvpEstimator().estimate(line, full=False)
  else:
    probe = hidlr_optax.ProbeEstimator(batch_size=batch_size)
    est, _ = probe.estimate(line, full=False)
  np.testing.assert_allclose(est.origin, loss(params), rtol=1e-6)
  if estimator == "probe":  # the same fit as with the origin given
    given, _ = probe.estimate(line._replace(value=loss(params)), full=False)
    np.testing.assert_allclose(est.slope, given.slope, rtol=1e-4)
    np.testing.assert_allclose(est.r_squared, given.r_squared, rtol=1e-5)


def test_probe_coefficients_layout():
  c = _evaluation.probe_coefficients(2, np.array([-1.0, 1.0]), full=True)
  np.testing.assert_array_equal(c, [[-1, 0], [1, 0], [0, -1], [0, 1], [-1, -1], [1, 1]])


# --------------------------------------------------------------------------
# Errors at the boundary.


def test_missing_value_fn_and_params():
  tx = hidlr_optax.gen(optax.identity())
  p = jnp.ones(2)
  state = tx.init(p)
  with pytest.raises(ValueError, match="value_fn"):
    tx.update(p, state, p)
  with pytest.raises(ValueError, match="params"):
    tx.update(p, state, None, value_fn=jnp.sum)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(learning_rate=-1.0), "learning_rate"),
        (dict(learning_rate={"a": 1.0, "b": -1.0}), "learning_rate"),
        (dict(update_every=0), "update_every"),
        (dict(update_every=2.5), "update_every"),
        (dict(smoothing=1.0), "smoothing"),
        (dict(smoothing=-0.1), "smoothing"),
        (dict(min_r2=1.5), "min_r2"),
        (dict(max_growth=0.5), "max_growth"),
        (dict(min_learning_rate=-1.0), "min_learning_rate"),
        (dict(max_learning_rate=0.0), "max_learning_rate"),
        (dict(min_learning_rate=1.0, max_learning_rate=0.5), "min_learning_rate"),
        (dict(fit="exact"), "fit"),
        (dict(estimator="hessian"), "estimator"),
        (dict(accept="some"), "accept"),
        (dict(joint_check="yes"), "joint_check"),
    ],
)
def test_bad_hyperparameters_fail_at_construction(kwargs, match):
  with pytest.raises(ValueError, match=match):
    hidlr_optax.scale_by_hidlr(**kwargs)


@pytest.mark.parametrize("batch_size", [0, "big", 2.0, True])
def test_bad_probe_batch_sizes_fail_at_construction(batch_size):
  with pytest.raises(ValueError, match="batch_size"):
    hidlr_optax.ProbeEstimator(batch_size=batch_size)


def test_an_estimator_that_is_not_one_is_named():
  with pytest.raises(ValueError, match="estimator"):
    hidlr_optax.scale_by_hidlr(estimator=object())


def test_gen_rejects_param_labels():
  with pytest.raises(TypeError, match="param_labels"):
    hidlr_optax.gen(optax.identity(), param_labels={"a": "a"})


@pytest.mark.parametrize(
    "shape, dtype", [((9,), jnp.float32), ((2,), jnp.bool_), ((2, 3), jnp.int32)]
)
def test_unread_loop_carries_compile_as_data_not_kernels(shape, dtype):
  """The probe loop's placeholder carries are constants in the compiled step,
  where zeros would be a broadcast kernel (a distinct fusion, compile time)."""
  spec = jax.ShapeDtypeStruct(shape, dtype)
  value = _evaluation.unread(spec)
  assert value.shape == shape and value.dtype == dtype
  compiled = lambda f: jax.jit(f).lower().compile().as_text()
  assert " fusion(" not in compiled(lambda: _evaluation.unread(spec))
  assert " fusion(" in compiled(lambda: jnp.zeros(shape, dtype))  # what it avoids
