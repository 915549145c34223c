"""The jvp estimator: exact directional derivatives, forward over forward."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from hidlr_optax import _evaluation, _fit
from hidlr_optax._resolution import below_resolution, fit_dtype
from hidlr_optax._types import Estimate, Line, NextPoint


@dataclasses.dataclass(frozen=True)
class JvpEstimator:
  """Slope and curvature per group by ``jax.jvp`` of ``jax.jvp``.

  For groups ``(k, l)`` (``k = l`` on the diagonal), ``h(s, t) = L(w - s
  eta_k d_k - t eta_l d_l)`` is differentiated in the two scalars: ``dh/ds =
  -beta_k`` and ``d2h/ds dt = M_kl`` at 0. No finite-difference
  cancellation, but the loss must be twice differentiable; ``R^2`` is 1.

  Example:
    >>> import optax, hidlr_optax
    >>> tx = hidlr_optax.gen(optax.scale_by_adam(), 1e-3, estimator=hidlr_optax.JvpEstimator())
  """

  sees_coupling = False
  fits_full = True

  def estimate(
      self, line: Line, *, full: bool, then: Optional[NextPoint] = None
  ) -> tuple[Estimate, Optional[jax.Array]]:
    """The exact model at ``w``, and the loss at ``then``'s point (or None)."""
    rates = line.rates
    k = line.layout.num_groups
    eye = np.eye(k, dtype=bool)
    pairs = np.stack([np.arange(k), np.arange(k)], axis=1)
    if full and k > 1:
      pairs = np.concatenate([pairs, _evaluation.pair_indices(k)], axis=0)
    zero, one = jnp.zeros((), rates.dtype), jnp.ones((), rates.dtype)

    def derivatives(i: int, j: int) -> tuple[jax.Array, jax.Array, jax.Array]:
      """``dh/ds``, ``d2h/ds dt`` and ``h`` at the parameters."""
      c_i, c_j = jnp.where(eye[i], rates, 0), jnp.where(eye[j], rates, 0)
      h = lambda s, t: _evaluation.loss_at(line, s * c_i + t * c_j, eye[i] | eye[j])
      along_s = lambda t: jax.jvp(lambda s: h(s, t), (zero,), (one,))[::-1]
      (first, value), (second, _) = jax.jvp(along_s, (zero,), (one,))
      return first, second, value

    first, second, values = (jnp.stack(x) for x in zip(*(derivatives(i, j) for i, j in pairs)))
    dtype = fit_dtype(first)
    slope = -first[:k].astype(dtype)
    second = second.astype(dtype)
    matrix = None
    if full and k > 1:
      matrix = _fit.set_off_diagonal(second[:k], second[k:], pairs[k:])
    origin = values[0].astype(dtype)
    unresolved = below_resolution(jnp.abs(slope) + 0.5 * jnp.abs(second[:k]), origin)
    estimate = Estimate(slope, second[:k], jnp.ones((k,), dtype), origin, unresolved, matrix)
    return estimate, _evaluation.loss_after(line, then, estimate)
