"""The loss at points moved along the groups' steps, batched or in chunks.

A point is given by its coefficients ``c`` (shape ``(K,)``): the parameters
moved to ``w - sum_k c_k d_k``. Only the leaves of the groups a point moves
are recomputed; the others enter ``value_fn`` unchanged, so whatever the loss
computes from them alone is neither batched over points nor repeated. This
module knows nothing of fits or rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from hidlr_optax._types import Line

T = TypeVar("T")


def every_group(num_groups: int) -> np.ndarray:
  """The static mask of all ``num_groups`` groups."""
  return np.ones(num_groups, bool)


def loss_at(line: Line, coeffs: jax.Array, groups: Optional[np.ndarray] = None) -> jax.Array:
  """``value_fn(w - sum_k coeffs_k d_k)``, moving only the leaves of ``groups``."""
  layout = line.layout
  mask = every_group(layout.num_groups) if groups is None else groups
  return line.value_fn(layout.move(line.params, coeffs, line.directions, mask))


def loss_after(line: Line, then: Optional[Callable[[T], jax.Array]], result: T) -> Optional[jax.Array]:
  """The loss at the point ``then`` picks from ``result`` (None without ``then``)."""
  return None if then is None else loss_at(line, then(result))


def probe_coefficients(num_groups: int, scales: np.ndarray, full: bool) -> np.ndarray:
  """Probe points in step units, one row per probe, shape ``(P, K)``.

  Rows: ``v_i e_k`` for every group ``k`` and scale ``v_i``, then, with
  ``full``, ``v_i (e_k + e_l)`` for every pair ``k < l``.
  """
  eye = np.eye(num_groups)
  rows = [np.kron(eye, scales[:, None])]
  if full:
    pairs = pair_indices(num_groups)
    rows.append(np.kron(eye[pairs[:, 0]] + eye[pairs[:, 1]], scales[:, None]))
  return np.concatenate(rows, axis=0)


def pair_indices(num_groups: int) -> np.ndarray:
  """The ``(k, l)`` index pairs with ``k < l``, shape ``(P, 2)``."""
  pairs = [(k, l) for k in range(num_groups) for l in range(k + 1, num_groups)]
  return np.asarray(pairs, dtype=np.int32).reshape(-1, 2)


def losses_per_set(
    line: Line, scales: np.ndarray, full: bool, with_origin: bool
) -> tuple[jax.Array, Optional[jax.Array]]:
  """The losses of every probe set, each set's scales in one ``jax.vmap``.

  A set is one group (or, with ``full``, one pair of groups) moved by ``v_i``
  steps. With ``with_origin`` the first set also evaluates scale 0, ``L(w)``,
  so that no separate forward is traced for it.

  Returns:
    ``(losses (S, n), L(w) or None)``.
  """
  rates = line.rates
  sets = probe_coefficients(line.layout.num_groups, np.ones(1), full) != 0
  first_scales = np.concatenate([[0.0], scales]) if with_origin else scales

  def set_losses(groups: np.ndarray, v: np.ndarray) -> jax.Array:
    coeffs = jnp.where(groups, rates, 0)
    return jax.vmap(lambda s: loss_at(line, s * coeffs, groups))(jnp.asarray(v, rates.dtype))

  first = set_losses(sets[0], first_scales)
  rest = [set_losses(groups, scales) for groups in sets[1:]]
  origin = first[0] if with_origin else None
  return jnp.stack([first[-scales.size:], *rest]), origin


def unread(shape: jax.ShapeDtypeStruct) -> jax.Array:
  """A loop carry's initial value that the loop overwrites before reading.

  A literal (one 1, then zeros): XLA turns a uniform constant into a
  broadcast and a ramp into an iota, each compiled as a kernel of its own
  (one more distinct fusion in the step, about 10 ms of XLA:CPU compile
  time); a constant without such a pattern is data, not a kernel.
  """
  value = np.zeros(shape.shape, shape.dtype)
  value.reshape(-1)[:1] = 1
  return jnp.asarray(value)


def losses_one_by_one(
    line: Line,
    steps: jax.Array,
    then: Optional[Callable[[jax.Array], jax.Array]] = None,
) -> tuple[jax.Array, Optional[jax.Array]]:
  """The losses at the points ``steps`` (step units, ``(n, K)``), one at a time.

  One ``jax.lax.fori_loop`` whose body holds the only copy of the forward
  (and forms its point ``steps[i] * rates``, which fuses with the row's
  lookup). With ``then`` (``losses (n,) -> coefficients``), the loop runs
  once more: its last iteration evaluates the point that ``then`` picks from
  the losses so far, inside ``jax.lax.cond``, so that this dependent forward
  is not compiled a second time.

  Returns:
    ``(losses (n,), the loss at then's point or None)``.
  """
  n = steps.shape[0]
  point = lambda i: steps[i] * line.rates
  loss_type = jax.eval_shape(lambda c: loss_at(line, c), line.rates)
  if then is None:
    body = lambda i, losses: losses.at[i].set(loss_at(line, point(i)))
    carry = jax.ShapeDtypeStruct((n, *loss_type.shape), loss_type.dtype)
    return jax.lax.fori_loop(0, n, body, unread(carry)), None

  def body(i, losses):
    at = jax.lax.cond(i == n, lambda: then(losses[:n]), lambda: point(i))
    return losses.at[i].set(loss_at(line, at))

  carry = jax.ShapeDtypeStruct((n + 1, *loss_type.shape), loss_type.dtype)
  losses = jax.lax.fori_loop(0, n + 1, body, unread(carry))
  return losses[:n], losses[n]


def losses_in_chunks(line: Line, steps: jax.Array, batch_size: int) -> jax.Array:
  """The losses at the points ``steps`` (step units, ``(n, K)``), ``batch_size`` at a time."""
  return jax.lax.map(lambda c: loss_at(line, c), steps * line.rates, batch_size=batch_size)
