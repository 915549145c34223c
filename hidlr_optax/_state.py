"""The Hi-DLR optimizer state: a plain pytree of per-group values."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from hidlr_optax._grouping import Label


class GroupFit(NamedTuple):
  """Diagnostics of one group's last refresh, per unit rate (the paper's units).

  Attributes:
    slope: ``b_k = G_k . d_k``, the first-order decrease per unit rate.
    curvature: the curvature that set the group's rate, per unit rate
      squared: ``A_kk = d_k^T H_kk d_k`` (probe and jvp estimators), ``(A
      eta)_k / eta_k`` (secant: the group's row of the combined step).
    r_squared: ``R^2`` of the quadratic fit (1 where the estimate is exact).
    accepted: whether the fit was accepted and set this group's rate.
    below_resolution: whether this group's step changed the loss by no more
      than rounding, so that its fit was noise and its rate was held.
    optimal_rate: the minimiser ``eta*`` that an accepted fit moved the rate
      towards (before the growth bound and smoothing; large where the
      curvature is tiny); NaN where the fit was not accepted and before the
      first refresh.
    uphill_refreshes: how many refreshes in a row, up to the last one, found
      this group's direction pointing *uphill*: a negative slope above the
      loss's resolution with ``R^2 >= min_r2`` (see
      :func:`hidlr_optax.check_direction`).
  """

  slope: jax.Array
  curvature: jax.Array
  r_squared: jax.Array
  accepted: jax.Array
  below_resolution: jax.Array
  optimal_rate: jax.Array
  uphill_refreshes: jax.Array


class LossGuard(NamedTuple):
  """State of the loss guard (``loss_guard=`` of :func:`hidlr_optax.scale_by_hidlr`).

  Per-group arrays are in the order of ``state.learning_rates``.

  Attributes:
    smoothed_loss: moving average of ``L(w)`` over the refreshes.
    best_loss: its lowest value.
    reference_loss: the level a trip is measured from: its lowest value
      since the last trip.
    rates_at_best: the rates in force when the smoothed loss was at its best.
    ceilings: every group's cap on its rate (``inf`` until the first trip).
    num_trips: how many refreshes found the loss risen and cut the rates.
  """

  smoothed_loss: jax.Array
  best_loss: jax.Array
  reference_loss: jax.Array
  rates_at_best: jax.Array
  ceilings: jax.Array
  num_trips: jax.Array


class PerGroup(Mapping):
  """Per-group values, stacked along a leading axis, read by label.

  A pytree whose one child, ``stacked``, is a pytree of arrays with one entry
  per group along their leading axis (in the order of ``labels``, which are
  static). The jitted step reads and writes all groups' values at once, with
  no per-group slices: each distinct slice is a kernel of its own for XLA to
  compile, which made compile time grow with the number of groups. As a
  read-only :class:`~collections.abc.Mapping` it gives one group's value by
  its label.

  Attributes:
    labels: the groups' labels, in the order of the leading axis.
    stacked: the values, stacked.

  Example:
    >>> import jax.numpy as jnp
    >>> rates = PerGroup(('body', 'head'), jnp.array([0.25, 0.5]))
    >>> float(rates['head']), list(rates), rates.stacked.shape
    (0.5, ['body', 'head'], (2,))
  """

  __slots__ = ("labels", "stacked")

  def __init__(self, labels: Sequence[Label], stacked: Any):
    self.labels = tuple(labels)
    self.stacked = stacked

  def __getitem__(self, label: Label) -> Any:
    try:
      k = self.labels.index(label)
    except ValueError:
      raise KeyError(label) from None
    # Framework containers (``flax.nnx`` variables) are unwrapped, not mapped.
    return jax.tree.map(
        lambda x: _value(x)[k], self.stacked, is_leaf=lambda x: not isinstance(x, tuple)
    )

  def __iter__(self) -> Iterator[Label]:
    return iter(self.labels)

  def __len__(self) -> int:
    return len(self.labels)

  def __eq__(self, other: Any) -> Any:
    # As pytree nodes compare: labels and values, whatever the values hold.
    if not isinstance(other, PerGroup):
      return NotImplemented
    return self.labels == other.labels and self.stacked == other.stacked

  __hash__ = None

  def __repr__(self) -> str:
    return f"PerGroup(labels={self.labels!r}, stacked={self.stacked!r})"


jax.tree_util.register_pytree_with_keys(
    PerGroup,
    lambda g: (((jax.tree_util.GetAttrKey("stacked"), g.stacked),), g.labels),
    lambda labels, children: PerGroup(labels, children[0]),
    flatten_func=lambda g: ((g.stacked,), g.labels),
)


class ScaleByHiDLRState(NamedTuple):
  """State of :func:`hidlr_optax.scale_by_hidlr`; a plain pytree.

  The per-group fields are :class:`PerGroup` mappings: ``state.learning_rates
  ['head']`` is one group's rate, ``state.learning_rates.stacked`` all of them
  as one array of shape ``(K,)``.

  Attributes:
    count: number of updates so far (int32).
    learning_rates: ``{label: eta}``, the current rate of every group.
    fits: ``{label: GroupFit}``, diagnostics of the last refresh (its
      ``stacked`` is one :class:`GroupFit` of ``(K,)`` arrays).
    num_refreshes: number of refreshes tried (int32).
    num_accepted: ``{label: n}``, refreshes whose fit set each group's rate.
    num_unresolved: ``{label: n}``, refreshes at which each group's step was
      below the loss's resolution.
    joint_factor: the factor by which the joint check of the last refresh
      scaled the rates of the groups above resolution (1: no correction).
    loss: ``L(w)`` at the last refresh (on ``value_fn``'s batch).
    first_loss: ``L(w)`` at the first refresh, where training started.
    previous_direction: with ``probe_direction="previous"``, the direction
      given to the last update, in the parameters' structure and dtypes;
      ``None`` otherwise.
    guard: with ``loss_guard``, the guard's :class:`LossGuard`; ``None``
      otherwise.
  """

  count: jax.Array
  learning_rates: PerGroup
  fits: PerGroup
  num_refreshes: jax.Array
  num_accepted: PerGroup
  num_unresolved: PerGroup
  joint_factor: jax.Array
  loss: jax.Array
  first_loss: jax.Array
  previous_direction: Any = None
  guard: Optional[LossGuard] = None


def _value(x: Any) -> Any:
  """Unwraps framework containers (e.g. ``flax.nnx`` variables) to arrays."""
  if isinstance(x, (jax.Array, np.ndarray)):
    return x
  if hasattr(x, "get_value"):  # flax.nnx.Variable (its `.value` is deprecated)
    return x.get_value()
  return x.value if hasattr(x, "value") else x
