"""The probe estimator: loss values along each group's step and a quadratic fit.

Xu, Bu, Zhang & Barnett, Algorithm 1: ``L(w - v_i eta_k d_k)`` at the probe
scales ``v_i`` for every group ``k``, then a closed-form least-squares fit of
``-beta_k v + M_kk v^2 / 2`` per group (:mod:`hidlr_optax._fit`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from hidlr_optax import _evaluation, _fit
from hidlr_optax._resolution import below_resolution, fit_dtype
from hidlr_optax._types import Estimate, Line, NextPoint

BatchSize = Union[int, str, None]


def resolve_batch_size(batch_size: BatchSize) -> Optional[int]:
  """``"auto"``: chunks of 1 on CPU, one vmapped batch per group elsewhere.

  On CPU the vmapped probes make the step's block of temporaries several
  times the parameters' size, and XLA:CPU allocates that block on every call,
  also on steps that do not refresh; one probe at a time keeps it and the
  peak memory small, for a refresh step 5-25% slower (the overhead
  benchmark's three models). Accelerators run the batched forward in
  parallel and keep their memory pooled. Resolved when ``update`` is
  traced, on the default backend.
  """
  if batch_size == "auto":
    return 1 if jax.default_backend() == "cpu" else None
  return batch_size


def fitted(losses: jax.Array, origin: jax.Array, scales: np.ndarray, k: int, full: bool) -> Estimate:
  """The estimate from the probe sets' losses ``(S, n)`` and ``L(w)``."""
  dtype = fit_dtype(losses)
  origin = jnp.asarray(origin, dtype)
  deltas = losses.astype(dtype) - origin
  diag = _fit.fit_quadratics(deltas[:k], scales)
  matrix = None
  if full and k > 1:
    joint = _fit.fit_quadratics(deltas[k:], scales)
    matrix = _fit.curvature_matrix(diag.curvature, joint.curvature, _evaluation.pair_indices(k))
  largest = _fit.fold_last_axis(jnp.maximum, jnp.abs(deltas[:k]))
  unresolved = below_resolution(largest, origin)
  return Estimate(diag.slope, diag.curvature, diag.r_squared, origin, unresolved, matrix)


@dataclasses.dataclass(frozen=True)
class ProbeEstimator:
  """Fits each group's slope and curvature from ``4K`` probe losses.

  Args:
    scales: the probe scales ``v_i``; probes sit at ``w - v_i eta_k d_k``.
    batch_size: ``None``: each group's probes in one ``jax.vmap`` that moves
      only its leaves (fastest on accelerators); an int: all probes in one
      loop over chunks of that many points (least memory; with 1, the joint
      check's forward is the loop's last iteration); ``"auto"``: 1 on CPU,
      ``None`` elsewhere.

  Example:
    >>> import optax, hidlr_optax
    >>> tx = hidlr_optax.hidlr(optax.scale_by_adam(), 1e-3,
    ...     estimator=hidlr_optax.ProbeEstimator(scales=(-1.0, 1.0, 2.0), batch_size=None))
  """

  scales: Sequence[float] = (-2.0, -1.0, 1.0, 2.0)
  batch_size: BatchSize = "auto"
  sees_coupling = False
  fits_full = True

  def __post_init__(self):
    object.__setattr__(self, "scales", tuple(float(v) for v in _fit.check_probe_scales(self.scales)))
    b = self.batch_size
    if b not in (None, "auto") and not (
        isinstance(b, (int, np.integer)) and not isinstance(b, bool) and b >= 1
    ):
      raise ValueError(
          f"ProbeEstimator: batch_size must be None, 'auto' or an int >= 1, got {b!r}"
      )

  def estimate(
      self, line: Line, *, full: bool, then: Optional[NextPoint] = None
  ) -> tuple[Estimate, Optional[jax.Array]]:
    """The model from the probes, and the loss at ``then``'s point (or None)."""
    scales = np.asarray(self.scales)
    k = line.layout.num_groups
    batch_size = resolve_batch_size(self.batch_size)
    given = line.value if line.grad_at is None else None  # L(w), if known
    with_origin = given is None
    if batch_size is None:
      losses, found = _evaluation.losses_per_set(line, scales, full, with_origin)
      estimate = fitted(losses, found if with_origin else given, scales, k, full)
      return estimate, _evaluation.loss_after(line, then, estimate)

    steps = _evaluation.probe_coefficients(k, scales, full)
    if with_origin:
      steps = np.concatenate([np.zeros((1, k)), steps])
    steps = jnp.asarray(steps, line.rates.dtype)

    def estimate_from(losses: jax.Array) -> Estimate:
      origin = losses[0] if with_origin else given
      rows = losses[int(with_origin):].reshape(-1, scales.size)
      return fitted(rows, origin, scales, k, full)

    if batch_size == 1:
      pick = None if then is None else (lambda losses: then(estimate_from(losses)))
      losses, then_loss = _evaluation.losses_one_by_one(line, steps, pick)
      return estimate_from(losses), then_loss
    estimate = estimate_from(_evaluation.losses_in_chunks(line, steps, batch_size))
    return estimate, _evaluation.loss_after(line, then, estimate)

