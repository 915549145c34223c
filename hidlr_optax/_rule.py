"""From an estimate of the local quadratic model to the next learning rates."""

from __future__ import annotations

from typing import NamedTuple, Union

import jax
import jax.numpy as jnp

from hidlr_optax import _estimators, _fit

Scalar = Union[float, jax.Array]

#: The joint check acts only when its predicted decrease is above this many
#: units in the last place of ``L(w)``. It divides one measured loss change
#: by a prediction built from K fitted slopes and rescales every group at
#: once, so it asks for more than a single fit (``_estimators.RESOLUTION_ULPS``):
#: at 32 ulp the California MLP's (layer) grouping ended 3% worse over 8 seeds.
JOINT_CHECK_ULPS = 256


class Proposal(NamedTuple):
  """What one refresh proposes for every group.

  Attributes:
    optimal_rates: the fitted minimiser ``eta*`` (meaningful where accepted).
    accepted: whether each group's refresh passes the acceptance rule.
    below_resolution: whether each group's step was too small for the loss
      to register (such a group is never accepted).
  """

  optimal_rates: jax.Array
  accepted: jax.Array
  below_resolution: jax.Array


def propose(
    estimate: _estimators.Estimate,
    rates: jax.Array,
    *,
    min_r2: Scalar,
    accept: str,
    full: bool,
) -> Proposal:
  """Applies the acceptance rule and computes ``eta*``.

  A group passes when its step registers in the loss (it is not
  ``below_resolution``), its slope and curvature are finite and positive and
  its fit has ``R^2 >= min_r2``. With ``accept="all"`` (the paper's rule)
  every group above resolution must pass for any to update; with ``"group"``
  each passing group updates alone. With the full fit,
  ``eta* = eta * M^{-1} beta`` is used when every group passes and that
  solution is valid; otherwise the diagonal ``eta*_k = eta_k beta_k / M_kk``.
  """
  slope, r2 = estimate.slope, estimate.r_squared
  diag = estimate.curvature
  below = estimate.below_resolution
  passes = (
      ~below
      & jnp.isfinite(slope)
      & jnp.isfinite(diag)
      & jnp.isfinite(r2)
      & (slope > 0)
      & (diag > 0)
      & (r2 >= min_r2)
  )
  safe_diag = jnp.where(passes, diag, 1)
  optimal = rates * jnp.where(passes, slope / safe_diag, 1)
  if full and estimate.curvature_matrix is not None:
    joint, joint_ok = _fit.solve_full(slope, estimate.curvature_matrix)
    use_joint = joint_ok & jnp.all(passes)
    optimal = jnp.where(use_joint, rates * joint, optimal)
  if accept == "all":
    passes = ~below & jnp.all(passes | below)
  return Proposal(optimal.astype(rates.dtype), passes, below)


def next_rates(
    rates: jax.Array,
    proposal: Proposal,
    *,
    smoothing: Scalar,
    max_growth: Union[Scalar, None],
    min_learning_rate: Scalar,
    max_learning_rate: Union[Scalar, None],
) -> jax.Array:
  """Moves accepted groups' rates towards ``eta*``; others keep theirs.

  ``eta <- smoothing * eta + (1 - smoothing) * clip(eta*, eta / g, eta * g)``
  with ``g = max_growth``, except that when ``eta > 2 eta*`` (the fitted
  quadratic predicts that a step at the current rate *increases* the loss)
  ``eta <- clip(eta*, eta / g, eta * g)`` at once, without smoothing: a
  predicted increase is acted on now, and a run of them cuts ``g``-fold per
  refresh, but one noisy fit (a slope near zero on one probe batch) cannot
  wipe a rate out. Rejected groups, and groups whose step is below the
  loss's resolution (whose fit is rounding noise), keep their rate. The
  result is clipped to ``[min_learning_rate, max_learning_rate]``.
  """
  target = proposal.optimal_rates
  if max_growth is not None:
    target = jnp.clip(target, rates / max_growth, rates * max_growth)
  smoothed = smoothing * rates + (1 - smoothing) * target
  predicted_increase = rates > 2 * proposal.optimal_rates
  new = jnp.where(predicted_increase, target, smoothed)
  new = bound(new, min_learning_rate, max_learning_rate)
  return jnp.where(proposal.accepted, new, rates).astype(rates.dtype)


def bound(
    rates: jax.Array,
    min_learning_rate: Scalar,
    max_learning_rate: Union[Scalar, None],
) -> jax.Array:
  """Clips rates to ``[min_learning_rate, max_learning_rate]``."""
  rates = jnp.maximum(rates, min_learning_rate)
  if max_learning_rate is not None:
    rates = jnp.minimum(rates, max_learning_rate)
  return rates


def joint_factor(
    slopes: jax.Array,
    rates: jax.Array,
    origin: jax.Array,
    joint_loss: jax.Array,
) -> jax.Array:
  r"""The factor ``t`` by which to scale the step after the joint check.

  The per-group fits ignore the curvature between groups, so their steps,
  each right on its own, can overshoot together. One loss value along the
  combined step ``s = sum_k eta_k d_k`` with the new rates tells: with the
  fitted slopes ``b_k``, the loss along ``w - t s`` is modelled as

  .. math::

    f(t) = -S t + c t^2, \quad S = \sum_k \eta_k b_k, \quad
    c = \Delta L + S,

  where ``Delta L = L(w - s) - L(w)`` is measured, and its minimiser is
  ``t* = S / (2c)``. The factor is ``t*`` when the combined step lands past
  that minimum (``Delta L > -S / 2``), and 1 otherwise: it only shrinks.

  Two bounds keep one noisy value from stalling training. The factor is at
  least ``1 / (2K)``: for a convex quadratic, with every rate at most twice
  its group's fitted optimum (which :func:`next_rates` ensures for the
  groups that enter ``S``), ``t* >= 1 / (2K)`` (Cauchy-Schwarz), so a
  smaller value contradicts the model. And the check only acts when the
  predicted decrease ``S`` is above ``JOINT_CHECK_ULPS`` units in the last
  place of ``L(w)``; below it, ``Delta L`` is mostly rounding. When ``L(w)``
  is finite but ``L(w - s)`` is not, the factor is ``1 / K``, the average of
  the groups' single steps, which cannot increase a convex loss if none of
  them does.

  Args:
    slopes: ``b_k`` per unit rate, shape ``(K,)``; non-finite ones (a group
      whose probes failed, or whose step is below resolution) are left out
      of ``S``.
    rates: the new rates, shape ``(K,)``.
    origin: ``L(w)``.
    joint_loss: ``L(w - s)``.

  Returns:
    A scalar in ``(0, 1]``, of the rates' dtype.
  """
  dtype = rates.dtype
  num_groups = rates.shape[0]
  origin, joint_loss = jnp.asarray(origin, dtype), jnp.asarray(joint_loss, dtype)
  decrease = jnp.sum(jnp.where(jnp.isfinite(slopes), rates * slopes, 0))
  curvature = joint_loss - origin + decrease
  resolvable = decrease > _estimators.loss_resolution(origin, JOINT_CHECK_ULPS)
  overshoot = resolvable & (2 * curvature > decrease)
  factor = decrease / jnp.where(overshoot, 2 * curvature, 1)
  factor = jnp.where(overshoot, jnp.maximum(factor, 1 / (2 * num_groups)), 1)
  blown_up = jnp.isfinite(origin) & ~jnp.isfinite(joint_loss)
  return jnp.where(blown_up, 1 / num_groups, factor).astype(dtype)
