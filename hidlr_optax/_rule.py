"""From an estimate of the quadratic model to the next learning rates.

Xu, Bu, Zhang & Barnett (Hi-DLR), eqs. 3.2 and 2.4 and the acceptance,
growth bound and smoothing of GeN (Bu & Xu, arXiv:2407.02772); the cut on a
predicted increase and the joint check are this project's safeguards
(``docs/method.md``). Every value is in the step units of
:class:`hidlr_optax._types.Estimate`.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from hidlr_optax import _fit
from hidlr_optax._resolution import loss_resolution
from hidlr_optax._types import Estimate, Scalar


#: The joint check acts only when its predicted decrease is above this many
#: units in the last place of ``L(w)``. It divides one measured loss change
#: by a prediction built from K fitted slopes and rescales every group at
#: once, so it asks for more than a single fit (``RESOLUTION_ULPS``):
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
    estimate: Estimate, rates: jax.Array, *, min_r2: Scalar, accept: str, full: bool
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
  slope, diag, r2 = estimate.slope, estimate.curvature, estimate.r_squared
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
    optimal = jnp.where(joint_ok & jnp.all(passes), rates * joint, optimal)
  if accept == "all":
    passes = ~below & jnp.all(passes | below)
  return Proposal(optimal.astype(rates.dtype), passes, below)


def next_rates(
    rates: jax.Array,
    proposal: Proposal,
    *,
    smoothing: Scalar,
    max_growth: Optional[Scalar],
    min_learning_rate: Scalar,
    max_learning_rate: Optional[Scalar],
) -> jax.Array:
  """Moves accepted groups' rates towards ``eta*``; others keep theirs.

  ``eta <- smoothing * eta + (1 - smoothing) * clip(eta*, eta / g, eta * g)``
  with ``g = max_growth``, except that when ``eta > 2 eta*`` (the fitted
  quadratic predicts that a step at the current rate *increases* the loss)
  ``eta <- clip(eta*, eta / g, eta * g)`` at once, without smoothing.
  Rejected groups keep their rate; groups below the loss's resolution
  catch up (:func:`catch_up`). The result is clipped to
  ``[min_learning_rate, max_learning_rate]``.
  """
  clip = lambda x: x if max_growth is None else jnp.clip(x, rates / max_growth, rates * max_growth)
  target = clip(proposal.optimal_rates)
  smoothed = smoothing * rates + (1 - smoothing) * target
  predicted_increase = proposal.accepted & (rates > 2 * proposal.optimal_rates)
  new = jnp.where(predicted_increase, target, smoothed)
  new = bound(new, min_learning_rate, max_learning_rate)
  new = jnp.where(proposal.accepted, new, rates)
  return catch_up(new, proposal.below_resolution, max_growth, max_learning_rate).astype(rates.dtype)


def catch_up(
    rates: jax.Array, below: jax.Array, max_growth: Optional[Scalar],
    max_learning_rate: Optional[Scalar],
) -> jax.Array:
  """Grows the rates of the groups below resolution towards the others'.

  A rate whose step does not move the loss by more than rounding is too
  small for its direction. It grows by ``max_growth`` (2 without a bound) per
  refresh, up to the largest rate of the groups above resolution (and
  ``max_learning_rate``); with none above resolution it is held. A growth
  from below resolution cannot overshoot far: the first step that registers
  moves the loss by at most ``g^2`` times the resolution, and its fit then
  sets the rate.
  """
  growth = 2.0 if max_growth is None else max_growth
  ceiling = jnp.max(jnp.where(below, 0, rates))
  grown = jnp.minimum(rates * growth, ceiling)
  if max_learning_rate is not None:
    grown = jnp.minimum(grown, max_learning_rate)
  return jnp.where(below & (grown > rates), grown, rates)


def bound(rates: jax.Array, min_learning_rate: Scalar, max_learning_rate: Optional[Scalar]) -> jax.Array:
  """Clips rates to ``[min_learning_rate, max_learning_rate]``."""
  rates = jnp.maximum(rates, min_learning_rate)
  if max_learning_rate is not None:
    rates = jnp.minimum(rates, max_learning_rate)
  return rates


def uphill(estimate: Estimate, min_r2: Scalar) -> jax.Array:
  """Per group: the fit finds the direction pointing uphill, well resolved.

  The slope is negative by more than the loss's resolution and the fit
  explains the probes (``R^2 >= min_r2``).
  """
  rise = -estimate.slope
  return (
      ~estimate.below_resolution
      & jnp.isfinite(rise)
      & (rise > loss_resolution(estimate.origin))
      & (estimate.r_squared >= min_r2)
  )


def joint_factor(
    slopes: jax.Array, rates: jax.Array, origin: jax.Array, joint_loss: jax.Array
) -> jax.Array:
  r"""The factor ``t`` by which to scale the step after the joint check.

  The per-group fits ignore the curvature between groups, so their steps,
  each right on its own, can overshoot together. One loss value along the
  combined step ``s = sum_k eta_k d_k`` with the new rates tells: with the
  fitted slopes ``b_k``, the loss along ``w - t s`` is modelled as

  .. math::

    f(t) = -S t + c t^2, \quad S = \sum_k \eta_k b_k, \quad
    c = \Delta L + S,

  where ``Delta L = L(w - s) - L(w)`` is measured. The minimiser of ``f`` is
  ``t* = S / (2c)``; the factor is ``t*`` when the combined step lands past
  it (``Delta L > -S / 2``), and 1 otherwise, so it only shrinks. It is at
  least ``1 / (2K)``: for a convex quadratic, with every rate at most twice
  its group's fitted optimum (which :func:`next_rates` ensures for the
  groups that enter ``S``), ``t* >= 1 / (2K)`` (Cauchy-Schwarz), so a
  smaller value contradicts the model. It acts only when ``S`` is above
  ``JOINT_CHECK_ULPS`` units in the last place of ``L(w)``. When ``L(w)`` is
  finite but ``L(w - s)`` is not, the factor is ``1 / K``.

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
  resolvable = decrease > loss_resolution(origin, JOINT_CHECK_ULPS)
  overshoot = resolvable & (2 * curvature > decrease)
  factor = jnp.maximum(decrease / jnp.where(overshoot, 2 * curvature, 1), 1 / (2 * num_groups))
  factor = jnp.where(overshoot, factor, 1)
  blown_up = jnp.isfinite(origin) & ~jnp.isfinite(joint_loss)
  return jnp.where(blown_up, 1 / num_groups, factor).astype(dtype)


def joint_check(
    estimate: Estimate,
    rates: jax.Array,
    new_rates: jax.Array,
    joint_loss: jax.Array,
    *,
    min_learning_rate: Scalar,
    max_learning_rate: Optional[Scalar],
) -> tuple[jax.Array, jax.Array]:
  """The new rates after the joint check, and its factor.

  Groups below resolution are left out: their slopes are rounding, their
  steps cannot cause what the check measures, and shrinking them at every
  refresh that overshoots would walk their rates down to 0.

  Args:
    estimate: the refresh's estimate, made at ``rates``.
    rates: the rates the estimate was made with.
    new_rates: the rule's rates, whose combined step gave ``joint_loss``.
    joint_loss: ``L(w - sum_k new_rates_k d_k)``.
    min_learning_rate: lower bound of every rate.
    max_learning_rate: upper bound of every rate, or ``None``.
  """
  below = estimate.below_resolution
  slopes = jnp.where(below, jnp.nan, estimate.slope / rates)
  factor = joint_factor(slopes, new_rates, estimate.origin, joint_loss)
  scaled = bound(new_rates * factor, min_learning_rate, max_learning_rate)
  return jnp.where(below, new_rates, scaled).astype(factor.dtype), factor


def fitted_optimum(proposal: Proposal) -> jax.Array:
  """The ``eta*`` that each group moved towards; NaN where it was not accepted.

  Before the growth bound, the cut and the smoothing; where the fitted
  curvature is tiny it is large (the rate then grows by ``max_growth``).
  """
  return jnp.where(proposal.accepted, proposal.optimal_rates, jnp.nan).astype(
      proposal.optimal_rates.dtype)
