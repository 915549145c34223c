"""``estimator="secant"``: two gradients measure every group's slope at both
ends of the combined step, ``c_k = b_k - b'_k = (A eta)_k``, and the rate is
``eta_k b_k / c_k`` (the Jacobi step on the joint quadratic). Exact problems,
the feeds and the cost (the own-batch bias of each feed is tested beside the
other estimators', in ``tests/test_core_lagged.py``)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hidlr_optax

ELLIPSE = lambda p: p["x"] ** 2 + 100 * p["y"] ** 2


def _exact(labels, **kwargs):
  return hidlr_optax.hidlr(optax.identity(), 1e-3, labels, smoothing=0.0, max_growth=None,
                           estimator="secant", **kwargs)


@pytest.mark.parametrize("given", [False, True])
def test_ellipse_one_refresh_gives_newtons_rates(given):
  params = {"x": jnp.array(50.0), "y": jnp.array(1.0)}
  tx = _exact({"x": "x", "y": "y"})
  value, grads = jax.value_and_grad(ELLIPSE)(params)
  extra = dict(value=value, grad=grads) if given else {}
  updates, state = tx.update(grads, tx.init(params), params, value_fn=ELLIPSE, **extra)
  rates = hidlr_optax.learning_rates(state)
  assert float(rates["x"]) == pytest.approx(0.5, rel=1e-4)
  assert float(rates["y"]) == pytest.approx(0.005, rel=1e-4)
  assert float(ELLIPSE(optax.apply_updates(params, updates))) < 1e-3
  fits = hidlr_optax.fit_diagnostics(state)
  # b = g^2 and c / eta = A_kk in the paper's units.
  assert float(fits["y"].slope) == pytest.approx(200.0**2, rel=1e-5)
  assert float(fits["y"].curvature) == pytest.approx(200.0**2 * 200, rel=1e-4)
  assert float(fits["x"].optimal_rate) == pytest.approx(0.5, rel=1e-4)


@pytest.mark.parametrize("num_groups", [2, 4, 8])
def test_collinear_groups_split_one_step_without_a_joint_check(num_groups):
  # L = (sum_k w_k)^2 / 2: every group's direction is the same; each taking
  # the step that its own A_kk asks for would overshoot K-fold.
  params = {f"g{k}": jnp.array(1.0 + k) for k in range(num_groups)}
  loss = lambda p: 0.5 * sum(p.values()) ** 2
  tx = _exact({k: k for k in params}, joint_check=False)
  updates, state = tx.update(jax.grad(loss)(params), tx.init(params), params, value_fn=loss)
  assert float(loss(optax.apply_updates(params, updates))) < 1e-6 * float(loss(params))
  for rate in hidlr_optax.learning_rates(state).values():
    assert float(rate) == pytest.approx(1 / num_groups, rel=1e-4)


def test_coupled_groups_iterate_to_the_full_fit():
  # Refreshes at one point along one direction: eta <- eta o b / (A eta)
  # has the full fit A^{-1} b (paper eq. 2.4) as its fixed point, and with
  # A >= 0 entrywise it is the multiplicative update of Lee & Seung (2001),
  # which converges to it from any positive start.
  h = jnp.array([[3.0, 1.0], [1.0, 2.0]])
  loss = lambda p: 0.5 * jnp.stack([p["a"], p["b"]]) @ h @ jnp.stack([p["a"], p["b"]])
  params = {"a": jnp.array(1.0), "b": jnp.array(2.0)}
  grads = jax.grad(loss)(params)
  tx = _exact({"a": "a", "b": "b"}, update_every=1)
  state = tx.init(params)
  for _ in range(60):
    _, state = tx.update(grads, state, params, value_fn=loss)
  g = jnp.stack([grads["a"], grads["b"]])
  big_a = jnp.diag(g) @ h @ jnp.diag(g)  # A_kl = d_k H_kl d_l with d = g
  full = jnp.linalg.solve(big_a, g * g)  # A^{-1} b
  assert bool(jnp.all(full > 0))
  rates = hidlr_optax.learning_rates(state)
  np.testing.assert_allclose([float(rates["a"]), float(rates["b"])], full, rtol=1e-3)
  diagonal = g * g / jnp.diag(big_a)  # what the per-group fit would give
  assert not np.allclose(full, diagonal, rtol=0.1)


def test_a_refresh_costs_two_gradients_or_one_with_grad_given_whatever_k():
  x = jnp.ones((4, 6))
  loss = lambda p: jnp.sum(jnp.tanh(x @ p["w"]) @ p["v"])
  params = {"w": jnp.ones((6, 5)), "v": jnp.ones((5, 3))}
  value, grads = jax.value_and_grad(loss)(params)

  def calls(labels, **extra):
    tx = hidlr_optax.hidlr(optax.identity(), 1e-3, labels, estimator="secant")
    count = [0]

    def counted(p):
      count[0] += 1
      return loss(p)

    jax.make_jaxpr(lambda p: tx.update(grads, tx.init(params), p, value_fn=counted,
                                       refresh=True, **extra))(params)
    return count[0]

  per_slice = {"w": "w", "v": hidlr_optax.per_slice(1, "col")}
  # One trace of value_fn is the check of its output (jax.eval_shape).
  assert calls(None) == calls(per_slice) == 1 + 2
  assert calls(per_slice, value=value, grad=grads) == 1 + 1


def test_rejects_what_it_cannot_do():
  with pytest.raises(ValueError, match="fit='full'"):
    hidlr_optax.scale_by_hidlr(estimator="secant", fit="full")
  tx = hidlr_optax.gen(optax.identity(), estimator="secant")
  p = jnp.ones(2)
  with pytest.raises(ValueError, match="`grad=` needs `value=`"):
    tx.update(p, tx.init(p), p, value_fn=jnp.sum, grad=p)


def test_runs_under_inject_hyperparams_without_recompiling():
  # smoothing set between steps (an injected array) changes the next refresh,
  # not the compiled step: 0.9 climbs towards Newton's rates, 0 lands on them.
  factory = optax.inject_hyperparams(hidlr_optax.scale_by_hidlr,
                                     static_args=hidlr_optax.STATIC_ARGS)
  tx = optax.chain(optax.identity(), factory(1e-3, {"x": "x", "y": "y"}, update_every=1,
                                             estimator="secant", smoothing=0.9, max_growth=None))
  params = {"x": jnp.array(50.0), "y": jnp.array(1.0)}
  step = jax.jit(lambda p, s: tx.update(jax.grad(ELLIPSE)(p), s, p, value_fn=ELLIPSE))
  state = tx.init(params)
  _, state = step(params, state)
  smoothed = hidlr_optax.learning_rates(state)
  assert 1e-3 < float(smoothed["x"]) < 0.5 and 1e-3 < float(smoothed["y"]) < 0.005
  state = hidlr_optax.set_hyperparams(state, smoothing=0.0)
  _, state = step(params, state)
  rates = hidlr_optax.learning_rates(state)
  assert float(rates["x"]) == pytest.approx(0.5, rel=1e-4)
  assert float(rates["y"]) == pytest.approx(0.005, rel=1e-4)
  assert step._cache_size() == 1
