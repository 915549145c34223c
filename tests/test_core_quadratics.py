"""On random block quadratics the fitted model is the exact one."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import hidlr_optax


@st.composite
def block_quadratics(draw):
  sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
  seed = draw(st.integers(0, 2**31 - 1))
  rng = np.random.default_rng(seed)
  n = sum(sizes)
  q = rng.normal(size=(n, n))
  hess = q @ q.T / n + draw(st.floats(0.05, 2.0)) * np.eye(n)
  linear = rng.normal(size=n)
  w0 = rng.normal(size=n)
  rate = draw(st.floats(1e-3, 1.0))
  return sizes, hess, linear, w0, rate


def split(vec, sizes):
  bounds = np.cumsum(sizes)[:-1]
  return {f"g{k}": jnp.asarray(part) for k, part in enumerate(np.split(vec, bounds))}


def exact_model(sizes, hess, grad):
  """b_k = G_k . d_k and A_kl = d_k^T H_kl d_l, with d = G (SGD direction)."""
  k = len(sizes)
  dirs = np.zeros((k, hess.shape[0]))
  start = 0
  for i, s in enumerate(sizes):
    dirs[i, start:start + s] = grad[start:start + s]
    start += s
  return dirs @ grad, dirs @ hess @ dirs.T


@pytest.mark.parametrize("estimator", ["probe", "jvp"])
@pytest.mark.parametrize("fit", ["diagonal", "full"])
@settings(max_examples=8, deadline=None)
@given(problem=block_quadratics())
def test_fit_equals_exact_model(problem, fit, estimator):
  sizes, hess, linear, w0, rate = problem
  with jax.enable_x64(True):
    h, c = jnp.asarray(hess), jnp.asarray(linear)
    keys = [f"g{k}" for k in range(len(sizes))]

    def loss(p):
      w = jnp.concatenate([p[k] for k in keys])
      return 0.5 * w @ h @ w + c @ w

    params = split(w0, sizes)
    labels = {k: k for k in keys}
    grads = jax.grad(loss)(params)
    grad_vec = hess @ w0 + linear
    b, a = exact_model(sizes, hess, grad_vec)

    want = b / np.diag(a)
    if fit == "full":
      joint = np.linalg.solve(a, b)
      if np.all(joint > 0):
        want = joint  # else: falls back to the diagonal minimiser
    # The joint check: along w - t sum_k eta_k d_k the loss changes by
    # -t S + t^2 eta^T A eta / 2 with S = eta . b, minimised at t = S / eta^T A eta.
    checked = want * min(1.0, want @ b / (want @ a @ want)) if len(keys) > 1 else want

    for joint_check, expected in ((False, want), (True, checked)):
      tx = hidlr_optax.scale_by_hidlr(
          rate, labels, smoothing=0.0, max_growth=None, fit=fit, estimator=estimator,
          joint_check=joint_check,
      )
      _, state = tx.update(grads, tx.init(params), params, value_fn=loss)
      fits = hidlr_optax.fit_diagnostics(state)
      rates = hidlr_optax.learning_rates(state)
      np.testing.assert_allclose([fits[k].slope for k in keys], b, rtol=1e-6)
      np.testing.assert_allclose([fits[k].curvature for k in keys], np.diag(a), rtol=1e-6)
      assert all(bool(fits[k].accepted) for k in keys)
      np.testing.assert_allclose([rates[k] for k in keys], expected, rtol=1e-6)


def test_full_fit_is_one_newton_step_on_a_coupled_quadratic():
  """With the full fit, two coupled groups reach the minimum along d at once."""
  with jax.enable_x64(True):
    hess = jnp.array([[2.0, 0.9], [0.9, 1.0]])

    def loss(p):
      w = jnp.stack([p["a"], p["b"]])
      return 0.5 * w @ hess @ w

    params = {"a": jnp.array(1.0), "b": jnp.array(-2.0)}
    res = {}
    for fit in ("diagonal", "full"):
      tx = hidlr_optax.hidlr(
          optax.identity(), 0.1, {"a": "a", "b": "b"}, smoothing=0.0, max_growth=None, fit=fit
      )
      g = jax.grad(loss)(params)
      updates, _ = tx.update(g, tx.init(params), params, value_fn=loss)
      res[fit] = float(loss(optax.apply_updates(params, updates)))
    # the full step minimises L(w - eta_a d_a - eta_b d_b) over both rates;
    # the diagonal step ignores the coupling and does worse.
    g = np.asarray(hess @ jnp.array([1.0, -2.0]))
    dirs = np.diag(g)
    a, b = dirs @ np.asarray(hess) @ dirs, dirs @ g
    best = 0.5 * np.array([1.0, -2.0]) @ np.asarray(hess) @ np.array([1.0, -2.0]) - 0.5 * b @ np.linalg.solve(a, b)
    np.testing.assert_allclose(res["full"], best, rtol=1e-8, atol=1e-12)
    assert res["diagonal"] > res["full"] + 1e-3
