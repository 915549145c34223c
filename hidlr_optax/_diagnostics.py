"""Reading a Hi-DLR state out of any optimizer state, and the checks on it.

Everything here runs on the host, outside the jitted step (e.g. when you log).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from hidlr_optax._grouping import Label
from hidlr_optax._state import GroupFit, ScaleByHiDLRState, _value


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
    accepted, whether the group's step was below the loss's resolution, the
    fitted optimum and the uphill streak. Counts over training are in the
    state (``num_accepted``, ``num_unresolved``; see
    :func:`unresolved_groups`).

  Example:
    >>> import jax.numpy as jnp, hidlr_optax, optax
    >>> tx = hidlr_optax.gen(optax.scale_by_adam(), 1e-3)
    >>> fits = hidlr_optax.fit_diagnostics(tx.init({'w': jnp.zeros(3)}))
    >>> sorted(fits['all']._fields)  # doctest: +NORMALIZE_WHITESPACE
    ['accepted', 'below_resolution', 'curvature', 'optimal_rate', 'r_squared',
     'slope', 'uphill_refreshes']
  """
  return dict(_single_state(opt_state).fits)


def unresolved_groups(opt_state: Any, share: float = 0.5) -> dict[Label, float]:
  """The groups whose steps were below the loss's resolution at most refreshes.

  Such a group's probes do not move the loss by more than rounding, so no fit
  can set its rate; its rate is too small for its direction (raise that
  group's initial ``learning_rate``).

  Args:
    opt_state: as for :func:`learning_rates`.
    share: report groups unresolved at more than this share of refreshes.

  Returns:
    ``{label: share of refreshes below resolution}`` for those groups.

  Example:
    >>> import jax, jax.numpy as jnp, optax, hidlr_optax
    >>> loss = lambda p: jnp.sum((p['a'] - 1.0) ** 2) + 1e-12 * jnp.sum(p['b'] ** 2)
    >>> params = {'a': jnp.zeros(2), 'b': jnp.ones(2)}
    >>> tx = hidlr_optax.hidlr(optax.identity(), 0.1, {'a': 'a', 'b': 'b'})
    >>> state = tx.init(params)
    >>> _, state = tx.update(jax.grad(loss)(params), state, params, value_fn=loss)
    >>> hidlr_optax.unresolved_groups(state)
    {'b': 1.0}
  """
  state = _single_state(opt_state)
  refreshes = int(np.asarray(_value(state.num_refreshes)))
  if refreshes == 0:
    return {}
  counts = np.asarray(_value(state.num_unresolved.stacked))
  return {
      label: float(n / refreshes)
      for label, n in zip(state.num_unresolved.labels, counts)
      if n / refreshes > share
  }


def check_direction(opt_state: Any, refreshes: int = 3) -> None:
  """Raises if the base direction points uphill: a base that is not a direction.

  Hi-DLR expects the base optimizer's *direction* (e.g.
  ``optax.scale_by_adam()``), which it negates and scales. A full optimizer
  such as ``optax.adam(1e-3)`` has already negated it, so Hi-DLR steps
  uphill: every fit then finds a negative slope and the loss rises. This
  raises only when both are seen: every group's fitted slope has been
  negative (well resolved) for ``refreshes`` refreshes in a row, and the loss
  at the last refresh is above the loss at the first refresh of training.
  Near its noise floor a descending run can read many uphill fits in a row
  (with momentum, the step carries past the minimum); its loss is then far
  below where it started.

  Args:
    opt_state: as for :func:`learning_rates`.
    refreshes: how many uphill refreshes in a row, in every group, to watch.

  Raises:
    ValueError: naming the likely mistake.

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
  state = _single_state(opt_state)
  streaks = np.asarray(_value(state.fits.stacked.uphill_refreshes))
  start, last = (float(np.asarray(_value(x))) for x in (state.first_loss, state.loss))
  if streaks.size and np.all(streaks >= refreshes) and last > start:
    raise ValueError(
        f"Hi-DLR: for the last {int(streaks.min())} refreshes every group's"
        " direction pointed uphill (negative fitted slope b = G.d, well"
        f" resolved) in groups {list(state.fits)}, and the loss rose from"
        f" {start:.6g} at the first refresh to {last:.6g}. Hi-DLR negates and scales the base"
        " optimizer's *direction*: pass e.g. optax.scale_by_adam(), not"
        " optax.adam(lr) (which is already negated and scaled), and check"
        " that no transformation before Hi-DLR flips the sign of the updates."
    )
