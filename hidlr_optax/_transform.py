"""Hi-DLR as an optax gradient transformation.

Reference: Xu, Bu, Zhang & Barnett, "A Hessian-informed hyperparameter
optimization for differential learning rate" (Hi-DLR). ``K = 1`` is GeN
(Bu & Xu, "Gradient descent with generalized Newton's method",
arXiv:2407.02772), which the Hi-DLR paper calls Hi-ULR.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from hidlr_optax import _guard
from hidlr_optax._config import DEFAULTS, STATIC_ARGS, Config
from hidlr_optax._grouping import Label, LabelsOrFn, build_layout, initial_rates
from hidlr_optax._refresh import refresh as refreshed_state
from hidlr_optax._state import GroupFit, PerGroup, ScaleByHiDLRState
from hidlr_optax._types import Estimator, Scalar

__all__ = ["STATIC_ARGS", "gen", "hidlr", "scale_by_hidlr"]

LearningRate = Union[Scalar, Mapping[Label, Scalar]]
Schedule = Union[Scalar, optax.Schedule, None]
EstimatorLike = Union[str, Estimator]


def _rate_dtype(params: Any) -> jnp.dtype:
  """float32, or float64 when the parameters are float64."""
  return jnp.promote_types(optax.tree.dtype(params, "highest"), jnp.float32)


def _init_state(config: Config, param_labels: LabelsOrFn, params: Any) -> ScaleByHiDLRState:
  layout = build_layout(param_labels, params)
  dtype = _rate_dtype(params)
  k = layout.num_groups
  per_group = lambda x: PerGroup(layout.labels, x)
  rates = jnp.asarray(initial_rates(config.learning_rate, layout), dtype)
  nan = jnp.full((k,), jnp.nan, dtype)
  no, zeros = jnp.zeros((k,), bool), jnp.zeros((k,), jnp.int32)
  return ScaleByHiDLRState(
      count=jnp.zeros((), jnp.int32),
      learning_rates=per_group(rates),
      fits=per_group(GroupFit(nan, nan, nan, no, no, nan, zeros)),
      num_refreshes=jnp.zeros((), jnp.int32),
      num_accepted=per_group(zeros),
      num_unresolved=per_group(zeros),
      joint_factor=jnp.ones((), dtype),
      loss=jnp.full((), jnp.nan, dtype),
      first_loss=jnp.full((), jnp.nan, dtype),
      previous_direction=jax.tree.map(jnp.zeros_like, params) if config.lagged else None,
      guard=_guard.initial(rates) if config.guarded else None,
  )


def _check_value_fn(value_fn, params) -> None:
  """Checks at trace time that ``value_fn(params)`` is a float scalar."""
  try:
    out = jax.eval_shape(value_fn, params)
  except TypeError as error:
    raise TypeError(
        "scale_by_hidlr: value_fn(params) failed. value_fn must take the"
        " parameters that tx.update receives as `params` (the pytree of"
        " arrays being optimised; with flax.nnx.Optimizer an nnx.State, so"
        " merge it back into a model inside value_fn:"
        " `lambda p: loss_fn(nnx.merge(graphdef, p, rest), batch)`), not the"
        f" model. The error was: {error}"
    ) from error
  if not (
      isinstance(out, jax.ShapeDtypeStruct) and out.shape == ()
      and jnp.issubdtype(out.dtype, jnp.floating)
  ):
    raise TypeError(
        "scale_by_hidlr: value_fn(params) must return the loss as a scalar of"
        f" a float dtype, got {out!r} (return only the loss, not (loss, aux))"
    )


def scale_by_hidlr(
    learning_rate: LearningRate = DEFAULTS.learning_rate,
    param_labels: LabelsOrFn = None,
    *,
    update_every: int = DEFAULTS.update_every,
    smoothing: Optional[Scalar] = None,
    min_r2: Scalar = DEFAULTS.min_r2,
    fit: str = DEFAULTS.fit,
    estimator: EstimatorLike = "probe",
    accept: str = DEFAULTS.accept,
    max_growth: Optional[Scalar] = DEFAULTS.max_growth,
    min_learning_rate: Scalar = DEFAULTS.min_learning_rate,
    max_learning_rate: Optional[Scalar] = DEFAULTS.max_learning_rate,
    joint_check: bool = DEFAULTS.joint_check,
    schedule: Schedule = DEFAULTS.schedule,
    probe_direction: str = DEFAULTS.probe_direction,
    loss_guard: Optional[float] = DEFAULTS.loss_guard,
    total_steps: Optional[int] = DEFAULTS.total_steps,
) -> optax.GradientTransformationExtraArgs:
  r"""Scales the base direction by per-group learning rates set by Hi-DLR.

  Given the base optimizer's direction ``d`` as ``updates`` (e.g. the output
  of ``optax.scale_by_adam()``), returns ``-eta_k d_k`` for every group ``k``
  of ``param_labels``. Every ``update_every`` steps (step 0 included) the
  rates are refreshed from the quadratic model of the loss along the groups'
  steps,

  .. math::

    L(w - \sum_k \eta_k d_k) - L(w) \approx -\eta^\top b
      + \tfrac12 \eta^\top A \eta, \quad
    b_k = G_k^\top d_k, \quad A_{kl} = d_k^\top H_{kl} d_l,

  each accepted group moving towards :math:`\eta^*_k = b_k / A_{kk}` (or
  :math:`A^{-1} b` with ``fit="full"``):

  .. math::

    \eta_k \leftarrow \gamma\,\eta_k + (1-\gamma)\,
      \mathrm{clip}(\eta^*_k, \eta_k / g, \eta_k g),

  cut at once when :math:`\eta_k > 2\eta^*_k`. With ``K > 1`` one more
  forward checks the groups' combined step. ``K = 1`` is GeN. The
  acceptance rule, the cut, the joint check and the measurements behind the
  defaults are on the docs' method page.

  Args:
    learning_rate: initial rate of every group, or ``{label: initial rate}``.
    param_labels: the groups, in any form ``optax.multi_transform`` accepts
      (a label pytree, a prefix of it, or a callable); ``None`` for one group.
    update_every: the refresh period ``Phi``, in steps.
    smoothing: ``gamma``, the weight of the old rate in the moving average;
      ``None``: 0.9 (GeN's), or 0.7 with ``total_steps``.
    min_r2: smallest ``R^2`` of a group's fit for it to be accepted.
    fit: ``"diagonal"`` (``b_k / A_kk``) or ``"full"`` (``A^{-1} b``, with
      ``K(K-1)/2`` more probe sets).
    estimator: ``"probe"`` (:class:`~hidlr_optax.ProbeEstimator`, the paper's
      probes), ``"jvp"`` (:class:`~hidlr_optax.JvpEstimator`), or an object.
    accept: ``"group"``: each passing group updates alone; ``"all"``: the
      paper's rule, every group passes or none updates.
    max_growth: bound ``g`` on the factor between ``eta*`` and the current
      rate; ``None`` for none.
    min_learning_rate: lower bound of every rate.
    max_learning_rate: upper bound of every rate, or ``None``.
    joint_check: with ``K > 1``, check the combined step (one more forward
      per refresh) and shrink every rate when it overshoots.
    schedule: a multiplier of the applied step, ``-schedule(t) eta_k d_k``
      (an optax schedule or a number); the fits and rates stay un-annealed.
    probe_direction: ``"current"`` (the paper's rule) fits this step;
      ``"previous"`` fits the previous step from where it started, unbiased
      on any probe batch, the gradient's own included.
    loss_guard: when the refresh losses' moving average rises by this
      fraction, cap the rates of the groups that made it climb; and hold any
      climb until the loss makes a new low (for own-batch probes). ``None``: no guard.
    total_steps: the run's length: a linear decay of the applied step to 0
      over it (in place of ``schedule``); ``loss_guard=0.5`` and
      ``smoothing=0.7`` unless given.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose ``update`` takes
    ``(updates, state, params, *, value_fn, value=None, grad=None,
    refresh=None)``: ``value_fn`` is ``params -> scalar loss``, called only
    on refresh steps; ``value`` is ``value_fn(params)`` if the caller has it
    (one forward fewer); ``grad`` is its gradient (for estimators that take
    gradients); ``refresh`` is ``None`` (every ``update_every`` steps, by a
    ``jax.lax.cond`` on the count), a Python bool (decided at trace time: a
    step compiled with ``False`` holds no probe code) or a traced bool.

  Raises:
    ValueError: for a bad hyperparameter (at construction), labels that do
      not match the parameters (at ``init``), or a missing ``params`` or
      ``value_fn`` (at ``update``).

  Example:
    >>> import jax, jax.numpy as jnp, optax, hidlr_optax
    >>> params = {'x': jnp.array(50.0), 'y': jnp.array(1.0)}
    >>> loss = lambda p: p['x'] ** 2 + 100 * p['y'] ** 2
    >>> tx = optax.chain(optax.identity(), hidlr_optax.scale_by_hidlr(
    ...     1e-3, {'x': 'x', 'y': 'y'}, smoothing=0.0, max_growth=None,
    ...     estimator='jvp'))
    >>> state = tx.init(params)
    >>> grads = jax.grad(loss)(params)
    >>> updates, state = tx.update(grads, state, params, value_fn=loss)
    >>> params = optax.apply_updates(params, updates)
    >>> {k: round(float(v), 6) for k, v in hidlr_optax.learning_rates(state).items()}
    {'x': 0.5, 'y': 0.005}
    >>> print(f"{float(loss(params)):.1e}")  # one Newton step to the minimum
    0.0e+00

  References:
    Xu, Bu, Zhang & Barnett, *A Hessian-informed hyperparameter optimization
    for differential learning rate*, 2025.
    Bu & Xu, *Gradient descent with generalized Newton's method*,
    arXiv:2407.02772, 2024.
  """
  config = Config(
      learning_rate=learning_rate, update_every=update_every, smoothing=smoothing,
      min_r2=min_r2, fit=fit, estimator=estimator, accept=accept, max_growth=max_growth,
      min_learning_rate=min_learning_rate, max_learning_rate=max_learning_rate,
      joint_check=joint_check, schedule=schedule, probe_direction=probe_direction,
      loss_guard=loss_guard, total_steps=total_steps,
  )

  def init_fn(params: optax.Params) -> ScaleByHiDLRState:
    return _init_state(config, param_labels, params)

  def update_fn(
      updates: optax.Updates,
      state: ScaleByHiDLRState,
      params: Optional[optax.Params] = None,
      *,
      value_fn=None,
      value: Optional[jax.Array] = None,
      grad: Any = None,
      refresh: Union[bool, jax.Array, None] = None,
      **extra_args,
  ) -> tuple[optax.Updates, ScaleByHiDLRState]:
    del extra_args
    if params is None:
      raise ValueError(
          "scale_by_hidlr: update needs `params` (the current parameters) to"
          " probe the loss; call tx.update(updates, state, params, value_fn=...)"
      )
    if value_fn is None:
      raise ValueError(
          "scale_by_hidlr: update needs the keyword argument `value_fn`, a"
          " function params -> scalar loss (build it inside your training"
          " step, e.g. value_fn=lambda p: loss_fn(p, batch))"
      )
    layout = build_layout(param_labels, params)
    if tuple(state.learning_rates) != layout.labels:
      raise ValueError(
          f"scale_by_hidlr: the state has groups {list(state.learning_rates)}"
          f" but the labels of these params give {list(layout.labels)}"
      )
    if refresh is None:
      refresh = state.count % config.update_every == 0
    if not (isinstance(refresh, (bool, np.bool_)) and not refresh):
      _check_value_fn(value_fn, params)
      if value is not None and jnp.shape(value) != ():
        raise TypeError(
            "scale_by_hidlr: `value` must be the scalar value_fn(params), got shape"
            f" {jnp.shape(value)}")
      if grad is not None and value is None:
        raise ValueError("scale_by_hidlr: `grad=` needs `value=` too, value_fn(params)")
    new = lambda s: refreshed_state(config, layout, s, updates, params, value_fn, value, grad)
    if isinstance(refresh, (bool, np.bool_)):
      state = new(state) if refresh else state
    else:
      state = jax.lax.cond(refresh, new, lambda s: s, state)

    rates = state.learning_rates.stacked
    multiplier = config.multiplier(state.count)
    if multiplier is not None:
      rates = rates * jnp.asarray(multiplier, rates.dtype)
    if config.lagged:
      state = state._replace(previous_direction=optax.tree.cast_like(updates, state.previous_direction))
    updates = optax.tree.cast_like(layout.scale(-rates, updates), params)
    return updates, state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def hidlr(
    base: optax.GradientTransformation,
    learning_rate: LearningRate = DEFAULTS.learning_rate,
    param_labels: LabelsOrFn = None,
    *,
    update_every: int = DEFAULTS.update_every,
    smoothing: Optional[Scalar] = None,
    min_r2: Scalar = DEFAULTS.min_r2,
    fit: str = DEFAULTS.fit,
    estimator: EstimatorLike = "probe",
    accept: str = DEFAULTS.accept,
    max_growth: Optional[Scalar] = DEFAULTS.max_growth,
    min_learning_rate: Scalar = DEFAULTS.min_learning_rate,
    max_learning_rate: Optional[Scalar] = DEFAULTS.max_learning_rate,
    joint_check: bool = DEFAULTS.joint_check,
    schedule: Schedule = DEFAULTS.schedule,
    probe_direction: str = DEFAULTS.probe_direction,
    loss_guard: Optional[float] = DEFAULTS.loss_guard,
    total_steps: Optional[int] = DEFAULTS.total_steps,
) -> optax.GradientTransformationExtraArgs:
  """Hi-DLR over a base optimizer: ``optax.chain(base, scale_by_hidlr(...))``.

  Args:
    base: the *direction* (not negated, not scaled by a rate): e.g.
      ``optax.scale_by_adam()``, ``optax.identity()`` for SGD, or for AdamW
      ``optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-2))``.
    learning_rate: initial rate of every group, or ``{label: rate}``.
    param_labels: the groups (see :func:`scale_by_hidlr`).
    update_every: as in :func:`scale_by_hidlr`.
    smoothing: as in :func:`scale_by_hidlr`.
    min_r2: as in :func:`scale_by_hidlr`.
    fit: as in :func:`scale_by_hidlr`.
    estimator: as in :func:`scale_by_hidlr`.
    accept: as in :func:`scale_by_hidlr`.
    max_growth: as in :func:`scale_by_hidlr`.
    min_learning_rate: as in :func:`scale_by_hidlr`.
    max_learning_rate: as in :func:`scale_by_hidlr`.
    joint_check: as in :func:`scale_by_hidlr`.
    schedule: as in :func:`scale_by_hidlr`.
    probe_direction: as in :func:`scale_by_hidlr`.
    loss_guard: as in :func:`scale_by_hidlr`.
    total_steps: as in :func:`scale_by_hidlr`.

  Returns:
    The chained transformation; ``update`` needs ``value_fn=``.

  Example:
    >>> import jax.numpy as jnp, optax, hidlr_optax
    >>> params = {'w': jnp.ones((3, 2)), 'b': jnp.zeros(2)}
    >>> tx = hidlr_optax.hidlr(optax.scale_by_adam(), 1e-3, {'w': 'w', 'b': 'b'})
    >>> sorted(hidlr_optax.learning_rates(tx.init(params)))
    ['b', 'w']
  """
  return optax.chain(base, scale_by_hidlr(
      learning_rate, param_labels, update_every=update_every, smoothing=smoothing,
      min_r2=min_r2, fit=fit, estimator=estimator, accept=accept, max_growth=max_growth,
      min_learning_rate=min_learning_rate, max_learning_rate=max_learning_rate,
      joint_check=joint_check, schedule=schedule, probe_direction=probe_direction,
      loss_guard=loss_guard, total_steps=total_steps,
  ))


def gen(
    base: optax.GradientTransformation,
    learning_rate: Scalar = DEFAULTS.learning_rate,
    *,
    param_labels: None = None,
    update_every: int = DEFAULTS.update_every,
    smoothing: Optional[Scalar] = None,
    min_r2: Scalar = DEFAULTS.min_r2,
    estimator: EstimatorLike = "probe",
    max_growth: Optional[Scalar] = DEFAULTS.max_growth,
    min_learning_rate: Scalar = DEFAULTS.min_learning_rate,
    max_learning_rate: Optional[Scalar] = DEFAULTS.max_learning_rate,
    schedule: Schedule = DEFAULTS.schedule,
    probe_direction: str = DEFAULTS.probe_direction,
    loss_guard: Optional[float] = DEFAULTS.loss_guard,
    total_steps: Optional[int] = DEFAULTS.total_steps,
) -> optax.GradientTransformationExtraArgs:
  """GeN (Hi-ULR): one learning rate for all parameters, set by Hi-DLR's fit.

  Bu & Xu, *Gradient descent with generalized Newton's method*,
  arXiv:2407.02772; :func:`hidlr` with one group.

  Args:
    base: the direction transformation, as in :func:`hidlr`.
    learning_rate: the initial learning rate.
    param_labels: must be ``None`` (use :func:`hidlr` for groups); listed so
      that ``optax.inject_hyperparams(gen, static_args=STATIC_ARGS)`` works.
    update_every: as in :func:`scale_by_hidlr`.
    smoothing: as in :func:`scale_by_hidlr`.
    min_r2: as in :func:`scale_by_hidlr`.
    estimator: as in :func:`scale_by_hidlr`.
    max_growth: as in :func:`scale_by_hidlr`.
    min_learning_rate: as in :func:`scale_by_hidlr`.
    max_learning_rate: as in :func:`scale_by_hidlr`.
    schedule: as in :func:`scale_by_hidlr`.
    probe_direction: as in :func:`scale_by_hidlr`.
    loss_guard: as in :func:`scale_by_hidlr`.
    total_steps: as in :func:`scale_by_hidlr`.

  Returns:
    The chained transformation; ``update`` needs ``value_fn=``.

  Example:
    >>> import jax.numpy as jnp, optax, hidlr_optax
    >>> tx = hidlr_optax.gen(optax.scale_by_adam(), 1e-3)
    >>> list(hidlr_optax.learning_rates(tx.init(jnp.zeros(4))))
    ['all']
  """
  if param_labels is not None:
    raise TypeError("gen() has one group; use hidlr() for param_labels")
  return hidlr(
      base, learning_rate, None, update_every=update_every, smoothing=smoothing,
      min_r2=min_r2, estimator=estimator, max_growth=max_growth,
      min_learning_rate=min_learning_rate, max_learning_rate=max_learning_rate,
      schedule=schedule, probe_direction=probe_direction, loss_guard=loss_guard,
      total_steps=total_steps,
  )
