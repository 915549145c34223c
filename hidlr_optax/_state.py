"""The Hi-DLR optimizer state and accessors that find it in any optimizer state."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from hidlr_optax._grouping import Label


class GroupFit(NamedTuple):
  """Diagnostics of one group's last refresh.

  Attributes:
    slope: ``b_k = G_k . d_k``, the first-order decrease per unit rate.
    curvature: ``A_kk = d_k^T H_kk d_k``.
    r_squared: ``R^2`` of the quadratic fit (1 for ``estimator="jvp"``).
    accepted: whether the fit was accepted and set this group's rate.
    below_resolution: whether this group's step changed the loss by no more
      than rounding, so that its fit was noise and its rate was held.
    optimal_rate: the fitted one-step minimiser ``eta* = b_k / A_kk``; NaN
      where the fitted quadratic has no minimum along the group's step
      (``A_kk <= 0``, or its curvature within rounding, or the fit not
      finite), and before the first refresh.
    uphill_refreshes: how many refreshes in a row, up to the last one, found
      this group's direction pointing *uphill*: a negative slope ``b_k < 0``
      above the loss's resolution with ``R^2 >= min_r2``. When every group
      reads several, the direction given to Hi-DLR is most likely an
      ascent direction (see :func:`check_direction`).
    slope_snr: with per-example losses from ``value_fn``, the slope's
      signal-to-noise ratio ``b_k / se(b_k)`` over the probe batch's
      examples; NaN with a scalar ``value_fn``.
    curvature_snr: likewise ``A_kk / se(A_kk)``; NaN with a scalar
      ``value_fn``.
  """

  slope: jax.Array
  curvature: jax.Array
  r_squared: jax.Array
  accepted: jax.Array
  below_resolution: jax.Array
  optimal_rate: jax.Array
  uphill_refreshes: jax.Array
  slope_snr: jax.Array
  curvature_snr: jax.Array


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
    num_noisy: ``{label: n}``, refreshes whose fit was noise-dominated (a
      slope or curvature within ``min_snr`` standard errors of 0, see
      :func:`hidlr_optax._rule.noise_dominated`); stays 0 with a scalar
      ``value_fn``, which gives no standard errors.
    joint_factor: the factor by which the joint check of the last refresh
      scaled the rates of the groups above resolution (1: the combined step
      behaved as the per-group fits predicted, or ``K = 1``, or
      ``joint_check=False``).
    anchor: with ``horizon="period"``, the parameters at the last refresh
      (the start of the displacement that the next refresh fits along);
      ``None`` otherwise.
    previous_direction: with ``probe_direction="previous"``, the direction
      given to the last update (what the next refresh fits along), in the
      parameters' structure and dtypes; ``None`` otherwise.
  """

  count: jax.Array
  learning_rates: PerGroup
  fits: PerGroup
  num_refreshes: jax.Array
  num_accepted: PerGroup
  num_noisy: PerGroup
  joint_factor: jax.Array
  anchor: Any = None
  previous_direction: Any = None


def _value(x: Any) -> Any:
  """Unwraps framework containers (e.g. ``flax.nnx`` variables) to arrays."""
  if isinstance(x, (jax.Array, np.ndarray)):
    return x
  if hasattr(x, "get_value"):  # flax.nnx.Variable (its `.value` is deprecated)
    return x.get_value()
  return x.value if hasattr(x, "value") else x


def find_states(opt_state: Any) -> list[ScaleByHiDLRState]:
  """Returns every Hi-DLR state nested anywhere in ``opt_state``.

  Works through ``optax.chain``, ``optax.inject_hyperparams``,
  ``optax.MultiSteps``, ``optax.partition`` and ``flax.nnx.Optimizer`` states.
  """
  is_state = lambda x: isinstance(x, ScaleByHiDLRState)
  return [s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(s)]


def _single_state(opt_state: Any) -> ScaleByHiDLRState:
  states = find_states(opt_state)
  if not states:
    raise ValueError("no Hi-DLR state (ScaleByHiDLRState) found in opt_state")
  if len(states) > 1:
    raise ValueError(
        f"opt_state holds {len(states)} Hi-DLR states; pass the one you mean"
        " (see hidlr_optax.find_states)"
    )
  return states[0]


def learning_rates(opt_state: Any) -> dict[Label, jax.Array]:
  """Returns ``{label: eta}`` from any optimizer state holding a Hi-DLR state.

  Args:
    opt_state: the state of an optimizer that contains exactly one
      :func:`~hidlr_optax.scale_by_hidlr` (possibly nested in ``chain``,
      ``inject_hyperparams``, ``MultiSteps`` or an ``nnx.Optimizer``).

  Returns:
    The current learning rate of every group.

  Example:
    >>> import jax.numpy as jnp, hidlr_optax, optax
    >>> tx = hidlr_optax.hidlr(optax.scale_by_adam(), 1e-3)
    >>> hidlr_optax.learning_rates(tx.init({'w': jnp.zeros(3)}))
    {'all': Array(0.001, dtype=float32)}
  """
  return dict(_single_state(opt_state).learning_rates)


def fit_diagnostics(opt_state: Any) -> dict[Label, GroupFit]:
  """Returns ``{label: GroupFit}`` of the last refresh (see :class:`GroupFit`).

  Args:
    opt_state: as for :func:`learning_rates`.

  Returns:
    For every group, ``b``, ``A``, ``R^2``, whether the refresh was
    accepted and whether the group's step was below the loss's resolution,
    the signal-to-noise ratios of ``b`` and ``A`` (with per-example
    losses), plus (in ``num_accepted`` and ``num_noisy`` of the state)
    counts over training.

  Example:
    >>> import jax.numpy as jnp, hidlr_optax, optax
    >>> tx = hidlr_optax.gen(optax.scale_by_adam(), 1e-3)
    >>> fits = hidlr_optax.fit_diagnostics(tx.init({'w': jnp.zeros(3)}))
    >>> sorted(fits['all']._fields)  # doctest: +NORMALIZE_WHITESPACE
    ['accepted', 'below_resolution', 'curvature', 'curvature_snr', 'optimal_rate',
     'r_squared', 'slope', 'slope_snr', 'uphill_refreshes']
  """
  return dict(_single_state(opt_state).fits)


def check_direction(opt_state: Any, refreshes: int = 3) -> None:
  """Raises if every group's direction has pointed uphill for a while.

  Hi-DLR expects the base optimizer's *direction* (e.g.
  ``optax.scale_by_adam()``), which it negates and scales. A full optimizer
  such as ``optax.adam(1e-3)`` has already negated it, so Hi-DLR steps
  uphill: every fit then finds a negative slope, is rejected, and the rates
  freeze while the loss rises. This check reads the state on the host (call
  it outside the jitted step, e.g. when you log); it does nothing until
  every group's :attr:`GroupFit.uphill_refreshes` reaches ``refreshes``.

  Args:
    opt_state: as for :func:`learning_rates`.
    refreshes: how many uphill refreshes in a row, in every group, raise.

  Raises:
    ValueError: naming the likely mistake, when every group has pointed
      uphill for ``refreshes`` refreshes in a row.

  Example:
    >>> import jax, jax.numpy as jnp, optax, hidlr_optax
    >>> loss = lambda p: jnp.sum((p - 3.0) ** 2)
    >>> tx = hidlr_optax.gen(optax.sgd(0.1), update_every=1)  # a mistake
    >>> params, state = jnp.zeros(2), tx.init(jnp.zeros(2))
    >>> for _ in range(3):
    ...   updates, state = tx.update(jax.grad(loss)(params), state, params, value_fn=loss)
    ...   params = optax.apply_updates(params, updates)
    >>> hidlr_optax.check_direction(state)
    Traceback (most recent call last):
    ...
    ValueError: Hi-DLR: for the last 3 refreshes every group's direction pointed uphill ...
  """
  fits = _single_state(opt_state).fits
  streaks = np.asarray(_value(fits.stacked.uphill_refreshes))
  if streaks.size and np.all(streaks >= refreshes):
    raise ValueError(
        f"Hi-DLR: for the last {int(streaks.min())} refreshes every group's"
        " direction pointed uphill (negative fitted slope b = G.d, well"
        f" resolved) in groups {list(fits)}. Hi-DLR negates and scales the"
        " base optimizer's *direction*: pass e.g. optax.scale_by_adam(), not"
        " optax.adam(lr) (which is already negated and scaled), and check"
        " that no transformation before Hi-DLR flips the sign of the updates."
    )
