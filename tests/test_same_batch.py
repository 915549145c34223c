"""Probes on the gradient's own batch, on an exact noisy problem.

Noisy least squares, ``y = x.w + 2 eps`` (noise floor 2.0), in two groups,
mini-batches of 32. On the gradient's own batch the fitted slope ``b = g_B.d``
is biased upwards (``d`` was fitted to that batch): the one-step rule accepts
every refresh and its rates climb far past what serves the run
(``benchmarks/results/same_batch.md``). These tests pin what keeps the rates
in check, so that a rule change that lets them run away fails here.
"""

import jax
import jax.numpy as jnp
import optax
import pytest

import hidlr_optax

from benchmarks.same_batch import FEATURES as DIM, ROWS as N, noisy_least_squares

BATCH, STEPS = 32, 800
NOISE_FLOOR = 2.0


def _train(tx, probe: str):
  loss, full, _, rng = noisy_least_squares()
  params = {"a": jnp.zeros(DIM // 2), "b": jnp.zeros(DIM // 2)}
  state = tx.init(params)

  @jax.jit
  def step(params, state, i, j):
    value, grads = jax.value_and_grad(loss)(params, i)
    same = probe == "same"
    updates, state = tx.update(grads, state, params, value_fn=lambda q: loss(q, i if same else j),
                               value=value if same else None)
    return optax.apply_updates(params, updates), state

  for _ in range(STEPS):
    i, j = rng.integers(0, N, size=(2, BATCH))
    params, state = step(params, state, i, j)
  return full(params), hidlr_optax.learning_rates(state)


@pytest.mark.parametrize("base", ["sgd", "adam"])
def test_rates_stay_in_check_with_fresh_probes(base):
  direction = optax.identity() if base == "sgd" else optax.scale_by_adam()
  tx = hidlr_optax.hidlr(direction, 1e-3, {"a": "a", "b": "b"}, update_every=8)
  final, rates = _train(tx, "fresh")
  assert final < 1.1 * NOISE_FLOOR, (final, rates)
  assert all(float(r) < 0.3 for r in rates.values()), rates


@pytest.mark.parametrize("base", ["sgd", "adam"])
@pytest.mark.parametrize("probe", ["fresh", "same"])
def test_fits_of_the_previous_step_stay_in_check(base, probe):
  # probe_direction="previous" fits the previous step at the point it
  # started from: unbiased on either batch, so both end near the floor.
  # Over the Adam direction its final loss spreads more than the paper's
  # rule's with fresh probes (seeds 0-5 of this problem: 2.05-2.70 fresh,
  # 2.10-2.83 on the own batch, against 2.09-2.25), so the limit there is
  # 1.5x the floor, above every seed's and below the paper's rule on the
  # own batch (near 6 with Adam, rates up to 1).
  direction = optax.identity() if base == "sgd" else optax.scale_by_adam()
  tx = hidlr_optax.hidlr(direction, 1e-3, {"a": "a", "b": "b"}, update_every=8,
                         probe_direction="previous")
  final, rates = _train(tx, probe)
  assert final < (1.1 if base == "sgd" else 1.5) * NOISE_FLOOR, (final, rates)
  assert all(float(r) < (0.3 if base == "sgd" else 0.6) for r in rates.values()), rates


def test_the_one_step_rule_overshoots_on_the_own_batch():
  # The measured failure the tests above guard against: the paper's rule on
  # the gradient's own batch ends far above the noise floor, its rates near
  # 0.45 (6x what it settles at with fresh probes). If this stops holding,
  # the rule has changed: update benchmarks/results/same_batch.md.
  tx = hidlr_optax.hidlr(optax.identity(), 1e-3, {"a": "a", "b": "b"}, update_every=8)
  final, rates = _train(tx, "same")
  assert final > 1.2 * NOISE_FLOOR
  assert all(float(r) > 0.3 for r in rates.values())
