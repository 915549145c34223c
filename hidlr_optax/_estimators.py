"""Estimating ``beta`` and ``M`` along the groups' directions.

Two estimators share one interface: given the parameters ``w``, the base
direction ``d`` and the current rates ``eta``, they return the first-order
decrease ``beta_k`` and the curvature ``M_kl`` in normalised step units (see
:mod:`hidlr_optax._fit`).

* ``"probe"`` (the paper's Algorithm 1): loss values at
  ``w - v_i eta_k d_k`` for the probe scales ``v_i``, all evaluated in one
  batched forward (``jax.vmap``) or in chunks (``jax.lax.map``), then a
  least-squares fit per group.
* ``"jvp"``: the exact first and second directional derivatives by
  forward-over-forward differentiation (``jax.jvp`` of ``jax.jvp``); no
  finite-difference cancellation, but the loss must be twice differentiable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from hidlr_optax import _fit
from hidlr_optax._grouping import GroupLayout

ValueFn = Callable[[Any], jax.Array]


class Estimate(NamedTuple):
  """Second-order model along the groups, in normalised step units.

  Attributes:
    slope: ``beta``, shape ``(K,)``.
    curvature: ``M``, shape ``(K, K)`` (only the diagonal is estimated for
      the diagonal fit; the rest is zero).
    r_squared: fit quality per group, shape ``(K,)`` (1 for ``"jvp"``).
  """

  slope: jax.Array
  curvature: jax.Array
  r_squared: jax.Array


def batched_map(fn: Callable, xs: jax.Array, batch_size: Union[int, None]):
  """Maps ``fn`` over the leading axis of ``xs``, vmapped or in chunks."""
  if batch_size is None or batch_size >= xs.shape[0]:
    return jax.vmap(fn)(xs)
  return jax.lax.map(fn, xs, batch_size=batch_size)


def _move(params: Any, step: Any) -> Any:
  """Returns ``params - step`` in the parameters' own dtypes."""
  return jax.tree.map(lambda p, s: (p - s).astype(p.dtype), params, step)


def fit_dtype(loss: jax.Array) -> jnp.dtype:
  """Fits run in float32 at least, in float64 when the loss is float64."""
  return jnp.promote_types(jnp.asarray(loss).dtype, jnp.float32)


def probe_coefficients(
    num_groups: int, scales: np.ndarray, full: bool, with_origin: bool
) -> np.ndarray:
  """Probe points in normalised units, one row per probe, shape ``(P, K)``.

  Rows: optionally the origin (for ``L0``), then ``v_i e_k`` for every group
  ``k`` and scale ``v_i``, then, for the full fit, ``v_i (e_k + e_l)`` for
  every pair ``k < l``.
  """
  eye = np.eye(num_groups)
  rows = [np.zeros((1, num_groups))] if with_origin else []
  rows.append(np.kron(eye, scales[:, None]))
  if full:
    pairs = _fit.pair_indices(num_groups)
    joint = eye[pairs[:, 0]] + eye[pairs[:, 1]]
    rows.append(np.kron(joint, scales[:, None]))
  return np.concatenate(rows, axis=0)


def probe_estimate(
    value_fn: ValueFn,
    params: Any,
    directions: Any,
    layout: GroupLayout,
    rates: jax.Array,
    scales: np.ndarray,
    *,
    full: bool,
    value: Union[jax.Array, None],
    batch_size: Union[int, None],
) -> Estimate:
  """Estimates the model from loss values at probe points (Algorithm 1)."""
  k = layout.num_groups
  n = scales.size
  with_origin = value is None
  coeffs = jnp.asarray(probe_coefficients(k, scales, full, with_origin), rates.dtype)

  def probe_loss(c):
    return value_fn(_move(params, layout.scale(c * rates, directions)))

  losses = batched_map(probe_loss, coeffs, batch_size)
  dtype = fit_dtype(losses)
  losses = losses.astype(dtype)
  if with_origin:
    origin, losses = losses[0], losses[1:]
  else:
    origin = jnp.asarray(value, dtype)
  deltas = losses - origin
  diag = _fit.fit_quadratics(deltas[: k * n].reshape(k, n), scales)
  curvature = jnp.diag(diag.curvature)
  if full and k > 1:
    joint = _fit.fit_quadratics(deltas[k * n :].reshape(-1, n), scales)
    curvature = _fit.curvature_matrix(
        diag.curvature, joint.curvature, _fit.pair_indices(k)
    )
  return Estimate(diag.slope, curvature, diag.r_squared)


def jvp_estimate(
    value_fn: ValueFn,
    params: Any,
    directions: Any,
    layout: GroupLayout,
    rates: jax.Array,
    *,
    full: bool,
    batch_size: Union[int, None],
) -> Estimate:
  """Estimates the model exactly by forward-over-forward differentiation."""
  k = layout.num_groups
  unit = jnp.eye(k, dtype=rates.dtype) * rates[None, :]  # row k: eta_k e_k

  def tangent(c):
    return jax.tree.map(jnp.negative, layout.scale(c, directions))

  def derivatives(c_pair):
    """First derivative along u and second along (u, u') at the params."""
    u, u2 = tangent(c_pair[0]), tangent(c_pair[1])
    first_along_u = lambda w: jax.jvp(value_fn, (w,), (u,))[1]
    first, second = jax.jvp(first_along_u, (params,), (u2,))
    return first, second

  pairs = np.stack([np.arange(k), np.arange(k)], axis=1)
  if full and k > 1:
    pairs = np.concatenate([pairs, _fit.pair_indices(k)], axis=0)
  c_pairs = unit[jnp.asarray(pairs)]  # (P, 2, K)
  first, second = batched_map(derivatives, c_pairs, batch_size)
  dtype = fit_dtype(first)
  slope = -first[:k].astype(dtype)
  second = second.astype(dtype)
  curvature = _fit.set_off_diagonal(second[:k], second[k:], pairs[k:])
  return Estimate(slope, curvature, jnp.ones((k,), dtype))
