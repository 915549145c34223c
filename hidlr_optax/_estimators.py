"""Estimating ``beta`` and ``M`` along the groups' directions.

Two estimators share one interface: given the parameters ``w``, the base
direction ``d`` and the current rates ``eta``, they return the first-order
decrease ``beta_k`` and the curvature ``M_kl`` in normalised step units (see
:mod:`hidlr_optax._fit`).

* ``"probe"`` (the paper's Algorithm 1): loss values at
  ``w - v_i eta_k d_k`` for the probe scales ``v_i``, each group's evaluated
  in one batched forward (``jax.vmap``) or all in one loop over chunks, then
  a least-squares fit per group.
* ``"jvp"``: the exact first and second directional derivatives by
  forward-over-forward differentiation (``jax.jvp`` of ``jax.jvp``); no
  finite-difference cancellation, but the loss must be twice differentiable.

Both move only the leaves of the group(s) being probed; the other leaves
enter the loss unchanged, so computations that depend on them alone are
neither batched over probes nor differentiated.

Both can also evaluate one more point chosen from the estimate (a
:data:`FollowUp`; Hi-DLR's joint check of the new rates). With chunks of one
probe, that point is the probe loop's last iteration, so the program holds a
single copy of the forward.

``value_fn`` may return the loss as a scalar or as per-example losses, a
float vector of shape ``(B,)`` whose mean is the loss. With per-example
losses, every estimate is that of the mean loss, and it also carries the
standard errors of ``beta_k`` and ``M_kk`` over the batch's examples (see
:func:`hidlr_optax._fit.per_example_standard_errors`); the loss values it
reports (``origin``, a follow-up's ``loss``) are means. The scalar path is
traced exactly as without this option.
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
    curvature: the diagonal ``M_kk``, shape ``(K,)``.
    r_squared: fit quality per group, shape ``(K,)`` (1 for ``"jvp"``).
    origin: the loss at the parameters, ``L(w)``.
    below_resolution: per group, whether its step changes the (finite) loss
      by no more than rounding (see :func:`loss_resolution`), shape
      ``(K,)``; such a group's slope and curvature are rounding noise.
    curvature_matrix: the whole ``M``, shape ``(K, K)``, when the joint
      moves of pairs of groups were estimated too (the full fit with
      ``K > 1``); ``None`` otherwise.
    slope_se: with per-example losses, the standard error of ``beta`` over
      the batch's examples, shape ``(K,)``; ``None`` for a scalar loss.
    curvature_se: likewise for ``M_kk``; ``None`` for a scalar loss.
  """

  slope: jax.Array
  curvature: jax.Array
  r_squared: jax.Array
  origin: jax.Array
  below_resolution: jax.Array
  curvature_matrix: Union[jax.Array, None]
  slope_se: Union[jax.Array, None] = None
  curvature_se: Union[jax.Array, None] = None


#: A loss change no larger than this many units in the last place of the loss
#: is taken as rounding, not as a measurement. Measured: two float32 forwards
#: of the same loss at nearby points differ from the smooth curve through
#: them by 0.5 to 1.3 ulp (standard deviation), 3.2 ulp at most, for the
#: benchmark MLP, transformer and LoRA models (tests/test_core_semantics.py
#: checks a margin of 8x over a small MLP's worst case).
RESOLUTION_ULPS = 32


def loss_resolution(origin: jax.Array, ulps: float = RESOLUTION_ULPS) -> jax.Array:
  """The smallest loss change taken as a measurement near ``L(w) = origin``.

  ``ulps`` units in the last place of ``L(w)`` in its dtype: a difference of
  two loss values below it is dominated by the rounding of the forward
  passes (their reductions round differently at every point).
  """
  return ulps * jnp.finfo(origin.dtype).eps * jnp.abs(origin)


def below_resolution(change: jax.Array, origin: jax.Array) -> jax.Array:
  """Whether a size of loss change is finite and within rounding of ``origin``."""
  return jnp.isfinite(origin) & jnp.isfinite(change) & (change <= loss_resolution(origin))



def fit_dtype(loss: jax.Array) -> jnp.dtype:
  """Fits run in float32 at least, in float64 when the loss is float64."""
  return jnp.promote_types(jnp.asarray(loss).dtype, jnp.float32)


def mean_loss(loss: jax.Array) -> jax.Array:
  """The loss itself, or the mean of per-example losses (in the fit dtype)."""
  if jnp.ndim(loss) == 0:
    return loss
  return jnp.mean(jnp.asarray(loss).astype(fit_dtype(loss)), axis=-1)


def probe_coefficients(num_groups: int, scales: np.ndarray, full: bool) -> np.ndarray:
  """Probe points in normalised units, one row per probe, shape ``(P, K)``.

  Rows: ``v_i e_k`` for every group ``k`` and scale ``v_i``, then, for the
  full fit, ``v_i (e_k + e_l)`` for every pair ``k < l``.
  """
  eye = np.eye(num_groups)
  rows = [np.kron(eye, scales[:, None])]
  if full:
    pairs = _fit.pair_indices(num_groups)
    joint = eye[pairs[:, 0]] + eye[pairs[:, 1]]
    rows.append(np.kron(joint, scales[:, None]))
  return np.concatenate(rows, axis=0)


def _set_losses_vmapped(value_fn, params, directions, layout, rates, scales, full, with_origin):
  """Losses of every probe set, each set's scales in one ``jax.vmap``.

  A set's probes move only its groups' leaves; the other leaves stay
  unbatched, so what the loss computes from them alone runs once per set.
  With ``with_origin``, the first set also evaluates scale 0, ``L(w)``, so
  that no separate forward is traced for it.

  Returns:
    ``(losses (S, n), L(w) or None)``.
  """
  sets = probe_coefficients(layout.num_groups, np.ones(1), full) != 0
  first_scales = np.concatenate([[0.0], scales]) if with_origin else scales

  def set_losses(groups: np.ndarray, v: np.ndarray) -> jax.Array:
    coeffs = jnp.where(groups, rates, 0)
    probe = lambda s: value_fn(layout.move(params, s * coeffs, directions, groups))
    return jax.vmap(probe)(jnp.asarray(v, rates.dtype))

  first = set_losses(sets[0], first_scales)
  rest = [set_losses(groups, scales) for groups in sets[1:]]
  origin = first[0] if with_origin else None
  return jnp.stack([first[-scales.size:], *rest]), origin


#: ``Estimate -> (rates, aux)``: from a fresh estimate, the rates of one more
#: point ``w - sum_k rates_k d_k`` whose loss is wanted, and anything else to
#: return with it.
FollowUp = Callable[[Estimate], tuple[jax.Array, Any]]


class FollowedUp(NamedTuple):
  """The loss at the point a :data:`FollowUp` chose from an estimate.

  Attributes:
    rates: the point's rates, shape ``(K,)``.
    aux: what the follow-up returned with them.
    loss: ``L(w - sum_k rates_k d_k)``.
  """

  rates: jax.Array
  aux: Any
  loss: jax.Array


def _every_group(layout: GroupLayout) -> np.ndarray:
  return np.ones(layout.num_groups, bool)


def follow_up_after(
    value_fn: ValueFn,
    params: Any,
    directions: Any,
    layout: GroupLayout,
    estimate: Estimate,
    follow_up: Union[FollowUp, None],
) -> Union[FollowedUp, None]:
  """Evaluates ``follow_up``'s point after the estimate (``None`` without one)."""
  if follow_up is None:
    return None
  rates, aux = follow_up(estimate)
  loss = value_fn(layout.move(params, rates, directions, _every_group(layout)))
  return FollowedUp(rates, aux, mean_loss(loss))


def _fitted(
    losses: jax.Array, origin: jax.Array, scales: np.ndarray, k: int, full: bool
) -> Estimate:
  """The estimate from the probe sets' losses ``(S, n)`` and ``L(w)``.

  With per-example losses ``(S, n, B)`` and ``L_j(w)`` of shape ``(B,)``,
  the fit is that of the mean change, with the standard errors of its
  diagonal coefficients from the per-example changes.
  """
  dtype = fit_dtype(losses)
  deltas = losses.astype(dtype) - jnp.asarray(origin, dtype)
  noise = None
  if deltas.ndim == 3:
    noise = _fit.per_example_standard_errors(deltas[:k], scales)
    deltas = jnp.mean(deltas, axis=-1)
    origin = jnp.mean(jnp.asarray(origin, dtype), axis=-1)
  diag = _fit.fit_quadratics(deltas[:k], scales)
  matrix = None
  if full and k > 1:
    joint = _fit.fit_quadratics(deltas[k:], scales)
    matrix = _fit.curvature_matrix(diag.curvature, joint.curvature, _fit.pair_indices(k))
  origin = jnp.asarray(origin, dtype)
  largest = _fit.fold_last_axis(jnp.maximum, jnp.abs(deltas[:k]))
  unresolved = below_resolution(largest, origin)
  estimate = Estimate(diag.slope, diag.curvature, diag.r_squared, origin, unresolved, matrix)
  if noise is not None:
    estimate = estimate._replace(slope_se=noise.slope, curvature_se=noise.curvature)
  return estimate


def _unread(shape: jax.ShapeDtypeStruct) -> jax.Array:
  """A loop carry's initial value that the loop overwrites before reading.

  A literal (one 1, then zeros): XLA turns a uniform constant into a
  broadcast and a ramp into an iota, each compiled as a kernel of its own
  (one more distinct fusion in the step, about 10 ms of XLA:CPU compile
  time); a constant without such a pattern is data, not a kernel.
  """
  value = np.zeros(shape.shape, shape.dtype)
  value.reshape(-1)[:1] = 1
  return jnp.asarray(value)


def _losses_one_by_one(loss_at, coeffs: jax.Array, rates: jax.Array, estimate_from, follow_up):
  """Losses at the points ``coeffs[i] * rates``, one forward at a time.

  One ``jax.lax.fori_loop`` whose body holds the only copy of the forward
  (and forms its point from the row of ``coeffs``, which fuses with the
  row's lookup). With ``follow_up``, the loop runs once more: that last
  iteration fits the losses so far and evaluates the point the follow-up
  chooses from them, inside ``jax.lax.cond``, so that this dependent forward
  is not compiled a second time.

  The losses may be per-example vectors; the loop's carry is then
  ``(n, B)``.

  Returns:
    ``(estimate_from(losses), FollowedUp or None)``.
  """
  n = coeffs.shape[0]
  point = lambda i: coeffs[i] * rates
  loss_type = jax.eval_shape(loss_at, rates)  # a point has the rates' shape and dtype
  if follow_up is None:
    body = lambda i, losses: losses.at[i].set(loss_at(point(i)))
    carry = jax.ShapeDtypeStruct((n, *loss_type.shape), loss_type.dtype)
    losses = jax.lax.fori_loop(0, n, body, _unread(carry))
    return estimate_from(losses), None

  def choose(losses: jax.Array):
    """The follow-up's point, and what the loop hands out, from the probes."""
    estimate = estimate_from(losses[:n])
    rates, aux = follow_up(estimate)
    return rates, (rates, estimate, aux)

  def body(i, carry):
    losses, found = carry
    at, found = jax.lax.cond(i == n, choose, lambda _: (point(i), found), losses)
    return losses.at[i].set(loss_at(at)), found

  losses = _unread(jax.ShapeDtypeStruct((n + 1, *loss_type.shape), loss_type.dtype))
  unset = jax.tree.map(_unread, jax.eval_shape(choose, losses)[1])
  losses, (rates, estimate, aux) = jax.lax.fori_loop(0, n + 1, body, (losses, unset))
  return estimate, FollowedUp(rates, aux, mean_loss(losses[n]))


def _probe_chunked(value_fn, params, directions, layout, rates, scales, full, batch_size,
                   origin, follow_up):
  """All probes in one loop over chunks of ``batch_size`` points.

  At most ``batch_size`` moved copies of the parameters (and, when they are
  sharded, of their gathered leaves) are alive at a time, whatever the number
  of groups. When ``origin`` is None, the loop's first point is ``w``
  itself. Chunks of 1 run in :func:`_losses_one_by_one`, with the
  follow-up's forward in the same loop; larger chunks in ``jax.lax.map``,
  followed by the follow-up's forward.
  """
  coeffs = probe_coefficients(layout.num_groups, scales, full)
  with_origin = origin is None
  if with_origin:
    coeffs = np.concatenate([np.zeros((1, layout.num_groups)), coeffs])
  coeffs = jnp.asarray(coeffs, rates.dtype)
  loss_at = lambda c: value_fn(layout.move(params, c, directions, _every_group(layout)))

  def estimate_from(losses: jax.Array) -> Estimate:
    found = losses[0] if with_origin else origin
    rows = losses[int(with_origin):].reshape(-1, scales.size, *losses.shape[1:])
    return _fitted(rows, found, scales, layout.num_groups, full)

  if batch_size == 1:
    return _losses_one_by_one(loss_at, coeffs, rates, estimate_from, follow_up)
  estimate = estimate_from(jax.lax.map(loss_at, coeffs * rates, batch_size=batch_size))
  return estimate, follow_up_after(value_fn, params, directions, layout, estimate, follow_up)


def probe_estimate(
    value_fn: ValueFn,
    params: Any,
    directions: Any,
    layout: GroupLayout,
    rates: jax.Array,
    scales: np.ndarray,
    *,
    full: bool,
    origin: Union[jax.Array, None],
    batch_size: Union[int, None],
    follow_up: Union[FollowUp, None] = None,
) -> tuple[Estimate, Union[FollowedUp, None]]:
  """Estimates the model from loss values at probe points (Algorithm 1).

  The probes come in sets, one per group (and one per pair of groups for the
  full fit). With ``batch_size=None`` each set is one ``jax.vmap`` over the
  scales that moves only the set's leaves, so whatever the loss computes from
  the other leaves alone (e.g. the layers below a head group) runs once per
  set. With an int, all probes run in one loop in chunks of that size, which
  bounds memory independently of the number of groups. ``origin`` is
  ``L(w)`` if the caller has it; ``None`` evaluates it with the probes (in
  the same batched forward). ``follow_up``, if given, picks one more point
  from the estimate; its loss comes back as a :class:`FollowedUp`.

  When ``value_fn`` returns per-example losses ``(B,)``, ``origin`` must be
  ``None`` or the per-example losses at ``w`` (each example's change is
  measured from its own ``L_j(w)``); the estimate then carries standard
  errors (see :class:`Estimate`).
  """
  batched = (value_fn, params, directions, layout, rates, scales, full)
  if batch_size is not None:
    return _probe_chunked(*batched, batch_size, origin, follow_up)
  with_origin = origin is None
  losses, found = _set_losses_vmapped(*batched, with_origin)
  estimate = _fitted(losses, found if with_origin else origin, scales, layout.num_groups, full)
  return estimate, follow_up_after(value_fn, params, directions, layout, estimate, follow_up)


def jvp_estimate(
    value_fn: ValueFn,
    params: Any,
    directions: Any,
    layout: GroupLayout,
    rates: jax.Array,
    *,
    full: bool,
) -> Estimate:
  """Estimates the model exactly by forward-over-forward differentiation.

  For groups ``(k, l)`` (``k = l`` on the diagonal), ``h(s, t) = L(w - s
  eta_k d_k - t eta_l d_l)`` is differentiated in the two scalars: ``dh/ds =
  -beta_k`` and ``d2h/ds dt = M_kl`` at 0. Only the leaves of ``k`` and ``l``
  depend on ``(s, t)``, so the other leaves carry no tangents. The origin
  ``L(w) = h(0, 0)`` comes with the first group's derivatives.

  With per-example losses ``(B,)`` the derivatives are per-example too
  (the jvp of a vector function): the estimate is their mean, with the
  standard errors of the diagonal's ``beta_k`` and ``M_kk`` over the batch.
  """
  k = layout.num_groups
  eye = np.eye(k, dtype=bool)
  pairs = np.stack([np.arange(k), np.arange(k)], axis=1)
  if full and k > 1:
    pairs = np.concatenate([pairs, _fit.pair_indices(k)], axis=0)
  zero, one = jnp.zeros((), rates.dtype), jnp.ones((), rates.dtype)

  def derivatives(i: int, j: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``dh/ds``, ``d2h/ds dt`` and ``h`` at the parameters."""
    c_i, c_j = jnp.where(eye[i], rates, 0), jnp.where(eye[j], rates, 0)
    h = lambda s, t: value_fn(layout.move(params, s * c_i + t * c_j, directions, eye[i] | eye[j]))
    along_s = lambda t: jax.jvp(lambda s: h(s, t), (zero,), (one,))[::-1]
    (first, value), (second, _) = jax.jvp(along_s, (zero,), (one,))
    return first, second, value

  first, second, values = (jnp.stack(x) for x in zip(*(derivatives(i, j) for i, j in pairs)))
  dtype = fit_dtype(first)
  noise = None
  if first.ndim == 2:  # per-example derivatives, (pairs, B)
    first, second = first.astype(dtype), second.astype(dtype)
    noise = _fit.NoiseEstimate(_fit.standard_error(first[:k]), _fit.standard_error(second[:k]))
    first, second, values = (mean_loss(x) for x in (first, second, values))
  slope = -first[:k].astype(dtype)
  second = second.astype(dtype)
  matrix = None
  if full and k > 1:
    matrix = _fit.set_off_diagonal(second[:k], second[k:], pairs[k:])
  origin = values[0].astype(dtype)
  unresolved = below_resolution(jnp.abs(slope) + 0.5 * jnp.abs(second[:k]), origin)
  estimate = Estimate(slope, second[:k], jnp.ones((k,), dtype), origin, unresolved, matrix)
  if noise is not None:
    estimate = estimate._replace(slope_se=noise.slope, curvature_se=noise.curvature)
  return estimate
