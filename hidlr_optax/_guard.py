"""The loss guard: rates that make the loss climb are cut, and climb only while it falls.

Fits on the gradient's own batch are biased upwards (the batch's noise adds to
the slope), and nothing in a fit tells a useful lift from a runaway one: on a
recommender whose embedding rows each batch touches sparsely, own-batch rates
climb until the loss grows tenfold, every fit accepted on the way
(``docs/research/suite_findings.md``). The guard watches the one thing that
tells, the loss ``L(w)`` at the refreshes:

* its moving average, into which one refresh's loss enters at most a margin
  above the average (one outlier batch moves it by a fraction of the margin);
* a trip when that average rises by a fraction ``tolerance`` above the level
  it is measured from, its lowest value since the last trip (so the cut must
  fail, and the loss rise by the margin again, for a second trip);
* on a trip, every group whose rate has not fallen since the lowest average
  of the run is capped at its rate then and at half its current one; a group
  whose fits already cut its rate is left to them (the rise is not its doing:
  a run of outlier batches). A loss that is not finite halves every rate;
* every refresh without a trip lifts the caps by :data:`RELAXATION`;
* a climb must be earned by progress: no group's rate rises above
  :data:`PROGRESS_LIFT` times its rate at the lowest average (a rate above
  that may fall, not rise), so rates climb while the loss makes new lows and
  hold while it only stalls, which a guard that waits for a rise never sees.

A cap never takes a rate below ``min_learning_rate``: the refresh bounds the
guarded rates from below again.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from hidlr_optax._resolution import loss_resolution
from hidlr_optax._state import LossGuard
from hidlr_optax._types import Scalar


#: The weight of the old value in the moving average of the refresh losses:
#: about 1 / (1 - 0.7) = 3 refreshes.
SMOOTHING = 0.7

#: A cap rises by this factor at every refresh that does not trip the guard,
#: so a cut that a run of outlier batches set off costs some refreshes, not
#: the rest of the run (measured: without it, one seed of the California
#: additive model ended at twice its siblings' test MSE; with it, rates that
#: run away again trip the guard again).
RELAXATION = 1.1

#: How far above its rate at the lowest smoothed loss a group may climb before
#: the loss makes a new low. Measured with the recipe on six real tasks, 5
#: seeds (``docs/research/suite_findings.md``): at 1 the California MLP's climb
#: stalls (test MSE 0.284; 0.252 without the bound), at 4 the reviews' rates
#: still climb all run (accuracy 0.770); at 2 (0.256, 0.793) no task ends
#: behind separate-batch probes.
PROGRESS_LIFT = 2.0


def _margin(level: jax.Array, tolerance: Scalar) -> jax.Array:
  """The rise above ``level`` that counts: a fraction of it, and rounding."""
  return tolerance * jnp.abs(level) + loss_resolution(level)


def initial(rates: jax.Array) -> LossGuard:
  """The guard before the first refresh: no loss seen, no cap."""
  nan = jnp.full((), jnp.nan, rates.dtype)
  return LossGuard(
      smoothed_loss=nan, best_loss=nan, reference_loss=nan, rates_at_best=rates,
      ceilings=jnp.full_like(rates, jnp.inf), num_trips=jnp.zeros((), jnp.int32))


def guard(
    state: LossGuard, loss: jax.Array, rates: jax.Array, new_rates: jax.Array, *,
    tolerance: Scalar,
) -> tuple[jax.Array, LossGuard]:
  """The rates after the guard, and its new state.

  Args:
    state: the guard's state before this refresh.
    loss: ``L(w)`` at this refresh.
    rates: the rates in force up to this refresh (those that moved the loss).
    new_rates: the rates the refresh proposes.
    tolerance: the rise of the smoothed loss, as a fraction of the level it
      is measured from, that trips the guard.

  Returns:
    ``new_rates`` capped, and the guard's state after this refresh.
  """
  dtype = rates.dtype
  loss = jnp.asarray(loss, dtype)
  first = jnp.isnan(state.smoothed_loss)
  finite = jnp.isfinite(loss)
  previous = state.smoothed_loss
  entering = jnp.minimum(loss, previous + _margin(previous, tolerance))
  smoothed = jnp.where(first, loss, SMOOTHING * previous + (1 - SMOOTHING) * entering)
  # A loss that is not finite counts as the largest rise of all.
  smoothed = jnp.where(finite, smoothed, jnp.inf)
  best = jnp.where(first, smoothed, state.best_loss)
  reference = jnp.where(first, smoothed, state.reference_loss)
  tripped = ~first & (smoothed > reference + _margin(reference, tolerance))

  held = rates >= state.rates_at_best
  cut = jnp.where(held, jnp.minimum(rates / 2, state.rates_at_best), jnp.inf)
  cut = jnp.where(finite, cut, rates / 2)
  ceilings = jnp.where(tripped, jnp.minimum(state.ceilings, cut), state.ceilings * RELAXATION)

  keep_finite = lambda new, old: jnp.where(finite, new, old).astype(dtype)
  improved = finite & (first | (smoothed < best))
  rates_at_best = jnp.where(improved, rates, state.rates_at_best)
  earned = jnp.maximum(PROGRESS_LIFT * rates_at_best, rates)
  new_state = LossGuard(
      smoothed_loss=keep_finite(smoothed, previous),
      best_loss=keep_finite(jnp.minimum(best, smoothed), state.best_loss),
      reference_loss=keep_finite(
          jnp.where(tripped, smoothed, jnp.minimum(reference, smoothed)), state.reference_loss),
      rates_at_best=rates_at_best,
      ceilings=ceilings,
      num_trips=state.num_trips + tripped.astype(jnp.int32),
  )
  return jnp.minimum(jnp.minimum(new_rates, earned), ceilings).astype(dtype), new_state
