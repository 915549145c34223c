r"""The secant estimator: two gradients measure every group's slope at both ends.

With ``g`` the gradient of ``value_fn`` at the start of the line and ``g'`` at
its end, ``w - span eta o d``,

.. math::

  b_k = g_k \cdot d_k, \quad b'_k = g'_k \cdot d_k, \quad
  c_k = (b_k - b'_k) / \mathrm{span} = (A \eta)_k,

exact on a quadratic (``A_kl = d_k^T H_kl d_l``), and ``eta*_k = eta_k b_k /
c_k`` is the Jacobi step on the joint quadratic model: for separable groups
``c_k = eta_k A_kk`` (the paper's diagonal optimum, eq. 3.2); for groups that
act alike ``c_k`` counts every group's share of the combined step, so they
split it; where ``A^{-1} b`` is positive it is the fixed point (eq. 2.4). The
cost is one or two gradients per refresh, whatever the number of groups.
The two-point gradient difference along the step taken is the secant of
Barzilai & Borwein (1988), used for SGD's step size by Tan, Ma, Dai & Qian
(2016).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from hidlr_optax import _evaluation
from hidlr_optax._resolution import below_resolution, fit_dtype
from hidlr_optax._types import Estimate, Line, NextPoint


def _ends(line: Line) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """``L`` and ``beta = eta o b`` at the start and at the end of the line.

  The loss is differentiated in the step coordinates ``s`` of the groups,
  ``L(w - sum_k s_k eta_k d_k)``, whose gradient is ``-beta``: one backward
  pass gives every group's slope. Where the caller's value and gradient are
  known (at ``grad_at``, the start or the end), only the other end is
  differentiated.

  Returns:
    ``(L(start), L(end), beta(start), beta(end))``.
  """
  k = line.layout.num_groups
  span = 1.0 if line.span is None else line.span
  along = jax.value_and_grad(lambda s: _evaluation.loss_at(line, s * line.rates))
  ones = jnp.ones((k,), line.rates.dtype)
  if line.grad is None:
    (value, start), (end_value, end) = along(0 * ones), along(span * ones)
    return value, end_value, -start, -end
  dtype = fit_dtype(line.rates)
  known = line.rates.astype(dtype) * line.layout.dot(line.grad, line.directions, dtype)
  known_value = jnp.asarray(line.value)
  at_start = True if line.grad_at is None else line.grad_at == 0
  value, measured = along(jnp.where(at_start, span, 0) * ones)
  measured, value = -measured.astype(dtype), value.astype(known_value.dtype)
  first = lambda a, b: jnp.where(at_start, a, b)
  return (first(known_value, value), first(value, known_value), first(known, measured),
          first(measured, known))


def consistency(change: jax.Array, predicted: jax.Array) -> jax.Array:
  """How well the measured loss change agrees with the slopes' prediction.

  ``1 - ((change - predicted) / (|change| + |predicted|))^2``: 1 when they
  agree (on any quadratic), 0 when one of them is 0, below 0 when their signs
  differ; the estimate's ``R^2``.
  """
  scale = jnp.abs(change) + jnp.abs(predicted)
  safe = jnp.where(scale > 0, scale, 1)
  return jnp.where(scale > 0, 1 - ((change - predicted) / safe) ** 2, 0)


@dataclasses.dataclass(frozen=True)
class SecantEstimator:
  """Slope and combined-step curvature per group from two gradients.

  A refresh costs two gradients of ``value_fn`` (at ``w`` and at ``w - eta o
  d``), or one when the caller passes ``value=`` and ``grad=`` (``value_fn``
  and its gradient at ``params``, e.g. on the gradient's own batch). Its
  curvature counts the coupling between groups, so no joint check runs;
  ``fit="full"`` is not available. The loss must be differentiable. Its
  ``R^2`` is the agreement of the loss change over the step with the
  slopes' trapezoid prediction (see :func:`consistency`), the same for every
  group.

  Example:
    >>> import optax, hidlr_optax
    >>> tx = hidlr_optax.hidlr(optax.scale_by_adam(), 1e-3, estimator="secant")
  """

  sees_coupling = True
  fits_full = False

  def estimate(
      self, line: Line, *, full: bool, then: Optional[NextPoint] = None
  ) -> tuple[Estimate, Optional[jax.Array]]:
    """The model from the slopes at both ends, and ``then``'s loss (or None)."""
    del full  # refused at construction (fits_full)
    value, end_value, start, end = _ends(line)
    dtype = fit_dtype(value)
    start, end = start.astype(dtype), end.astype(dtype)
    origin, change = value.astype(dtype), (end_value - value).astype(dtype)
    span = jnp.asarray(1.0 if line.span is None else line.span, dtype)
    curvature = (start - end) / span
    unresolved = below_resolution(jnp.abs(start) + 0.5 * jnp.abs(curvature), origin)
    # On a quadratic the trapezoid rule is exact: L(end) - L(start) =
    # -span (sum beta(start) + sum beta(end)) / 2 along the combined step.
    agreement = consistency(change, -span * (jnp.sum(start) + jnp.sum(end)) / 2)
    estimate = Estimate(start, curvature, jnp.full_like(start, agreement), origin, unresolved)
    return estimate, _evaluation.loss_after(line, then, estimate)
