"""Noise-aware fits: per-example losses from ``value_fn``.

When ``value_fn`` returns per-example losses ``(B,)``, the fits are those of
their mean, with standard errors of each group's slope and curvature over the
batch; a fit whose signal-to-noise ratio is below ``min_snr`` is
noise-dominated and its rate is held, and an accepted step is shrunk by
``snr^2 / (snr^2 + 1)``. With a scalar ``value_fn`` nothing changes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hidlr_optax
from hidlr_optax import _estimators, _fit, _rule
from hidlr_optax._grouping import build_layout

SCALES = _fit.check_probe_scales((-2.0, -1.0, 1.0, 2.0))
LABELS = {"w": "w", "b": "b"}


def _problem(seed: int = 0, batch: int = 48, dtype=jnp.float32):
  """A random least-squares problem with per-example losses.

  ``l_j(w) = (a_j . w + b - y_j)^2 / 2``: along a step ``-s eta_k d_k`` each
  example's change is an exact quadratic with ``beta_kj = eta_k (a_j .
  d_k) r_j`` and ``M_kkj = eta_k^2 (a_j . d_k)^2`` (``r_j`` the residual).
  """
  rng = np.random.default_rng(seed)
  a = jnp.asarray(rng.normal(size=(batch, 4)), dtype)
  y = jnp.asarray(rng.normal(size=batch) + 1.0, dtype)
  params = {"w": jnp.asarray(rng.normal(size=4), dtype), "b": jnp.asarray([0.3], dtype)}
  per_example = lambda p: 0.5 * (a @ p["w"] + p["b"][0] - y) ** 2
  directions = jax.grad(lambda p: jnp.mean(per_example(p)))(params)
  return a, y, params, per_example, directions


def _closed_form(a, y, params, directions, rates):
  """Per-example slopes and curvatures of the groups ``("b", "w")`` (the
  layout's order), shape (2, B)."""
  residual = a @ params["w"] + params["b"][0] - y
  along = jnp.stack([jnp.broadcast_to(directions["b"][0], y.shape), a @ directions["w"]])
  rates = rates[:, None]
  return rates * along * residual, rates**2 * along**2


def _estimate(value_fn, params, directions, rates, estimator="probe", batch_size=None,
              origin=None, full=False):
  layout = build_layout(LABELS, params)
  if estimator == "jvp":
    return _estimators.jvp_estimate(value_fn, params, directions, layout, rates, full=full)
  est, _ = _estimators.probe_estimate(
      value_fn, params, directions, layout, rates, SCALES,
      full=full, origin=origin, batch_size=batch_size,
  )
  return est


# --------------------------------------------------------------------------
# (a) The per-example fits average to the scalar fit.


@pytest.mark.parametrize("estimator, batch_size", [("probe", None), ("probe", 1), ("probe", 3),
                                                   ("jvp", None)])
def test_per_example_fit_means_equal_the_scalar_fit(estimator, batch_size):
  # In float64, so that the probes' differences lose no digits that would
  # hide a mismatch (in float32 the two agree to the probes' rounding).
  with jax.enable_x64(True):
    _, _, params, per_example, directions = _problem(dtype=jnp.float64)
    rates = jnp.asarray([0.05, 0.2], jnp.float64)
    mean = lambda p: jnp.mean(per_example(p))
    vector = _estimate(per_example, params, directions, rates, estimator, batch_size)
    scalar = _estimate(mean, params, directions, rates, estimator, batch_size)
    assert scalar.slope_se is None and scalar.curvature_se is None
    assert vector.origin.shape == () and vector.slope_se.shape == (2,)
    assert vector.slope.dtype == jnp.float64
    for field in ("slope", "curvature", "r_squared", "origin"):
      np.testing.assert_allclose(getattr(vector, field), getattr(scalar, field), rtol=1e-9,
                                 err_msg=field)
    np.testing.assert_array_equal(vector.below_resolution, scalar.below_resolution)


def test_standard_errors_of_the_linear_fit_match_per_example_least_squares():
  rng = np.random.default_rng(1)
  deltas = rng.normal(size=(3, SCALES.size, 10))
  got = _fit.per_example_standard_errors(jnp.asarray(deltas), SCALES)
  features = np.stack([-SCALES, 0.5 * SCALES**2], axis=1)
  coeffs = np.stack([
      np.stack([np.linalg.lstsq(features, deltas[m, :, j], rcond=None)[0] for j in range(10)], -1)
      for m in range(3)
  ])  # (3, 2, 10)
  want = coeffs.std(axis=-1, ddof=1) / np.sqrt(10)
  np.testing.assert_allclose(got.slope, want[:, 0], rtol=1e-5)
  np.testing.assert_allclose(got.curvature, want[:, 1], rtol=1e-5)
  # ... and their means are the fit of the mean curve.
  mean_fit = _fit.fit_quadratics(jnp.asarray(deltas.mean(-1)), SCALES)
  np.testing.assert_allclose(mean_fit.slope, coeffs[:, 0].mean(-1), rtol=1e-6)


# --------------------------------------------------------------------------
# (b) The standard errors: closed form and Monte Carlo.


@pytest.mark.parametrize("estimator, batch_size", [("probe", None), ("probe", 1), ("jvp", None)])
def test_standard_errors_match_the_closed_form(estimator, batch_size):
  a, y, params, per_example, directions = _problem()
  rates = jnp.asarray([0.05, 0.2])
  est = _estimate(per_example, params, directions, rates, estimator, batch_size)
  slopes, curvatures = _closed_form(a, y, params, directions, rates)
  root_b = np.sqrt(y.shape[0])
  np.testing.assert_allclose(est.slope, slopes.mean(-1), rtol=1e-4)
  np.testing.assert_allclose(est.curvature, curvatures.mean(-1), rtol=1e-4)
  # The bias's curvature is the same for every example: its standard error
  # is 0, up to the probes' rounding.
  np.testing.assert_allclose(est.slope_se, np.std(slopes, -1, ddof=1) / root_b, rtol=1e-3)
  np.testing.assert_allclose(est.curvature_se, np.std(curvatures, -1, ddof=1) / root_b,
                             rtol=1e-3, atol=1e-6)


def test_standard_errors_match_the_spread_of_the_fit_over_batches():
  # Draw many batches from one population: the fitted slope's and
  # curvature's spread over batches is what the standard error estimates.
  rng = np.random.default_rng(2)
  num_batches, batch = 400, 32
  a = jnp.asarray(rng.normal(size=(num_batches, batch, 4)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(num_batches, batch)) + 1.0, jnp.float32)
  params = {"w": jnp.asarray([0.5, -0.2, 0.1, 0.3]), "b": jnp.asarray([0.1])}
  directions = {"w": jnp.asarray([1.0, 0.5, -0.5, 0.2]), "b": jnp.asarray([-0.3])}
  rates = jnp.asarray([0.1, 0.1])

  def one(a, y):
    per_example = lambda p: 0.5 * (a @ p["w"] + p["b"][0] - y) ** 2
    est = _estimate(per_example, params, directions, rates)
    return est.slope, est.curvature, est.slope_se, est.curvature_se

  slope, curvature, slope_se, curvature_se = jax.jit(jax.vmap(one))(a, y)
  np.testing.assert_allclose(np.mean(slope_se, 0), np.std(slope, 0, ddof=1), rtol=0.12)
  np.testing.assert_allclose(np.mean(curvature_se, 0), np.std(curvature, 0, ddof=1), rtol=0.12)


# --------------------------------------------------------------------------
# (c) A pure-noise slope is noise-dominated and its rate is held.


def _pure_noise(batch: int = 64):
  """Per-example losses ``10 + z_j x + x^2 / 2`` whose mean slope is tiny.

  ``z_j`` has spread 1 and mean ``0.1 / sqrt(B)``: the mean loss along
  ``x`` is a quadratic whose slope is a tenth of its standard error.
  """
  rng = np.random.default_rng(3)
  z = rng.normal(size=batch)
  z = z - z.mean()
  z = z / z.std(ddof=1) + 0.1 / np.sqrt(batch)
  z = jnp.asarray(z, jnp.float32)
  return lambda p: 10.0 + z * p[0] + 0.5 * p[0] ** 2


@pytest.mark.parametrize("estimator", ["probe", "jvp"])
def test_pure_noise_is_noise_dominated_and_the_rate_is_held(estimator):
  per_example = _pure_noise()
  params, direction = jnp.zeros(1), jnp.ones(1)
  kwargs = dict(update_every=1, estimator=estimator)
  tx = hidlr_optax.scale_by_hidlr(0.1, **kwargs)
  _, state = tx.update(direction, tx.init(params), params, value_fn=per_example)
  fit = hidlr_optax.fit_diagnostics(state)["all"]
  assert not bool(fit.accepted) and not bool(fit.below_resolution)
  assert abs(float(fit.slope_snr)) < 0.2 and float(fit.curvature_snr) > 100
  assert int(state.num_noisy["all"]) == 1 and int(state.num_accepted["all"]) == 0
  assert float(state.learning_rates["all"]) == pytest.approx(0.1)
  # The paper's rule, on the mean, accepts the tiny slope and cuts the rate.
  scalar = lambda p: jnp.mean(per_example(p))
  _, state = tx.update(direction, tx.init(params), params, value_fn=scalar)
  assert int(state.num_accepted["all"]) == 1 and int(state.num_noisy["all"]) == 0
  assert float(state.learning_rates["all"]) == pytest.approx(0.1 / 4)
  assert np.isnan(float(hidlr_optax.fit_diagnostics(state)["all"].slope_snr))


def test_signal_passes_and_the_step_is_shrunk_by_its_snr():
  rates = jnp.asarray([1.0, 1.0, 1.0])
  est = _estimators.Estimate(
      slope=jnp.asarray([2.0, 2.0, 2.0]), curvature=jnp.asarray([4.0, 4.0, 4.0]),
      r_squared=jnp.ones(3), origin=jnp.asarray(1.0), below_resolution=jnp.zeros(3, bool),
      curvature_matrix=None,
      slope_se=jnp.asarray([0.0, 0.5, 2.0]), curvature_se=jnp.asarray([1.0, 1.0, 1.0]),
  )
  proposal = _rule.propose(est, rates, min_r2=0.95, accept="group", full=False, min_snr=2.0)
  snr = 4.0
  np.testing.assert_array_equal(proposal.accepted, [True, True, False])
  np.testing.assert_array_equal(proposal.noisy, [False, False, True])
  np.testing.assert_allclose(proposal.optimal_rates[:2], [0.5, 0.5 * snr**2 / (snr**2 + 1)])
  # min_snr=0 keeps the shrinkage and accepts every positive fit.
  loose = _rule.propose(est, rates, min_r2=0.95, accept="group", full=False, min_snr=0.0)
  np.testing.assert_array_equal(loose.accepted, [True, True, True])
  np.testing.assert_allclose(loose.optimal_rates[2], 0.5 * 0.5)
  # Without standard errors the rule is the paper's.
  plain = _rule.propose(est._replace(slope_se=None, curvature_se=None), rates,
                        min_r2=0.95, accept="group", full=False)
  assert plain.noisy is None
  np.testing.assert_allclose(plain.optimal_rates, [0.5, 0.5, 0.5])


# --------------------------------------------------------------------------
# (d) Every estimator path gives the same estimate from per-example losses.


def _run(per_example, params, directions, steps=3, value=None, **kwargs):
  tx = hidlr_optax.scale_by_hidlr(
      {"w": 0.05, "b": 0.2}, LABELS, update_every=1, smoothing=0.0, max_growth=None, **kwargs
  )

  @jax.jit
  def step(p, s):
    v = None if value is None else value(p)
    updates, s = tx.update(directions(p), s, p, value_fn=per_example, value=v)
    return optax.apply_updates(p, updates), s

  p, s = params, tx.init(params)
  for _ in range(steps):
    p, s = step(p, s)
  return p, s


@pytest.mark.parametrize("joint_check", [True, False])
def test_chunked_vmapped_and_jvp_agree_on_per_example_losses(joint_check):
  a, y, params, per_example, _ = _problem(batch=40)
  directions = jax.grad(lambda p: jnp.mean(per_example(p)))
  runs = {
      name: _run(per_example, params, directions, joint_check=joint_check, **kw)
      for name, kw in {
          "chunks of 1": dict(probe_batch_size=1),
          "chunks of 3": dict(probe_batch_size=3),
          "vmapped": dict(probe_batch_size=None),
          "jvp": dict(estimator="jvp"),
          "vector value": dict(probe_batch_size=1),
      }.items()
  }
  runs["vector value"] = _run(per_example, params, directions, joint_check=joint_check,
                              probe_batch_size=None, value=per_example)
  runs["scalar value"] = _run(per_example, params, directions, joint_check=joint_check,
                              probe_batch_size=1, value=lambda p: jnp.mean(per_example(p)))
  _, reference = runs["chunks of 1"]
  fits = reference.fits.stacked
  assert np.all(np.isfinite(fits.slope_snr)) and np.all(np.isfinite(fits.curvature_snr))
  assert int(reference.num_refreshes) == 3
  for name, (_, state) in runs.items():
    got = state.fits.stacked
    # The bias's curvature is the same for every example: its ratio is
    # rounding over a standard error of 0, large but not reproducible.
    clipped = lambda fit, field: np.minimum(getattr(fit, field), 1e4)
    for field in ("slope", "curvature", "slope_snr", "curvature_snr"):
      np.testing.assert_allclose(clipped(got, field), clipped(fits, field), rtol=1e-3,
                                 err_msg=f"{name}: {field}")
    np.testing.assert_allclose(state.learning_rates.stacked, reference.learning_rates.stacked,
                               rtol=1e-3, err_msg=name)
    np.testing.assert_array_equal(state.num_noisy.stacked, reference.num_noisy.stacked)


def test_full_fit_and_period_horizon_take_per_example_losses():
  _, _, params, per_example, _ = _problem(batch=40)
  directions = jax.grad(lambda p: jnp.mean(per_example(p)))
  for kwargs in (dict(fit="full"), dict(fit="full", estimator="jvp"), dict(horizon="period")):
    _, state = _run(per_example, params, directions, **kwargs)
    fits = state.fits.stacked
    assert np.all(np.isfinite(fits.slope_snr)), kwargs
    assert np.all(np.isfinite(state.learning_rates.stacked)), kwargs


def test_shrinkage_on_an_exact_quadratic():
  # One refresh with smoothing 0 and no growth bound sets the rate to the
  # shrunk optimum: eta * beta / M * snr^2 / (snr^2 + 1), from the closed form.
  a, y, params, per_example, directions = _problem()
  tx = hidlr_optax.scale_by_hidlr(
      {"w": 0.05, "b": 0.2}, LABELS, update_every=1, smoothing=0.0, max_growth=None,
      joint_check=False, min_snr=0.0,
  )
  _, state = tx.update(directions, tx.init(params), params, value_fn=per_example)
  assert list(state.learning_rates) == ["b", "w"]
  rates = jnp.asarray([0.2, 0.05])
  slopes, curvatures = _closed_form(a, y, params, directions, rates)
  beta, m = slopes.mean(-1), curvatures.mean(-1)
  snr = beta / (np.std(slopes, -1, ddof=1) / np.sqrt(y.shape[0]))
  want = rates * beta / m * snr**2 / (snr**2 + 1)
  np.testing.assert_allclose(state.learning_rates.stacked, want, rtol=1e-3)
  np.testing.assert_allclose(state.fits.stacked.slope_snr, snr, rtol=1e-3)


# --------------------------------------------------------------------------
# (e) min_snr under optax.inject_hyperparams.


def test_min_snr_is_an_injected_hyperparameter():
  _, _, params, per_example, directions = _problem()
  tx = optax.inject_hyperparams(hidlr_optax.scale_by_hidlr, static_args=hidlr_optax.STATIC_ARGS)(
      learning_rate=0.05, param_labels=LABELS, update_every=1, min_snr=1e9,
  )
  traces = []

  @jax.jit
  def step(s):
    traces.append(1)
    _, s = tx.update(directions, s, params, value_fn=per_example)
    return s

  state = tx.init(params)
  assert "min_snr" in state.hyperparams
  strict = hidlr_optax.find_states(step(state))[0]
  assert list(strict.num_noisy.stacked) == [1, 1] and not np.any(strict.fits.stacked.accepted)
  loose = hidlr_optax.find_states(step(hidlr_optax.set_hyperparams(state, min_snr=2.0)))[0]
  assert list(loose.num_noisy.stacked) == [0, 0] and np.all(loose.fits.stacked.accepted)
  assert len(traces) == 1


# --------------------------------------------------------------------------
# (f) The scalar path is unchanged.

#: Rates of :func:`_scalar_run` at commit aea24b1, before per-example losses.
SCALAR_RATES = {
    "probe": [
        [9.9999997764825821e-03, 9.9999997764825821e-03],
        [1.7333784699440002e-01, 2.5734107475727797e-03],
        [1.4172831177711487e-01, 2.1059727296233177e-03],
        [1.4172831177711487e-01, 2.1059727296233177e-03],
        [8.6099401116371155e-02, 1.2116410732269287e+00],
        [8.6099401116371155e-02, 1.2116410732269287e+00],
        [7.9436324536800385e-02, 9.4366222620010376e-01],
        [2.4997618198394775e+00, 9.4366222620010376e-01],
    ],
    "jvp": [
        [0.009999999776482582, 0.009999999776482582],
        [0.5546205043792725, 0.009999999776482582],
        [0.5546205043792725, 0.009999999776482582],
        [2.721968650817871, 0.009999999776482582],
        [0.7272490859031677, 0.2891102135181427],
        [5.106848239898682, 0.2891102135181427],
        [0.4711998403072357, 0.07618792355060577],
        [0.4711998403072357, 0.07618792355060577],
    ],
}


def _scalar_run(**kwargs):
  rng = np.random.default_rng(3)
  a = jnp.asarray(rng.normal(size=(64, 6)), jnp.float32)
  y = jnp.asarray(rng.normal(size=64) + 2.0, jnp.float32)
  loss = lambda p, i: jnp.mean(jnp.log(jnp.cosh(a[i, :5] @ p["w"] + p["b"][0] * a[i, 5] - y[i])))
  tx = hidlr_optax.hidlr(optax.scale_by_adam(), 1e-2, LABELS, update_every=1,
                         smoothing=0.5, max_growth=None, min_r2=0.5, **kwargs)
  p = {"w": jnp.zeros(5), "b": jnp.zeros(1)}
  s = tx.init(p)

  @jax.jit
  def step(p, s, k):
    g = jax.grad(loss)(p, jnp.arange(16) + 16 * (k % 4))
    u, s = tx.update(g, s, p, value_fn=lambda q: loss(q, jnp.arange(16) + 16 * ((k + 1) % 4)))
    return optax.apply_updates(p, u), s

  rates = []
  for k in range(8):
    p, s = step(p, s, k)
    rates.append([float(r) for r in hidlr_optax.learning_rates(s).values()])
  return np.asarray(rates), hidlr_optax.find_states(s)[0]


@pytest.mark.parametrize("kwargs, key", [(dict(probe_batch_size=1), "probe"),
                                         (dict(probe_batch_size=None), "probe"),
                                         (dict(estimator="jvp"), "jvp")])
def test_scalar_value_fn_keeps_the_papers_rule(kwargs, key):
  rates, state = _scalar_run(**kwargs)
  np.testing.assert_allclose(rates, SCALAR_RATES[key], rtol=1e-6)
  assert np.all(np.isnan(state.fits.stacked.slope_snr))
  assert np.all(np.isnan(state.fits.stacked.curvature_snr))
  assert list(state.num_noisy.stacked) == [0, 0]


# --------------------------------------------------------------------------
# Errors.


def test_value_fn_shapes_and_min_snr_are_checked():
  params = jnp.zeros(3)
  tx = hidlr_optax.scale_by_hidlr(0.1, update_every=1)
  state = tx.init(params)
  for bad in (lambda p: p[:1], lambda p: jnp.stack([p, p], 1), lambda p: jnp.arange(3)):
    with pytest.raises(TypeError, match=r"per-example losses as a float vector of shape \(B,\)"):
      tx.update(params, state, params, value_fn=bad)
  with pytest.raises(TypeError, match="`value` must be"):
    tx.update(params, state, params, value_fn=lambda p: p**2, value=jnp.zeros(2))
  with pytest.raises(TypeError, match="`value` must be"):
    tx.update(params, state, params, value_fn=lambda p: jnp.sum(p**2), value=jnp.zeros(3))
  with pytest.raises(ValueError, match="min_snr"):
    hidlr_optax.scale_by_hidlr(0.1, min_snr=-1.0)
