"""One refresh of the rates: estimate, propose, next rates, joint check, state.

Xu, Bu, Zhang & Barnett, Algorithm 1 (with GeN's acceptance and smoothing),
as one pure function of the state; ``docs/architecture.md`` follows a call.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from hidlr_optax import _evaluation, _guard, _rule
from hidlr_optax._config import Config
from hidlr_optax._grouping import GroupLayout
from hidlr_optax._state import GroupFit, PerGroup, ScaleByHiDLRState
from hidlr_optax._types import Estimate, Line, ValueFn


def refresh(
    config: Config,
    layout: GroupLayout,
    state: ScaleByHiDLRState,
    directions: Any,
    params: Any,
    value_fn: ValueFn,
    value: Optional[jax.Array] = None,
    grad: Any = None,
) -> ScaleByHiDLRState:
  """The state after a refresh at ``params`` along ``directions``.

  Every per-group value is set here, so that a step that does not refresh
  leaves the state as it was.
  """
  rates = state.learning_rates.stacked
  line = Line(value_fn, params, directions, layout, rates, value, grad)
  if config.lagged:
    line = previous_step(config, layout, state, line)

  def rule(estimate: Estimate) -> tuple[_rule.Proposal, jax.Array]:
    proposal = _rule.propose(
        estimate, rates, min_r2=config.min_r2, accept=config.accept, full=config.full)
    return proposal, _rule.next_rates(
        rates, proposal, smoothing=config.smoothing, max_growth=config.max_growth,
        min_learning_rate=config.min_learning_rate, max_learning_rate=config.max_learning_rate)

  estimator = config.estimator
  checks_jointly = config.joint_check and layout.num_groups > 1 and not estimator.sees_coupling
  then = (lambda estimate: rule(estimate)[1]) if checks_jointly else None
  estimate, joint_loss = estimator.estimate(line, full=config.full, then=then)
  proposal, new_rates = rule(estimate)
  factor = jnp.ones((), rates.dtype)
  if checks_jointly:
    new_rates, factor = _rule.joint_check(
        estimate, rates, new_rates, joint_loss,
        min_learning_rate=config.min_learning_rate, max_learning_rate=config.max_learning_rate)

  guard = state.guard
  if config.guarded:
    new_rates, guard = _guard.guard(guard, estimate.origin, rates, new_rates,
                                    tolerance=config.loss_guard)
    # The guard only lowers rates; the user's lower bound holds over it.
    new_rates = _rule.bound(new_rates, config.min_learning_rate, None).astype(rates.dtype)

  old = state.fits.stacked
  uphill = _rule.uphill(estimate, config.min_r2)
  streaks = jnp.where(uphill, old.uphill_refreshes + 1, 0)
  fit = GroupFit(
      slope=estimate.slope / rates,
      curvature=estimate.curvature / rates**2,
      r_squared=estimate.r_squared,
      accepted=proposal.accepted,
      below_resolution=proposal.below_resolution,
      optimal_rate=_rule.fitted_optimum(proposal),
      uphill_refreshes=streaks,
  )
  count = lambda counter, flags: PerGroup(layout.labels, counter.stacked + flags.astype(jnp.int32))
  new = state._replace(
      learning_rates=PerGroup(layout.labels, new_rates),
      fits=PerGroup(layout.labels, fit),
      num_refreshes=state.num_refreshes + 1,
      num_accepted=count(state.num_accepted, proposal.accepted),
      num_unresolved=count(state.num_unresolved, proposal.below_resolution),
      joint_factor=factor,
      loss=estimate.origin,
      first_loss=jnp.where(state.num_refreshes == 0, estimate.origin, state.first_loss),
      guard=guard,
  )
  return optax.tree.cast_like(new, state)


def previous_step(config: Config, layout: GroupLayout, state: ScaleByHiDLRState, line: Line) -> Line:
  """The line of the previous step: from where it started, along its direction.

  The step before moved the parameters by ``-tau eta_k d_{t-1}`` (``tau`` the
  schedule's factor at ``t - 1``; the rates are still the ones it used, since
  they change only at a refresh, before the step), so ``w_{t-1} = w_t + tau
  eta d_{t-1}``, up to rounding, and the line's step reaches ``w_t`` at
  ``span = tau``, where the caller's value and gradient were taken. On step 0
  there is no previous step: the line of this one.
  """
  first = state.count == 0
  previous = jax.tree.map(
      lambda prev, u: jnp.where(first, u, prev.astype(u.dtype)), state.previous_direction,
      line.directions)
  before = config.multiplier(jnp.maximum(state.count - 1, 0))
  taken = jnp.where(first, 0, 1 if before is None else before)
  start = layout.move(line.params, -taken * line.rates, previous,
                      _evaluation.every_group(layout.num_groups))
  span = jnp.where(first, 1, taken).astype(line.rates.dtype)
  return line._replace(params=start, directions=previous, span=span,
                       grad_at=jnp.where(first, 0, span))
