"""Closed-form quadratic fits of probe losses (Xu, Bu, Zhang & Barnett, eq. 3.1).

All fits work in *step units*. Along group ``k`` a step of size
``s`` means moving the parameters by ``-s * eta_k * d_k``, so that ``s = 1`` is
the step the current learning rate would take. In these units the second-order
model of the loss change is

    L(w - sum_k s_k eta_k d_k) - L(w) ~= -sum_k s_k beta_k + 1/2 s^T M s,

with ``beta_k = eta_k b_k`` and ``M_kl = eta_k eta_l A_kl`` (``b_k = G_k . d_k``
and ``A_kl = d_k^T H_kl d_l`` in the paper's notation). The probe scales ``v``
are fixed, so the least-squares operator is a constant matrix computed once.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class QuadraticFit(NamedTuple):
  """Per-curve fit of ``y(v) ~= -beta v + 1/2 curvature v^2``.

  Attributes:
    slope: ``beta``, the first-order decrease per unit step.
    curvature: the second derivative along the step.
    r_squared: coefficient of determination of the fit on its points.
  """

  slope: jax.Array
  curvature: jax.Array
  r_squared: jax.Array


def check_probe_scales(scales: Sequence[float]) -> np.ndarray:
  """Validates probe scales and returns them as a float64 array."""
  v = np.asarray(scales, dtype=np.float64)
  if v.ndim != 1 or v.size < 2:
    raise ValueError(f"probe_scales needs at least 2 values, got {scales!r}")
  if np.any(v == 0) or not np.all(np.isfinite(v)):
    raise ValueError(f"probe_scales must be finite and non-zero, got {scales!r}")
  if np.unique(v).size < 2:
    raise ValueError(f"probe_scales needs 2 distinct values, got {scales!r}")
  return v


def _features(scales: np.ndarray) -> np.ndarray:
  """Regressors ``[-v, v^2 / 2]`` of the no-intercept model, shape (n, 2)."""
  return np.stack([-scales, 0.5 * scales**2], axis=1)


def _least_squares_operator(scales: np.ndarray) -> np.ndarray:
  """Returns P (2, n) with [beta, curvature] = P @ y for the no-intercept fit."""
  features = _features(scales)
  return np.linalg.solve(features.T @ features, features.T)


def fold_last_axis(fn, x: jax.Array) -> jax.Array:
  """Combines the entries of ``x`` along its last axis left to right with ``fn``.

  For the few (static) entries along that axis here (the probe scales) this
  replaces a reduction, for compile time: elementwise operations fuse
  with what surrounds them, where XLA compiles each reduction as a kernel of
  its own, and each distinct kernel adds to the step's compile time. Used
  only where the result is the same to the last bit as the reduction it
  replaces (``tests/test_core_semantics.py`` checks it): not for the fit's
  row-wise sums of squares, which XLA vectorises across rows and rounds
  differently for some numbers of rows.
  """
  return functools.reduce(fn, [x[..., i] for i in range(x.shape[-1])])


def fit_quadratics(deltas: jax.Array, scales: np.ndarray) -> QuadraticFit:
  """Fits every row of ``deltas`` by least squares, without intercept.

  Args:
    deltas: loss changes ``L(v_i) - L(0)``, shape ``(m, n)`` for ``m`` curves
      probed at the ``n`` scales.
    scales: the probe scales ``v``, shape ``(n,)``.

  Returns:
    The fit of each row, each field of shape ``(m,)``.
  """
  dtype = deltas.dtype
  operator = jnp.asarray(_least_squares_operator(scales), dtype)
  coeffs = deltas @ operator.T  # (m, 2)
  features = jnp.asarray(_features(scales), dtype)
  residual = deltas - coeffs @ features.T
  ss_res = jnp.sum(residual**2, axis=-1)
  centred = deltas - (fold_last_axis(jnp.add, deltas) / scales.size)[:, None]
  ss_tot = jnp.sum(centred**2, axis=-1)
  safe_tot = jnp.where(ss_tot > 0, ss_tot, 1)
  r_squared = jnp.where(ss_tot > 0, 1 - ss_res / safe_tot, 0)
  return QuadraticFit(coeffs[:, 0], coeffs[:, 1], r_squared)


def curvature_matrix(
    diagonal: jax.Array, pair_curvature: jax.Array, pairs: np.ndarray
) -> jax.Array:
  """Assembles the symmetric ``M`` from its diagonal and joint-move curvatures.

  Moving groups ``k`` and ``l`` together has curvature
  ``M_kk + M_ll + 2 M_kl``; this inverts that relation.

  Args:
    diagonal: ``M_kk``, shape ``(K,)``.
    pair_curvature: curvature of each joint move, shape ``(P,)``.
    pairs: the ``(k, l)`` of each joint move, shape ``(P, 2)``.

  Returns:
    ``M``, shape ``(K, K)``.
  """
  k, l = pairs[:, 0], pairs[:, 1]
  off = 0.5 * (pair_curvature - diagonal[k] - diagonal[l])
  return set_off_diagonal(diagonal, off, pairs)


def set_off_diagonal(
    diagonal: jax.Array, off: jax.Array, pairs: np.ndarray
) -> jax.Array:
  """Builds a symmetric matrix from its diagonal and upper-triangle entries."""
  m = jnp.diag(diagonal)
  if pairs.shape[0]:
    k, l = pairs[:, 0], pairs[:, 1]
    m = m.at[k, l].set(off).at[l, k].set(off)
  return m


def solve_full(slope: jax.Array, curvature: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Solves ``M s = beta`` (paper eq. 2.4) when ``M`` is positive definite.

  Args:
    slope: ``beta``, shape ``(K,)``.
    curvature: ``M``, shape ``(K, K)``.

  Returns:
    ``(s, ok)``: the minimiser in step units and whether it is valid
    (``M`` positive definite, every entry of ``s`` finite and positive).
  """
  finite = jnp.all(jnp.isfinite(curvature)) & jnp.all(jnp.isfinite(slope))
  safe_m = jnp.where(finite, curvature, jnp.eye(curvature.shape[0], dtype=curvature.dtype))
  chol = jnp.linalg.cholesky(safe_m)
  pos_def = jnp.all(jnp.isfinite(chol)) & jnp.all(jnp.diag(chol) > 0)
  safe_chol = jnp.where(pos_def, chol, jnp.eye(curvature.shape[0], dtype=curvature.dtype))
  safe_slope = jnp.where(finite, slope, 0)
  s = jax.scipy.linalg.cho_solve((safe_chol, True), safe_slope)
  ok = finite & pos_def & jnp.all(jnp.isfinite(s)) & jnp.all(s > 0)
  return s, ok
