"""Types shared by the estimators, the rule and the refresh."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Protocol, Union

import jax

from hidlr_optax._grouping import GroupLayout

#: A hyperparameter that may be a number or an array (traced under
#: ``optax.inject_hyperparams``).
Scalar = Union[float, jax.Array]

#: ``params -> scalar loss``, built by the caller inside the training step.
ValueFn = Callable[[Any], jax.Array]


class Line(NamedTuple):
  """Where a refresh measures the loss: from ``params`` along the groups' steps.

  Group ``k``'s step at unit scale is ``rates_k * directions_k``; a point of
  the line is ``params - sum_k s_k rates_k directions_k``.

  Attributes:
    value_fn: the loss to measure.
    params: the point measured from, ``w``.
    directions: the base direction ``d``, in the parameters' structure.
    layout: the parameter groups.
    rates: the current rates ``eta``, shape ``(K,)``.
    value: the loss at ``grad_at`` if the caller has it, else ``None``.
    grad: the gradient of ``value_fn`` at ``grad_at`` if the caller has it,
      else ``None`` (used by estimators that take gradients).
    grad_at: where ``value`` and ``grad`` were taken, in step units along
      the line; ``None`` for the start, ``params``.
    span: how far the line's step reaches, in step units (``None``: 1): the
      step that was taken is ``span * rates * directions``.
  """

  value_fn: ValueFn
  params: Any
  directions: Any
  layout: GroupLayout
  rates: jax.Array
  value: Optional[jax.Array] = None
  grad: Any = None
  grad_at: Optional[jax.Array] = None
  span: Optional[jax.Array] = None


class Estimate(NamedTuple):
  """The second-order model of the loss along the groups' steps.

  All values are in *step units*: a step of size ``s_k`` along group ``k``
  moves the parameters by ``-s_k eta_k d_k``, so ``s = 1`` is the step of the
  current rates, and

  .. math::

    L(w - \\textstyle\\sum_k s_k \\eta_k d_k) - L(w) \\approx -s^\\top \\beta
      + \\tfrac12 s^\\top M s,

  with ``beta_k = eta_k b_k`` and ``M_kl = eta_k eta_l A_kl`` (the paper's
  ``b_k = G_k . d_k`` and ``A_kl = d_k^T H_kl d_l``). The minimiser along
  group ``k`` alone is ``s_k = beta_k / curvature_k``.

  Attributes:
    slope: ``beta``, shape ``(K,)``.
    curvature: the curvature that sets each group's step, shape ``(K,)``:
      ``M_kk`` for estimators of the diagonal.
    r_squared: fit quality per group, shape ``(K,)`` (1 where exact).
    origin: ``L(w)``.
    below_resolution: per group, whether its step changes the finite loss by
      no more than rounding (its slope and curvature are then noise).
    curvature_matrix: the whole ``M``, shape ``(K, K)``, where the joint
      moves of pairs of groups were measured (``fit="full"``); else ``None``.
  """

  slope: jax.Array
  curvature: jax.Array
  r_squared: jax.Array
  origin: jax.Array
  below_resolution: jax.Array
  curvature_matrix: Optional[jax.Array] = None


#: ``Estimate -> rates``: from a fresh estimate, the rates of one more point
#: ``w - sum_k rates_k d_k`` whose loss the caller wants (the joint check's).
NextPoint = Callable[[Estimate], jax.Array]


class Estimator(Protocol):
  """What :func:`hidlr_optax.scale_by_hidlr` asks of an estimator.

  Attributes:
    sees_coupling: whether :attr:`Estimate.curvature` already counts the
      other groups' share of the combined step (then no joint check runs).
    fits_full: whether it can measure the whole ``M`` (``fit="full"``).
  """

  sees_coupling: bool
  fits_full: bool

  def estimate(
      self, line: Line, *, full: bool, then: Optional[NextPoint] = None
  ) -> tuple[Estimate, Optional[jax.Array]]:
    """The model along ``line``, and the loss at ``then``'s point (or None).

    Args:
      line: where to measure.
      full: also measure the curvature between pairs of groups.
      then: picks one more point from the estimate; its loss is returned.
    """
    ...
